//! `make bench`: pgvpn's throughput, latency and cost on this one box, next to a plain
//! veth pair and to what the database alone can take. Run as root:
//!
//! ```text
//! cargo run --release -p pgvpn-tests --bin bench -- [--runs N] [--seconds S] [--quick] [--jumbo-mtu M]
//! ```
//!
//! Prints a table and writes `<target>/bench/bench-<timestamp>.json` and `latest.json`.
//! Exits 0 whatever the speed; 1 if something is broken (a log check failed, a tool or
//! measurement failed), 2 on bad flags, 130 when interrupted. Modules: tests/src/bench/.

#[allow(
    dead_code,
    reason = "modules shared by the bench binaries; each uses a part"
)]
#[path = "../bench/mod.rs"]
mod bench;

use bench::logcheck::Verdict;
use bench::plan::{self, RunResult, Settings};
use bench::report::{self, Table};
use bench::topology::{Direct, Tunnel, DB};
use bench::{interrupted, Scratch};
use pgvpn_core::limits::{DEFAULT_MTU, MAX_PACKET, MIN_MTU_IPV6};
use pgvpn_tests::util;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: bench [--runs N] [--seconds S] [--quick] [--jumbo-mtu M]
  --runs N        runs per figure; each figure is the median (default 3)
  --seconds S     TCP test and database-ceiling duration (default 10; UDP runs min(S, 5))
  --quick         1 run of 3 s, for development
  --jumbo-mtu M   the large MTU for TCP and the ceiling (default 65000)";

fn parse_args(args: &[String]) -> Result<Settings, String> {
    let mut s = Settings {
        runs: 3,
        seconds: 10,
        udp_seconds: 5,
        jumbo_mtu: 65000,
        ping_count: 200,
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
    Ok(s)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = parse_args(&args).unwrap_or_else(|e| {
        if !e.is_empty() {
            eprintln!("bench: {e}");
        }
        eprintln!("{USAGE}");
        std::process::exit(if e.is_empty() { 0 } else { 2 })
    });
    if let Err(e) =
        pgvpn_tests::check_prerequisites("bench", &["ip", "ss", "ping", "iperf3", "runuser"])
    {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
    bench::install_signal_handlers();
    std::process::exit(run(&settings));
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

    let median = report::medians(&runs);
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
    for e in &errors {
        table += &format!("ERROR {e}\n");
    }
    println!("\n{table}");

    let mut json = report::to_json(&env, settings, default_mtu, &runs, &median);
    json["ok"] = ok.into();
    json["duration_s"] = t0.elapsed().as_secs_f64().into();
    json["table"] = table.clone().into();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| util::workspace_dir().join("target"));
    match report::write_json(&target.join("bench"), &report::timestamps(started).1, &json) {
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
    }
}
