//! Thin helpers over the pgvpn SQL API (admin side) and small query utilities.

use crate::cluster::{db_error, Cluster};
use pgvpn_core::sql::quote_ident;
use postgres::Client;

/// `CREATE ROLE <role> LOGIN` + `pgvpn.add_peer(name, role, allowed_ips)`; returns the
/// peer id.
pub fn add_peer(admin: &mut Client, name: &str, role: &str, allowed_ips: &[&str]) -> i32 {
    let ips: Vec<String> = allowed_ips.iter().map(|s| s.to_string()).collect();
    admin
        .query_one(
            "SELECT pgvpn.add_peer($1::text, $2::text::regrole, $3::text[]::cidr[])",
            &[&name, &role, &ips],
        )
        .unwrap_or_else(|e| {
            panic!(
                "pgvpn.add_peer({name}, {role}, {allowed_ips:?}): {}",
                db_error(&e)
            )
        })
        .get(0)
}

pub fn set_allowed_ips(admin: &mut Client, name: &str, allowed_ips: &[&str]) {
    let ips: Vec<String> = allowed_ips.iter().map(|s| s.to_string()).collect();
    admin
        .execute(
            "SELECT pgvpn.set_allowed_ips($1::text, $2::text[]::cidr[])",
            &[&name, &ips],
        )
        .unwrap_or_else(|e| panic!("pgvpn.set_allowed_ips({name}): {}", db_error(&e)));
}

pub fn remove_peer(admin: &mut Client, name: &str) {
    admin
        .execute("SELECT pgvpn.remove_peer($1::text)", &[&name])
        .unwrap_or_else(|e| panic!("pgvpn.remove_peer({name}): {}", db_error(&e)));
}

/// Create a LOGIN role `name` and register it as peer `name`.
pub fn create_peer(cluster: &Cluster, db: &str, name: &str, allowed_ips: &[&str]) -> i32 {
    cluster.create_login_role(name);
    let mut admin = cluster.superuser(db);
    add_peer(&mut admin, name, name, allowed_ips)
}

/// Create a LOGIN role that is a member of `pgvpn_auditor`.
pub fn create_auditor(cluster: &Cluster, name: &str) {
    cluster.create_login_role(name);
    let mut su = cluster.superuser("postgres");
    su.batch_execute(&format!("GRANT pgvpn_auditor TO {}", quote_ident(name)))
        .unwrap_or_else(|e| panic!("GRANT pgvpn_auditor TO {name}: {}", db_error(&e)));
}

/// `pgvpn.send(bytea[])` as the connected peer; returns the accepted count.
pub fn send(c: &mut Client, packets: &[Vec<u8>]) -> i64 {
    c.query_one(pgvpn_core::sql::SEND, &[&packets])
        .unwrap_or_else(|e| panic!("pgvpn.send: {}", db_error(&e)))
        .get(0)
}

/// `pgvpn.recv(after, max)` as the connected peer (no waiting).
pub fn recv(c: &mut Client, after: i64, max: i32) -> Vec<(i64, Vec<u8>)> {
    c.query(pgvpn_core::sql::RECV, &[&after, &max, &0i32])
        .unwrap_or_else(|e| panic!("pgvpn.recv: {}", db_error(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `pgvpn.ack(upto_id)` as the connected peer; returns the stored cursor.
pub fn ack(c: &mut Client, upto_id: i64) -> i64 {
    c.query_one(pgvpn_core::sql::ACK, &[&upto_id])
        .unwrap_or_else(|e| panic!("pgvpn.ack({upto_id}): {}", db_error(&e)))
        .get(0)
}

/// `pgvpn.cursor()` as the connected peer: its stored delivery cursor.
pub fn cursor(c: &mut Client) -> i64 {
    scalar_i64(c, pgvpn_core::sql::CURSOR)
}

/// A single bigint from a query (NULL → 0).
pub fn scalar_i64(c: &mut Client, sql: &str) -> i64 {
    let row = c
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)));
    row.get::<_, Option<i64>>(0).unwrap_or(0)
}
