//! `--metrics ADDR:PORT`: the shim's counters on `/metrics`, in the Prometheus text
//! exposition format 0.0.4, rendered by hand (it is a few lines of `name value`; the
//! tests parse it back), served by tiny_http (threads, no async runtime).
//!
//! Every counter of the shutdown summary is here (a test holds the two together), plus
//! gauges (the queue between tun reader and sender, the packets in the pgvpn.send() call
//! under way, the last stored cursor) and a histogram of pgvpn.send() call latency, which
//! [`Timed`] measures around the database without the loops knowing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use pgvpn_shim::error::DbError;
use pgvpn_shim::io::{Database, UplinkSession};
use pgvpn_shim::runtime::Shared;
use pgvpn_shim::stats::{Stats, SEND_LATENCY_BUCKETS};

/// The content type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often the server thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

fn g(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// A counter: its key in the summary line, its metric (a family may have several label
/// sets), help text and value.
struct Counter {
    /// Only the tests read it: they hold it against the summary line.
    #[cfg_attr(not(test), allow(dead_code))]
    summary: &'static str,
    name: &'static str,
    labels: &'static str,
    help: &'static str,
    value: fn(&Stats) -> u64,
}

const COUNTERS: &[Counter] = &[
    Counter {
        summary: "tun_read_packets",
        name: "pgvpn_shim_tun_read_packets_total",
        labels: "",
        help: "Packets read from the tun device.",
        value: |s| g(&s.tun_read_packets),
    },
    Counter {
        summary: "tun_read_bytes",
        name: "pgvpn_shim_tun_read_bytes_total",
        labels: "",
        help: "Bytes read from the tun device.",
        value: |s| g(&s.tun_read_bytes),
    },
    Counter {
        summary: "sent",
        name: "pgvpn_shim_sent_packets_total",
        labels: "",
        help: "Packets handed to a pgvpn.send() call that returned.",
        value: |s| g(&s.sent),
    },
    Counter {
        summary: "accepted",
        name: "pgvpn_shim_accepted_packets_total",
        labels: "",
        help: "Packets the database accepted (logged and routed).",
        value: |s| g(&s.accepted),
    },
    Counter {
        summary: "rejected_by_db",
        name: "pgvpn_shim_rejected_packets_total",
        labels: "",
        help: "Packets the database rejected (sent minus accepted; reasons in pgvpn.reject_totals).",
        value: |s| g(&s.sent).saturating_sub(g(&s.accepted)),
    },
    Counter {
        summary: "dropped_queue_full",
        name: "pgvpn_shim_dropped_packets_total",
        labels: "reason=\"queue_full\"",
        help: "Packets read from the tun device and lost before the database had them.",
        value: |s| g(&s.dropped_queue_full),
    },
    Counter {
        summary: "dropped_db_down",
        name: "pgvpn_shim_dropped_packets_total",
        labels: "reason=\"db_down\"",
        help: "",
        value: |s| g(&s.dropped_db_down),
    },
    Counter {
        summary: "dropped_db_error",
        name: "pgvpn_shim_dropped_packets_total",
        labels: "reason=\"db_error\"",
        help: "",
        value: |s| g(&s.dropped_db_error),
    },
    Counter {
        summary: "received",
        name: "pgvpn_shim_received_packets_total",
        labels: "",
        help: "Packets returned by pgvpn.recv().",
        value: |s| g(&s.received),
    },
    Counter {
        summary: "written",
        name: "pgvpn_shim_written_packets_total",
        labels: "",
        help: "Packets written to the tun device.",
        value: |s| g(&s.written),
    },
    Counter {
        summary: "written_bytes",
        name: "pgvpn_shim_written_bytes_total",
        labels: "",
        help: "Bytes written to the tun device.",
        value: |s| g(&s.written_bytes),
    },
    Counter {
        summary: "write_errors",
        name: "pgvpn_shim_write_errors_total",
        labels: "",
        help: "Packets from pgvpn.recv() that could not be written to the tun device.",
        value: |s| g(&s.write_errors),
    },
    Counter {
        summary: "reconnects",
        name: "pgvpn_shim_reconnects_total",
        labels: "",
        help: "Database connections re-opened (uplink and downlink each count).",
        value: |s| g(&s.reconnects),
    },
    Counter {
        summary: "diverged_lost",
        name: "pgvpn_shim_diverged_lost_packets_total",
        labels: "",
        help: "Packets written to the tun device that a new primary's log does not have (failover to a standby that was behind).",
        value: |s| g(&s.diverged_lost),
    },
    Counter {
        summary: "expired_unread",
        name: "pgvpn_shim_expired_unread_packets_total",
        labels: "",
        help: "Packets for this host that retention dropped before the shim read them (pgvpn.recv's notice).",
        value: |s| g(&s.expired_unread),
    },
];

/// Summary keys that are gauges here.
#[cfg(test)]
const GAUGE_KEYS: &[&str] = &["last_acked_id"];

/// Packets read from the tun device and not yet handed to pgvpn.send(): what went in
/// minus what came out, read without locks (so an estimate, never negative).
fn queued(s: &Stats) -> u64 {
    // What left the queue first, then what entered it: a packet read meanwhile can only
    // make the estimate larger, not negative.
    let out = g(&s.dropped_queue_full)
        + g(&s.sent)
        + g(&s.dropped_db_error)
        + g(&s.dropped_db_down)
        + g(&s.send_in_flight);
    g(&s.tun_read_packets).saturating_sub(out)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A bucket bound as Prometheus writes floats ("0.005", "1", "2.5").
fn bound(b: f64) -> String {
    format!("{b}")
}

/// The page served on /metrics.
pub fn render(s: &Stats) -> String {
    let mut out = String::new();
    let mut family = "";
    for c in COUNTERS {
        if c.name != family {
            header(&mut out, c.name, "counter", c.help);
            family = c.name;
        }
        let labels = if c.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", c.labels)
        };
        let _ = writeln!(out, "{}{labels} {}", c.name, (c.value)(s));
    }

    let gauges: [(&str, &str, i64); 3] = [
        (
            "pgvpn_shim_last_acked_id",
            "The delivery cursor last stored with pgvpn.ack() (or read at start).",
            s.last_acked_id.load(Relaxed),
        ),
        (
            "pgvpn_shim_queue_packets",
            "Packets read from the tun device waiting for pgvpn.send() (an estimate).",
            queued(s) as i64,
        ),
        (
            "pgvpn_shim_send_in_flight_packets",
            "Packets in the pgvpn.send() call under way.",
            g(&s.send_in_flight) as i64,
        ),
    ];
    for (name, help, v) in gauges {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }

    let name = "pgvpn_shim_send_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "How long pgvpn.send() calls took (each a transaction and its commit).",
    );
    let (counts, sum) = s.send_latency.read();
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        let le = SEND_LATENCY_BUCKETS
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| bound(*b));
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {cumulative}");
    out
}

/// Binds the listener (before any thread starts, so a bad address is an exit code).
pub fn bind(addr: SocketAddr) -> Result<tiny_http::Server, String> {
    tiny_http::Server::http(addr).map_err(|e| format!("--metrics {addr}: {e}"))
}

/// Answers requests until the shim stops: GET/HEAD /metrics, 404 for anything else.
pub fn serve(server: &tiny_http::Server, shared: &Shared) {
    let content_type =
        tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE).expect("a valid header");
    while !shared.stopping() {
        let request = match server.recv_timeout(POLL) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("metrics: {e}");
                continue;
            }
        };
        let path = request.url().split('?').next().unwrap_or("");
        let get = matches!(
            request.method(),
            tiny_http::Method::Get | tiny_http::Method::Head
        );
        let response = if path == "/metrics" && get {
            tiny_http::Response::from_string(render(&shared.stats))
                .with_header(content_type.clone())
        } else {
            tiny_http::Response::from_string("pgvpn-shim: the metrics are on /metrics\n")
                .with_status_code(404)
        };
        if let Err(e) = request.respond(response) {
            log::debug!("metrics: answering: {e}");
        }
    }
}

/// The database, with pgvpn.send() timed: the latency histogram and the in-flight gauge.
pub struct Timed<'a, D> {
    pub inner: D,
    pub stats: &'a Stats,
}

pub struct TimedUplink<'a, U> {
    inner: U,
    stats: &'a Stats,
}

impl<'a, D: Database> Database for Timed<'a, D> {
    type Uplink = TimedUplink<'a, D::Uplink>;
    type Downlink = D::Downlink;

    fn open_uplink(&self) -> Result<Self::Uplink, DbError> {
        Ok(TimedUplink {
            inner: self.inner.open_uplink()?,
            stats: self.stats,
        })
    }

    fn open_downlink(&self) -> Result<Self::Downlink, DbError> {
        self.inner.open_downlink()
    }
}

impl<U: UplinkSession> UplinkSession for TimedUplink<'_, U> {
    /// Every call is timed, also one that fails.
    fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, DbError> {
        self.stats.send_in_flight.store(batch.len() as u64, Relaxed);
        let start = Instant::now();
        let r = self.inner.send(batch);
        self.stats.send_latency.observe(start.elapsed());
        self.stats.send_in_flight.store(0, Relaxed);
        r
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn check(&mut self) -> Result<(), DbError> {
        self.inner.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::io::{Read, Write};

    /// name{labels} → value, checking the text format's rules on the way: HELP and TYPE
    /// once per family and before its samples, valid names, a value on every line, a
    /// newline at the end.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        assert!(text.ends_with('\n'));
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let valid = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(valid(name), "{line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    typed.insert(name.into(), kind.into()).is_none(),
                    "two TYPEs: {line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("name value");
            let name = key.split('{').next().unwrap();
            assert!(valid(name), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(family), "sample before its TYPE: {line}");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            assert!(
                samples.insert(key.to_string(), v).is_none(),
                "twice: {line}"
            );
        }
        samples
    }

    #[test]
    fn every_summary_counter_is_a_metric() {
        let summary_keys: HashSet<String> = Stats::default()
            .to_string()
            .split(' ')
            .map(|kv| kv.split('=').next().unwrap().to_string())
            .collect();
        let covered: HashSet<String> = COUNTERS
            .iter()
            .map(|c| c.summary.to_string())
            .chain(GAUGE_KEYS.iter().map(|k| k.to_string()))
            .collect();
        assert_eq!(
            summary_keys, covered,
            "the summary line and /metrics must have the same counters"
        );
    }

    #[test]
    fn renders_the_text_format() {
        let s = Stats::default();
        Stats::add(&s.tun_read_packets, 10);
        Stats::add(&s.tun_read_bytes, 1400);
        Stats::add(&s.sent, 6);
        Stats::add(&s.accepted, 5);
        Stats::add(&s.dropped_queue_full, 1);
        Stats::add(&s.dropped_db_down, 2);
        s.last_acked_id.store(1 << 40, Relaxed);
        s.send_latency.observe(Duration::from_micros(700));
        s.send_latency.observe(Duration::from_secs(5));
        let m = parse(&render(&s));
        assert_eq!(m["pgvpn_shim_tun_read_packets_total"], 10.0);
        assert_eq!(m["pgvpn_shim_rejected_packets_total"], 1.0);
        assert_eq!(
            m["pgvpn_shim_dropped_packets_total{reason=\"queue_full\"}"],
            1.0
        );
        assert_eq!(
            m["pgvpn_shim_dropped_packets_total{reason=\"db_down\"}"],
            2.0
        );
        assert_eq!(m["pgvpn_shim_last_acked_id"], (1u64 << 40) as f64);
        // 10 read: 1 dropped (queue full), 6 sent, 2 dropped (db down): 1 still queued
        assert_eq!(m["pgvpn_shim_queue_packets"], 1.0);
        let h = "pgvpn_shim_send_duration_seconds";
        assert_eq!(m[&format!("{h}_bucket{{le=\"0.0005\"}}")], 0.0);
        assert_eq!(m[&format!("{h}_bucket{{le=\"0.001\"}}")], 1.0);
        assert_eq!(m[&format!("{h}_bucket{{le=\"2.5\"}}")], 1.0);
        assert_eq!(m[&format!("{h}_bucket{{le=\"+Inf\"}}")], 2.0);
        assert_eq!(m[&format!("{h}_count")], 2.0);
        assert!((m[&format!("{h}_sum")] - 5.0007).abs() < 1e-9);
    }

    #[test]
    fn serves_over_http() {
        let server = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.server_addr().to_ip().unwrap();
        let shared = Shared::new();
        Stats::add(&shared.stats.reconnects, 3);
        let get = |path: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            reply
        };
        std::thread::scope(|sc| {
            sc.spawn(|| serve(&server, &shared));
            let reply = get("/metrics");
            assert!(
                reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
                "{reply}"
            );
            assert!(
                reply.contains(&format!("Content-Type: {CONTENT_TYPE}")),
                "{reply}"
            );
            let body = reply.split("\r\n\r\n").nth(1).unwrap();
            assert_eq!(parse(body)["pgvpn_shim_reconnects_total"], 3.0);
            assert!(get("/").contains(" 404 "));
            shared.request_stop();
        });
    }

    #[test]
    fn timed_uplink_measures_every_call() {
        struct Slow;
        impl UplinkSession for Slow {
            fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, DbError> {
                std::thread::sleep(Duration::from_millis(3));
                Ok(batch.len() as u64)
            }
            fn is_closed(&self) -> bool {
                false
            }
            fn check(&mut self) -> Result<(), DbError> {
                Ok(())
            }
        }
        let stats = Stats::default();
        let mut up = TimedUplink {
            inner: Slow,
            stats: &stats,
        };
        assert_eq!(up.send(&[vec![1], vec![2]]).unwrap(), 2);
        assert_eq!(up.send(&[vec![3]]).unwrap(), 1);
        let (counts, sum) = stats.send_latency.read();
        assert_eq!(counts.iter().sum::<u64>(), 2);
        assert!(sum >= 0.006, "{sum}");
        assert_eq!(
            counts[..5].iter().sum::<u64>(),
            0,
            "none under 2.5 ms: {counts:?}"
        );
        assert_eq!(stats.send_in_flight.load(Relaxed), 0);
    }
}
