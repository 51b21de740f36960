//! Traffic tools run inside the namespaces — iperf3 (TCP, UDP) and ping — and the parsers
//! for what they print. Every tool runs with a bound (`-t`, `-w`) and is waited for with a
//! timeout; the server side dies with its `Bg` handle.

use super::{check_interrupt, sleep, Result, Scratch};
use pgvpn_tests::{util, Bg, Netns};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// Where a measurement runs: clients in `client`, servers in `server`, reached at `addr`.
pub struct Hosts<'a> {
    pub client: &'a Netns,
    pub server: &'a Netns,
    pub addr: &'a str,
    pub scratch: &'a Scratch,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tcp {
    /// Received by the server, Mbit/s (10^6).
    pub mbit: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Udp {
    /// Datagrams the receiver got per second.
    pub pps: f64,
    /// iperf3's `lost_percent` (receiver side).
    pub loss_pct: f64,
    pub sent: u64,
    pub delivered: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rtt {
    pub sent: u64,
    pub received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Rtt {
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        100.0 * (self.sent - self.received.min(self.sent)) as f64 / self.sent as f64
    }
}

/// A background tool whose stdout (and stderr) go to files in the scratch dir.
pub struct Job {
    bg: Bg,
    out: PathBuf,
    err: PathBuf,
}

impl Job {
    pub fn spawn(ns: &Netns, argv: &[&str], scratch: &Scratch) -> Job {
        let out = scratch.file(&format!("{}.out", argv[0]));
        let err = out.with_extension("err");
        Job {
            bg: ns.spawn(argv, Some(&out), Some(&err)),
            out,
            err,
        }
    }

    /// Wait (interruptibly) up to `timeout` for it to exit; returns (success, stdout, stderr).
    /// On timeout it is killed and an error returned.
    pub fn finish(mut self, timeout: Duration) -> Result<(bool, String, String)> {
        let end = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.bg.try_wait() {
                break st;
            }
            if let Err(e) = check_interrupt() {
                self.bg.kill();
                return Err(e);
            }
            if std::time::Instant::now() >= end {
                self.bg.kill();
                return Err(format!(
                    "`{}` did not finish within {timeout:?}",
                    self.bg.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        Ok((status.success(), read(&self.out), read(&self.err)))
    }
}

const IPERF_PORT: &str = "5201";

/// One iperf3 test: a one-off server (`-s -1`) in the server namespace and a client.
pub struct Iperf {
    server: Job,
    client: Job,
    seconds: u64,
}

impl Iperf {
    /// `iperf3 -c ADDR -t S -J`: one TCP stream.
    pub fn tcp(h: &Hosts, seconds: u64) -> Result<Iperf> {
        Iperf::start(h, &[], seconds)
    }

    /// `iperf3 -c ADDR -u -b RATE -l SIZE -t S -J`: UDP at `pps` datagrams per second
    /// offered, or as fast as the sender can (`None`, `-b 0`).
    pub fn udp(h: &Hosts, size: usize, pps: Option<u64>, seconds: u64) -> Result<Iperf> {
        let rate = pps.map_or("0".to_string(), |p| (p * size as u64 * 8).to_string());
        Iperf::start(h, &["-u", "-b", &rate, "-l", &size.to_string()], seconds)
    }

    fn start(h: &Hosts, extra: &[&str], seconds: u64) -> Result<Iperf> {
        let server = Job::spawn(
            h.server,
            &["iperf3", "-s", "-1", "-J", "-B", h.addr, "-p", IPERF_PORT],
            h.scratch,
        );
        let listening = util::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
            let out = h
                .server
                .exec(&["ss", "-Hltn", "sport", "=", &format!(":{IPERF_PORT}")]);
            (!out.stdout.is_empty()).then_some(())
        });
        if listening.is_none() {
            return Err("iperf3 server did not start listening within 5 s".into());
        }
        let t = seconds.to_string();
        let mut argv = vec!["iperf3", "-c", h.addr, "-p", IPERF_PORT, "-t", &t, "-J"];
        argv.extend_from_slice(extra);
        let client = Job::spawn(h.client, &argv, h.scratch);
        Ok(Iperf {
            server,
            client,
            seconds,
        })
    }

    /// Wait for the client; return its JSON report (which includes the receiver's side).
    pub fn finish(self) -> Result<Value> {
        let (ok, out, err) = self.client.finish(Duration::from_secs(self.seconds + 60))?;
        // The one-off server exits by itself after the test; give it a moment.
        let _ = self.server.finish(Duration::from_secs(5));
        let v: Value = serde_json::from_str(&out).map_err(|e| {
            format!(
                "iperf3 printed no JSON ({e}): {} {}",
                out.trim(),
                err.trim()
            )
        })?;
        if let Some(msg) = v.get("error").and_then(Value::as_str) {
            return Err(format!("iperf3: {msg}"));
        }
        if !ok {
            return Err(format!("iperf3 failed: {}", err.trim()));
        }
        Ok(v)
    }
}

fn field(v: &Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .ok_or_else(|| format!("iperf3 JSON has no {}", path.join(".")))?;
    }
    cur.as_f64()
        .ok_or_else(|| format!("iperf3 JSON: {} is not a number", path.join(".")))
}

/// TCP: what the receiver got (`end.sum_received`).
pub fn parse_tcp(v: &Value) -> Result<Tcp> {
    Ok(Tcp {
        mbit: field(v, &["end", "sum_received", "bits_per_second"])? / 1e6,
        bytes: field(v, &["end", "sum_received", "bytes"])? as u64,
        seconds: field(v, &["end", "sum_received", "seconds"])?,
        retransmits: field(v, &["end", "sum_sent", "retransmits"]).unwrap_or(0.0) as u64,
    })
}

/// UDP: datagrams the receiver got per second, and its loss figure.
pub fn parse_udp(v: &Value) -> Result<Udp> {
    let r = ["end", "sum_received"];
    let packets = field(v, &[r[0], r[1], "packets"])? as u64;
    let lost = field(v, &[r[0], r[1], "lost_packets"])? as u64;
    let seconds = field(v, &[r[0], r[1], "seconds"])?;
    let delivered = packets.saturating_sub(lost);
    Ok(Udp {
        pps: if seconds > 0.0 {
            delivered as f64 / seconds
        } else {
            0.0
        },
        loss_pct: field(v, &[r[0], r[1], "lost_percent"])?,
        sent: field(v, &["end", "sum_sent", "packets"])
            .map(|x| x as u64)
            .unwrap_or(packets),
        delivered,
    })
}

pub fn udp(h: &Hosts, size: usize, pps: Option<u64>, seconds: u64) -> Result<Udp> {
    parse_udp(&Iperf::udp(h, size, pps, seconds)?.finish()?)
}

/// `ping -c COUNT -i INTERVAL` in the background.
pub struct Pinger(Job, Duration);

impl Pinger {
    pub fn start(h: &Hosts, count: u32, interval: f64) -> Pinger {
        let deadline = (count as f64 * interval).ceil() as u64 + 5;
        let (c, i, w) = (
            count.to_string(),
            format!("{interval}"),
            deadline.to_string(),
        );
        let job = Job::spawn(
            h.client,
            &[
                "ping", "-n", "-c", &c, "-i", &i, "-w", &w, "-W", "2", h.addr,
            ],
            h.scratch,
        );
        Pinger(job, Duration::from_secs(deadline + 10))
    }

    pub fn finish(self) -> Result<Rtt> {
        let (_, out, err) = self.0.finish(self.1)?;
        // Exit status 1 just means some replies were missing: the parse counts them.
        parse_ping(&out)
            .ok_or_else(|| format!("ping got no replies: {} {}", out.trim(), err.trim()))
    }
}

/// Idle RTT: `ping -c COUNT -i INTERVAL`, nothing else running.
pub fn ping(h: &Hosts, count: u32, interval: f64) -> Result<Rtt> {
    sleep(Duration::from_millis(100))?;
    Pinger::start(h, count, interval).finish()
}

/// Per-reply times (`time=0.623 ms`) → percentiles; `N packets transmitted` → sent.
/// Duplicates are ignored. None if there was no reply at all.
pub fn parse_ping(text: &str) -> Option<Rtt> {
    let mut times: Vec<f64> = text
        .lines()
        .filter(|l| !l.contains("DUP!"))
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if times.is_empty() {
        return None;
    }
    times.sort_by(f64::total_cmp);
    let sent = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(times.len() as u64);
    Some(Rtt {
        sent,
        received: times.len() as u64,
        p50_ms: percentile(&times, 50.0),
        p99_ms: percentile(&times, 99.0),
    })
}

/// Nearest-rank percentile of sorted values (p in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median (mean of the two middle values for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tcp_json() {
        let v = json!({"end": {
            "sum_sent": {"bytes": 1000, "bits_per_second": 9e8, "retransmits": 7, "seconds": 10.0},
            "sum_received": {"bytes": 999_000_000u64, "bits_per_second": 799_200_000.0, "seconds": 10.0}
        }});
        let t = parse_tcp(&v).unwrap();
        assert_eq!(
            t,
            Tcp {
                mbit: 799.2,
                bytes: 999_000_000,
                seconds: 10.0,
                retransmits: 7
            }
        );
        assert!(parse_tcp(&json!({"end": {}})).is_err());
    }

    #[test]
    fn udp_json() {
        // As iperf3 3.12 prints it (client side, -J).
        let v = json!({"end": {
            "sum": {"packets": 590580, "lost_packets": 390225, "lost_percent": 66.07, "seconds": 2.0},
            "sum_sent": {"packets": 590580, "lost_packets": 0, "lost_percent": 0, "seconds": 2.000047},
            "sum_received": {"bytes": 280497000u64, "packets": 590580, "lost_packets": 390225,
                             "lost_percent": 66.07487554607336, "seconds": 2.000121}
        }});
        let u = parse_udp(&v).unwrap();
        assert_eq!(u.delivered, 200355);
        assert_eq!(u.sent, 590580);
        assert!((u.pps - 200355.0 / 2.000121).abs() < 1e-6);
        assert!((u.loss_pct - 66.0749).abs() < 1e-3);
    }

    #[test]
    fn ping_text() {
        let text = "PING 198.18.0.2 (198.18.0.2) 56(84) bytes of data.\n\
            64 bytes from 198.18.0.2: icmp_seq=1 ttl=64 time=0.623 ms\n\
            64 bytes from 198.18.0.2: icmp_seq=2 ttl=64 time=1.90 ms\n\
            64 bytes from 198.18.0.2: icmp_seq=2 ttl=64 time=9.99 ms (DUP!)\n\
            64 bytes from 198.18.0.2: icmp_seq=4 ttl=64 time=12 ms\n\
            \n--- 198.18.0.2 ping statistics ---\n\
            4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 30ms\n\
            rtt min/avg/max/mdev = 0.623/4.841/12.000/5.100 ms\n";
        let r = parse_ping(text).unwrap();
        assert_eq!((r.sent, r.received), (4, 3));
        assert_eq!((r.p50_ms, r.p99_ms), (1.90, 12.0));
        assert_eq!(r.loss_pct(), 25.0);
        assert!(
            parse_ping("PING x\n1 packets transmitted, 0 received, 100% packet loss\n").is_none()
        );
    }

    #[test]
    fn percentiles_and_median() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
