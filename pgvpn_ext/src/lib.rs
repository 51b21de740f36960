//! pgvpn: a VPN whose transport and audit log is PostgreSQL.
//!
//! Module map: decoding and routing are pure Rust in `pgvpn_core` (no pgrx, unit-tested
//! and fuzzed without a database); `send`, `deliver`, `notify`, `retention` and `peers`
//! are the SQL API around them; `error` maps failures to SQL errors. Handwritten SQL
//! lives in `../sql/`.
use pgrx::prelude::*;

mod audit;
mod deliver;
mod error;
mod guc;
mod inet;
mod notify;
mod peers;
mod plans;
mod retention;
mod send;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    notify::init();
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
    requires = ["retention"]
);
extension_sql_file!("../../sql/grants.sql", name = "grants", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
