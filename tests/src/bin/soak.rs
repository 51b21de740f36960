//! `make soak`: the long soak (12 minutes by default) — a steady UDP stream through the
//! tunnel while the log rotates and expires underneath; prints the figures (log size,
//! throughput per minute, memory, autovacuum, exactly-once) and writes them to
//! `<target>/soak/latest.json` (and `latest.txt`). Exits 1 if the soak did not hold. See `pgvpn_tests::soak`.
//!
//! `--minutes N` changes the duration; `--pps N` the rate.

use pgvpn_tests::soak::{self, Config};
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    if let Err(e) = pgvpn_tests::check_prerequisites("the soak", &["ip"]) {
        eprintln!("soak: {e}");
        std::process::exit(2);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("bin dir").to_path_buf();
    let netcheck = dir.join("pgvpn-netcheck");
    if !netcheck.exists() {
        eprintln!(
            "soak: {} is missing (cargo build --release -p pgvpn-tests)",
            netcheck.display()
        );
        std::process::exit(2);
    }
    let mut cfg = Config::long(netcheck);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    eprintln!("soak: {} needs a number", args[i]);
                    std::process::exit(2)
                })
        };
        match args[i].as_str() {
            "--minutes" => cfg.duration = Duration::from_secs(value(i) * 60),
            "--pps" => cfg.pps = value(i) as u32,
            other => {
                eprintln!("soak: unknown argument {other} (--minutes N, --pps N)");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let report = soak::run(&cfg);
    let text = report.render();
    println!("{text}");
    // <target>/soak/ (next to release/, whose `soak` is this program).
    let out: PathBuf = dir.parent().unwrap_or(&dir).join("soak");
    std::fs::create_dir_all(&out).expect("create soak dir");
    let file = out.join("latest.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report.json()).unwrap())
        .expect("write report");
    std::fs::write(out.join("latest.txt"), &text).expect("write report");
    eprintln!("soak: figures in {}", file.display());
    std::process::exit(if report.ok() { 0 } else { 1 });
}
