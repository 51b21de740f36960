//! "Cost flat in the number of peers": `pgvpn.send` from one client (alice to bob,
//! batches of [`BATCH`] × [`SIZE`]-byte packets, durable commits) in a database where
//! alice and bob are the only peers, and in one where [`EXTRA`] more are registered.
//! Two fresh databases of the bench's cluster, measured in turns (few, many, few, many)
//! so that both see the same machine.

use super::topology::{ALICE, BOB};
use super::{ceiling, Result};
use pgvpn_tests::sql::{add_peer, scalar_i64};
use pgvpn_tests::{db_error, packet, Cluster};
use std::time::{Duration, Instant};

pub const BATCH: usize = 32;
pub const SIZE: usize = 200;
pub const EXTRA: usize = 2000;
pub const FEW_DB: &str = "peers_2";
pub const MANY_DB: &str = "peers_2002";

/// Both databases; the roles alice and bob exist already (the tunnel's peers). Does
/// nothing when an earlier run made them.
pub fn setup(cluster: &Cluster) -> Result<()> {
    let made = scalar_i64(
        &mut cluster.superuser("postgres"),
        &format!("SELECT count(*) FROM pg_database WHERE datname IN ('{FEW_DB}', '{MANY_DB}')"),
    );
    if made == 2 {
        return Ok(());
    }
    for db in [FEW_DB, MANY_DB] {
        cluster.create_db(db);
        cluster.create_extension(db);
        let mut su = cluster.superuser(db);
        add_peer(&mut su, "alice", "alice", &[&format!("{ALICE}/32")]);
        add_peer(&mut su, "bob", "bob", &[&format!("{BOB}/32")]);
    }
    // The others: a role and a /32 each, in 198.18.128.0/17 (away from the tunnel's).
    let mut su = cluster.superuser(MANY_DB);
    su.batch_execute(&format!(
        "DO $$
         BEGIN
           FOR i IN 1..{EXTRA} LOOP
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'extra' || i) THEN
               EXECUTE format('CREATE ROLE %I LOGIN', 'extra' || i);
             END IF;
             PERFORM pgvpn.add_peer('extra' || i, ('extra' || i)::regrole,
                 ARRAY[format('198.18.%s.%s/32', 128 + i / 250, i % 250 + 1)::cidr]);
           END LOOP;
         END $$"
    ))
    .map_err(|e| format!("register {EXTRA} peers: {}", db_error(&e)))?;
    let n = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.peers");
    if n != EXTRA as i64 + 2 {
        return Err(format!("{MANY_DB} has {n} peers"));
    }
    Ok(())
}

pub fn batch() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| packet::udp(ALICE, BOB, 41000 + i as u16, 9, &[0x42; SIZE - 28]))
        .collect()
}

/// alice's send rate in `db` over `secs` (bob's cursor is moved past it afterwards).
pub fn send_rate(cluster: &Cluster, db: &str, secs: f64) -> Result<f64> {
    let packets = batch();
    let mut alice = cluster.connect("alice", db);
    let t = Instant::now();
    let sent = ceiling::send_for(
        cluster,
        db,
        &mut alice,
        &packets,
        Duration::from_secs_f64(secs),
    )?;
    let rate = sent as f64 / t.elapsed().as_secs_f64();
    let newest = scalar_i64(
        &mut cluster.superuser(db),
        "SELECT last_value FROM pgvpn.packet_id",
    );
    cluster
        .connect("bob", db)
        .execute(pgvpn_core::sql::ACK, &[&newest])
        .map_err(|e| db_error(&e))?;
    Ok(rate)
}
