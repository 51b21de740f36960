//! `make bench`: pgvpn's throughput, latency and cost on this one box, next to a plain
//! veth pair, to what the database alone can take, to COPY of the same rows and (with
//! `--baseline`) to an older version's database ceiling. Run as root:
//!
//! ```text
//! cargo run --release -p pgvpn-tests --bin bench -- [--runs N] [--seconds S] [--quick]
//!     [--jumbo-mtu M] [--baseline TAG | --baseline-bindir DIR | --no-baseline]
//!     [--baseline-only [--after REV]] [--index-costs]
//! ```
//!
//! Prints a table, with the targets of issues #12 and #14 as met or missed, and writes
//! `<target>/bench/bench-<timestamp>.json` and `latest.json`. Exits 0 whatever the
//! speed; 1 if something is broken (a log check failed, a tool or measurement failed),
//! 2 on bad flags, 130 when interrupted. Modules: tests/src/bench/.

#[allow(
    dead_code,
    reason = "modules shared by the bench binaries; each uses a part"
)]
#[path = "../bench/mod.rs"]
mod bench;

use bench::baseline::{self, Source};
use bench::logcheck::Verdict;
use bench::plan::{self, RunResult, Settings};
use bench::report::{self, Table};
use bench::topology::{Direct, Tunnel, DB};
use bench::{interrupted, Scratch};
use pgvpn_core::limits::{DEFAULT_MTU, MAX_PACKET, MIN_MTU_IPV6};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: bench [--runs N] [--seconds S] [--quick] [--jumbo-mtu M]
             [--baseline TAG | --baseline-bindir DIR | --no-baseline] [--baseline-only]
  --runs N        runs per figure; each figure is the median (default 3)
  --seconds S     TCP test and database-ceiling duration (default 10; UDP, the peer
                  count and the baseline's ceilings run min(S, 5))
  --quick         1 run of 3 s, for development
  --jumbo-mtu M   the large MTU for TCP and the ceiling (default 65000)
  --baseline TAG  also measure the send ceiling of TAG (built once into a private
                  PostgreSQL) against the current version built the same way
  --baseline-bindir DIR   the same against an installation's bin/ directory
                  (default: $PGVPN_BENCH_BASELINE_BINDIR, if set)
  --no-baseline   no baseline, whatever the environment says
  --baseline-only only the baseline's before/after send ceilings, N rounds of them
                  (the --runs figure), each size for min(S, 5) s
  --after REV     with --baseline-only: compare with REV (a commit or tag), not HEAD
  --index-costs   only the current send ceiling with and without each index issue #13
                  added to the log's chunks, N rounds, each size for min(S, 5) s";

fn parse_args(args: &[String]) -> Result<Settings, String> {
    let mut s = Settings {
        runs: 3,
        seconds: 10,
        udp_seconds: 5,
        jumbo_mtu: 65000,
        ping_count: 200,
        baseline: std::env::var_os(baseline::ENV_BINDIR)
            .filter(|v| !v.is_empty())
            .map(|v| Source::Bindir(v.into())),
        baseline_only: false,
        after: None,
        index_costs: false,
    };
    let mut quick = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--runs" => s.runs = value("--runs")? as usize,
            "--seconds" => s.seconds = value("--seconds")?,
            "--jumbo-mtu" => s.jumbo_mtu = value("--jumbo-mtu")? as u32,
            "--quick" => quick = true,
            "--baseline" | "--baseline-bindir" => {
                let v = it
                    .next()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| format!("{a} needs a value"))?;
                s.baseline = Some(if a == "--baseline" {
                    Source::Tag(v.clone())
                } else {
                    Source::Bindir(v.into())
                });
            }
            "--no-baseline" => s.baseline = None,
            "--baseline-only" => s.baseline_only = true,
            "--index-costs" => s.index_costs = true,
            "--after" => {
                let v = it.next().filter(|v| !v.is_empty());
                s.after = Some(v.ok_or("--after needs a commit or tag")?.clone());
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if quick {
        (s.runs, s.seconds) = (1, 3);
    }
    let max_mtu = MAX_PACKET as u32;
    if !(MIN_MTU_IPV6..=max_mtu).contains(&s.jumbo_mtu) {
        return Err(format!(
            "--jumbo-mtu must be between {MIN_MTU_IPV6} and {max_mtu}"
        ));
    }
    s.udp_seconds = s.seconds.min(5);
    if s.baseline_only && s.baseline.is_none() {
        return Err("--baseline-only needs --baseline TAG or --baseline-bindir DIR".into());
    }
    if s.after.is_some() && !s.baseline_only {
        return Err("--after goes with --baseline-only".into());
    }
    Ok(s)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(baseline::CHILD_FLAG) {
        // One side of the baseline comparison, in the PostgreSQL PGVPN_PG_BINDIR names.
        bench::install_signal_handlers();
        std::process::exit(baseline::child_main(&args[1..]));
    }
    let needs = ["ip", "ss", "ping", "iperf3", "runuser"];
    let settings = bench::start("bench", USAGE, &args, parse_args, &needs);
    std::process::exit(if settings.index_costs {
        run_index_costs(&settings)
    } else if settings.baseline_only {
        run_baseline_only(&settings)
    } else {
        run(&settings)
    });
}

/// Writes a mode's JSON report (and `<prefix>-latest.json`); the exit code.
fn save_report(prefix: &str, started: u64, json: &serde_json::Value) -> i32 {
    let latest = format!("{prefix}-latest.json");
    match report::save(prefix, &latest, started, json) {
        Ok(p) => {
            println!("JSON: {} (and {latest})", p.display());
            0
        }
        Err(e) => {
            eprintln!("bench: cannot write the JSON report: {e}");
            1
        }
    }
}

/// `--index-costs`: the send ceiling per index variant, and each one's share of the rate
/// with every index.
fn run_index_costs(settings: &Settings) -> i32 {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let scratch = Scratch::new();
    let secs = settings.udp_seconds as f64;
    let m = match baseline::index_costs(secs, settings.runs, &scratch) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("[bench] index costs: FAILED: {e}");
            return if interrupted() { 130 } else { 1 };
        }
    };
    let mut table = format!(
        "send ceiling of HEAD by index set, pkt/s (vs every index; {} rounds, {secs} s per size)\n{:<34}",
        settings.runs, ""
    );
    for size in baseline::SIZES {
        table += &format!("{:>20}", format!("{size} B"));
    }
    table += "\n";
    for (i, (label, _)) in baseline::INDEX_VARIANTS.iter().enumerate() {
        table += &format!("{label:<34}");
        for size in baseline::SIZES {
            let g = |v: usize| m.get(&format!("indexcost.{v}.{size}B.send_pps")).copied();
            let cell = match (g(i), g(0)) {
                (Some(x), Some(all)) => format!("{} ({:.0}%)", report::num(x), 100.0 * x / all),
                _ => "—".into(),
            };
            table += &format!("{cell:>20}");
        }
        table += "\n";
    }
    println!("\n{table}");
    let json = serde_json::json!({"metrics": m, "table": table, "seconds_per_size": secs,
                                  "rounds": settings.runs});
    save_report("indexcost", started, &json)
}

/// `--baseline-only`: the send ceilings before/after, their targets, and a JSON report.
fn run_baseline_only(settings: &Settings) -> i32 {
    let Some(src) = &settings.baseline else {
        return 2;
    };
    let t0 = Instant::now();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let scratch = Scratch::new();
    let secs = settings.udp_seconds as f64;
    let (m, info) = match baseline::prepare(src, settings.after.as_deref())
        .and_then(|sides| baseline::compare(&sides, secs, settings.runs, &scratch))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("[bench] baseline: FAILED: {e}");
            return if interrupted() { 130 } else { 1 };
        }
    };
    let mut table = format!(
        "send ceiling, before = {} vs after = {} ({} rounds, {secs} s per size)\n",
        info["before"]["source"].as_str().unwrap_or("?"),
        info["after"]["source"].as_str().unwrap_or("?"),
        settings.runs
    );
    for t in report::targets(&m)
        .into_iter()
        .filter(|t| t.name.starts_with("send vs baseline"))
    {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "—",
        };
        table += &format!("{:<36}{:<44}{:<8}{verdict}\n", t.name, t.figure, t.target);
    }
    if let Some(note) = info["note"].as_str() {
        table += &format!("NOTE baseline: {note}\n");
    }
    println!("\n{table}");
    let json = serde_json::json!({
        "metrics": m, "baseline": info, "table": table,
        "duration_s": t0.elapsed().as_secs_f64(),
    });
    save_report("baseline", started, &json)
}

fn run(settings: &Settings) -> i32 {
    let t0 = Instant::now();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let scratch = Scratch::new();
    eprintln!("[bench] starting a private PostgreSQL cluster, namespaces and a veth pair…");
    let mut tunnel = Tunnel::new();
    let direct = Direct::new();
    let env = report::environment(&tunnel.cluster, DB, started);

    let mut runs: Vec<RunResult> = Vec::new();
    for n in 1..=settings.runs {
        match plan::run(n, settings, &mut tunnel, &direct, &scratch) {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("[bench] stopped: {e}");
                break;
            }
        }
    }
    if interrupted() {
        eprintln!("[bench] interrupted; everything was torn down.");
        return 130;
    }
    let db_bytes: i64 = {
        let mut su = tunnel.cluster.superuser(DB);
        su.query_one("SELECT pg_database_size(current_database())", &[])
            .map(|r| r.get(0))
            .unwrap_or(0)
    };
    drop(direct);
    drop(tunnel);

    // Before/after after the runs, with the bench's own cluster and namespaces gone.
    let mut baseline_info = serde_json::Value::Null;
    let mut baseline_metrics = Default::default();
    let mut errors_extra: Vec<String> = Vec::new();
    if let Some(src) = &settings.baseline {
        let secs = settings.udp_seconds as f64;
        match baseline::prepare(src, None).and_then(|sides| {
            let (m, mut info) = baseline::compare(&sides, secs, baseline::ROUNDS, &scratch)?;
            info["bindirs"] = serde_json::json!({
                "before": sides.before.1, "after": sides.after.1,
            });
            Ok((m, info))
        }) {
            Ok((m, info)) => (baseline_metrics, baseline_info) = (m, info),
            Err(e) if interrupted() => eprintln!("[bench] baseline: {e}"),
            Err(e) => {
                eprintln!("[bench] baseline: FAILED: {e}");
                errors_extra.push(format!("baseline: {e}"));
            }
        }
    }
    if interrupted() {
        eprintln!("[bench] interrupted; everything was torn down.");
        return 130;
    }

    let mut median = report::medians(&runs);
    median.extend(baseline_metrics);
    let default_mtu = runs
        .iter()
        .find_map(|r| r.default_mtu)
        .unwrap_or(DEFAULT_MTU);
    let checks: Vec<(usize, &str, &Verdict)> = runs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.checks.iter().map(move |(w, v)| (i + 1, w.as_str(), v)))
        .collect();
    let errors: Vec<String> = runs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.errors.iter().map(move |e| format!("run {}: {e}", i + 1)))
        .chain(errors_extra)
        .collect();
    let ok = checks.iter().all(|c| c.2.ok) && errors.is_empty() && !checks.is_empty();

    let mut table = Table {
        m: &median,
        settings,
        default_mtu,
    }
    .render(&env, &checks);
    if let Some(by) = runs.last().and_then(|r| r.db_cpu.get("default")) {
        let cores = median
            .get("tunnel.tcp_default.cpu_db_cores")
            .map(|c| format!(" ({c:.2} cores busy)"));
        let label = format!("DB CPU in TCP (MTU {default_mtu})");
        table += &format!(
            "{label:<32}{}{}\n",
            report::cpu_shares(by),
            cores.unwrap_or_default()
        );
    }
    table += &format!(
        "{:<32}{:.1} GB after the run\n",
        "database size",
        db_bytes as f64 / 1e9
    );
    for (i, r) in runs
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.foreign.is_empty())
    {
        table += &format!("NOTE run {}: other pgvpn tests were running meanwhile ({} namespaces): noisy figures\n", i + 1, r.foreign.len());
    }
    if let Some(note) = baseline_info["note"].as_str() {
        table += &format!("NOTE baseline: {note}\n");
    }
    for e in &errors {
        table += &format!("ERROR {e}\n");
    }
    println!("\n{table}");

    let mut json = report::to_json(&env, settings, default_mtu, &runs, &median);
    json["baseline"] = baseline_info;
    json["ok"] = ok.into();
    json["duration_s"] = t0.elapsed().as_secs_f64().into();
    json["table"] = table.clone().into();
    match report::save("bench", "latest.json", started, &json) {
        Ok(p) => println!(
            "JSON: {} (and latest.json); took {:.0} s",
            p.display(),
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("bench: cannot write the JSON report: {e}");
            return 1;
        }
    }
    if !ok {
        eprintln!("bench: something is broken (see log check / ERROR lines above)");
        return 1;
    }
    0
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
            (s.runs, s.seconds, s.udp_seconds, s.jumbo_mtu),
            (3, 10, 5, 65000)
        );
        let s = parse_args(&args("--quick")).unwrap();
        assert_eq!((s.runs, s.seconds, s.udp_seconds), (1, 3, 3));
        let s = parse_args(&args("--runs 5 --seconds 20 --jumbo-mtu 9000")).unwrap();
        assert_eq!(
            (s.runs, s.seconds, s.udp_seconds, s.jumbo_mtu),
            (5, 20, 5, 9000)
        );
        assert!(parse_args(&args("--runs 0")).is_err());
        assert!(parse_args(&args("--runs")).is_err());
        assert!(parse_args(&args("--jumbo-mtu 70000")).is_err());
        assert!(parse_args(&args("--bogus")).is_err());
        let s = parse_args(&args("--baseline v0.1.0")).unwrap();
        assert_eq!(s.baseline, Some(Source::Tag("v0.1.0".into())));
        let s = parse_args(&args("--baseline-bindir /opt/pg/bin")).unwrap();
        assert_eq!(s.baseline, Some(Source::Bindir("/opt/pg/bin".into())));
        let s = parse_args(&args("--baseline v0.1.0 --no-baseline")).unwrap();
        assert_eq!(s.baseline, None);
        assert!(parse_args(&args("--baseline")).is_err());
        assert!(parse_args(&args("--baseline-only")).is_err());
        let s = parse_args(&args("--baseline 3f0d4ea --baseline-only --runs 4")).unwrap();
        assert!(s.baseline_only && s.runs == 4);
        assert!(parse_args(&args("--baseline v0.1.0 --after 3f0d4ea")).is_err());
        let s = parse_args(&args("--baseline v0.1.0 --baseline-only --after 3f0d4ea")).unwrap();
        assert_eq!(s.after.as_deref(), Some("3f0d4ea"));
    }
}
