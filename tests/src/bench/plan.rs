//! What one run measures, in order:
//!
//! 1. the database ceiling at 64 B, 1400 B, the shim's default MTU (8000) and the jumbo
//!    MTU, each of 64, 1400 and 8000 B followed by COPY of the same rows into a copy of
//!    a chunk (`copyref`);
//! 2. `send` with 2 and with 2,002 peers registered (`peerscale`);
//! 3. the tunnel at the shim's default MTU: the floor (`floor`), idle ping, TCP (with
//!    ping and CPU sampling alongside), UDP 1400 B and 64 B; log check;
//! 4. the tunnel at the jumbo MTU: TCP (same); log check;
//! 5. the direct veth pair: the same as 3 and 4;
//! 6. the ratios the targets are stated in ([`derived`]).
//!
//! Results are flat `metric name → value` maps (e.g. `tunnel.tcp_default.mbit`), so the
//! median over runs is per key. A failing measurement is recorded and the run goes on;
//! only an interruption stops it.

use super::cpu::{Probe, Usage};
use super::logcheck::Verdict;
use super::measure::{self, Hosts, Iperf, Pinger};
use super::topology::DB;
use super::topology::{foreign_namespaces, Direct, Transport, Tunnel};
use super::{ceiling, copyref, floor, peerscale};
use super::{interrupted, sleep, Result, Scratch};
use pgvpn_core::limits::DEFAULT_MTU;
use pgvpn_tests::db_error;
use std::collections::BTreeMap;
use std::time::Duration;

pub type Metrics = BTreeMap<String, f64>;

/// The metrics prefix of the tunnel over TCP + TLS (idle ping and TCP only).
pub const TLS_LINK: &str = "tunnel_tls";

#[derive(Clone, Debug)]
pub struct Settings {
    pub runs: usize,
    /// TCP test and ceiling duration.
    pub seconds: u64,
    pub udp_seconds: u64,
    pub jumbo_mtu: u32,
    /// Idle ping: this many at 10 ms intervals.
    pub ping_count: u32,
    /// The older version to compare the send ceiling with (`--baseline TAG`, …).
    pub baseline: Option<super::baseline::Source>,
    /// Only the before/after send ceilings (`--baseline-only`), `runs` rounds of them.
    pub baseline_only: bool,
    /// The after side of `--baseline-only` (`--after REV`; HEAD when None).
    pub after: Option<String>,
    /// Only the send ceiling without each of the log's audit indexes (`--index-costs`).
    pub index_costs: bool,
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

    ceilings_and_copy(&mut r, n, s, tunnel)?;
    peers(&mut r, n, s, tunnel)?;

    // The same tunnel three times: unix socket at the default and the jumbo MTU, then the
    // shims over TCP + TLS at the default MTU (its cost: TCP and ping against the first).
    let sessions = [
        ("tunnel", "default", None, Transport::Unix),
        ("tunnel", "jumbo", Some(s.jumbo_mtu), Transport::Unix),
        (TLS_LINK, "default", None, Transport::Tls),
    ];
    for (link, which, mtu, transport) in sessions {
        let mtu = tunnel.start_with(mtu, transport);
        if transport == Transport::Tls {
            match tunnel.tls_sessions() {
                Ok((tls, all)) if tls == all && all >= 4 => {}
                Ok((tls, all)) => {
                    r.errors.push(format!(
                        "TLS session: {tls} of the shims' {all} sessions use TLS"
                    ));
                }
                Err(e) => r.errors.push(format!("TLS session: {e}")),
            }
        }
        if link == "tunnel" && which == "default" {
            r.default_mtu = Some(mtu);
            // The floor under the idle ping, with the shims idle as during that ping.
            progress(&mut r, n, "the floor: one-row durable commits");
            if let Some(f) = r.attempt("floor", || {
                floor::measure(&tunnel.cluster, DB, s.ping_count as usize)
            })? {
                eprintln!(
                    "[bench]   commit p50 {:.3} ms, p99 {:.3} ms: floor {:.3} ms",
                    f.commit_p50_ms,
                    f.commit_p99_ms,
                    f.floor_ms()
                );
                r.put("floor.commit_p50_ms", f.commit_p50_ms);
                r.put("floor.commit_p99_ms", f.commit_p99_ms);
                r.put("floor.ms", f.floor_ms());
            }
        }
        let over = if transport == Transport::Tls {
            ", over TLS"
        } else {
            ""
        };
        progress(&mut r, n, &format!("tunnel, MTU {mtu}{over}"));
        let probe = Probe {
            postmaster: tunnel.postmaster_pid(),
            shims: tunnel.shim_pids(),
        };
        let hosts = tunnel.hosts(scratch);
        suite(&mut r, s, link, which, &hosts, Some(&probe), &|| {
            tunnel.settle()
        })?;
        match r.attempt(
            &format!("tunnel MTU {mtu}{over}: stop shims and check the log"),
            || tunnel.stop(),
        )? {
            Some(v) => {
                eprintln!("[bench]   log check: {}", v.text);
                r.checks.push((format!("MTU {mtu}{over}"), v));
            }
            None => r.checks.push((
                format!("MTU {mtu}{over}"),
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

    derived(&mut r);
    Ok(r)
}

/// The ratios of one run that the targets are stated in.
fn derived(r: &mut RunResult) {
    let m = |k: &str| r.metrics.get(k).copied();
    let mut out: Vec<(String, f64)> = Vec::new();
    // TCP as a share of the database ceiling at its own packet size, and of the 1400 B one.
    for which in ["default", "jumbo"] {
        let tcp = m(&format!("tunnel.tcp_{which}.mbit"));
        for (ceil, key) in [(which, "pct_of_ceiling"), ("1400B", "pct_of_1400_ceiling")] {
            if let (Some(t), Some(c)) = (tcp, m(&format!("ceiling.{ceil}.send_mbit"))) {
                out.push((format!("tunnel.tcp_{which}.{key}"), 100.0 * t / c));
            }
        }
    }
    // 64-byte UDP delivered (the better of flooding and the paced offer) vs the 64 B ceiling.
    let udp64 = [m("tunnel.udp64.pps"), m("tunnel.udp64_paced.pps")]
        .into_iter()
        .flatten()
        .reduce(f64::max);
    if let (Some(u), Some(c)) = (udp64, m("ceiling.64B.send_pps")) {
        out.push(("tunnel.udp64_best.pps".into(), u));
        out.push(("tunnel.udp64_best.pct_of_ceiling".into(), 100.0 * u / c));
    }
    // send's rows/s as a share of COPY's.
    for size in ceiling::COMPARED_SIZES {
        let send = ceiling_key(size).and_then(|k| m(&format!("ceiling.{k}.send_pps")));
        if let (Some(sp), Some(cp)) = (send, m(&format!("copy.{size}B.rows_per_s"))) {
            out.push((format!("copy.{size}B.send_pct"), 100.0 * sp / cp));
        }
    }
    if let (Some(p), Some(f)) = (m("tunnel.ping_idle.p50_ms"), m("floor.ms")) {
        out.push(("tunnel.ping_idle.per_floor".into(), p / f));
    }
    if let (Some(p99), Some(idle)) = (
        m("tunnel.tcp_default.ping_p99_ms"),
        m("tunnel.ping_idle.p50_ms"),
    ) {
        out.push((
            "tunnel.tcp_default.ping_p99_per_idle_p50".into(),
            p99 / idle,
        ));
    }
    for (k, v) in out {
        r.put(k, v);
    }
}

/// Metric names of the ceiling sizes: `64B`, `1400B`, `default` (the shim's default
/// MTU), `8000B` (only if that is not the default), `jumbo`.
pub fn ceiling_sizes(jumbo: u32) -> Vec<(String, usize)> {
    let mut v = vec![
        ("64B".to_string(), 64),
        ("1400B".to_string(), CEILING_SIZE),
        ("default".to_string(), DEFAULT_MTU as usize),
    ];
    if DEFAULT_MTU != 8000 {
        v.push(("8000B".into(), 8000));
    }
    v.push(("jumbo".into(), jumbo as usize));
    v
}

/// The ceiling key measured at `size` (the default MTU's for 8000 B when they agree).
pub fn ceiling_key(size: usize) -> Option<&'static str> {
    match size {
        64 => Some("64B"),
        CEILING_SIZE => Some("1400B"),
        s if s == DEFAULT_MTU as usize => Some("default"),
        8000 => Some("8000B"),
        _ => None,
    }
}

/// The database ceiling at each size; after each size COPY is compared with, COPY of
/// the same rows into a copy of a chunk (so that both meet the same machine).
fn ceilings_and_copy(r: &mut RunResult, n: usize, s: &Settings, tunnel: &Tunnel) -> Result<()> {
    let secs = s.seconds as f64;
    let copy_ready = r.attempt("COPY reference: tables", || {
        let mut su = tunnel.cluster.superuser(DB);
        copyref::setup(&mut su)?;
        peer_ids(&mut su)
    })?;
    for (name, size) in ceiling_sizes(s.jumbo_mtu) {
        progress(
            r,
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
            if let Some(g) = c.send_cpu_s_per_gb() {
                r.put(format!("ceiling.{name}.send_cpu_db_s_per_gb"), g);
            }
        }
        let compared =
            ceiling::COMPARED_SIZES.contains(&size) && ceiling_key(size) == Some(name.as_str());
        let Some(ids) = copy_ready.filter(|_| compared) else {
            continue;
        };
        progress(
            r,
            n,
            &format!("COPY reference, {size}-byte packets, {secs} s"),
        );
        if let Some(c) = r.attempt(&format!("COPY {size} B"), || {
            copyref::measure(&tunnel.cluster, DB, size, secs, true, ids)
        })? {
            eprintln!("[bench]   COPY {:.0} rows/s", c.rows_per_s());
            r.put(format!("copy.{size}B.rows_per_s"), c.rows_per_s());
        }
    }
    // The reference tables are scratch: they must not grow the database run after run.
    r.attempt("COPY reference: drop", || {
        tunnel
            .cluster
            .superuser(DB)
            .batch_execute(copyref::TEARDOWN)
            .map_err(|e| db_error(&e))
    })?;
    Ok(())
}

/// The ids of alice and bob (the COPY rows carry them as send's do).
fn peer_ids(su: &mut postgres::Client) -> Result<(i32, i32)> {
    let id = |su: &mut postgres::Client, name: &str| -> Result<i32> {
        su.query_one("SELECT id FROM pgvpn.peers WHERE name = $1", &[&name])
            .map(|row| row.get(0))
            .map_err(|e| format!("peer {name}: {}", db_error(&e)))
    };
    Ok((id(su, "alice")?, id(su, "bob")?))
}

/// `send` with 2 and with 2,002 peers registered, in turns (few, many, few, many).
fn peers(r: &mut RunResult, n: usize, s: &Settings, tunnel: &Tunnel) -> Result<()> {
    let secs = s.udp_seconds as f64;
    progress(
        r,
        n,
        &format!(
            "send with 2 vs {} peers registered, 2 × {secs} s each",
            peerscale::EXTRA + 2
        ),
    );
    if r.attempt("peers: setup", || peerscale::setup(&tunnel.cluster))?
        .is_none()
    {
        return Ok(());
    }
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..2 {
        for (key, db) in [("2", peerscale::FEW_DB), ("2002", peerscale::MANY_DB)] {
            if let Some(pps) = r.attempt(&format!("peers: send in {db}"), || {
                peerscale::send_rate(&tunnel.cluster, db, secs)
            })? {
                rates.entry(key).or_default().push(pps);
            }
        }
    }
    for (key, v) in &rates {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        eprintln!("[bench]   {key} peers: {mean:.0} pkt/s");
        r.put(format!("peers.{key}.send_pps"), mean);
    }
    if let (Some(few), Some(many)) = (
        r.metrics.get("peers.2.send_pps"),
        r.metrics.get("peers.2002.send_pps"),
    ) {
        let pct = 100.0 * many / few;
        r.put("peers.ratio_pct", pct);
    }
    Ok(())
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

    if full && link != TLS_LINK {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_of_a_run() {
        let mut r = RunResult::default();
        for (k, v) in [
            ("ceiling.64B.send_pps", 100_000.0),
            ("ceiling.default.send_pps", 10_000.0),
            ("ceiling.default.send_mbit", 640.0),
            ("ceiling.1400B.send_mbit", 400.0),
            ("copy.64B.rows_per_s", 125_000.0),
            ("copy.8000B.rows_per_s", 10_000.0),
            ("tunnel.tcp_default.mbit", 320.0),
            ("tunnel.udp64.pps", 50_000.0),
            ("tunnel.udp64_paced.pps", 85_000.0),
            ("tunnel.ping_idle.p50_ms", 2.0),
            ("floor.ms", 1.6),
        ] {
            r.put(k, v);
        }
        derived(&mut r);
        let m = |k: &str| r.metrics[k];
        assert_eq!(m("tunnel.tcp_default.pct_of_ceiling"), 50.0);
        assert_eq!(m("tunnel.tcp_default.pct_of_1400_ceiling"), 80.0);
        assert_eq!(m("tunnel.udp64_best.pct_of_ceiling"), 85.0);
        assert_eq!(m("copy.64B.send_pct"), 80.0);
        assert_eq!(m("copy.8000B.send_pct"), 100.0);
        assert!(!r.metrics.contains_key("copy.1400B.send_pct"));
        assert_eq!(m("tunnel.ping_idle.per_floor"), 1.25);
        assert_eq!(ceiling_key(8000), Some("default"));
        assert_eq!(ceiling_key(9000), None);
        let names: Vec<String> = ceiling_sizes(65000).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["64B", "1400B", "default", "jumbo"]);
    }
}
