//! Test harness for pgvpn: a private PostgreSQL cluster, network namespaces, shims, test
//! packets, and what the SQL-level specs share (`spec`). Used by the specs in `tests/`
//! (delivery, routing, security, retention, notify), `tests/tunnel.rs`, and the `demo`
//! and `bench` binaries.
//!
//! Running (as root; the SQL tests need the extension installed, the tunnel tests and the
//! demo also need `pgvpn-shim` built in release mode):
//!
//! ```text
//! cargo build --release -p pgvpn-shim
//! cargo test -p pgvpn-tests                      # harness, the SQL specs, tunnel
//! cargo run --release -p pgvpn-tests --bin demo  # the guided tour
//! ```
//!
//! Environment: `PGVPN_SHIM` (shim binary, default `<target>/release/pgvpn-shim`),
//! `PGVPN_PG_BINDIR` (default `/usr/lib/postgresql/15/bin`), `PGVPN_KEEP_CLUSTER=1` and
//! `PGVPN_KEEP_LOGS=1` (keep the cluster directory / shim logs for debugging).
//! Tools used: `ip` (iproute2), `runuser`, `ping` (iputils-ping), `psql`, `iperf3` (demo),
//! `openssl` and `tcpdump` (tests/tls_network.rs).

pub mod autoctl;
pub mod cluster;
pub mod cpu;
pub mod dbstate;
pub mod fill;
pub mod netns;
pub mod packet;
pub mod pgcopy;
pub mod pgtools;
pub mod replication;
pub mod schemadiff;
pub mod shim;
pub mod soak;
pub mod spec;
pub mod sql;
pub mod stream;
pub mod tools;
pub mod underlay;
pub mod util;

pub use cluster::{db_error, extension_available, sqlstate, Cluster};
pub use netns::{Bg, Netns};
pub use shim::{shim_path, Shim, ShimSpec};
pub use util::{is_root, wait_for, Rng};

/// What the demo and the bench need before they start: root, the extension installed,
/// the shim built, and these command-line tools. `who` names the caller in messages.
pub fn check_prerequisites(who: &str, tools: &[&str]) -> Result<(), String> {
    if !util::is_root() {
        return Err(format!(
            "{who} needs root (network namespaces and tun devices)"
        ));
    }
    if !cluster::extension_available() {
        return Err(format!(
            "the pgvpn extension is not installed ({} is missing)",
            cluster::extension_control_file().display()
        ));
    }
    if !shim_path().exists() {
        return Err(format!(
            "pgvpn-shim is not built ({} is missing)",
            shim_path().display()
        ));
    }
    for tool in tools {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}
