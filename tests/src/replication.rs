//! Streaming replication between private clusters, for the failover tests.
//!
//! A standby is a second private cluster made with `pg_basebackup -R` from the primary
//! (over its unix socket, as `postgres`, which initdb's `local replication all trust` line
//! lets in), started on a socket of its own. Its walreceiver names itself after
//! `cluster_name`, the name `synchronous_standby_names` on the primary uses. The copied
//! configuration keeps `shared_preload_libraries = 'pgvpn'`, so the promoted standby runs
//! pgvpn as the primary did.
//!
//! The shims reach both through one connection string with two socket directories
//! ([`conninfo`]): the shim tries them in order and takes the one that allows writes.

use crate::cluster::{db_error, pg_bindir, Cluster};
use crate::util::{run_ok, wait_for};
use pgvpn_core::sql::quote_literal;
use std::process::Command;
use std::time::Duration;

/// Synchronous: the primary's commits wait until this standby has flushed them
/// (`synchronous_standby_names` names it, `synchronous_commit = on`). Asynchronous: they
/// do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

/// Makes and starts a standby of `primary` named `name`; with [`Mode::Sync`] the primary's
/// commits then wait for it. Returns once it streams (and, if synchronous, is the
/// synchronous standby).
pub fn start_standby(primary: &Cluster, name: &str, mode: Mode) -> Cluster {
    let port = primary.port().to_string();
    let standby = Cluster::start_from(
        |data| {
            run_ok(
                Command::new(pg_bindir().join("pg_basebackup"))
                    .arg("-D")
                    .arg(data)
                    .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
                    .arg("-h")
                    .arg(primary.socket_dir())
                    .args(["-p", &port, "-U", "postgres"]),
            );
        },
        &[
            &format!("cluster_name = {}", quote_literal(name)),
            "hot_standby = on",
            // A standby applies what it receives at once (the default); the tests that
            // need it behind pause or cut it explicitly.
            "recovery_min_apply_delay = 0",
        ],
    );
    if mode == Mode::Sync {
        alter_system(
            primary,
            &format!("synchronous_standby_names = {}", quote_literal(name)),
        );
    }
    wait_replicating(primary, name, mode);
    standby
}

/// `ALTER SYSTEM SET <setting>` and a reload (two statements: ALTER SYSTEM refuses to run
/// inside the implicit transaction of a multi-statement query).
fn alter_system(c: &Cluster, setting: &str) {
    let mut su = c.superuser("postgres");
    for sql in [
        format!("ALTER SYSTEM SET {setting}"),
        "SELECT pg_reload_conf()".into(),
    ] {
        su.batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)));
    }
}

/// Waits (up to 30 s) until `name` streams from `primary`, as the synchronous standby if
/// `mode` says so.
pub fn wait_replicating(primary: &Cluster, name: &str, mode: Mode) {
    let want = match mode {
        Mode::Sync => "sync",
        Mode::Async => "async",
    };
    let mut last = String::new();
    let ok = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let mut su = primary.superuser("postgres");
        let row = su
            .query_opt(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1",
                &[&name],
            )
            .ok()
            .flatten();
        let (state, sync): (String, String) = row.map(|r| (r.get(0), r.get(1)))?;
        last = format!("state {state}, sync_state {sync}");
        (state == "streaming" && sync == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "standby {name} is not replicating ({want}) after 30 s: {last}\n--- primary's log ---\n{}",
        primary.log_tail(30)
    );
}

/// Stops the standby from receiving WAL: its walreceiver ends and does not come back
/// (primary_conninfo emptied, reloaded). What the primary commits from now on never
/// reaches it: promoted later, it is behind.
pub fn cut_off(standby: &Cluster) {
    alter_system(standby, "primary_conninfo = ''");
    let mut su = standby.superuser("postgres");
    let stopped = wait_for(Duration::from_secs(15), Duration::from_millis(50), || {
        let n: i64 = su
            .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
            .ok()?
            .get(0);
        (n == 0).then_some(())
    });
    assert!(stopped.is_some(), "the standby's walreceiver did not stop");
}

/// Waits until the standby has replayed everything the primary has flushed so far.
pub fn wait_caught_up(primary: &Cluster, standby: &Cluster) {
    let lsn: String = primary
        .superuser("postgres")
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .expect("pg_current_wal_flush_lsn")
        .get(0);
    let ok = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
        let mut su = standby.superuser("postgres");
        let done: bool = su
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .ok()?
            .get(0);
        done.then_some(())
    });
    assert!(ok.is_some(), "the standby did not replay up to {lsn}");
}

/// Is the server in recovery (a standby)?
pub fn in_recovery(c: &Cluster) -> bool {
    c.superuser("postgres")
        .query_one("SELECT pg_is_in_recovery()", &[])
        .expect("pg_is_in_recovery")
        .get(0)
}

/// `host=DIR1,DIR2 port=P1,P2 user=ROLE dbname=DB target_session_attrs=read-write`: every
/// server of the pair, in order; the client takes the first that allows writes.
pub fn conninfo(servers: &[&Cluster], role: &str, db: &str) -> String {
    let hosts: Vec<String> = servers
        .iter()
        .map(|c| c.socket_dir().display().to_string())
        .collect();
    let ports: Vec<String> = servers.iter().map(|c| c.port().to_string()).collect();
    format!(
        "host={} port={} user={role} dbname={db} target_session_attrs=read-write",
        hosts.join(","),
        ports.join(",")
    )
}
