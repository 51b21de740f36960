//! A pgvpn database with a history, for the backup and upgrade specs: three peers (one
//! of them removed at the end), traffic every way over several chunks of the log,
//! stored cursors with a backlog beyond them, rejected packets (counted and sampled),
//! and the counters written to their tables.
//!
//! Only the API that 0.1.0 already had is used (add_peer, remove_peer, send, recv, ack,
//! prune), so the upgrade spec fills a 0.1.0 database the same way.

use crate::cluster::{db_error, Cluster};
use crate::packet;
use crate::sql::{ack, create_peer, recv, remove_peer, scalar_i64, send};
use postgres::Client;
use std::time::Duration;

/// The peers: name and tunnel address (198.18.3.0/24).
pub const PEERS: [(&str, &str); 3] = [
    ("alpha", "198.18.3.1"),
    ("bravo", "198.18.3.2"),
    ("charlie", "198.18.3.3"),
];

/// Rounds of traffic; the log moves to a new chunk after each but the last.
pub const ROUNDS: usize = 4;

pub fn addr(name: &str) -> &'static str {
    PEERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("no peer {name}"))
}

/// A UDP packet whose payload is `tag`.
pub fn packet(from: &str, to: &str, tag: &str) -> Vec<u8> {
    packet::udp(addr(from), addr(to), 41000, 6000, tag.as_bytes())
}

/// What [`fill`] left behind.
#[derive(Debug)]
pub struct Filled {
    /// Packets accepted into the log.
    pub logged: i64,
    /// Packets rejected (spoofed or malformed).
    pub rejected: i64,
    /// Chunks that hold packets.
    pub chunks_with_rows: i64,
}

/// Is `name(...)` a function of schema pgvpn in this database (0.1.0 lacks some)?
pub fn has_function(su: &mut Client, name: &str) -> bool {
    scalar_i64(
        su,
        &format!(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgvpn'::regnamespace \
              AND proname = '{name}'"
        ),
    ) > 0
}

/// Prunes once as superuser with the log rotating every second (retention long: nothing
/// is dropped). Returns what prune() returned.
pub fn prune_rotating(su: &mut Client) -> i32 {
    su.batch_execute("SET pgvpn.chunk_interval = '1s'; SET pgvpn.retention = '1d'")
        .unwrap_or_else(|e| panic!("SET pgvpn GUCs: {}", db_error(&e)));
    su.query_one("SELECT pgvpn.prune()", &[])
        .unwrap_or_else(|e| panic!("pgvpn.prune(): {}", db_error(&e)))
        .get(0)
}

/// Fills database `db` of `cluster` (the extension created, no peers yet).
pub fn fill(cluster: &Cluster, db: &str) -> Filled {
    for (name, a) in PEERS {
        create_peer(cluster, db, name, &[&format!("{a}/32")]);
    }
    let mut su = cluster.superuser(db);
    let mut conns: Vec<Client> = PEERS.iter().map(|(n, _)| cluster.connect(n, db)).collect();
    let (mut logged, mut rejected) = (0i64, 0i64);
    for round in 0..ROUNDS {
        // Every peer to every other, a few packets each.
        for (i, (from, _)) in PEERS.iter().enumerate() {
            let batch: Vec<Vec<u8>> = PEERS
                .iter()
                .filter(|(to, _)| to != from)
                .flat_map(|(to, _)| {
                    (0..12).map(move |k| packet(from, to, &format!("r{round}-{from}-{to}-{k}")))
                })
                .collect();
            let n = batch.len() as i64;
            assert_eq!(send(&mut conns[i], &batch), n, "{from} round {round}");
            logged += n;
        }
        // Rejects: alpha claims another source address, and sends junk.
        let bad = vec![
            packet::udp("198.18.3.99", addr("bravo"), 1, 2, b"spoofed"),
            packet::bad::junk(),
            packet::bad::truncated_header(&packet("alpha", "bravo", "cut")),
        ];
        assert_eq!(send(&mut conns[0], &bad), 0, "rejects are not logged");
        rejected += bad.len() as i64;
        // Receivers read and acknowledge part of what they got: alpha everything so
        // far, bravo all but the newest round, charlie only the first half of round 0.
        if round == 1 {
            let got = recv(&mut conns[0], 0, 10_000);
            ack(&mut conns[0], got.last().expect("alpha got packets").0);
            let got = recv(&mut conns[2], 0, 10);
            ack(&mut conns[2], got.last().expect("charlie got packets").0);
        }
        if round + 1 < ROUNDS {
            if round >= 1 {
                let got = recv(&mut conns[1], 0, 10_000);
                ack(&mut conns[1], got.last().expect("bravo got packets").0);
            }
            std::thread::sleep(Duration::from_millis(1100));
            prune_rotating(&mut su);
        }
    }
    // One more prune: the chunks closed last time get their host-pair index.
    prune_rotating(&mut su);
    drop(conns);
    remove_peer(&mut su, "charlie");
    if has_function(&mut su, "flush_counters") {
        su.query_one("SELECT pgvpn.flush_counters()", &[])
            .unwrap_or_else(|e| panic!("flush_counters: {}", db_error(&e)));
    }
    let chunks_with_rows = scalar_i64(
        &mut su,
        "SELECT count(DISTINCT id >> 40) FROM pgvpn.packets",
    );
    assert!(
        chunks_with_rows >= ROUNDS as i64,
        "the fill should spread over {ROUNDS} chunks, used {chunks_with_rows}"
    );
    assert_eq!(
        scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"),
        logged
    );
    Filled {
        logged,
        rejected,
        chunks_with_rows,
    }
}

/// A peer's name and what `recv(cursor())` returns for it: [(id, payload)].
pub type Backlog = (String, Vec<(i64, Vec<u8>)>);

/// What each peer's `recv(cursor())` returns now. Read-only.
pub fn backlogs(cluster: &Cluster, db: &str, peers: &[&str]) -> Vec<Backlog> {
    peers
        .iter()
        .map(|p| {
            let mut c = cluster.connect(p, db);
            let cur = crate::sql::cursor(&mut c);
            (p.to_string(), recv(&mut c, cur, 65_536))
        })
        .collect()
}
