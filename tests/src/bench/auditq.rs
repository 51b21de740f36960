//! The audit queries of `make bench-audit`, timed as a role that holds only
//! `pgvpn_auditor`, and their plans.
//!
//! Each query runs once cold, then `runs` times; the figure is the median of those.
//! Plans come from a second session with `auto_explain` (analyze, buffers, nested
//! statements, reported as notices): the audit functions are SQL functions with their
//! own `SET search_path`, which PostgreSQL never inlines, so a plain EXPLAIN ANALYZE of
//! `SELECT * FROM pgvpn.host_packets(…)` would show only a Function Scan, not where the
//! time goes inside.

use super::measure::median;
use super::Result;
use pgvpn_core::sql::{quote_ident, quote_literal};
use pgvpn_tests::{db_error, Cluster};
use postgres::Client;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a query's figure is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// ≤ [`POINT_MS`] and no slower on the big log than on the small one.
    Point,
    /// ≤ [`AGGREGATE_MS`] on the big log.
    Aggregate,
    /// Shown, no target.
    Info,
}

pub const POINT_MS: f64 = 100.0;
pub const AGGREGATE_MS: f64 = 1000.0;
/// "No slower": timings on a busy 2-core box jitter, so the big log may take up to this
/// factor longer, or [`SLOWER_SLACK_MS`] more, and still count as no slower.
pub const SLOWER_FACTOR: f64 = 1.25;
pub const SLOWER_SLACK_MS: f64 = 2.0;

/// Beyond this cold time a query gets at most two more runs.
const SLOW_MS: f64 = 5000.0;

/// What the plans say about where the time went: scans of whole chunks of the log or
/// of the flow index (which grow with the log), else index scans only.
pub fn plan_note(plans: &[String]) -> String {
    // Nodes that ran: a plan also lists the empty spare chunk, which is never executed.
    let ran: Vec<&str> = plans
        .iter()
        .flat_map(|p| p.lines())
        .filter(|l| !l.contains("(never executed)"))
        .collect();
    let has = |node: &str| ran.iter().any(|l| l.contains(node));
    let mut notes = Vec::new();
    if has("Seq Scan on packets_") {
        notes.push("seq scan of the log");
    }
    if has("Seq Scan on flows_") {
        notes.push("seq scan of the flow index");
    }
    if has("Bitmap Heap Scan on packets_") {
        notes.push("bitmap scan of the log");
    }
    if notes.is_empty() {
        "index scans".into()
    } else {
        notes.join(", ")
    }
}

pub struct Query {
    pub key: &'static str,
    pub label: &'static str,
    pub sql: String,
    pub class: Class,
    /// Rows it must return, when that is known in advance.
    pub expect_rows: Option<usize>,
}

/// The hosts, flow and pair the queries ask about at one measurement point.
#[derive(Clone, Debug)]
pub struct Params {
    /// The probe conversation's two hosts (its size is the same at every point).
    pub probe: (IpAddr, IpAddr),
    pub probe_rows: usize,
    /// A recent web client and its server (their traffic grows with the log).
    pub busy_pair: (IpAddr, IpAddr),
    /// A recent ssh flow: src, sport, dst, dport.
    pub flow: (IpAddr, i32, IpAddr, i32),
    /// A busy server (the probe's).
    pub host: IpAddr,
}

impl Params {
    pub fn to_json(&self) -> Value {
        json!({
            "probe": [self.probe.0.to_string(), self.probe.1.to_string()],
            "probe_rows": self.probe_rows,
            "busy_pair": [self.busy_pair.0.to_string(), self.busy_pair.1.to_string()],
            "flow": [self.flow.0.to_string(), self.flow.1, self.flow.2.to_string(), self.flow.3],
            "host": self.host.to_string(),
        })
    }
}

/// Picks the busy pair and the flow from the newest flow rows (index scans only).
pub fn choose(su: &mut Client, probe: (IpAddr, IpAddr), probe_rows: usize) -> Result<Params> {
    let pair = su
        .query_one(
            "SELECT src_addr, dst_addr FROM pgvpn.flow_log \
             WHERE dst_port = 443 ORDER BY last_id DESC LIMIT 1",
            &[],
        )
        .map_err(|e| format!("choose a pair: {}", db_error(&e)))?;
    let flow = su
        .query_one(
            "SELECT src_addr, src_port, dst_addr, dst_port FROM \
               (SELECT * FROM pgvpn.flow_log WHERE dst_port = 22 ORDER BY last_id DESC LIMIT 500) f \
             WHERE protocol = 6 GROUP BY 1, 2, 3, 4 ORDER BY sum(packets) DESC LIMIT 1",
            &[],
        )
        .map_err(|e| format!("choose a flow: {}", db_error(&e)))?;
    Ok(Params {
        probe,
        probe_rows,
        busy_pair: (pair.get(0), pair.get(1)),
        flow: (flow.get(0), flow.get(1), flow.get(2), flow.get(3)),
        host: probe.1,
    })
}

fn lit(a: IpAddr) -> String {
    format!("{}::inet", quote_literal(&a.to_string()))
}

/// The five biggest flows (the flow summaries' index, plus the flow rows since the last
/// rollup).
pub const TOP_FLOWS: &str = "SELECT * FROM pgvpn.top_flows(5)";

/// The issue's table, in its order, plus the busy pair (for information).
pub fn queries(p: &Params) -> Vec<Query> {
    let (src, sport, dst, dport) = p.flow;
    vec![
        Query {
            key: "last10",
            label: "the last 10 packets, decoded",
            sql: "SELECT id, sent_at, pgvpn.decode(payload) FROM pgvpn.packets ORDER BY id DESC LIMIT 10".into(),
            class: Class::Point,
            expect_rows: Some(10),
        },
        Query {
            key: "between",
            label: "every packet between two hosts, last hour",
            sql: format!(
                "SELECT * FROM pgvpn.packets_between({}, {}, now() - interval '1 hour')",
                lit(p.probe.0),
                lit(p.probe.1)
            ),
            class: Class::Point,
            expect_rows: Some(p.probe_rows),
        },
        Query {
            key: "flow",
            label: "the last 10 packets of one TCP flow",
            sql: format!(
                "SELECT * FROM pgvpn.flow_packets({}, {sport}, {}, {dport}, 6, 10)",
                lit(src),
                lit(dst)
            ),
            class: Class::Point,
            expect_rows: Some(10),
        },
        Query {
            key: "port22",
            label: "the last 100 packets to port 22",
            sql: "SELECT * FROM pgvpn.port_packets(22, 100)".into(),
            class: Class::Point,
            expect_rows: Some(100),
        },
        Query {
            key: "host",
            label: "the last 100 packets from or to one host",
            sql: format!("SELECT * FROM pgvpn.host_packets({}, 100)", lit(p.host)),
            class: Class::Point,
            expect_rows: Some(100),
        },
        Query {
            key: "talkers",
            label: "top talkers in the last hour",
            sql: "SELECT src_addr, sum(packets), sum(bytes) FROM pgvpn.flow_log \
                  WHERE at > now() - interval '1 hour' GROUP BY src_addr ORDER BY 3 DESC LIMIT 10"
                .into(),
            class: Class::Aggregate,
            expect_rows: Some(10),
        },
        Query {
            key: "syns",
            label: "SYN counts per destination port, last hour",
            sql: "SELECT dst_port, sum(syns) FROM pgvpn.flow_log WHERE protocol = 6 AND syns > 0 \
                  AND at > now() - interval '1 hour' GROUP BY dst_port ORDER BY 2 DESC"
                .into(),
            class: Class::Aggregate,
            expect_rows: None,
        },
        Query {
            key: "flows",
            label: "pgvpn.flows, top 5 by bytes: top_flows(5)",
            sql: TOP_FLOWS.into(),
            class: Class::Aggregate,
            expect_rows: Some(5),
        },
        Query {
            key: "flows_view",
            label: "(info) the same from the whole view",
            sql: "SELECT * FROM pgvpn.flows ORDER BY bytes DESC LIMIT 5".into(),
            class: Class::Info,
            expect_rows: Some(5),
        },
        Query {
            key: "between_busy",
            label: "(info) between a busy web client and its server",
            sql: format!(
                "SELECT * FROM pgvpn.packets_between({}, {}, now() - interval '1 hour')",
                lit(p.busy_pair.0),
                lit(p.busy_pair.1)
            ),
            class: Class::Info,
            expect_rows: None,
        },
    ]
}

#[derive(Clone, Debug)]
pub struct Timing {
    pub cold_ms: f64,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
    pub rows: usize,
    /// auto_explain's plans (top-level and nested statements), as notices.
    pub plans: Vec<String>,
}

impl Timing {
    pub fn to_json(&self) -> Value {
        json!({
            "median_ms": self.median_ms, "cold_ms": self.cold_ms, "runs_ms": self.runs_ms,
            "rows": self.rows, "plan_note": plan_note(&self.plans), "explain_analyze": self.plans,
        })
    }
}

/// A superuser session with auto_explain that acts as `role`: its notices are the plans.
pub struct Explainer {
    client: Client,
    notices: Arc<Mutex<Vec<String>>>,
}

impl Explainer {
    pub fn new(cluster: &Cluster, db: &str, role: &str) -> Result<Explainer> {
        let settings = pgvpn_shim::conn::parse_with(
            &cluster.conninfo("postgres", db),
            &pgvpn_shim::conn::Env::empty(),
        )
        .map_err(|e| e.to_string())?;
        let target = settings.targets().first().ok_or("no target")?.clone();
        let notices: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&notices);
        let mut client = settings
            .config_for(&target, "bench-audit-explain")
            .notice_callback(move |n| sink.lock().expect("notices").push(n.message().to_string()))
            .connect(postgres::NoTls)
            .map_err(|e| format!("explain session: {}", db_error(&e)))?;
        client
            .batch_execute(&format!(
                "LOAD 'auto_explain';
                 SET auto_explain.log_min_duration = 0;
                 SET auto_explain.log_analyze = on;
                 SET auto_explain.log_buffers = on;
                 SET auto_explain.log_nested_statements = on;
                 SET auto_explain.log_level = notice;
                 SET ROLE {}",
                quote_ident(role)
            ))
            .map_err(|e| format!("auto_explain: {}", db_error(&e)))?;
        Ok(Explainer { client, notices })
    }

    pub fn plans(&mut self, sql: &str) -> Result<Vec<String>> {
        self.notices.lock().expect("notices").clear();
        self.client
            .query(sql, &[])
            .map_err(|e| format!("{sql}: {}", db_error(&e)))?;
        Ok(std::mem::take(&mut *self.notices.lock().expect("notices")))
    }
}

/// Cold run, then `runs` timed runs (as the auditor), then the plans.
pub fn time(
    auditor: &mut Client,
    explain: &mut Explainer,
    q: &Query,
    runs: usize,
) -> Result<Timing> {
    let mut once = || -> Result<(f64, usize)> {
        let t = Instant::now();
        let rows = auditor
            .query(q.sql.as_str(), &[])
            .map_err(|e| format!("{}: {}", q.key, db_error(&e)))?;
        Ok((t.elapsed().as_secs_f64() * 1e3, rows.len()))
    };
    let (cold_ms, rows) = once()?;
    if let Some(want) = q.expect_rows {
        if rows != want {
            return Err(format!(
                "{}: {rows} rows, expected {want} ({})",
                q.key, q.sql
            ));
        }
    }
    // A query that takes seconds is not run five more times: its figure is clear.
    let runs = if cold_ms > SLOW_MS { runs.min(2) } else { runs };
    let mut runs_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        runs_ms.push(once()?.0);
    }
    let plans = explain.plans(&q.sql)?;
    Ok(Timing {
        cold_ms,
        median_ms: median(&runs_ms).unwrap_or(cold_ms),
        runs_ms,
        rows,
        plans,
    })
}

/// Did the query meet its target? (small-log timing, big-log timing) → verdict text.
pub fn verdict(class: Class, small: Option<f64>, big: f64) -> (bool, String) {
    match class {
        Class::Point => {
            let fast = big <= POINT_MS;
            let flat = small.is_none_or(|s| big <= s * SLOWER_FACTOR || big <= s + SLOWER_SLACK_MS);
            let why = match (fast, flat) {
                (true, true) => "met".to_string(),
                (false, _) => format!("MISSED (> {POINT_MS:.0} ms)"),
                (true, false) => "MISSED (slower on the big log)".to_string(),
            };
            (fast && flat, why)
        }
        Class::Aggregate => {
            let ok = big <= AGGREGATE_MS;
            (
                ok,
                if ok {
                    "met".into()
                } else {
                    format!("MISSED (> {AGGREGATE_MS:.0} ms)")
                },
            )
        }
        Class::Info => (true, "(no target)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert!(verdict(Class::Point, Some(10.0), 12.0).0);
        assert!(verdict(Class::Point, Some(0.5), 2.4).0, "within the slack");
        assert!(!verdict(Class::Point, Some(10.0), 20.0).0, "slower");
        assert!(!verdict(Class::Point, Some(200.0), 150.0).0, "too slow");
        assert!(verdict(Class::Aggregate, None, 999.0).0);
        assert!(!verdict(Class::Aggregate, Some(1.0), 1001.0).0);
        assert!(verdict(Class::Info, None, 1e9).0);
    }

    #[test]
    fn plan_notes_count_only_nodes_that_ran() {
        let spare = "->  Index Scan using packets_000000_id on packets_000000 p_1  (actual time=0.007..0.018 rows=27 loops=200)\n\
                     ->  Seq Scan on packets_000001 p_2  (cost=0.00..0.00 rows=1 width=108) (never executed)";
        assert_eq!(plan_note(&[spare.to_string()]), "index scans");
        let scan =
            "->  Seq Scan on packets_000000 p_1  (actual time=0.010..310.2 rows=5441 loops=1)";
        assert_eq!(plan_note(&[scan.to_string()]), "seq scan of the log");
    }

    #[test]
    fn the_issue_table() {
        let a: IpAddr = "198.18.16.200".parse().unwrap();
        let b: IpAddr = "198.18.17.3".parse().unwrap();
        let p = Params {
            probe: (a, b),
            probe_rows: 250,
            busy_pair: (a, b),
            flow: (a, 40000, b, 22),
            host: b,
        };
        let q = queries(&p);
        assert_eq!(q.iter().filter(|q| q.class == Class::Point).count(), 5);
        assert_eq!(q.iter().filter(|q| q.class == Class::Aggregate).count(), 3);
        assert!(q[2].sql.contains(
            "flow_packets('198.18.16.200'::inet, 40000, '198.18.17.3'::inet, 22, 6, 10)"
        ));
    }
}
