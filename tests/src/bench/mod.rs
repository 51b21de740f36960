//! The `bench` binary (`make bench`): how fast pgvpn moves packets on this box, what it
//! costs, and how that compares with a plain veth pair and with the database alone.
//!
//! * `topology` — the two ways from host A to host B: the tunnel (cluster + two shims) and
//!   the direct reference (a veth pair between two namespaces).
//! * `measure`  — iperf3 (TCP, UDP) and ping runners and their parsers.
//! * `ceiling`  — `pgvpn.send` / `pgvpn.recv` from one client, no tun involved.
//! * `cpu`      — CPU seconds from /proc (the PostgreSQL process tree, a shim).
//! * `logcheck` — one log row per packet that crossed the tunnel.
//! * `peerscale` — `send` with 2 and with 2,002 peers registered.
//! * `copyref`  — COPY BINARY of the same rows: the reference for `send`'s rows/s.
//! * `floor`    — two durable single-row commits: the floor under the idle ping.
//! * `baseline` — the ceiling again against an older pgvpn (`--baseline TAG`).
//! * `waits`    — what the backends wait for (pg_stat_activity), for `make bench-peers`.
//! * `plan`     — what one run measures, in which order.
//! * `report`   — medians, the table, the JSON file.
//!
//! `make bench-audit` (src/bin/bench_audit.rs) builds a big log and times the audit
//! queries on it:
//!
//! * `auditmix` — the traffic: sites, hosts, TCP streams, DNS, pings (pure).
//! * `auditlog` — parallel senders that build the log, parked at measurement points.
//! * `auditq`   — the audit queries, timed as an auditor, with their plans.
//! * `flowcase` — the flow index's worst case: a new flow in every packet.
//!
//! Everything runs in network namespaces this program creates (no veth to the root
//! namespace, no default route, 198.18.0.0/15 only); the database is reached through its
//! unix socket. Drop guards tear everything down, also on a panic or Ctrl-C.

pub mod auditlog;
pub mod auditmix;
pub mod auditq;
pub mod baseline;
pub mod ceiling;
pub mod copyref;
pub use pgvpn_tests::cpu;
pub mod floor;
pub mod flowcase;
pub mod logcheck;
pub mod measure;
pub mod peerscale;
/// The throwaway CA of the TLS runs: the same openssl commands as the README's and the
/// TLS tests'.
#[path = "../../../shim/tests/support/pki.rs"]
pub mod pki;
pub mod plan;
pub mod report;
pub mod topology;
pub mod waits;

use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

/// Measurement errors are plain messages: a benchmark reports them and goes on.
pub type Result<T> = std::result::Result<T, String>;

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// The start of each bench program: its arguments parsed (usage on error, exit 2; on
/// `--help`, exit 0), the programs it runs checked, the signal handlers installed.
pub fn start<S>(
    program: &str,
    usage: &str,
    args: &[String],
    parse: impl FnOnce(&[String]) -> std::result::Result<S, String>,
    needs: &[&str],
) -> S {
    let settings = parse(args).unwrap_or_else(|e| {
        if !e.is_empty() {
            eprintln!("{program}: {e}");
        }
        eprintln!("{usage}");
        std::process::exit(if e.is_empty() { 0 } else { 2 })
    });
    if let Err(e) = pgvpn_tests::check_prerequisites(program, needs) {
        eprintln!("{program}: {e}");
        std::process::exit(1);
    }
    install_signal_handlers();
    settings
}

/// SIGINT / SIGTERM only set a flag; the long waits poll it and unwind normally, so the
/// Drop guards clean up. (On Ctrl-C the terminal also signals our children directly.)
pub fn install_signal_handlers() {
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED))
            .unwrap_or_else(|e| panic!("install the handler for signal {sig}: {e}"));
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err("interrupted")` once a signal arrived.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Sleep in small steps, returning early (with an error) when interrupted.
pub fn sleep(d: std::time::Duration) -> Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
    }
}

/// A scratch directory for tool output, removed on drop (kept with `PGVPN_KEEP_LOGS`).
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("pgvpn-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Scratch(p)
    }

    /// A fresh file name in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0
            .join(format!("{}-{name}", pgvpn_tests::util::next_id()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("PGVPN_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
