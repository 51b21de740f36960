//! PostgreSQL's client tools against a harness cluster: `pg_dump`, `pg_restore`, `psql`,
//! `pg_dumpall` and `pg_basebackup`, from the cluster's own binaries
//! ([`crate::cluster::pg_bindir`]).
//!
//! They run in a clean environment (no PG* variables, no ~/.psqlrc, C locale) and reach
//! the server through its socket, as superuser `postgres` (local connections use
//! `trust`). Dump files are written by root; `pg_basebackup` runs as `postgres` so that
//! the copy is owned by the server's user.

use crate::cluster::{pg_bindir, Cluster};
use crate::util::{describe, output};
use std::path::Path;
use std::process::{Command, Output};

/// A scratch directory for dump files, removed on drop (kept with `PGVPN_KEEP_LOGS`).
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "pgvpn-{tag}-{}-{}",
            std::process::id(),
            crate::util::next_id()
        ));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("PGVPN_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("[scratch] keeping {}", self.0.display());
        }
    }
}

/// A tool of the cluster's PostgreSQL, connection options first.
pub fn tool(cluster: &Cluster, name: &str) -> Command {
    let mut c = Command::new(pg_bindir().join(name));
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("PGTZ", "UTC")
        .arg("-h")
        .arg(cluster.socket_dir())
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(["-U", "postgres"]);
    c
}

/// Run `cmd`; panic with its output unless it succeeds. Returns its stderr (notices
/// and warnings a restore printed).
#[track_caller]
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = output(cmd);
    check(&out, cmd, what);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn check(out: &Output, cmd: &Command, what: &str) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}): `{}`\nstdout (tail):\n{}\nstderr:\n{}",
            out.status,
            describe(cmd),
            tail_of(&String::from_utf8_lossy(&out.stdout), 20),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tail_of(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The archive formats the specs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// SQL text, restored with `psql -v ON_ERROR_STOP=1`.
    Plain,
    /// `pg_dump -Fc`, restored with `pg_restore --exit-on-error`.
    Custom,
}

/// `pg_dump` of database `db` into `file`.
pub fn dump(cluster: &Cluster, db: &str, format: Format, file: &Path) {
    let mut c = tool(cluster, "pg_dump");
    c.args(["-d", db, "-f"]).arg(file).arg(match format {
        Format::Plain => "-Fp",
        Format::Custom => "-Fc",
    });
    run(&mut c, &format!("pg_dump {format:?} of {db}"));
}

/// `psql -X -v ON_ERROR_STOP=1 -d db -f file`: the first error stops the restore and
/// fails it. Returns psql's stderr.
pub fn psql_file(cluster: &Cluster, db: &str, file: &Path) -> Output {
    let mut c = tool(cluster, "psql");
    c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f"])
        .arg(file);
    output(&mut c)
}

/// `pg_restore --exit-on-error -d db [extra] file`.
pub fn pg_restore(cluster: &Cluster, db: &str, file: &Path, extra: &[&str]) -> Output {
    let mut c = tool(cluster, "pg_restore");
    c.args(["--exit-on-error", "-d", db]).args(extra).arg(file);
    output(&mut c)
}

/// Restores `file` (made by [`dump`] in `format`) into the existing database `db`;
/// panics with the tool's messages if it fails. Returns the tool's stderr.
#[track_caller]
pub fn restore(cluster: &Cluster, db: &str, format: Format, file: &Path) -> String {
    let out = match format {
        Format::Plain => psql_file(cluster, db, file),
        Format::Custom => pg_restore(cluster, db, file, &[]),
    };
    if !out.status.success() {
        panic!(
            "restoring a {format:?} dump into {db} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `pg_restore -l`: the archive's table of contents.
pub fn toc(cluster: &Cluster, file: &Path) -> String {
    let mut c = tool(cluster, "pg_restore");
    c.arg("-l").arg(file);
    let out = output(&mut c);
    check(&out, &c, "pg_restore -l");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pg_dumpall --roles-only`: the cluster's roles and memberships, as SQL. A dump of a
/// database does not carry them, and pgvpn's peers are roles.
pub fn roles(cluster: &Cluster) -> String {
    let mut c = tool(cluster, "pg_dumpall");
    c.args(["--roles-only", "--no-role-passwords"]);
    let out = output(&mut c);
    check(&out, &c, "pg_dumpall --roles-only");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs SQL text with psql against `db` (no ON_ERROR_STOP); returns the output.
pub fn psql_text(cluster: &Cluster, db: &str, sql_file: &Path) -> Output {
    let mut c = tool(cluster, "psql");
    c.args(["-X", "-q", "-d", db, "-f"]).arg(sql_file);
    output(&mut c)
}

/// `pg_dump --schema-only` of `db`, as text; `binary_upgrade` adds the extension's own
/// members (pg_upgrade's mode: a normal dump leaves them to CREATE EXTENSION).
pub fn schema_dump(cluster: &Cluster, db: &str, binary_upgrade: bool) -> String {
    let mut c = tool(cluster, "pg_dump");
    c.args(["-d", db, "--schema-only"]);
    if binary_upgrade {
        c.arg("--binary-upgrade");
    }
    let out = output(&mut c);
    check(&out, &c, "pg_dump --schema-only");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pg_basebackup` of the running cluster into `dest` (which must not exist or be
/// empty), as `postgres`, with the WAL streamed alongside and a fast checkpoint.
pub fn basebackup(cluster: &Cluster, dest: &Path) {
    std::fs::create_dir_all(dest).expect("create backup dir");
    crate::util::run_ok(Command::new("chown").arg("postgres:postgres").arg(dest));
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(pg_bindir().join("pg_basebackup"))
        .arg("-h")
        .arg(cluster.socket_dir())
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(["-U", "postgres", "-D"])
        .arg(dest)
        .args(["-X", "stream", "-c", "fast", "--no-sync"])
        .current_dir("/")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C");
    run(&mut c, "pg_basebackup");
}
