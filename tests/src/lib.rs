//! Test harness for pgvpn: a private PostgreSQL cluster, network namespaces, shims, and
//! hand-built packets. Used by `tests/sql_api.rs`, `tests/tunnel.rs` and the `demo` binary.
//!
//! Running (as root; the SQL tests need the extension installed, the tunnel tests and the
//! demo also need `pgvpn-shim` built in release mode):
//!
//! ```text
//! cargo build --release -p pgvpn-shim
//! cargo test -p pgvpn-tests                      # harness, sql_api, tunnel
//! cargo run --release -p pgvpn-tests --bin demo  # the guided tour
//! ```
//!
//! Environment: `PGVPN_SHIM` (shim binary, default `<target>/release/pgvpn-shim`),
//! `PGVPN_PG_BINDIR` (default `/usr/lib/postgresql/15/bin`), `PGVPN_KEEP_CLUSTER=1` and
//! `PGVPN_KEEP_LOGS=1` (keep the cluster directory / shim logs for debugging).
//! Tools used: `ip` (iproute2), `runuser`, `ping` (iputils-ping), `psql`, `iperf3` (demo).

pub mod cluster;
pub mod netns;
pub mod packet;
pub mod shim;
pub mod sql;
pub mod util;

pub use cluster::{db_error, extension_available, quote_ident, quote_literal, sqlstate, Cluster};
pub use netns::{Bg, Netns};
pub use shim::{shim_path, Shim, ShimSpec};
pub use util::{is_root, wait_for, Rng};
