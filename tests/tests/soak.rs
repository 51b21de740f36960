//! The short soak (90 s; `make soak` runs the long one): a steady UDP stream through the
//! tunnel while `pgvpn.prune()` rotates chunks every 3 s and drops them after 20 s.
//! Exactly once across every chunk drop, a bounded log, flat throughput and memory
//! (see `pgvpn_tests::soak`).
//!
//! Needs root, the extension installed and the shim built (see tunnel.rs).

use pgvpn_tests::soak::{self, Config};
use std::path::PathBuf;

#[test]
fn steady_stream_while_chunks_rotate_and_expire() {
    assert!(
        pgvpn_tests::is_root(),
        "the soak needs root (network namespaces, tun devices)"
    );
    assert!(
        pgvpn_tests::shim_path().exists(),
        "pgvpn-shim not built: {} is missing",
        pgvpn_tests::shim_path().display()
    );
    let cfg = Config::short(PathBuf::from(env!("CARGO_BIN_EXE_pgvpn-netcheck")));
    let report = soak::run(&cfg);
    eprintln!("{}", report.render());
    assert!(
        report.ok(),
        "the soak did not hold:\n{}",
        report.problems.join("\n")
    );
}
