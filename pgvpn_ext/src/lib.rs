//! pgvpn: a VPN whose transport and audit log is PostgreSQL.
//!
//! Module map: decoding and routing are pure Rust in `pgvpn_core` (no pgrx, unit-tested
//! and fuzzed without a database). Around them, the SQL API: `send` (decode and route
//! now), `txn` and `log` (log at commit, under the ordering locks), `deliver` (recv,
//! ack, cursor), `retention`, `peers` (the cached routing table), `audit`; `shmem`
//! holds what backends share (wake-ups, counters), `plans` the saved plans and the
//! pinned planner environment, `error` the one error type. Handwritten SQL lives in
//! `../sql/`.
use pgrx::prelude::*;

mod audit;
mod deliver;
mod error;
mod guc;
mod heap;
mod inet;
mod log;
mod peers;
mod plans;
mod retention;
mod send;
mod shmem;
mod stats;
mod txn;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // A Rust backtrace would otherwise be appended to an internal error's DETAIL and
    // reach the client. Removed before anything could capture one (with preloading this
    // runs in the postmaster, whose environment every backend inherits).
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
    guc::init();
    // SAFETY: a plain read of a flag the postmaster sets while loading preloaded libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::install_hooks();
    }
    txn::init();
}

extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../../sql/peers.sql", name = "peers", requires = ["schema"]);
extension_sql_file!(
    "../../sql/retention.sql",
    name = "retention",
    requires = ["peers"]
);
extension_sql_file!(
    "../../sql/views.sql",
    name = "views",
    requires = [
        "retention",
        stats::_live_counters,
        stats::_live_rejects,
        peers::trigger::peers_changed
    ]
);
extension_sql_file!("../../sql/grants.sql", name = "grants", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pgvpn'"]
    }
}
