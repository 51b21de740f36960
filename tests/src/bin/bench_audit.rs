//! `make bench-audit`: the audit queries on a big log. Builds a log of `--packets`
//! packets (default 50M) with `pgvpn.send` from several parallel senders (the mix of
//! tests/src/bench/auditmix.rs), and at `--first` packets (default 5M) and at the end
//! runs `VACUUM ANALYZE` and times each audit query as a role holding only
//! `pgvpn_auditor` (median of `--runs`; plans into the JSON). Before building, the flow
//! index's worst case (a new flow in every packet) is measured against one TCP flow.
//!
//! ```text
//! cargo run --release -p pgvpn-tests --bin bench-audit -- [--packets N] [--first N]
//!     [--senders N] [--runs N] [--flowcase-seconds S] [--quick]
//! ```
//!
//! The log is built with `synchronous_commit = off` (also `pgvpn.synchronous_commit`)
//! and `pgvpn.max_backlog = 0` (nobody reads it). `sent_at` is the commit time, so the
//! log is as young as the build: "the last hour" of the queries covers all of it, a
//! network that logged the whole log within the hour. 50M packets take about 20 GB: the
//! free space is checked first and watched; the cluster is removed at the end
//! (`PGVPN_KEEP_CLUSTER=1` keeps it). Writes `<target>/bench/audit-<stamp>.json` and
//! `audit-latest.json`. Exit 0 whatever the speed; 1 if something broke; 2 on bad flags.

#[allow(
    dead_code,
    reason = "modules shared by the bench binaries; each uses a part"
)]
#[path = "../bench/mod.rs"]
mod bench;

use bench::auditlog::{self, Shared};
use bench::auditmix::{self, Pool};
use bench::auditq::{self, Class, Explainer, Params, Timing};
use bench::topology::BENCH_CONF;
use bench::{flowcase, report, sleep};
use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::sql::{create_auditor, scalar_i64};
use pgvpn_tests::{db_error, Cluster};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DB: &str = "audit";
const AUDITOR: &str = "auditor";
/// What the log takes per packet before we have measured it (rows, indexes, flow rows;
/// mean packet about 200 B), and what must stay free on the disk besides.
const GUESS_BYTES_PER_PACKET: u64 = 420;
const WAL_BYTES: u64 = 5 << 30;
const RESERVE_BYTES: u64 = 4 << 30;

const USAGE: &str = "usage: bench-audit [--packets N] [--first N] [--senders N] [--runs N] [--flowcase-seconds S] [--quick]
  --packets N           the log's final size (default 50000000)
  --first N             the first measurement point (default 5000000)
  --senders N           parallel sending threads, each owning some of the 8 sites (default 4)
  --runs N              timed runs per query after a cold one; the median counts (default 5)
  --flowcase-seconds S  per round of the flow index's worst case, 3 rounds (default 5)
  --quick               200000 and 2000000 packets, 3 runs, 2 s worst case: a look at the tooling";

struct Settings {
    packets: u64,
    first: u64,
    senders: usize,
    runs: usize,
    flowcase_secs: f64,
}

fn parse_args(args: &[String]) -> Result<Settings, String> {
    let mut s = Settings {
        packets: 50_000_000,
        first: 5_000_000,
        senders: 4,
        runs: 5,
        flowcase_secs: 5.0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--packets" => s.packets = value("--packets")?,
            "--first" => s.first = value("--first")?,
            "--senders" => s.senders = value("--senders")? as usize,
            "--runs" => s.runs = value("--runs")? as usize,
            "--flowcase-seconds" => s.flowcase_secs = value("--flowcase-seconds")? as f64,
            "--quick" => {
                (s.packets, s.first, s.runs, s.flowcase_secs) = (2_000_000, 200_000, 3, 2.0)
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if s.first >= s.packets {
        return Err("--first must be below --packets".into());
    }
    Ok(s)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = bench::start("bench-audit", USAGE, &args, parse_args, &["runuser"]);
    std::process::exit(run(&settings));
}

/// One measurement point.
struct Point {
    packets: u64,
    json: Value,
    timings: BTreeMap<&'static str, Timing>,
    labels: Vec<(&'static str, &'static str, Class)>,
}

/// 5000000 → "5M", 200000 → "0.2M".
fn millions(n: u64) -> String {
    let m = n as f64 / 1e6;
    if m >= 10.0 || (m - m.round()).abs() < 0.05 {
        format!("{m:.0}M")
    } else {
        format!("{m:.1}M")
    }
}

fn gb(b: f64) -> String {
    format!("{:.1} GB", b / 1e9)
}

fn run(s: &Settings) -> i32 {
    let t0 = Instant::now();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let tmp = std::env::temp_dir();
    let free = auditlog::free_bytes(&tmp).unwrap_or(0);
    let need = s.packets * GUESS_BYTES_PER_PACKET + WAL_BYTES + RESERVE_BYTES;
    eprintln!(
        "[audit] {} free on {}; a log of {} packets needs about {}",
        gb(free as f64),
        tmp.display(),
        s.packets,
        gb(need as f64)
    );
    if free < need {
        eprintln!("bench-audit: not enough free disk space (try a smaller --packets)");
        return 1;
    }

    let mut conf: Vec<String> = BENCH_CONF.iter().map(|l| l.to_string()).collect();
    conf.extend(
        [
            // Building the log: the audit reads it, the speed of durable commits is
            // `make bench`'s business.
            "synchronous_commit = off",
            "pgvpn.synchronous_commit = off",
            // The sites never read their packets.
            "pgvpn.max_backlog = 0",
        ]
        .map(String::from),
    );
    eprintln!("[audit] starting a private PostgreSQL cluster…");
    let cluster = Cluster::start_with(ClusterOptions {
        extra_conf: conf,
        ..ClusterOptions::default()
    });
    let env = report::environment(&cluster, DB_FOR_ENV, started);

    eprintln!(
        "[audit] the flow index's worst case: 3 rounds of {} s each way",
        s.flowcase_secs
    );
    let fc = match flowcase::measure(&cluster, s.flowcase_secs, 3) {
        Ok(f) => {
            eprintln!(
                "[audit]   new flow per packet: {:.0} pkt/s, {:.2} flow rows/packet; one TCP flow: {:.0} pkt/s, {:.4} rows/packet",
                f.new_flows.pps(),
                f.new_flows.rows_per_packet(),
                f.one_flow.pps(),
                f.one_flow.rows_per_packet()
            );
            Some(f)
        }
        Err(e) => {
            eprintln!("[audit] flow index worst case: FAILED: {e}");
            None
        }
    };
    if bench::interrupted() {
        return 130;
    }

    cluster.create_db(DB);
    cluster.create_extension(DB);
    auditlog::create_sites(&cluster, DB);
    create_auditor(&cluster, AUDITOR);
    let pool = Pool::new(7);
    let shared = Shared::default();
    let feeders = auditlog::senders(&cluster, DB, s.senders, 11);
    let threads = feeders.len();
    let mut points: Vec<Point> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut probes = 0u64;

    std::thread::scope(|scope| {
        for f in feeders {
            let (shared, pool) = (&shared, &pool);
            scope.spawn(move || f.run(shared, pool));
        }
        let mut last_prune = Instant::now();
        for (k, target) in [s.first, s.packets].into_iter().enumerate() {
            let built = Instant::now();
            let from = shared.accepted.load(Ordering::SeqCst);
            shared.run_until(target);
            if let Err(e) = build_until(
                &cluster,
                &shared,
                threads,
                target,
                &mut last_prune,
                s.packets,
            ) {
                errors.push(e);
                break;
            }
            let build_s = built.elapsed().as_secs_f64();
            let rate = (shared.accepted.load(Ordering::SeqCst) - from) as f64 / build_s;
            match measure_point(&cluster, &pool, k as u8, s.runs, &shared, &mut probes) {
                Ok(mut p) => {
                    p.json["build_seconds"] = build_s.into();
                    p.json["build_pps"] = rate.into();
                    points.push(p);
                }
                Err(e) => {
                    errors.push(format!("measurement at {target} packets: {e}"));
                    break;
                }
            }
        }
        shared.stop();
    });
    if bench::interrupted() {
        eprintln!("[audit] interrupted; the cluster is removed.");
        return 130;
    }
    if let Some(e) = shared.error.lock().expect("error lock").clone() {
        errors.push(e);
    }
    let refused = shared.refused.load(Ordering::SeqCst);
    if refused > 0 {
        errors.push(format!("{refused} packets of the mix were not accepted"));
    }
    let mean_packet = shared.bytes.load(Ordering::SeqCst) as f64
        / shared.accepted.load(Ordering::SeqCst).max(1) as f64;
    drop(cluster);

    let table = render(&env, s, threads, mean_packet, &points, fc.as_ref(), &errors);
    println!("\n{table}");
    let json = json!({
        "started_utc": env.started_utc,
        "host": env.host_json(),
        "postgres_settings": env.settings_json(),
        "settings": {"packets": s.packets, "first": s.first, "senders": threads, "runs": s.runs,
                     "flowcase_seconds": s.flowcase_secs},
        "last_hour": "sent_at is the commit time and the log is built in one go: the last hour holds all of it",
        "mean_packet_bytes": mean_packet,
        "points": points.iter().map(|p| p.json.clone()).collect::<Vec<_>>(),
        "flow_index_worst_case": fc.as_ref().map(flowcase::FlowCase::to_json),
        "errors": errors,
        "ok": errors.is_empty(),
        "duration_s": t0.elapsed().as_secs_f64(),
        "table": table,
    });
    match report::save("audit", "audit-latest.json", started, &json) {
        Ok(p) => println!(
            "JSON: {} (and audit-latest.json); took {:.0} s",
            p.display(),
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("bench-audit: cannot write the JSON report: {e}");
            return 1;
        }
    }
    if errors.is_empty() {
        0
    } else {
        1
    }
}

/// The environment is read from the maintenance database (the log's does not exist yet).
const DB_FOR_ENV: &str = "postgres";

/// Lets the senders run to `target`, printing progress, running `prune()` once a minute
/// (as a deployment would) and watching the disk.
fn build_until(
    cluster: &Cluster,
    shared: &Shared,
    threads: usize,
    target: u64,
    last_prune: &mut Instant,
    total: u64,
) -> Result<(), String> {
    let mut su = cluster.superuser(DB);
    let (t, mut last_print) = (Instant::now(), Instant::now());
    let start = shared.accepted.load(Ordering::SeqCst);
    loop {
        sleep(Duration::from_millis(500))?;
        if let Some(e) = shared.error.lock().expect("error lock").clone() {
            return Err(e);
        }
        let now = shared.accepted.load(Ordering::SeqCst);
        if now >= target && shared.parked() >= threads {
            return Ok(());
        }
        if last_prune.elapsed() >= Duration::from_secs(60) {
            su.batch_execute("SELECT pgvpn.prune()")
                .map_err(|e| format!("prune: {}", db_error(&e)))?;
            *last_prune = Instant::now();
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            last_print = Instant::now();
            let rate = (now - start) as f64 / t.elapsed().as_secs_f64();
            let free = auditlog::free_bytes(&cluster.data_dir()).unwrap_or(0);
            let eta = (target.saturating_sub(now)) as f64 / rate.max(1.0);
            eprintln!(
                "[audit]   {:.2}M packets ({:.0} pkt/s), next point in {:.0} s; {} free",
                now as f64 / 1e6,
                rate,
                eta,
                gb(free as f64)
            );
            if free < RESERVE_BYTES {
                shared.stop();
                return Err(format!(
                    "stopped at {now} packets: only {} left on the disk",
                    gb(free as f64)
                ));
            }
            // Will the rest fit? Judge by what the log takes per packet so far.
            let size = scalar_i64(&mut su, "SELECT pg_database_size(current_database())") as f64;
            let per_packet = size / now.max(1) as f64;
            let more = per_packet * total.saturating_sub(now) as f64;
            if now > 1_000_000 && more + RESERVE_BYTES as f64 > free as f64 + 1e9 {
                shared.stop();
                return Err(format!(
                    "stopped at {now} packets: the rest needs about {} ({:.0} B/packet), {} free",
                    gb(more),
                    per_packet,
                    gb(free as f64)
                ));
            }
        }
    }
}

/// Probe conversation, VACUUM ANALYZE, the queries; everything as JSON.
fn measure_point(
    cluster: &Cluster,
    pool: &Pool,
    k: u8,
    runs: usize,
    shared: &Shared,
    probes: &mut u64,
) -> Result<Point, String> {
    let (client, server) = auditlog::send_probe(cluster, DB, k, pool)?;
    *probes += auditmix::probe_packets() as u64;
    let accepted = shared.accepted.load(Ordering::SeqCst) + *probes;
    eprintln!(
        "[audit] point {}: {:.2}M packets; VACUUM ANALYZE…",
        k + 1,
        accepted as f64 / 1e6
    );
    let mut su = cluster.superuser(DB);
    let t = Instant::now();
    su.batch_execute("VACUUM (ANALYZE) pgvpn.packets, pgvpn.flow_log")
        .map_err(|e| format!("vacuum: {}", db_error(&e)))?;
    let vacuum_s = t.elapsed().as_secs_f64();
    // The flow summaries: top_flows before the rollup (it reads every flow row since the
    // last prune, up to a minute of them), then prune() rolls them up, as its schedule
    // would, and the queries run on the summaries.
    let tail_rows = scalar_i64(
        &mut su,
        "SELECT count(*) FROM pgvpn.flow_log \
          WHERE first_id > coalesce((SELECT summarized_to FROM pgvpn.flow_rollup), 0)",
    );
    let mut auditor = cluster.connect(AUDITOR, DB);
    let t = Instant::now();
    auditor
        .batch_execute(auditq::TOP_FLOWS)
        .map_err(|e| format!("top_flows: {}", db_error(&e)))?;
    let top_before_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    su.batch_execute("SELECT pgvpn.prune()")
        .map_err(|e| format!("prune: {}", db_error(&e)))?;
    let rollup_s = t.elapsed().as_secs_f64();
    su.batch_execute("VACUUM (ANALYZE) pgvpn.flow_sums")
        .map_err(|e| format!("vacuum: {}", db_error(&e)))?;
    let sums = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.flow_sums");
    eprintln!(
        "[audit]   top_flows(5) before the rollup: {top_before_ms:.0} ms ({tail_rows} flow rows since the last prune); \
         prune() rolled them up in {rollup_s:.1} s: {sums} flow summaries"
    );
    let rows = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets");
    if rows as u64 != accepted {
        return Err(format!(
            "the log holds {rows} rows, {accepted} packets were accepted"
        ));
    }
    let flow_rows = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.flow_log");
    let sizes = su
        .query_one(
            "SELECT sum(pg_table_size(relid))::float8, sum(pg_indexes_size(relid))::float8, \
                    sum(pg_total_relation_size(flow_relid))::float8, count(*), \
                    pg_database_size(current_database())::float8 \
               FROM pgvpn.chunks",
            &[],
        )
        .map_err(|e| db_error(&e))?;
    let (heap, idx, flows, chunks, dbsize): (f64, f64, f64, i64, f64) = (
        sizes.get(0),
        sizes.get(1),
        sizes.get(2),
        sizes.get(3),
        sizes.get(4),
    );
    let age: f64 = su
        .query_one(
            "SELECT extract(epoch FROM now() - (SELECT sent_at FROM pgvpn.packets ORDER BY id LIMIT 1))::float8",
            &[],
        )
        .map_err(|e| db_error(&e))?
        .get(0);
    let params: Params = auditq::choose(
        &mut su,
        (client.into(), server.into()),
        auditmix::probe_packets(),
    )?;
    eprintln!(
        "[audit]   {} rows, {} flow rows ({:.3}/packet), log {} + indexes {} + flow index {}, oldest packet {:.0} s old; vacuum {:.0} s",
        rows,
        flow_rows,
        flow_rows as f64 / rows.max(1) as f64,
        gb(heap),
        gb(idx),
        gb(flows),
        age,
        vacuum_s
    );

    let mut explain = Explainer::new(cluster, DB, AUDITOR)?;
    let mut timings = BTreeMap::new();
    let mut labels = Vec::new();
    let mut qjson = serde_json::Map::new();
    for q in auditq::queries(&params) {
        bench::check_interrupt()?;
        let tm = auditq::time(&mut auditor, &mut explain, &q, runs)?;
        eprintln!(
            "[audit]   {:<48} {:>9.1} ms (cold {:.1}), {} rows",
            q.label, tm.median_ms, tm.cold_ms, tm.rows
        );
        let mut j = tm.to_json();
        j["sql"] = q.sql.clone().into();
        j["label"] = q.label.into();
        qjson.insert(q.key.to_string(), j);
        labels.push((q.key, q.label, q.class));
        timings.insert(q.key, tm);
    }
    Ok(Point {
        packets: rows as u64,
        json: json!({
            "packets": rows, "flow_rows": flow_rows, "flow_rows_per_packet": flow_rows as f64 / rows.max(1) as f64,
            "chunks": chunks, "heap_bytes": heap, "index_bytes": idx, "flow_index_bytes": flows,
            "database_bytes": dbsize, "bytes_per_packet": dbsize / rows.max(1) as f64,
            "oldest_packet_age_s": age, "vacuum_analyze_s": vacuum_s,
            "rollup": {"flow_rows_since_last_prune": tail_rows, "top_flows_before_ms": top_before_ms,
                       "prune_seconds": rollup_s, "flow_summaries": sums},
            "params": params.to_json(), "queries": qjson,
        }),
        timings,
        labels,
    })
}

fn render(
    env: &report::Env,
    s: &Settings,
    senders: usize,
    mean_packet: f64,
    points: &[Point],
    fc: Option<&flowcase::FlowCase>,
    errors: &[String],
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "pgvpn bench-audit — {}, {}, {} cores, PostgreSQL {}",
        env.started_utc, env.cpu_model, env.cores, env.postgres
    );
    let _ = writeln!(
        o,
        "log built by {senders} parallel senders (8 sites, synchronous_commit off), mean packet {mean_packet:.0} B; \
         median of {} runs after a cold one, as a role with only pgvpn_auditor",
        s.runs
    );
    let _ = writeln!(
        o,
        "\"the last hour\": sent_at is the commit time and the log is built in one go, so the hour holds the whole log"
    );
    for p in points {
        let j = &p.json;
        let f = |k: &str| j[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            o,
            "at {} packets: {} flow rows ({:.3}/packet), database {} ({:.0} B/packet), built at {:.0} pkt/s, vacuum analyze {:.0} s",
            millions(p.packets),
            j["flow_rows"],
            f("flow_rows_per_packet"),
            gb(f("database_bytes")),
            f("bytes_per_packet"),
            f("build_pps"),
            f("vacuum_analyze_s")
        );
        let r = &j["rollup"];
        let _ = writeln!(
            o,
            "  flow summaries: top_flows(5) took {:.0} ms with {} flow rows since the last prune; prune() then rolled them up in {:.1} s ({} summaries)",
            r["top_flows_before_ms"].as_f64().unwrap_or(0.0),
            r["flow_rows_since_last_prune"],
            r["prune_seconds"].as_f64().unwrap_or(0.0),
            r["flow_summaries"]
        );
    }
    let head: Vec<String> = points
        .iter()
        .map(|p| format!("{} ms", millions(p.packets)))
        .collect();
    let _ = writeln!(
        o,
        "{:<50}{:>12}{:>12}{:>10}  {:<22}{:<30}plan at the end",
        "query",
        head.first().cloned().unwrap_or_default(),
        head.last().cloned().unwrap_or_default(),
        "rows",
        "target",
        "verdict"
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        for (key, label, class) in &last.labels {
            let big = &last.timings[key];
            let small = first.timings.get(key).map(|t| t.median_ms);
            let small = if points.len() > 1 { small } else { None };
            let (_, why) = auditq::verdict(*class, small, big.median_ms);
            let target = match class {
                Class::Point => format!("≤ {:.0} ms, no slower", auditq::POINT_MS),
                Class::Aggregate => format!("≤ {:.0} ms", auditq::AGGREGATE_MS),
                Class::Info => "—".into(),
            };
            let _ = writeln!(
                o,
                "{:<50}{:>12}{:>12}{:>10}  {:<22}{why:<30}{}",
                label,
                small.map_or("—".into(), report::num),
                report::num(big.median_ms),
                big.rows,
                target,
                auditq::plan_note(&big.plans)
            );
        }
    }
    if let Some(f) = fc {
        let _ = writeln!(
            o,
            "flow index worst case (64 B, batches of {}, durable): a new flow per packet {:.2} flow rows/packet at {:.0} pkt/s; \
             one TCP flow {:.4} rows/packet at {:.0} pkt/s: {:.0}% of its rate",
            flowcase::BATCH,
            f.new_flows.rows_per_packet(),
            f.new_flows.pps(),
            f.one_flow.rows_per_packet(),
            f.one_flow.pps(),
            100.0 * f.ratio()
        );
    }
    for e in errors {
        let _ = writeln!(o, "ERROR {e}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags() {
        let s = parse_args(&[]).unwrap();
        assert_eq!(
            (s.packets, s.first, s.senders, s.runs),
            (50_000_000, 5_000_000, 4, 5)
        );
        let s = parse_args(&args("--quick")).unwrap();
        assert_eq!((s.packets, s.first), (2_000_000, 200_000));
        assert!(parse_args(&args("--first 10 --packets 5")).is_err());
        assert!(parse_args(&args("--bogus")).is_err());
    }
}
