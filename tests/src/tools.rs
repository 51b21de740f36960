//! Running the `pgvpn` tool (capture, show) and checking what it and the shim's
//! `--metrics` produce: capture files read back with tshark ([`tshark`]), the Prometheus
//! text format parsed strictly ([`prom`]). Used by tests/tools.rs.
//!
//! Environment: `PGVPN_TOOL` (the tool, default `<target>/release/pgvpn`, built with the
//! shim: `cargo build --release -p pgvpn-shim`).

pub mod prom;
pub mod tshark;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::cluster::Cluster;
use crate::util;

/// The tool binary: `$PGVPN_TOOL`, else next to the shim in `<target>/release/`.
pub fn tool_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PGVPN_TOOL") {
        return PathBuf::from(p);
    }
    let target = util::target_dir();
    target.join("release/pgvpn")
}

/// `pgvpn ARGS...` connecting to `cluster` as `role` (through `--db`, in an environment
/// without PG* variables, so only what the test says counts).
pub fn command(cluster: &Cluster, db: &str, role: &str, args: &[&str]) -> Command {
    let bin = tool_path();
    assert!(
        bin.exists(),
        "pgvpn not found at {} (cargo build --release -p pgvpn-shim, or set PGVPN_TOOL)",
        bin.display()
    );
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            c.env_remove(k);
        }
    }
    c.env_remove("NO_COLOR");
    c.arg("--db").arg(cluster.conninfo(role, db)).args(args);
    c
}

/// Runs it to completion (stdin from /dev/null).
pub fn run(cluster: &Cluster, db: &str, role: &str, args: &[&str]) -> Output {
    util::output(&mut command(cluster, db, role, args))
}

/// Runs it and requires exit status 0; returns stdout.
pub fn run_ok(cluster: &Cluster, db: &str, role: &str, args: &[&str]) -> String {
    let out = run(cluster, db, role, args);
    assert!(
        out.status.success(),
        "pgvpn {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts it in the background, stderr to `stderr`; the caller owns the child (and must
/// kill it if the test fails: see [`Running`]).
pub fn spawn(cluster: &Cluster, db: &str, role: &str, args: &[&str], stderr: &Path) -> Running {
    let mut c = command(cluster, db, role, args);
    let err = std::fs::File::create(stderr).expect("stderr file");
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    Running {
        child: Some(c.spawn().expect("spawn pgvpn")),
        stderr: stderr.to_path_buf(),
    }
}

/// A tool process in the background; killed (by PID) when dropped.
pub struct Running {
    pub child: Option<Child>,
    stderr: PathBuf,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `sig` and waits up to `timeout` for the exit; its status code.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: std::time::Duration) -> Option<i32> {
        util::signal(self.pid(), sig);
        let child = self.child.as_mut().expect("running");
        let st = util::wait_for(timeout, std::time::Duration::from_millis(20), || {
            child.try_wait().ok().flatten()
        });
        match st {
            Some(st) => {
                self.child = None;
                st.code()
            }
            None => panic!(
                "pgvpn did not exit within {timeout:?} of SIG{sig}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Has it exited (its status code), without waiting?
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.code())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `argv` under a pseudo-terminal (`script`), so that stdout and stderr are a
/// terminal; returns what the terminal showed and the exit status.
pub fn on_terminal(argv: &[String]) -> (String, Option<i32>) {
    let line = argv
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let out = util::output(Command::new("script").args(["-qfec", &line, "/dev/null"]));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}
