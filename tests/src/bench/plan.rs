//! What one run measures, in order:
//!
//! 1. the database ceiling at 1400 B, at the shim's default MTU and at the jumbo MTU;
//! 2. the tunnel at the shim's default MTU: idle ping, TCP (with ping and CPU sampling
//!    alongside), UDP 1400 B and 64 B; log check;
//! 3. the tunnel at the jumbo MTU: TCP (same); log check;
//! 4. the direct veth pair: the same as 2 and 3.
//!
//! Results are flat `metric name → value` maps (e.g. `tunnel.tcp_default.mbit`), so the
//! median over runs is per key. A failing measurement is recorded and the run goes on;
//! only an interruption stops it.

use super::ceiling;
use super::cpu::{Probe, Usage};
use super::logcheck::Verdict;
use super::measure::{self, Hosts, Iperf, Pinger};
use super::topology::{foreign_namespaces, Direct, Tunnel};
use super::{interrupted, sleep, Result, Scratch};
use pgvpn_core::limits::DEFAULT_MTU;
use std::collections::BTreeMap;
use std::time::Duration;

pub type Metrics = BTreeMap<String, f64>;

#[derive(Clone, Debug)]
pub struct Settings {
    pub runs: usize,
    /// TCP test and ceiling duration.
    pub seconds: u64,
    pub udp_seconds: u64,
    pub jumbo_mtu: u32,
    /// Idle ping: this many at 10 ms intervals.
    pub ping_count: u32,
}

/// Packet size of the small database ceiling (the jumbo one uses the jumbo MTU).
pub const CEILING_SIZE: usize = 1400;
pub const UDP_SIZES: [usize; 2] = [1400, 64];
/// The offered rate of the paced 64-byte UDP run (the target is 100k delivered).
pub const UDP_PACED_PPS: u64 = 100_000;
/// Ping interval while TCP runs.
const LOADED_PING_INTERVAL: f64 = 0.05;

#[derive(Debug, Default)]
pub struct RunResult {
    pub metrics: Metrics,
    pub checks: Vec<(String, Verdict)>,
    pub errors: Vec<String>,
    /// Database CPU seconds by process during each tunnel TCP test.
    pub db_cpu: BTreeMap<String, BTreeMap<String, f64>>,
    /// The shim's default MTU as seen on the tun device.
    pub default_mtu: Option<u32>,
    /// Other harness namespaces seen during the run (someone else was using the box).
    pub foreign: std::collections::BTreeSet<String>,
}

impl RunResult {
    fn put(&mut self, key: impl Into<String>, v: f64) {
        self.metrics.insert(key.into(), v);
    }

    /// Run one measurement; a failure is recorded (and the run goes on) unless it was an
    /// interruption.
    fn attempt<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        match f() {
            Ok(v) => Ok(Some(v)),
            Err(e) if interrupted() => Err(e),
            Err(e) => {
                eprintln!("[bench] {what}: FAILED: {e}");
                self.errors.push(format!("{what}: {e}"));
                Ok(None)
            }
        }
    }
}

/// Announce a phase, and note who else is using the box right now.
fn progress(r: &mut RunResult, run: usize, what: &str) {
    eprintln!("[bench] run {run}: {what}");
    let others = foreign_namespaces();
    if !others.is_empty() {
        eprintln!(
            "[bench]   note: other harness namespaces exist ({}): figures may be noisy",
            others.join(" ")
        );
    }
    r.foreign.extend(others);
}

/// One complete run. Err only when interrupted.
pub fn run(
    n: usize,
    s: &Settings,
    tunnel: &mut Tunnel,
    direct: &Direct,
    scratch: &Scratch,
) -> Result<RunResult> {
    let mut r = RunResult::default();
    let secs = s.seconds as f64;

    let default_mtu = DEFAULT_MTU as usize;
    let sizes = [
        ("1400B", CEILING_SIZE),
        ("default", default_mtu),
        ("jumbo", s.jumbo_mtu as usize),
    ];
    for (name, size) in sizes {
        progress(
            &mut r,
            n,
            &format!("database ceiling, {size}-byte packets, {secs} s send + up to {secs} s recv"),
        );
        if let Some(c) = r.attempt(&format!("ceiling {size} B"), || {
            ceiling::measure(&tunnel.cluster, size, secs)
        })? {
            eprintln!(
                "[bench]   send {:.0} pkt/s ({:.0} Mbit/s), recv {:.0} pkt/s",
                c.send_pps(),
                c.send_mbit(),
                c.recv_pps()
            );
            r.put(format!("ceiling.{name}.send_pps"), c.send_pps());
            r.put(format!("ceiling.{name}.send_mbit"), c.send_mbit());
            r.put(format!("ceiling.{name}.recv_pps"), c.recv_pps());
        }
    }

    for (which, mtu) in [("default", None), ("jumbo", Some(s.jumbo_mtu))] {
        let mtu = tunnel.start(mtu);
        if which == "default" {
            r.default_mtu = Some(mtu);
        }
        progress(&mut r, n, &format!("tunnel, MTU {mtu}"));
        let probe = Probe {
            postmaster: tunnel.postmaster_pid(),
            shims: tunnel.shim_pids(),
        };
        let hosts = tunnel.hosts(scratch);
        suite(&mut r, s, "tunnel", which, &hosts, Some(&probe), &|| {
            tunnel.settle()
        })?;
        match r.attempt(
            &format!("tunnel MTU {mtu}: stop shims and check the log"),
            || tunnel.stop(),
        )? {
            Some(v) => {
                eprintln!("[bench]   log check: {}", v.text);
                r.checks.push((format!("MTU {mtu}"), v));
            }
            None => r.checks.push((
                format!("MTU {mtu}"),
                Verdict {
                    ok: false,
                    text: "not done (see errors)".into(),
                    json: serde_json::Value::Null,
                },
            )),
        }
    }

    let default_mtu = r.default_mtu.unwrap_or(DEFAULT_MTU);
    for (which, mtu) in [("default", default_mtu), ("jumbo", s.jumbo_mtu)] {
        progress(&mut r, n, &format!("direct veth, MTU {mtu}"));
        direct.set_mtu(mtu);
        let quiet = || sleep(Duration::from_millis(300));
        suite(
            &mut r,
            s,
            "direct",
            which,
            &direct.hosts(scratch),
            None,
            &quiet,
        )?;
    }

    // TCP as a share of the database ceiling measured in this run.
    for (which, ceil) in [("default", "default"), ("jumbo", "jumbo")] {
        let tcp = r.metrics.get(&format!("tunnel.tcp_{which}.mbit")).copied();
        let top = r.metrics.get(&format!("ceiling.{ceil}.send_mbit")).copied();
        if let (Some(t), Some(c)) = (tcp, top) {
            r.put(format!("tunnel.tcp_{which}.pct_of_ceiling"), 100.0 * t / c);
        }
    }
    Ok(r)
}

/// The measurements on one link at one MTU; `full` adds idle ping and UDP (default MTU).
fn suite(
    r: &mut RunResult,
    s: &Settings,
    link: &str,
    which: &str,
    h: &Hosts,
    probe: Option<&Probe>,
    settle: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let full = which == "default";
    if full {
        if let Some(p) = r.attempt(&format!("{link} idle ping"), || {
            measure::ping(h, s.ping_count, 0.01)
        })? {
            eprintln!(
                "[bench]   idle ping p50 {:.3} ms, p99 {:.3} ms",
                p.p50_ms, p.p99_ms
            );
            r.put(format!("{link}.ping_idle.p50_ms"), p.p50_ms);
            r.put(format!("{link}.ping_idle.p99_ms"), p.p99_ms);
            r.put(format!("{link}.ping_idle.loss_pct"), p.loss_pct());
        }
        r.attempt(&format!("{link} settle"), settle)?;
    }

    let key = format!("{link}.tcp_{which}");
    if let Some((tcp, rtt, cpu)) = r.attempt(&format!("{link} TCP ({which} MTU)"), || {
        tcp_under_load(h, s.seconds, probe)
    })? {
        eprintln!(
            "[bench]   TCP {:.0} Mbit/s ({} retransmits)",
            tcp.mbit, tcp.retransmits
        );
        r.put(format!("{key}.mbit"), tcp.mbit);
        r.put(format!("{key}.retransmits"), tcp.retransmits as f64);
        if let Some(p) = rtt {
            r.put(format!("{key}.ping_p50_ms"), p.p50_ms);
            r.put(format!("{key}.ping_p99_ms"), p.p99_ms);
        }
        if let Some(u) = cpu {
            let gb = tcp.bytes as f64 / 1e9;
            eprintln!(
                "[bench]   CPU s/GB: db {:.1}, shim A {:.1}, shim B {:.1}",
                u.db / gb,
                u.shims[0] / gb,
                u.shims[1] / gb
            );
            r.put(format!("{key}.cpu_db_s_per_gb"), u.db / gb);
            r.put(format!("{key}.cpu_shim_a_s_per_gb"), u.shims[0] / gb);
            r.put(format!("{key}.cpu_shim_b_s_per_gb"), u.shims[1] / gb);
            r.put(format!("{key}.cpu_db_cores"), u.db / tcp.seconds);
            r.db_cpu.insert(which.to_string(), u.db_by_process);
        }
    }
    r.attempt(&format!("{link} settle"), settle)?;

    if full {
        // Unlimited (the sender itself then takes a core of the two), and paced at the
        // 100k packets/s target for 64-byte datagrams.
        let cases = UDP_SIZES
            .iter()
            .map(|&size| (size, None, format!("udp{size}")));
        let paced = std::iter::once((64, Some(UDP_PACED_PPS), "udp64_paced".to_string()));
        for (size, pps, key) in cases.chain(paced) {
            let what = format!("{link} UDP {size} B");
            if let Some(u) = r.attempt(&what, || measure::udp(h, size, pps, s.udp_seconds))? {
                eprintln!(
                    "[bench]   UDP {size} B ({}): {:.0} pkt/s delivered, {:.1}% lost",
                    pps.map_or("unlimited".to_string(), |p| format!("{p} pkt/s offered")),
                    u.pps,
                    u.loss_pct
                );
                r.put(format!("{link}.{key}.pps"), u.pps);
                r.put(format!("{link}.{key}.loss_pct"), u.loss_pct);
            }
            r.attempt(&format!("{link} settle"), settle)?;
        }
    }
    Ok(())
}

/// One TCP stream for `secs`, with ping alongside (every 50 ms) and, if given, the CPU
/// used while the client ran.
fn tcp_under_load(
    h: &Hosts,
    secs: u64,
    probe: Option<&Probe>,
) -> Result<(measure::Tcp, Option<measure::Rtt>, Option<Usage>)> {
    let iperf = Iperf::tcp(h, secs)?;
    // Sampled right after the client started: its connection setup is a few packets.
    let before = probe.map(Probe::sample);
    let count = ((secs as f64 - 1.0).max(1.0) / LOADED_PING_INTERVAL) as u32;
    let pinger = Pinger::start(h, count, LOADED_PING_INTERVAL);
    let json = iperf.finish();
    let usage = probe.zip(before).map(|(p, b)| p.usage(&b, &p.sample()));
    let rtt = pinger.finish();
    let tcp = measure::parse_tcp(&json?)?;
    Ok((tcp, rtt.ok(), usage))
}
