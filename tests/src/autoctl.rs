//! pg_auto_failover (`pg_autoctl`, Debian's `postgresql-15-auto-failover`) on namespaced
//! hosts, for `make ha-demo`: a monitor and nodes, each a throwaway cluster that
//! `pg_autoctl create monitor|postgres` makes and `pg_autoctl run` then keeps running
//! (restarts, promotes, rejoins).
//!
//! * Every `pg_autoctl` runs as `postgres` inside its host's network namespace, through
//!   `setpriv` rather than `runuser`: setpriv execs, so the PID we hold is pg_autoctl's own
//!   and its whole process tree (services, postmaster, backends) is ours to stop.
//! * Private state: each has a directory `<tmp>/pgvpn-autoctl-<pid>-<n>-<name>` holding the
//!   data directory, the unix socket (`PG_REGRESS_SOCK_DIR` and `PGHOST` point there) and
//!   pg_autoctl's configuration and state files (`HOME` and `XDG_*` point there, so
//!   nothing lands in ~postgres).
//! * `--auth trust --no-ssl`: a demo on namespaced underlay addresses (198.19.0.0/16) that
//!   nothing outside can reach, never a setup for real use.
//! * Drop stops `pg_autoctl run` (SIGTERM: it stops its postgres cleanly), SIGKILLs by PID
//!   whatever of its process tree is left, and removes the directory. Borrowing the
//!   namespace makes sure this happens before the namespace goes.

use crate::cluster::{db_error, pg_bindir};
use crate::netns::Netns;
use crate::util::{self, describe, next_id, output, tail, wait_for};
use pgvpn_core::sql::quote_literal;
use pgvpn_shim::conn;
use pgvpn_shim::error::DbError;
use postgres::Client;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The monitor's database.
pub const MONITOR_DB: &str = "pg_auto_failover";

/// Monitor settings for quick decisions (defaults: a health check every 5 s, 5 s timeout,
/// 2 retries 2 s apart, unhealthy after 20 s). What `make ha-demo` measured with these is
/// in docs/ha.md.
pub const QUICK_MONITOR: [(&str, &str); 5] = [
    ("pgautofailover.health_check_period", "1000"),
    ("pgautofailover.health_check_timeout", "1000"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.health_check_retry_delay", "500"),
    ("pgautofailover.node_considered_unhealthy_timeout", "2000"),
];

/// Is `pg_autoctl` installed?
pub fn available() -> bool {
    Command::new("pg_autoctl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A node's state as the monitor has it (`pgautofailover.node`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub host: String,
    pub port: i32,
    pub reported: String,
    pub goal: String,
}

/// A monitor or a node: its directory, its address, and `pg_autoctl run` once started.
pub struct Autoctl<'ns> {
    ns: &'ns Netns,
    name: String,
    dir: PathBuf,
    addr: String,
    port: u16,
    run: Option<Child>,
}

impl<'ns> Autoctl<'ns> {
    fn prepare(ns: &'ns Netns, name: &str, addr: &str, port: u16) -> Autoctl<'ns> {
        let dir = std::env::temp_dir().join(format!(
            "pgvpn-autoctl-{}-{}-{name}",
            std::process::id(),
            next_id()
        ));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["sock", "xdg/config", "xdg/data", "xdg/run"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.join(sub).display()));
        }
        util::run_ok(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&dir),
        );
        util::run_ok(Command::new("chmod").arg("-R").arg("0700").arg(&dir));
        Autoctl {
            ns,
            name: name.to_string(),
            dir,
            addr: addr.to_string(),
            port,
            run: None,
        }
    }

    /// `pg_autoctl create monitor` on `addr:port` in `ns` (not started yet).
    pub fn create_monitor(ns: &'ns Netns, addr: &str, port: u16) -> Autoctl<'ns> {
        let m = Autoctl::prepare(ns, "monitor", addr, port);
        let port = port.to_string();
        let pgctl = pg_bindir().join("pg_ctl");
        m.pg_autoctl_ok(&[
            "create",
            "monitor",
            "--pgctl",
            pgctl.to_str().expect("utf-8 path"),
            "--pgport",
            &port,
            "--hostname",
            addr,
            "--auth",
            "trust",
            "--no-ssl",
        ]);
        // `create monitor` has no --listen: it would listen on every address of the
        // namespace; only the underlay address is wanted.
        m.pg_autoctl_ok(&["config", "set", "postgresql.listen_addresses", addr]);
        m
    }

    /// `pg_autoctl create postgres` for node `name` on `addr:port` in `ns`, registered with
    /// `monitor`, database `db`. The first node of a group initdb's and is left stopped
    /// (its `run` starts it); a later one needs the first running: it is a
    /// `pg_basebackup` of it.
    pub fn create_node(
        ns: &'ns Netns,
        name: &str,
        addr: &str,
        port: u16,
        monitor: &Autoctl<'_>,
        db: &str,
    ) -> Autoctl<'ns> {
        let n = Autoctl::prepare(ns, name, addr, port);
        let port = port.to_string();
        let pgctl = pg_bindir().join("pg_ctl");
        let monitor_uri = monitor.monitor_uri();
        n.pg_autoctl_ok(&[
            "create",
            "postgres",
            "--pgctl",
            pgctl.to_str().expect("utf-8 path"),
            "--pgport",
            &port,
            "--hostname",
            addr,
            "--listen",
            addr,
            "--name",
            name,
            "--dbname",
            db,
            "--monitor",
            &monitor_uri,
            "--auth",
            "trust",
            "--no-ssl",
        ]);
        n
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn addr(&self) -> &str {
        &self.addr
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }
    fn log_file(&self) -> PathBuf {
        self.dir.join("pg_autoctl.log")
    }
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_file(), n)
    }

    /// `pg_autoctl ARGS --pgdata <this one>` as `postgres` in the namespace, with the
    /// private socket, configuration and state directories.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = self.ns.command("setpriv");
        c.args([
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--init-groups",
        ])
        .arg("pg_autoctl")
        .args(args)
        .arg("--pgdata")
        .arg(self.data_dir())
        .current_dir(&self.dir)
        .env("HOME", &self.dir)
        .env("XDG_CONFIG_HOME", self.dir.join("xdg/config"))
        .env("XDG_DATA_HOME", self.dir.join("xdg/data"))
        .env("XDG_RUNTIME_DIR", self.dir.join("xdg/run"))
        .env("PG_REGRESS_SOCK_DIR", self.socket_dir())
        .env("PGHOST", self.socket_dir())
        .env("PGPORT", self.port.to_string());
        c
    }

    /// Runs `pg_autoctl ARGS` to completion.
    pub fn pg_autoctl(&self, args: &[&str]) -> Output {
        output(&mut self.command(args))
    }

    /// Runs `pg_autoctl ARGS`; panics with its output if it fails; returns stdout.
    pub fn pg_autoctl_ok(&self, args: &[&str]) -> String {
        let mut c = self.command(args);
        let out = output(&mut c);
        assert!(
            out.status.success(),
            "`{}` failed ({}):\n{}{}",
            describe(&c),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Appends lines to `postgresql.conf`; they come after pg_autoctl's `include` (the
    /// file's first line), so they win over its settings.
    pub fn append_conf(&self, lines: &[&str]) {
        append(&self.data_dir().join("postgresql.conf"), lines);
    }

    /// Appends lines to `pg_hba.conf`.
    pub fn append_hba(&self, lines: &[&str]) {
        append(&self.data_dir().join("pg_hba.conf"), lines);
    }

    /// Starts `pg_autoctl run` (in a process group of its own, so that a Ctrl-C at the
    /// terminal reaches only the demo, which then stops it) and waits until its postgres
    /// accepts connections on the socket.
    pub fn start(&mut self) {
        assert!(self.run.is_none(), "{} already runs", self.name);
        let log = fs::File::create(self.log_file()).expect("pg_autoctl log");
        let mut c = self.command(&["run"]);
        c.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{}`: {e}", describe(&c)));
        self.run = Some(child);
        let up = wait_for(Duration::from_secs(120), Duration::from_millis(200), || {
            if let Some(st) = self.run.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "pg_autoctl run ({}) exited ({st}):\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            self.connect("postgres").ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "{}: postgres not accepting connections 120 s after pg_autoctl run:\n{}",
            self.name,
            self.log_tail(40)
        );
    }

    /// PID of `pg_autoctl run`, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.run.as_ref().map(Child::id)
    }

    /// `postgres` on database `db`, through the private unix socket.
    pub fn connect(&self, db: &str) -> Result<Client, DbError> {
        let info = format!(
            "host={} port={} user=postgres dbname={}",
            self.socket_dir().display(),
            self.port,
            db
        );
        let settings = conn::parse_with(&info, &conn::Env::empty())
            .unwrap_or_else(|e| panic!("connection string {info}: {e}"));
        conn::connect(&settings, "pgvpn-ha-demo")
    }

    /// Does its postgres accept writes now (a primary, not in recovery)?
    pub fn writable(&self) -> bool {
        self.connect("postgres")
            .ok()
            .and_then(|mut c| c.query_one("SELECT NOT pg_is_in_recovery()", &[]).ok())
            .is_some_and(|r| r.get::<_, bool>(0))
    }

    /// The monitor's connection string, as `pg_autoctl show uri` gives it.
    pub fn monitor_uri(&self) -> String {
        let table = self.pg_autoctl_ok(&["show", "uri"]);
        table
            .lines()
            .find(|l| l.split('|').next().is_some_and(|t| t.trim() == "monitor"))
            .and_then(|l| l.rsplit('|').next())
            .map(|u| u.trim().to_string())
            .filter(|u| u.starts_with("postgres"))
            .unwrap_or_else(|| panic!("no monitor URI in `pg_autoctl show uri`:\n{table}"))
    }

    /// What clients connect with: `pg_autoctl show uri --formation default` (every node,
    /// `target_session_attrs=read-write`).
    pub fn formation_uri(&self) -> String {
        let uri = self.pg_autoctl_ok(&["show", "uri", "--formation", "default"]);
        let uri = uri.trim().to_string();
        assert!(
            uri.starts_with("postgres"),
            "unexpected `pg_autoctl show uri --formation default`: {uri}"
        );
        uri
    }

    /// `ALTER SYSTEM SET` each setting on the monitor, then a reload.
    pub fn tune(&self, settings: &[(&str, &str)]) {
        let mut c = self
            .connect(MONITOR_DB)
            .unwrap_or_else(|e| panic!("connect to the monitor: {e}"));
        for (name, value) in settings {
            // ALTER SYSTEM takes no parameters; the values are our own constants.
            let sql = format!("ALTER SYSTEM SET {name} = {}", quote_literal(value));
            c.batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)));
        }
        c.batch_execute("SELECT pg_reload_conf()")
            .unwrap_or_else(|e| panic!("pg_reload_conf: {}", db_error(&e)));
    }

    /// The current value of each setting on the monitor (`SHOW`), for printing.
    pub fn settings(&self, names: &[&str]) -> Vec<(String, String)> {
        let mut c = self
            .connect(MONITOR_DB)
            .unwrap_or_else(|e| panic!("connect to the monitor: {e}"));
        names
            .iter()
            .map(|n| {
                let v: String = c
                    .query_one("SELECT current_setting($1)", &[n])
                    .unwrap_or_else(|e| panic!("current_setting({n}): {}", db_error(&e)))
                    .get(0);
                (n.to_string(), v)
            })
            .collect()
    }

    /// The nodes as the monitor sees them, in registration order.
    pub fn node_states(&self) -> Result<Vec<NodeState>, String> {
        let mut c = self.connect(MONITOR_DB).map_err(|e| e.to_string())?;
        let rows = c
            .query(
                "SELECT nodename, nodehost, nodeport, reportedstate::text, goalstate::text \
                 FROM pgautofailover.node ORDER BY nodeid",
                &[],
            )
            .map_err(|e| db_error(&e))?;
        Ok(rows
            .iter()
            .map(|r| NodeState {
                name: r.get(0),
                host: r.get(1),
                port: r.get(2),
                reported: r.get(3),
                goal: r.get(4),
            })
            .collect())
    }

    /// Has every named node reached (reported and assigned) the given state?
    pub fn settled(&self, want: &[(&str, &str)]) -> bool {
        let Ok(nodes) = self.node_states() else {
            return false;
        };
        want.iter().all(|(name, state)| {
            nodes
                .iter()
                .any(|n| n.name == *name && n.reported == *state && n.goal == *state)
        })
    }

    /// `kill -9` of `pg_autoctl run` and its whole process tree at once (the supervisor,
    /// its services, the postmaster and its backends), as when the host dies; waits until
    /// they are gone. Returns how many processes were killed.
    pub fn kill9(&mut self) -> usize {
        let Some(mut child) = self.run.take() else {
            return 0;
        };
        let pids = util::process_tree(child.id());
        for pid in &pids {
            util::signal(*pid, "KILL");
        }
        let _ = child.wait();
        let gone = wait_for(Duration::from_secs(15), Duration::from_millis(10), || {
            (!pids.iter().any(|p| util::running(*p))).then_some(())
        });
        if gone.is_none() {
            eprintln!(
                "[autoctl] {}: still running after kill -9: {pids:?}",
                self.name
            );
        }
        pids.len()
    }

    /// Stops `pg_autoctl run` (SIGTERM, up to 30 s), then kills what is left of its tree,
    /// and a postmaster of this data directory that escaped it (e.g. after pg_autoctl
    /// itself died). Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = self.run.as_mut() {
            util::signal(child.id(), "TERM");
            let exited = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
                child.try_wait().ok().flatten()
            });
            if exited.is_some() {
                self.run = None;
            }
        }
        self.kill9();
        if let Some(pid) = self.postmaster_pid() {
            util::signal(pid, "KILL");
            let _ = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
                (!util::running(pid)).then_some(())
            });
        }
    }

    /// The PID in `postmaster.pid`, if that process runs and is a postgres of this data
    /// directory (so that a stale file never makes us signal someone else).
    fn postmaster_pid(&self) -> Option<u32> {
        let data = self.data_dir();
        let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = String::from_utf8_lossy(&cmdline).contains(data.to_str()?);
        (ours && util::running(pid)).then_some(pid)
    }
}

impl Drop for Autoctl<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- pg_autoctl {} ({}) ---\n{}\n--- end ---",
                self.name,
                self.log_file().display(),
                self.log_tail(40)
            );
        }
        self.stop();
        crate::util::remove_dir_unless_kept(&self.dir, "autoctl");
    }
}

fn append(path: &Path, lines: &[&str]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut text = String::from("\n# pgvpn ha-demo\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
