//! A private, throwaway PostgreSQL 15 cluster.
//!
//! * `initdb` and `pg_ctl` run as the `postgres` OS user (`runuser -u postgres --`) in a
//!   fresh directory under the temp dir that is owned by `postgres`.
//! * No TCP by default: `listen_addresses = ''`; the server is reached only through its
//!   unix socket in that directory (sockets cross network namespaces). The port number
//!   names the socket file (`.s.PGSQL.<port>`). [`ClusterOptions`] can start it inside a
//!   network namespace with TCP on an underlay address, TLS files and pg_hba lines (see
//!   tests/tls_network.rs); the harness itself always uses the socket.
//! * `fsync` / `synchronous_commit` are left at their (durable) defaults.
//! * Local connections use `trust`: the directory is private to this test and only root
//!   and `postgres` can reach the socket, so any role can be used by the test without
//!   passwords (LOGIN roles behave like peers authenticated by the OS). The harness
//!   connects through the shim's own connection code (`pgvpn_shim::conn`).
//! * Drop stops the server (`pg_ctl stop -m immediate`) and removes the directory; if the
//!   thread is panicking, the tail of the server log is printed first.

use crate::util::{self, children_of, next_id, output, run_ok, running, tail, wait_for};
use pgvpn_core::sql::quote_ident;
use pgvpn_shim::conn;
use pgvpn_shim::error::DbError;
use postgres::Client;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Prefix of every cluster directory we create: `<tmp>/pgvpn-pg-<pid>-<n>`.
pub const DIR_PREFIX: &str = "pgvpn-pg-";

/// Where the PostgreSQL 15 server binaries live (override with `PGVPN_PG_BINDIR`).
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("PGVPN_PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Is the `pgvpn` extension installed into the server's share directory?
pub fn extension_control_file() -> PathBuf {
    let share = Command::new(pg_bindir().join("pg_config"))
        .arg("--sharedir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "/usr/share/postgresql/15".to_string());
    Path::new(&share).join("extension/pgvpn.control")
}

pub fn extension_available() -> bool {
    extension_control_file().exists()
}

/// Options for [`Cluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines (e.g. `"log_min_messages = debug1"`).
    pub extra_conf: Vec<String>,
    /// `pg_hba.conf` lines placed before initdb's (which are `local ... trust` and
    /// `host ... reject`), so they decide for TCP.
    pub hba: Vec<String>,
    /// Run the server inside this network namespace (`ip netns exec`), e.g. to listen on
    /// an underlay address there. The unix socket still works from anywhere.
    pub netns: Option<String>,
    /// Files copied into the data directory under these names, owned by `postgres` with
    /// mode 0600 (certificates and keys for `ssl = on`).
    pub data_files: Vec<(PathBuf, String)>,
}

pub struct Cluster {
    dir: PathBuf,
    port: u16,
    stopped: bool,
    netns: Option<String>,
}

fn as_postgres(dir: &Path, program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(program)
        .current_dir(dir);
    c
}

/// Remove clusters left behind by test processes that no longer exist.
fn cleanup_stale() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || util::pid_alive(pid) {
            continue;
        }
        let dir = e.path();
        let data = dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = output(
                as_postgres(&dir, &pg_bindir().join("pg_ctl"))
                    .arg("stop")
                    .args(["-m", "immediate", "-w", "-D"])
                    .arg(&data),
            );
        }
        let _ = fs::remove_dir_all(&dir);
        eprintln!("[cluster] removed stale cluster dir {}", dir.display());
    }
}

impl Cluster {
    /// initdb + start, without any extension.
    pub fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> Cluster {
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(cleanup_stale);

        let n = next_id();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create cluster dir");
        run_ok(Command::new("chown").arg("postgres:postgres").arg(&dir));
        run_ok(Command::new("chmod").arg("0700").arg(&dir));
        // Port only names the socket file; the directory is unique anyway.
        let port = 20000 + ((std::process::id() as u64 * 7 + n) % 40000) as u16;
        let mut cluster = Cluster {
            dir,
            port,
            stopped: true,
            netns: opts.netns.clone(),
        };

        let data = cluster.data_dir();
        run_ok(
            as_postgres(&cluster.dir, &pg_bindir().join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=reject",
                    "-E",
                    "UTF8",
                ])
                .args(["--locale=C", "--no-sync"]),
        );
        let mut conf = format!(
            "\n# pgvpn test harness\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n\
             max_connections = 60\nshared_buffers = 64MB\nlogging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            cluster.dir.display(),
            port
        );
        if extension_available() {
            // pgvpn keeps its wake-ups and counters in shared memory (pgvpn_ext/src/shmem.rs).
            conf.push_str("shared_preload_libraries = 'pgvpn'\n");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        existing.push_str(&conf);
        fs::write(&conf_path, existing).expect("write postgresql.conf");
        if !opts.hba.is_empty() {
            let hba_path = data.join("pg_hba.conf");
            let defaults = fs::read_to_string(&hba_path).expect("read pg_hba.conf");
            let mut hba = format!("# pgvpn test harness\n{}\n", opts.hba.join("\n"));
            hba.push_str(&defaults);
            fs::write(&hba_path, hba).expect("write pg_hba.conf");
        }
        for (from, name) in &opts.data_files {
            let to = data.join(name);
            fs::copy(from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
            run_ok(Command::new("chown").arg("postgres:postgres").arg(&to));
            run_ok(Command::new("chmod").arg("0600").arg(&to));
        }

        let out = output(&mut cluster.pg_ctl_start());
        if !out.status.success() {
            panic!(
                "pg_ctl start failed: {}\n{}\n--- server log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&cluster.log_file(), 40)
            );
        }
        cluster.stopped = false;
        cluster
    }

    /// initdb + start + `CREATE DATABASE db` + `CREATE EXTENSION pgvpn` in it.
    /// Panics with a clear message if the extension is not installed.
    pub fn with_pgvpn(db: &str) -> Cluster {
        if !extension_available() {
            panic!(
                "the pgvpn extension is not installed ({} is missing): build and install pgvpn_ext first",
                extension_control_file().display()
            );
        }
        let c = Cluster::start();
        c.create_db(db);
        c.create_extension(db);
        c
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The unix socket directory (= the cluster directory).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_file(), n)
    }

    /// `host=<dir> port=<p> user=<role> dbname=<db>`
    pub fn conninfo(&self, role: &str, db: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.dir.display(),
            self.port,
            role,
            db
        )
    }

    /// Connect as `role` to `db` (panics with the server log tail on failure).
    pub fn connect(&self, role: &str, db: &str) -> Client {
        self.try_connect(role, db).unwrap_or_else(|e| {
            panic!(
                "connect as {role} to {db} failed: {e}\n--- server log ---\n{}",
                self.log_tail(30)
            )
        })
    }

    /// Through the shim's connection code, in a clean environment (no PG* variables, no
    /// ~/.pgpass): the socket and trust, so the role is all that matters.
    pub fn try_connect(&self, role: &str, db: &str) -> Result<Client, DbError> {
        let settings = conn::parse_with(&self.conninfo(role, db), &conn::Env::empty())
            .unwrap_or_else(|e| panic!("harness connection string: {e}"));
        conn::connect(&settings, "pgvpn-tests")
    }

    /// Superuser `postgres` on database `db`.
    pub fn superuser(&self, db: &str) -> Client {
        self.connect("postgres", db)
    }

    pub fn create_db(&self, db: &str) {
        let mut c = self.superuser("postgres");
        c.batch_execute(&format!("CREATE DATABASE {}", quote_ident(db)))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
    }

    pub fn create_extension(&self, db: &str) {
        let mut c = self.superuser(db);
        if let Err(e) = c.batch_execute("CREATE EXTENSION pgvpn") {
            panic!(
                "CREATE EXTENSION pgvpn failed: {}\n--- server log ---\n{}",
                db_error(&e),
                self.log_tail(30)
            );
        }
    }

    /// `CREATE ROLE name LOGIN` (plus optional extra options such as `NOINHERIT`).
    pub fn create_login_role(&self, name: &str) {
        let mut c = self.superuser("postgres");
        c.batch_execute(&format!("CREATE ROLE {} LOGIN", quote_ident(name)))
            .unwrap_or_else(|e| panic!("CREATE ROLE {name}: {e}"));
    }

    /// `pg_ctl start -w` as `postgres`, inside the cluster's network namespace if it has
    /// one (the postmaster then lives there).
    fn pg_ctl_start(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"])
                    .arg(pg_bindir().join("pg_ctl"))
                    .current_dir(&self.dir);
                c
            }
            None => as_postgres(&self.dir, &pg_bindir().join("pg_ctl")),
        };
        c.arg("start")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file());
        c
    }

    /// Crash-restart: `pg_ctl stop -m immediate` (no checkpoint, like a power cut for the
    /// server process) and start again; WAL recovery replays what was committed.
    pub fn restart_immediate(&mut self) {
        self.stop();
        let out = output(&mut self.pg_ctl_start());
        assert!(
            out.status.success(),
            "pg_ctl start (after immediate stop) failed: {}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        );
        self.stopped = false;
    }

    /// A cluster whose data directory is not made by initdb but by `fill` (e.g.
    /// `pg_basebackup` of another cluster), which gets the new data directory's path; it
    /// runs as root, and the directory is then given to `postgres`. The copied
    /// `postgresql.conf` keeps its settings; lines appended to it point the socket and
    /// the port at this cluster's own directory, and `extra_conf` follows.
    pub fn start_from(fill: impl FnOnce(&Path), extra_conf: &[&str]) -> Cluster {
        let n = next_id();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create cluster dir");
        let port = 20000 + ((std::process::id() as u64 * 7 + n) % 40000) as u16;
        let mut cluster = Cluster {
            dir,
            port,
            stopped: true,
            netns: None,
        };
        let data = cluster.data_dir();
        fill(&data);
        run_ok(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&cluster.dir),
        );
        run_ok(
            Command::new("chmod")
                .arg("0700")
                .arg(&cluster.dir)
                .arg(&data),
        );
        let mut conf = format!(
            "\n# pgvpn test harness (a copy of another cluster)\nunix_socket_directories = '{}'\nport = {}\n",
            cluster.dir.display(),
            port
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        existing.push_str(&conf);
        fs::write(&conf_path, existing).expect("write postgresql.conf");
        cluster.start_again();
        cluster
    }

    /// Clean shutdown (`pg_ctl stop -m fast`, with its shutdown checkpoint), e.g. to
    /// swap the installed library before [`Cluster::start_again`]. Idempotent.
    pub fn stop_fast(&mut self) {
        if self.stopped {
            return;
        }
        run_ok(
            as_postgres(&self.dir, &pg_bindir().join("pg_ctl"))
                .arg("stop")
                .args(["-m", "fast", "-w", "-t", "60", "-D"])
                .arg(self.data_dir()),
        );
        self.stopped = true;
    }

    /// Start a stopped cluster (after [`Cluster::stop_fast`] or [`Cluster::stop`]).
    pub fn start_again(&mut self) {
        if !self.stopped {
            return;
        }
        let out = output(&mut self.pg_ctl_start());
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        );
        self.stopped = false;
    }

    /// Stop the server now (immediate mode). Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = output(
            as_postgres(&self.dir, &pg_bindir().join("pg_ctl"))
                .arg("stop")
                .args(["-m", "immediate", "-w", "-t", "30", "-D"])
                .arg(self.data_dir()),
        );
        // Make sure the postmaster is really gone before removing its directory.
        let _ = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            (!self.data_dir().join("postmaster.pid").exists()).then_some(())
        });
    }
}

/// For replication and failover tests (see `crate::replication`): the postmaster as a
/// process, and promotion.
impl Cluster {
    /// The postmaster's PID (the first line of `postmaster.pid`), if it is running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        running(pid).then_some(pid)
    }

    /// `kill -9` of the postmaster, as when the server crashes: no shutdown, nothing
    /// flushed that was not already. Its backends notice and exit; this returns once they
    /// are gone. The data directory stays as a crash leaves it.
    pub fn kill9(&mut self) {
        let Some(pid) = self.postmaster_pid() else {
            self.stopped = true;
            return;
        };
        let children = children_of(pid);
        util::signal(pid, "KILL");
        self.stopped = true;
        let gone = wait_for(Duration::from_secs(15), Duration::from_millis(10), || {
            (!running(pid) && !children.iter().any(|c| running(*c))).then_some(())
        });
        assert!(
            gone.is_some(),
            "processes of the killed postmaster {pid} still running: {children:?}"
        );
    }

    /// `pg_ctl promote -w`: a standby stops recovery and becomes a primary.
    pub fn promote(&self) {
        run_ok(
            as_postgres(&self.dir, &pg_bindir().join("pg_ctl"))
                .arg("promote")
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir()),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- tail of PostgreSQL server log {} ---\n{}\n--- end of server log ---",
                self.log_file().display(),
                self.log_tail(60)
            );
        }
        self.stop();
        crate::util::remove_dir_unless_kept(&self.dir, "cluster");
    }
}

/// A readable rendering of a postgres error, with SQLSTATE and server message.
pub fn db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} [{}]{}{}",
            d.message(),
            d.code().code(),
            d.detail()
                .map(|x| format!(" DETAIL: {x}"))
                .unwrap_or_default(),
            d.hint().map(|x| format!(" HINT: {x}")).unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// The SQLSTATE of an error, if it came from the server.
pub fn sqlstate(e: &postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}
