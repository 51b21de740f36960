//! Run `pgvpn-shim` inside a network namespace.

use crate::cluster::Cluster;
use crate::netns::{Bg, Netns};
use crate::util::{self, next_id, tail, wait_for};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// The shim binary: `$PGVPN_SHIM`, else `<workspace>/target/release/pgvpn-shim`
/// (also honouring `CARGO_TARGET_DIR`).
pub fn shim_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PGVPN_SHIM") {
        return PathBuf::from(p);
    }
    let target = util::target_dir();
    target.join("release/pgvpn-shim")
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ShimSpec {
    /// The role the shim logs in as (used to recognise its backend).
    pub role: String,
    /// `--db`
    pub conninfo: String,
    /// `--address`, e.g. `198.18.0.1/24`
    pub address: String,
    /// `--tun`, e.g. `pgvpn0`
    pub tun: String,
    /// Anything else to pass.
    pub extra_args: Vec<String>,
    /// Environment variables for the shim (e.g. PGSSLROOTCERT), on top of the test's.
    pub env: Vec<(String, String)>,
}

impl ShimSpec {
    pub fn new(cluster: &Cluster, db: &str, role: &str, address: &str, tun: &str) -> ShimSpec {
        ShimSpec {
            role: role.to_string(),
            conninfo: cluster.conninfo(role, db),
            address: address.to_string(),
            tun: tun.to_string(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The shim's command line inside `ns`.
    fn command(&self, ns: &Netns) -> std::process::Command {
        let bin = shim_path();
        assert!(
            bin.exists(),
            "pgvpn-shim not found at {} (build it with `cargo build --release -p pgvpn-shim` or set PGVPN_SHIM)",
            bin.display()
        );
        let mut cmd = ns.command(&bin);
        cmd.args([
            "--db",
            &self.conninfo,
            "--address",
            &self.address,
            "--tun",
            &self.tun,
        ]);
        cmd.args(&self.extra_args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

fn log_path(ns: &Netns) -> PathBuf {
    std::env::temp_dir().join(format!(
        "pgvpn-shim-{}-{}-{}.log",
        std::process::id(),
        next_id(),
        ns.name()
    ))
}

pub struct Shim {
    bg: Bg,
    spec: ShimSpec,
    ns_name: String,
    log: PathBuf,
    /// Backend PID(s) of this shim's database session(s), seen at start.
    pub backend_pids: Vec<i32>,
}

fn backends_of(cluster: &Cluster, role: &str) -> HashSet<i32> {
    let mut c = cluster.superuser("postgres");
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE usename = $1",
        &[&role],
    )
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get::<_, i32>(0))
    .collect()
}

impl Shim {
    /// Start the shim in `ns` and wait until its tun device is up with the address and it
    /// has a database session. Panics (printing the shim's stderr) if it does not get
    /// there within 30 s or exits.
    pub fn start(ns: &Netns, cluster: &Cluster, spec: &ShimSpec) -> Shim {
        let before = backends_of(cluster, &spec.role);
        Shim::start_until(ns, spec, |shim| {
            let now = backends_of(cluster, &spec.role);
            let new: Vec<i32> = now.difference(&before).copied().collect();
            // The shim opens two sessions (uplink and downlink) and logs "ready:" once
            // both are open and its threads run.
            (!new.is_empty() && (shim.logged_ready() || new.len() >= 2)).then_some(new)
        })
    }

    /// Like [`Shim::start`], for a database the harness did not start (e.g.
    /// pg_auto_failover's nodes, see `crate::autoctl`): ready once its device is up with
    /// the address and it logged "ready:" (both sessions open). `backend_pids` stays
    /// empty.
    pub fn start_logged_ready(ns: &Netns, spec: &ShimSpec) -> Shim {
        Shim::start_until(ns, spec, |shim| shim.logged_ready().then(Vec::new))
    }

    fn logged_ready(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(" ready: "))
    }

    /// Starts the shim and waits for its device, its address, then `sessions` (which
    /// returns the backend PIDs once the shim's database sessions are there).
    fn start_until(
        ns: &Netns,
        spec: &ShimSpec,
        mut sessions: impl FnMut(&Shim) -> Option<Vec<i32>>,
    ) -> Shim {
        let log = log_path(ns);
        let cmd = spec.command(ns);
        let bg = ns.spawn_command(cmd, Some(&log), Some(&log));
        let mut shim = Shim {
            bg,
            spec: spec.clone(),
            ns_name: ns.name().to_string(),
            log,
            backend_pids: vec![],
        };

        let ip = spec.address.split('/').next().unwrap().to_string();
        let mut stage = "device";
        let ok = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
            if let Some(st) = shim.bg.try_wait() {
                panic!(
                    "pgvpn-shim in {} exited during startup ({st}); its output:\n{}",
                    shim.ns_name,
                    tail(&shim.log, 60)
                );
            }
            let link = ns.try_ip(&["-o", "link", "show", "dev", &spec.tun]);
            if !link.status.success() {
                stage = "device";
                return None;
            }
            let flags = String::from_utf8_lossy(&link.stdout).into_owned();
            let flags = flags
                .split('<')
                .nth(1)
                .and_then(|s| s.split('>').next())
                .unwrap_or("");
            if !flags.split(',').any(|f| f == "UP") {
                stage = "device UP";
                return None;
            }
            let addr = ns.try_ip(&["-o", "addr", "show", "dev", &spec.tun]);
            let addr = String::from_utf8_lossy(&addr.stdout).into_owned();
            if !addr
                .split_whitespace()
                .any(|w| w.split('/').next() == Some(ip.as_str()))
            {
                stage = "address";
                return None;
            }
            let new = sessions(&shim);
            if new.is_none() {
                stage = "database sessions";
            }
            new
        });
        match ok {
            Some(pids) => shim.backend_pids = pids,
            None => panic!(
                "pgvpn-shim in {} not ready after 30 s (waiting for: {stage}); its output:\n{}",
                shim.ns_name,
                tail(&shim.log, 60)
            ),
        }
        shim
    }

    /// Runs the shim in `ns` expecting it to fail: waits up to `timeout` for it to exit
    /// and returns its exit code and output (panics if it is still running). For the
    /// startup refusals: bad settings (2), certificate or login refused (3).
    pub fn run_to_exit(ns: &Netns, spec: &ShimSpec, timeout: Duration) -> (Option<i32>, String) {
        let log = log_path(ns);
        let mut bg = ns.spawn_command(spec.command(ns), Some(&log), Some(&log));
        let status = bg.wait_timeout(timeout);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        match status {
            Some(st) => (st.code(), text),
            None => {
                bg.kill();
                panic!(
                    "pgvpn-shim in {} still running after {timeout:?}; its output:\n{text}",
                    ns.name()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.bg.pid()
    }

    pub fn spec(&self) -> &ShimSpec {
        &self.spec
    }

    pub fn log_path(&self) -> &PathBuf {
        &self.log
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// Is it still running?
    pub fn running(&mut self) -> bool {
        self.bg.try_wait().is_none()
    }

    /// SIGTERM and wait (up to 20 s) for it to exit; returns its exit status.
    /// Falls back to SIGKILL (and panics) if it does not exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.bg.signal("TERM");
        match self.bg.wait_timeout(Duration::from_secs(20)) {
            Some(st) => st,
            None => {
                self.bg.kill();
                panic!(
                    "pgvpn-shim did not exit within 20 s of SIGTERM; output:\n{}",
                    self.log_tail(60)
                );
            }
        }
    }

    /// SIGTERM and require exit status 0.
    pub fn stop(&mut self) {
        let st = self.terminate();
        assert!(
            st.success(),
            "pgvpn-shim exited with {st} after SIGTERM (expected 0); output:\n{}",
            self.log_tail(60)
        );
    }

    /// Wait (up to 10 s) until this shim's database sessions have ended. After a kill -9
    /// a backend may still finish (and commit) the statement it was running, e.g. an ack;
    /// wait for this before reading what the shim left in the database.
    pub fn wait_sessions_gone(&self, cluster: &Cluster) {
        let gone = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            let now = backends_of(cluster, &self.spec.role);
            (!self.backend_pids.iter().any(|p| now.contains(p))).then_some(())
        });
        assert!(
            gone.is_some(),
            "the shim's sessions {:?} did not end",
            self.backend_pids
        );
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill9(&mut self) {
        self.bg.signal("KILL");
        self.bg.kill();
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- pgvpn-shim output ({} in {}) ---\n{}\n--- end of shim output ---",
                self.spec.role,
                self.ns_name,
                self.log_tail(40)
            );
        }
        self.bg.kill();
        if std::env::var_os("PGVPN_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("[shim] log kept at {}", self.log.display());
        }
    }
}

/// The counters of the last `pgvpn-shim summary: k=v ...` line in a shim's output.
pub fn parse_summary(output: &str) -> Option<BTreeMap<String, i64>> {
    output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("pgvpn-shim summary:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect()
        })
}

impl Shim {
    /// SIGTERM, then (exit status, the summary line it printed as it stopped, if any):
    /// what the demos show.
    pub fn terminate_with_summary(&mut self) -> (ExitStatus, Option<String>) {
        let st = self.terminate();
        let line = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| l.starts_with("pgvpn-shim summary:"))
            .map(str::to_string);
        (st, line)
    }

    /// Stops the shim and returns the counters it printed when it stopped.
    pub fn stop_and_summary(&mut self) -> BTreeMap<String, i64> {
        self.stop();
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        parse_summary(&text).unwrap_or_else(|| panic!("no summary line in:\n{}", self.log_tail(30)))
    }
}
