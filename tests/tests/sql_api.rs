//! SQL-level integration tests of the pgvpn extension, with real roles and real
//! connections to a private PostgreSQL 15 cluster (one cluster per test).
//!
//! Needs: root (initdb/pg_ctl run as `postgres` via runuser) and the extension installed
//! into the server (`pgvpn.control` in the share dir).

use pgvpn_tests::packet::{self, bad, TCP_ACK, TCP_SYN};
use pgvpn_tests::sql::{
    self, add_peer, create_auditor, create_peer, recv, remove_peer, scalar_i64, send,
};
use pgvpn_tests::{db_error, sqlstate, Cluster, Rng};
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DB: &str = "vpn";

// Address plan (all inside 198.18.0.0/15; IPv6 from a ULA).
const A4: &str = "198.18.1.1";
const B4: &str = "198.18.1.2";
const C4: &str = "198.18.1.3";
const R4: &str = "198.18.1.9";
const A6: &str = "fd00:5067:7670::1:1";
const B6: &str = "fd00:5067:7670::1:2";

fn cidr(a: &str) -> String {
    if a.contains(':') {
        format!("{a}/128")
    } else {
        format!("{a}/32")
    }
}

/// A cluster with the extension and the given peers (name, addresses).
fn setup(peers: &[(&str, &[&str])]) -> Cluster {
    let cluster = Cluster::with_pgvpn(DB);
    for (name, addrs) in peers {
        let cidrs: Vec<String> = addrs.iter().map(|a| cidr(a)).collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        create_peer(&cluster, DB, name, &refs);
    }
    cluster
}

/// Assert that `r` failed with SQLSTATE `code`.
#[track_caller]
fn expect_sqlstate<T: std::fmt::Debug>(r: Result<T, postgres::Error>, code: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected SQLSTATE {code}, but it succeeded: {v:?}"),
        Err(e) => assert_eq!(
            sqlstate(&e).as_deref(),
            Some(code),
            "{what}: expected SQLSTATE {code}, got: {}",
            db_error(&e)
        ),
    }
}

fn udp_tagged(src: &str, dst: &str, tag: &str) -> Vec<u8> {
    packet::udp(src, dst, 40000, 5000, tag.as_bytes())
}

fn tag_of(p: &[u8]) -> String {
    let s = packet::parse(p).unwrap_or_else(|| panic!("recv returned an unparsable packet: {p:?}"));
    String::from_utf8_lossy(&s.payload).into_owned()
}

fn tags(rows: &[(i64, Vec<u8>)]) -> Vec<String> {
    rows.iter().map(|(_, p)| tag_of(p)).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Exactly-once under concurrency (the outbox "sequence gap" trap)
// ---------------------------------------------------------------------------------------

/// How to talk to the implementation under test (pgvpn, or the naive control).
struct Api {
    send_sql: &'static str,
    recv_sql: &'static str,
}

const PGVPN_API: Api = Api {
    send_sql: "SELECT pgvpn.send($1::bytea[])",
    recv_sql: "SELECT id, payload FROM pgvpn.recv($1::bigint, 1024)",
};

#[derive(Debug, Default)]
struct ExactlyOnceReport {
    committed: usize,
    rolled_back: usize,
    seen: usize,
    missing: Vec<String>,
    duplicates: Vec<String>,
    from_rolled_back: Vec<String>,
    unknown: Vec<String>,
    order_violations: Vec<(i64, i64)>,
    accepted_mismatch: Vec<String>,
    per_sender_seen: BTreeMap<String, usize>,
    per_sender_committed: BTreeMap<String, usize>,
}

impl ExactlyOnceReport {
    fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.duplicates.is_empty()
            && self.from_rolled_back.is_empty()
            && self.unknown.is_empty()
            && self.order_violations.is_empty()
            && self.accepted_mismatch.is_empty()
            && self.seen == self.committed
    }
    fn summary(&self) -> String {
        let first = |v: &Vec<String>| v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        format!(
            "committed={} rolled_back={} seen={} missing={} [{}] duplicates={} [{}] seen_from_rolled_back={} [{}] \
             unknown={} order_violations={} {:?} accepted_mismatch={:?} per_sender_seen={:?} per_sender_committed={:?}",
            self.committed,
            self.rolled_back,
            self.seen,
            self.missing.len(),
            first(&self.missing),
            self.duplicates.len(),
            first(&self.duplicates),
            self.from_rolled_back.len(),
            first(&self.from_rolled_back),
            self.unknown.len(),
            self.order_violations.len(),
            self.order_violations.iter().take(5).collect::<Vec<_>>(),
            self.accepted_mismatch,
            self.per_sender_seen,
            self.per_sender_committed
        )
    }
}

/// Senders (role, source address) each send `txns` transactions of 1..=6 packets (in one
/// or two `send` calls) to `recv_addr`, sleeping a random 0..15 ms between the last send
/// and COMMIT so commits interleave out of id order; one transaction in ten rolls back.
/// A reader (role `receiver`) polls recv(last) in a tight loop and never acks. Returns
/// what the reader saw versus what was committed.
fn run_exactly_once(
    cluster: &Cluster,
    db: &str,
    api: &'static Api,
    senders: &[(&str, &str)],
    receiver: &str,
    recv_addr: &str,
    txns: usize,
) -> ExactlyOnceReport {
    let committed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let rolled_back: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mismatches: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    // Reader first, so it is already polling when the first commit lands.
    let reader = {
        let conn = cluster.conninfo(receiver, db);
        let done = Arc::clone(&done);
        let committed = Arc::clone(&committed);
        std::thread::spawn(move || {
            let mut c = Client::connect(&conn, NoTls).expect("reader connect");
            let stmt = c.prepare(api.recv_sql).expect("prepare recv");
            let mut last = 0i64;
            let mut seen: Vec<(i64, String)> = Vec::new();
            let mut order_violations = Vec::new();
            let mut last_progress = Instant::now();
            loop {
                let rows = c
                    .query(&stmt, &[&last])
                    .unwrap_or_else(|e| panic!("recv: {}", db_error(&e)));
                for r in &rows {
                    let id: i64 = r.get(0);
                    let payload: Vec<u8> = r.get(1);
                    if id <= last {
                        order_violations.push((last, id));
                    }
                    last = last.max(id);
                    seen.push((id, tag_of(&payload)));
                }
                if !rows.is_empty() {
                    last_progress = Instant::now();
                }
                if done.load(Ordering::SeqCst) {
                    let expected = committed.lock().unwrap().len();
                    // Everything is committed; stop once we have as many as expected (then
                    // one more poll to catch any extra), or after 10 s without progress.
                    if seen.len() >= expected && rows.is_empty() {
                        break;
                    }
                    if last_progress.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                }
                if rows.is_empty() {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            (seen, order_violations)
        })
    };

    let mut handles = Vec::new();
    for (i, (role, src)) in senders.iter().enumerate() {
        let conn = cluster.conninfo(role, db);
        let (role, src, dst) = (role.to_string(), src.to_string(), recv_addr.to_string());
        let committed = Arc::clone(&committed);
        let rolled_back = Arc::clone(&rolled_back);
        let mismatches = Arc::clone(&mismatches);
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(0x5eed + i as u64);
            let mut c = Client::connect(&conn, NoTls).expect("sender connect");
            let stmt = c.prepare(api.send_sql).expect("prepare send");
            for t in 0..txns {
                let n = 1 + rng.below(6) as usize;
                let tags: Vec<String> = (0..n).map(|p| format!("{role}:{t}:{p}")).collect();
                let pkts: Vec<Vec<u8>> =
                    tags.iter().map(|tag| udp_tagged(&src, &dst, tag)).collect();
                let mut tx = c.transaction().expect("begin");
                let split = if n > 1 && rng.below(3) == 0 {
                    1 + rng.below(n as u64 - 1) as usize
                } else {
                    n
                };
                let mut accepted = 0i64;
                for part in [&pkts[..split], &pkts[split..]] {
                    if part.is_empty() {
                        continue;
                    }
                    let r: i64 = tx
                        .query_one(&stmt, &[&part.to_vec()])
                        .unwrap_or_else(|e| panic!("send as {role}: {}", db_error(&e)))
                        .get(0);
                    accepted += r;
                    if rng.below(2) == 0 {
                        std::thread::sleep(Duration::from_millis(rng.below(4)));
                    }
                }
                if accepted != n as i64 {
                    mismatches
                        .lock()
                        .unwrap()
                        .push(format!("{role}:{t}: accepted {accepted} of {n}"));
                }
                std::thread::sleep(Duration::from_micros(rng.below(15_000)));
                if rng.below(10) == 0 {
                    tx.rollback().expect("rollback");
                    rolled_back.lock().unwrap().extend(tags);
                } else {
                    tx.commit()
                        .unwrap_or_else(|e| panic!("commit as {role}: {}", db_error(&e)));
                    committed.lock().unwrap().extend(tags);
                }
                std::thread::sleep(Duration::from_micros(rng.below(3_000)));
            }
        }));
    }
    for h in handles {
        h.join().expect("sender thread panicked");
    }
    done.store(true, Ordering::SeqCst);
    let (seen, order_violations) = reader.join().expect("reader thread panicked");

    let committed = committed.lock().unwrap().clone();
    let rolled_back = rolled_back.lock().unwrap().clone();
    let mut rep = ExactlyOnceReport {
        committed: committed.len(),
        rolled_back: rolled_back.len(),
        seen: seen.len(),
        order_violations,
        accepted_mismatch: mismatches.lock().unwrap().clone(),
        ..Default::default()
    };
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, tag) in &seen {
        *count.entry(tag.as_str()).or_default() += 1;
        *rep.per_sender_seen
            .entry(tag.split(':').next().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    for tag in &committed {
        *rep.per_sender_committed
            .entry(tag.split(':').next().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    for (tag, n) in &count {
        if *n > 1 {
            rep.duplicates.push(tag.to_string());
        }
        if rolled_back.contains(*tag) {
            rep.from_rolled_back.push(tag.to_string());
        } else if !committed.contains(*tag) {
            rep.unknown.push(tag.to_string());
        }
    }
    let mut missing: Vec<String> = committed
        .iter()
        .filter(|t| !count.contains_key(t.as_str()))
        .cloned()
        .collect();
    missing.sort();
    rep.missing = missing;
    rep
}

#[test]
fn exactly_once_under_concurrency() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4]), ("r", &[R4])]);
    let rep = run_exactly_once(
        &cluster,
        DB,
        &PGVPN_API,
        &[("a", A4), ("b", B4), ("c", C4)],
        "r",
        R4,
        70,
    );
    eprintln!("exactly-once report: {}", rep.summary());
    assert!(
        rep.committed > 300,
        "the test should move a few hundred packets"
    );
    assert!(
        rep.ok(),
        "pgvpn lost, duplicated or misordered packets: {}",
        rep.summary()
    );
    assert_eq!(rep.per_sender_seen, rep.per_sender_committed);

    // The reader never acked: the stored cursor is still 0 and a fresh recv(0) returns
    // the same ids again (delivery state is the caller's cursor, not consumption).
    let mut r = cluster.connect("r", DB);
    assert_eq!(scalar_i64(&mut r, "SELECT pgvpn.cursor()"), 0);
    let again = scalar_i64(&mut r, "SELECT count(*) FROM pgvpn.recv(0, 65536)");
    assert_eq!(again as usize, rep.committed);
}

/// The same check while the log rolls to new chunks underneath the senders:
/// `pgvpn.prune()` runs every 300 ms with `chunk_interval = 1s` (retention long).
#[test]
fn exactly_once_across_chunk_rolls() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4]), ("r", &[R4])]);
    let stop = Arc::new(AtomicBool::new(false));
    let pruner = {
        let conn = cluster.conninfo("postgres", DB);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut su = Client::connect(&conn, NoTls).expect("pruner connect");
            su.batch_execute("SET pgvpn.chunk_interval = '1s'; SET pgvpn.retention = '1d'")
                .unwrap();
            let mut calls = 0;
            while !stop.load(Ordering::SeqCst) {
                su.query_one("SELECT pgvpn.prune()", &[])
                    .unwrap_or_else(|e| panic!("prune: {}", db_error(&e)));
                calls += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            calls
        })
    };
    let rep = run_exactly_once(
        &cluster,
        DB,
        &PGVPN_API,
        &[("a", A4), ("b", B4), ("c", C4)],
        "r",
        R4,
        120,
    );
    stop.store(true, Ordering::SeqCst);
    let calls = pruner.join().expect("pruner panicked");
    let mut su = cluster.superuser(DB);
    let parts = partitions(&mut su);
    eprintln!(
        "exactly-once across chunk rolls ({calls} prunes, {parts} chunks): {}",
        rep.summary()
    );
    assert!(
        parts >= 2,
        "the log should have rolled to a new chunk, has {parts} chunk(s)"
    );
    assert!(
        rep.ok(),
        "pgvpn lost, duplicated or misordered packets across chunk rolls: {}",
        rep.summary()
    );
    // ids really span several chunks
    let chunks_used = scalar_i64(
        &mut su,
        "SELECT count(DISTINCT id >> 40) FROM pgvpn.packets",
    );
    assert!(chunks_used >= 2, "packets landed in {chunks_used} chunk(s)");
}

/// Negative control: the same driver against a naive outbox (bigserial ids, recv = "id >
/// after") must detect lost packets. Proves the test above can fail. Needs no extension.
#[test]
fn exactly_once_check_catches_a_naive_outbox() {
    const NAIVE: Api = Api {
        send_sql: "SELECT naive.send($1::bytea[])",
        recv_sql: "SELECT id, payload FROM naive.recv($1::bigint, 1024)",
    };
    let cluster = Cluster::start();
    cluster.create_db(DB);
    for r in ["a", "b", "c", "r"] {
        cluster.create_login_role(r);
    }
    let mut su = cluster.superuser(DB);
    su.batch_execute(
        "CREATE SCHEMA naive;
         CREATE TABLE naive.q (id bigserial PRIMARY KEY, payload bytea NOT NULL);
         CREATE FUNCTION naive.send(p bytea[]) RETURNS bigint LANGUAGE sql AS
           $$ WITH i AS (INSERT INTO naive.q (payload) SELECT unnest(p) RETURNING 1) SELECT count(*) FROM i $$;
         CREATE FUNCTION naive.recv(after bigint, n int) RETURNS TABLE (id bigint, payload bytea)
           LANGUAGE sql STABLE AS $$ SELECT id, payload FROM naive.q WHERE id > after ORDER BY id LIMIT n $$;
         GRANT USAGE ON SCHEMA naive TO PUBLIC;
         GRANT SELECT, INSERT ON naive.q TO PUBLIC;
         GRANT USAGE ON SEQUENCE naive.q_id_seq TO PUBLIC;",
    )
    .expect("naive outbox");
    let rep = run_exactly_once(
        &cluster,
        DB,
        &NAIVE,
        &[("a", A4), ("b", B4), ("c", C4)],
        "r",
        R4,
        70,
    );
    eprintln!("naive outbox report: {}", rep.summary());
    assert!(
        !rep.missing.is_empty(),
        "the exactly-once check did not notice the naive outbox skipping late commits: {}",
        rep.summary()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Coalesced notifications
// ---------------------------------------------------------------------------------------

/// Notifications that arrive within `quiet` of each other (after a first wait of `quiet`).
fn drain_notifications(c: &mut Client, quiet: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut n = c.notifications();
    let mut it = n.timeout_iter(quiet);
    use postgres::fallible_iterator::FallibleIterator;
    while let Some(x) = it.next().expect("notifications") {
        out.push((x.channel().to_string(), x.payload().to_string()));
    }
    out
}

#[test]
fn coalesced_notify_one_per_committed_transaction() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4])]);
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let mut c = cluster.connect("c", DB);
    let chan_b: String = b.query_one("SELECT pgvpn.channel()", &[]).unwrap().get(0);
    let chan_c: String = c.query_one("SELECT pgvpn.channel()", &[]).unwrap().get(0);
    assert_eq!(chan_b, "pgvpn_b");
    assert_eq!(chan_c, "pgvpn_c");
    b.batch_execute(&format!("LISTEN {chan_b}")).unwrap();
    c.batch_execute(&format!("LISTEN {chan_c}")).unwrap();
    let quiet = Duration::from_millis(1500);
    assert!(drain_notifications(&mut b, Duration::from_millis(200)).is_empty());

    let to = |dst: &str, tag: &str| udp_tagged(A4, dst, tag);

    // T1: three sends in one transaction (several packets to b, some to c).
    {
        let mut tx = a.transaction().unwrap();
        let n1: i64 = tx
            .query_one(
                "SELECT pgvpn.send($1::bytea[])",
                &[&vec![to(B4, "t1-1"), to(B4, "t1-2"), to(B4, "t1-3")]],
            )
            .unwrap()
            .get(0);
        let n2: i64 = tx
            .query_one(
                "SELECT pgvpn.send($1::bytea[])",
                &[&vec![
                    to(B4, "t1-4"),
                    to(C4, "t1-c1"),
                    to(B4, "t1-5"),
                    to(C4, "t1-c2"),
                ]],
            )
            .unwrap()
            .get(0);
        let n3: i64 = tx
            .query_one("SELECT pgvpn.send($1::bytea)", &[&to(C4, "t1-c3")])
            .unwrap()
            .get(0);
        assert_eq!((n1, n2, n3), (3, 4, 1));
        // Nothing before commit.
        assert!(
            drain_notifications(&mut b, Duration::from_millis(300)).is_empty(),
            "notified before commit"
        );
        tx.commit().unwrap();
    }
    let nb = drain_notifications(&mut b, quiet);
    let nc = drain_notifications(&mut c, quiet);
    assert_eq!(
        nb,
        vec![(chan_b.clone(), String::new())],
        "b: exactly one empty notification for T1"
    );
    assert_eq!(
        nc,
        vec![(chan_c.clone(), String::new())],
        "c: exactly one empty notification for T1"
    );
    // ... and the packets are there when the notification arrives.
    assert_eq!(
        tags(&recv(&mut b, 0, 1024)),
        ["t1-1", "t1-2", "t1-3", "t1-4", "t1-5"]
    );
    assert_eq!(tags(&recv(&mut c, 0, 1024)), ["t1-c1", "t1-c2", "t1-c3"]);

    // T2: only b.
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one(
            "SELECT pgvpn.send($1::bytea[])",
            &[&vec![to(B4, "t2-1"), to(B4, "t2-2")]],
        )
        .unwrap();
        tx.query_one("SELECT pgvpn.send($1::bytea)", &[&to(B4, "t2-3")])
            .unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(
        drain_notifications(&mut b, quiet).len(),
        1,
        "b: one more for T2"
    );
    assert_eq!(
        drain_notifications(&mut c, Duration::from_millis(500)).len(),
        0,
        "c: none for T2 (nothing for c)"
    );

    // T3: aborted transaction → none.
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one(
            "SELECT pgvpn.send($1::bytea[])",
            &[&vec![to(B4, "t3-1"), to(C4, "t3-c1")]],
        )
        .unwrap();
        tx.rollback().unwrap();
    }
    assert!(
        drain_notifications(&mut b, quiet).is_empty(),
        "b notified for an aborted transaction"
    );
    assert!(
        drain_notifications(&mut c, Duration::from_millis(300)).is_empty(),
        "c notified for an aborted transaction"
    );

    // T4: a transaction that failed after sending (error → rolled back) → none.
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one("SELECT pgvpn.send($1::bytea)", &[&to(B4, "t4-1")])
            .unwrap();
        assert!(tx.batch_execute("SELECT 1/0").is_err());
        let _ = tx.commit(); // COMMIT of a failed transaction is a rollback
    }
    assert!(
        drain_notifications(&mut b, quiet).is_empty(),
        "b notified for a failed transaction"
    );

    // Autocommit: two separate statements are two transactions → two notifications.
    send(&mut a, &[to(B4, "t5-1")]);
    send(&mut a, &[to(B4, "t6-1"), to(B4, "t6-2")]);
    assert_eq!(
        drain_notifications(&mut b, quiet).len(),
        2,
        "one per autocommit send"
    );
    let got = tags(&recv(&mut b, 0, 1024));
    assert_eq!(
        got,
        ["t1-1", "t1-2", "t1-3", "t1-4", "t1-5", "t2-1", "t2-2", "t2-3", "t5-1", "t6-1", "t6-2"]
    );
    assert!(drain_notifications(&mut c, Duration::from_millis(200)).is_empty());
}

// ---------------------------------------------------------------------------------------
// 3. Privileges
// ---------------------------------------------------------------------------------------

/// `recv(after, max, wait_ms)` is a long poll: with nothing to deliver it sleeps in the
/// database until the receiver's own wake-up (its LISTEN) says a send committed.
#[test]
fn recv_long_poll_wakes_on_commit() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut b = cluster.connect("b", DB);
    b.batch_execute("LISTEN pgvpn_b").unwrap();
    let sender = {
        let mut a = cluster.connect("a", DB);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let sent_at = Instant::now();
            assert_eq!(send(&mut a, &[udp_tagged(A4, B4, "late")]), 1);
            sent_at
        })
    };
    let start = Instant::now();
    let rows = b
        .query("SELECT id, payload FROM pgvpn.recv(0, 10, 10000)", &[])
        .unwrap_or_else(|e| panic!("recv: {}", db_error(&e)));
    let returned_at = Instant::now();
    let sent_at = sender.join().unwrap();
    assert_eq!(rows.len(), 1, "the packet committed while recv waited");
    assert_eq!(tag_of(rows[0].get::<_, &[u8]>(1)), "late");
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "recv really waited"
    );
    let after_send = returned_at.saturating_duration_since(sent_at);
    assert!(
        after_send < Duration::from_secs(2),
        "woken by the commit, not by the 10 s timeout ({after_send:?})"
    );

    // Without LISTEN nothing sets the latch: the wait simply times out.
    let mut b2 = cluster.connect("b", DB);
    let last: i64 = rows[0].get(0);
    let t = Instant::now();
    let rows = b2
        .query("SELECT id FROM pgvpn.recv($1, 10, 300)", &[&last])
        .unwrap();
    assert!(rows.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn privileges_peers_nonpeers_auditor() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4])]);
    cluster.create_login_role("mallory");
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let mut c = cluster.connect("c", DB);

    // c sends to a and to b.
    let pk = vec![
        udp_tagged(C4, A4, "for-a-1"),
        udp_tagged(C4, B4, "for-b-1"),
        udp_tagged(C4, A4, "for-a-2"),
        udp_tagged(C4, B4, "for-b-2"),
    ];
    assert_eq!(send(&mut c, &pk), 4);
    // Each peer's recv only ever returns its own packets.
    assert_eq!(tags(&recv(&mut a, 0, 1024)), ["for-a-1", "for-a-2"]);
    assert_eq!(tags(&recv(&mut b, 0, 1024)), ["for-b-1", "for-b-2"]);
    let all_ids: Vec<i64> = {
        let mut au = cluster.connect("auditor", DB);
        au.query("SELECT id FROM pgvpn.packets ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Even asking from below b's first id, a does not get b's packets.
    for after in [0, all_ids[0] - 1, all_ids[1] - 1] {
        for (_, p) in recv(&mut a, after, 65536) {
            assert!(
                tag_of(&p).starts_with("for-a"),
                "a got someone else's packet after {after}"
            );
        }
    }

    // Peers cannot read the tables or views directly.
    for rel in [
        "pgvpn.packets",
        "pgvpn.peers",
        "pgvpn.cursors",
        "pgvpn.packet_log",
        "pgvpn.flows",
        "pgvpn.peer_stats",
        "pgvpn.rejects",
    ] {
        expect_sqlstate(
            a.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[]),
            "42501",
            &format!("peer a SELECT {rel}"),
        );
    }
    // ... nor write them.
    expect_sqlstate(
        a.execute("DELETE FROM pgvpn.packets", &[]),
        "42501",
        "peer a DELETE packets",
    );
    expect_sqlstate(
        a.execute("UPDATE pgvpn.cursors SET acked_id = 0", &[]),
        "42501",
        "peer a UPDATE cursors",
    );
    // Peers cannot administer.
    expect_sqlstate(
        a.query(
            "SELECT pgvpn.add_peer('evil', 'mallory'::regrole, '{198.18.9.0/24}'::cidr[])",
            &[],
        ),
        "42501",
        "peer a add_peer",
    );
    expect_sqlstate(
        a.query(
            "SELECT pgvpn.set_allowed_ips('a', '{198.18.0.0/15}'::cidr[])",
            &[],
        ),
        "42501",
        "peer a set_allowed_ips",
    );
    expect_sqlstate(
        a.query("SELECT pgvpn.remove_peer('b')", &[]),
        "42501",
        "peer a remove_peer",
    );
    expect_sqlstate(
        a.query("SELECT pgvpn.prune()", &[]),
        "42501",
        "peer a prune",
    );
    // A peer cannot become another peer.
    expect_sqlstate(a.batch_execute("SET ROLE b"), "42501", "peer a SET ROLE b");
    // A peer cannot shorten the audit trail (the GUCs are superuser-only).
    scalar_i64(&mut a, "SELECT pgvpn.cursor()"); // make sure the library is loaded
    expect_sqlstate(
        a.batch_execute("SET pgvpn.retention = '1s'"),
        "42501",
        "peer a SET pgvpn.retention",
    );
    expect_sqlstate(
        a.batch_execute("SET pgvpn.chunk_interval = '1s'"),
        "42501",
        "peer a SET pgvpn.chunk_interval",
    );

    // A login role that is not a peer gets 42501 from the data path.
    let mut m = cluster.connect("mallory", DB);
    let p = udp_tagged(A4, B4, "forged");
    expect_sqlstate(
        m.query("SELECT pgvpn.send($1::bytea[])", &[&vec![p.clone()]]),
        "42501",
        "non-peer send(bytea[])",
    );
    expect_sqlstate(
        m.query("SELECT pgvpn.send($1::bytea)", &[&p]),
        "42501",
        "non-peer send(bytea)",
    );
    expect_sqlstate(
        m.query("SELECT * FROM pgvpn.recv(0)", &[]),
        "42501",
        "non-peer recv",
    );
    expect_sqlstate(m.query("SELECT pgvpn.ack(0)", &[]), "42501", "non-peer ack");
    expect_sqlstate(
        m.query("SELECT pgvpn.cursor()", &[]),
        "42501",
        "non-peer cursor",
    );
    expect_sqlstate(
        m.query("SELECT pgvpn.channel()", &[]),
        "42501",
        "non-peer channel",
    );
    expect_sqlstate(
        m.query("SELECT * FROM pgvpn.packets", &[]),
        "42501",
        "non-peer SELECT packets",
    );

    // The auditor reads everything and changes nothing.
    let mut au = cluster.connect("auditor", DB);
    let n = scalar_i64(
        &mut au,
        "SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'c'",
    );
    assert_eq!(n, 4, "auditor sees c's packets in packet_log");
    for rel in [
        "pgvpn.packets",
        "pgvpn.peers",
        "pgvpn.flows",
        "pgvpn.peer_stats",
        "pgvpn.rejects",
        "pgvpn.cursors",
    ] {
        au.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[])
            .unwrap_or_else(|e| panic!("auditor SELECT {rel}: {}", db_error(&e)));
    }
    // every table and view in the schema
    let rels: Vec<String> = au
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'pgvpn' AND c.relkind IN ('r', 'p', 'v') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for rel in &rels {
        au.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[])
            .unwrap_or_else(|e| panic!("auditor cannot SELECT {rel}: {}", db_error(&e)));
    }
    let decoded: serde_json::Value = au
        .query_one(
            "SELECT pgvpn.decode(payload)::text FROM pgvpn.packets ORDER BY id LIMIT 1",
            &[],
        )
        .map(|r| serde_json::from_str(&r.get::<_, String>(0)).unwrap())
        .unwrap_or_else(|e| panic!("auditor decode: {}", db_error(&e)));
    assert_eq!(decoded["dst_addr"], A4, "{decoded}");
    expect_sqlstate(
        au.execute("DELETE FROM pgvpn.packets", &[]),
        "42501",
        "auditor DELETE packets",
    );
    expect_sqlstate(
        au.execute(
            "INSERT INTO pgvpn.peers (name, role) VALUES ('x', 'auditor')",
            &[],
        ),
        "42501",
        "auditor INSERT peers",
    );
    expect_sqlstate(
        au.query("SELECT pgvpn.send($1::bytea[])", &[&vec![p.clone()]]),
        "42501",
        "auditor send",
    );
    expect_sqlstate(
        au.query("SELECT pgvpn.prune()", &[]),
        "42501",
        "auditor prune",
    );

    // A removed peer loses the data path.
    let mut admin = cluster.superuser(DB);
    remove_peer(&mut admin, "c");
    let mut c2 = cluster.connect("c", DB);
    expect_sqlstate(
        c2.query(
            "SELECT pgvpn.send($1::bytea[])",
            &[&vec![udp_tagged(C4, A4, "late")]],
        ),
        "42501",
        "removed peer send",
    );
    expect_sqlstate(
        c2.query("SELECT * FROM pgvpn.recv(0)", &[]),
        "42501",
        "removed peer recv",
    );
    // ... its log rows stay, with its name.
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'c'"
        ),
        4
    );
}

// ---------------------------------------------------------------------------------------
// 4. ack / cursor persistence
// ---------------------------------------------------------------------------------------

#[test]
fn ack_and_cursor_persist_across_reconnects_and_crash() {
    let mut cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut a = cluster.connect("a", DB);
    let pk: Vec<Vec<u8>> = (0..10)
        .map(|i| udp_tagged(A4, B4, &format!("m{i}")))
        .collect();
    assert_eq!(send(&mut a, &pk), 10);

    let mut b = cluster.connect("b", DB);
    assert_eq!(
        scalar_i64(&mut b, "SELECT pgvpn.cursor()"),
        0,
        "cursor starts at 0"
    );
    let rows = recv(&mut b, 0, 1024);
    assert_eq!(rows.len(), 10);
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ascending ids: {ids:?}"
    );
    // recv with a limit pages through in order.
    let page = recv(&mut b, 0, 3);
    assert_eq!(page.iter().map(|r| r.0).collect::<Vec<_>>(), ids[..3]);
    assert_eq!(
        recv(&mut b, ids[2], 3)
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        ids[3..6]
    );

    let acked: i64 = b
        .query_one("SELECT pgvpn.ack($1)", &[&ids[4]])
        .unwrap()
        .get(0);
    assert_eq!(acked, ids[4]);
    assert_eq!(scalar_i64(&mut b, "SELECT pgvpn.cursor()"), ids[4]);
    drop(b);

    // Reconnect: cursor kept; resume from it.
    let mut b = cluster.connect("b", DB);
    let cur = scalar_i64(&mut b, "SELECT pgvpn.cursor()");
    assert_eq!(cur, ids[4], "cursor survives a reconnect");
    let rest = recv(&mut b, cur, 1024);
    assert_eq!(tags(&rest), ["m5", "m6", "m7", "m8", "m9"]);
    // The cursor only moves forward.
    let back: i64 = b
        .query_one("SELECT pgvpn.ack($1)", &[&ids[1]])
        .unwrap()
        .get(0);
    assert_eq!(back, ids[4], "ack backwards does not move the cursor back");
    // a's cursor is independent.
    assert_eq!(scalar_i64(&mut a, "SELECT pgvpn.cursor()"), 0);
    // Acked inside a rolled-back transaction: not stored.
    {
        let mut tx = b.transaction().unwrap();
        tx.query_one("SELECT pgvpn.ack($1)", &[&ids[9]]).unwrap();
        tx.rollback().unwrap();
    }
    assert_eq!(scalar_i64(&mut b, "SELECT pgvpn.cursor()"), ids[4]);
    let acked: i64 = b
        .query_one("SELECT pgvpn.ack($1)", &[&ids[8]])
        .unwrap()
        .get(0);
    assert_eq!(acked, ids[8]);
    drop(a);
    drop(b);

    // A committed ack is durable: crash the server (immediate stop) and come back.
    cluster.restart_immediate();
    let mut b = cluster.connect("b", DB);
    assert_eq!(
        scalar_i64(&mut b, "SELECT pgvpn.cursor()"),
        ids[8],
        "cursor survives a crash restart"
    );
    assert_eq!(tags(&recv(&mut b, ids[8], 1024)), ["m9"]);
    // And the log survived too.
    assert_eq!(recv(&mut b, 0, 1024).len(), 10);
}

// ---------------------------------------------------------------------------------------
// 5. Rejects
// ---------------------------------------------------------------------------------------

fn reject_totals(au: &mut Client, peer: &str) -> BTreeMap<String, i64> {
    au.query(
        "SELECT reason, packets FROM pgvpn.reject_totals WHERE peer = $1",
        &[&peer],
    )
    .unwrap_or_else(|e| panic!("reject_totals: {}", db_error(&e)))
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn rejects_do_not_fail_good_packets_and_are_audited() {
    let cluster = setup(&[("a", &[A4, A6]), ("b", &[B4, B6]), ("c", &[C4])]);
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut au = cluster.connect("auditor", DB);

    let good = [
        udp_tagged(A4, B4, "good-udp"),
        packet::tcp(A4, B4, 40001, 80, TCP_SYN, b""),
        packet::ping(A6, B6, 7, 1, b"good-ping6"),
    ];
    let base = udp_tagged(A4, B4, "x");
    let base6 = udp_tagged(A6, B6, "x");

    // Batch 1: one of each kind, interleaved (few enough to all be sampled).
    let batch1 = vec![
        good[0].clone(),
        bad::junk(),                        // malformed
        udp_tagged(B4, B4, "spoofed-as-b"), // spoofed: b's address
        good[1].clone(),
        udp_tagged(A4, "198.19.200.1", "nowhere"), // no_route
        udp_tagged(A4, A4, "to-myself"),           // loop
        good[2].clone(),
    ];
    assert_eq!(send(&mut a, &batch1), 3, "accepted = the good ones");
    let mut reasons: Vec<String> = au
        .query(
            "SELECT reason FROM pgvpn.rejects WHERE peer = 'a' ORDER BY reason",
            &[],
        )
        .unwrap_or_else(|e| panic!("rejects: {}", db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["loop", "malformed", "no_route", "spoofed"],
        "rejects view"
    );
    let details: Vec<(String, String)> = au
        .query(
            "SELECT reason, detail FROM pgvpn.rejects WHERE peer = 'a'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("reject samples: {details:?}");
    assert!(
        details.iter().all(|(_, d)| !d.is_empty()),
        "every reject has a detail"
    );

    // Batch 2: many bad ones, every malformed variant, NULL, spoofed from nobody's address.
    let batch2: Vec<Option<Vec<u8>>> = vec![
        Some(bad::empty()),
        Some(bad::truncated_header(&base)),
        Some(good[0].clone()),
        Some(bad::v4_length_lies(&base)),
        Some(bad::v4_bad_ihl(&base)),
        Some(bad::v6_length_lies(&base6)),
        None,
        Some(udp_tagged("203.0.113.7", B4, "spoofed-nobody")),
        Some(udp_tagged(C4, B4, "spoofed-as-c")),
        Some(udp_tagged(A4, "203.0.113.8", "nowhere-2")),
        Some(packet::ping(A6, A6, 1, 1, b"loop6")),
        Some(good[1].clone()),
    ];
    let accepted: i64 = a
        .query_one("SELECT pgvpn.send($1::bytea[])", &[&batch2])
        .unwrap_or_else(|e| panic!("send with NULL element: {}", db_error(&e)))
        .get(0);
    assert_eq!(accepted, 2);
    // single-packet form
    let one: i64 = a
        .query_one("SELECT pgvpn.send($1::bytea)", &[&bad::junk()])
        .unwrap()
        .get(0);
    assert_eq!(
        one, 0,
        "a malformed single packet is rejected, not an error"
    );
    let one: i64 = a
        .query_one("SELECT pgvpn.send($1::bytea)", &[&good[2]])
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    // an all-bad batch, and an empty batch
    assert_eq!(send(&mut a, &[bad::junk(), bad::empty()]), 0);
    assert_eq!(send(&mut a, &[]), 0);

    let expect: BTreeMap<String, i64> = [
        ("malformed", 1 + 6 + 1 + 2),
        ("spoofed", 1 + 2),
        ("no_route", 1 + 1),
        ("loop", 1 + 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(
        reject_totals(&mut au, "a"),
        expect,
        "reject totals per reason"
    );
    let total: i64 = expect.values().sum();
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'a'"
        ),
        total
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT sent_packets FROM pgvpn.peer_stats WHERE peer = 'a'"
        ),
        6
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT received_packets FROM pgvpn.peer_stats WHERE peer = 'b'"
        ),
        6
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'b'"
        ),
        0
    );

    // Only the good packets were logged and delivered, byte for byte.
    assert_eq!(scalar_i64(&mut au, "SELECT count(*) FROM pgvpn.packets"), 6);
    let mut b = cluster.connect("b", DB);
    let got: Vec<Vec<u8>> = recv(&mut b, 0, 1024).into_iter().map(|r| r.1).collect();
    let want = vec![
        good[0].clone(),
        good[1].clone(),
        good[2].clone(),
        good[0].clone(),
        good[1].clone(),
        good[2].clone(),
    ];
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------
// 5b. The audit columns and views
// ---------------------------------------------------------------------------------------

#[test]
fn audit_columns_and_views() {
    let cluster = setup(&[("a", &[A4, A6]), ("b", &[B4, B6])]);
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let syn = packet::tcp(A4, B4, 40001, 80, TCP_SYN, b"");
    let synack = packet::tcp(B4, A4, 80, 40001, TCP_SYN | TCP_ACK, b"");
    let data = packet::tcp(A4, B4, 40001, 80, TCP_ACK, &[7u8; 1000]);
    let ping6 = packet::ping(A6, B6, 9, 3, b"hello");
    let udp = packet::udp(A4, B4, 5353, 53, b"q");
    assert_eq!(
        send(
            &mut a,
            &[syn.clone(), data.clone(), ping6.clone(), udp.clone()]
        ),
        4
    );
    assert_eq!(send(&mut b, std::slice::from_ref(&synack)), 1);

    let mut au = cluster.connect("auditor", DB);
    let rows = au
        .query(
            "SELECT src_peer, dst_peer, ip_version::int, host(src_addr), host(dst_addr), protocol::int, src_port, dst_port, \
                    icmp_type::int, tcp_flags::int, length FROM pgvpn.packet_log ORDER BY id",
            &[],
        )
        .unwrap_or_else(|e| panic!("packet_log: {}", db_error(&e)));
    type Row = (
        String,
        String,
        i32,
        String,
        String,
        i32,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        i32,
    );
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
                r.get(10),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    let want: Vec<Row> = vec![
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            6,
            Some(40001),
            Some(80),
            None,
            Some(2),
            syn.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            6,
            Some(40001),
            Some(80),
            None,
            Some(0x10),
            data.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            6,
            s(A6),
            s(B6),
            58,
            None,
            None,
            Some(128),
            None,
            ping6.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            17,
            Some(5353),
            Some(53),
            None,
            None,
            udp.len() as i32,
        ),
        (
            s("b"),
            s("a"),
            4,
            s(B4),
            s(A4),
            6,
            Some(80),
            Some(40001),
            None,
            Some(0x12),
            synack.len() as i32,
        ),
    ];
    assert_eq!(got, want, "packet_log columns");
    // The table itself has peer ids and the exact payload.
    let payloads: Vec<Vec<u8>> = au
        .query("SELECT payload FROM pgvpn.packets ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        payloads,
        vec![
            syn.clone(),
            data.clone(),
            ping6.clone(),
            udp.clone(),
            synack.clone()
        ]
    );

    // flows: the TCP flow a→b has 2 packets and their bytes.
    let f = au
        .query_one(
            "SELECT packets, bytes::bigint FROM pgvpn.flows WHERE src_peer = 'a' AND dst_peer = 'b' AND protocol = 6 \
             AND src_port = 40001 AND dst_port = 80",
            &[],
        )
        .unwrap_or_else(|e| panic!("flows: {}", db_error(&e)));
    assert_eq!(
        (f.get::<_, i64>(0), f.get::<_, i64>(1)),
        (2, (syn.len() + data.len()) as i64)
    );
    assert_eq!(scalar_i64(&mut au, "SELECT count(*) FROM pgvpn.flows"), 4);

    // peer_stats
    let ps = au
        .query_one(
            "SELECT sent_packets, sent_bytes, received_packets, received_bytes, rejected, cursor \
             FROM pgvpn.peer_stats WHERE peer = 'a'",
            &[],
        )
        .unwrap_or_else(|e| panic!("peer_stats: {}", db_error(&e)));
    let sent_bytes = (syn.len() + data.len() + ping6.len() + udp.len()) as i64;
    assert_eq!(
        (
            ps.get::<_, i64>(0),
            ps.get::<_, i64>(1),
            ps.get::<_, i64>(2),
            ps.get::<_, i64>(3),
            ps.get::<_, i64>(4),
            ps.get::<_, i64>(5)
        ),
        (4, sent_bytes, 1, synack.len() as i64, 0, 0)
    );

    // decode()
    let j: String = au
        .query_one("SELECT pgvpn.decode($1)::text", &[&ping6])
        .unwrap_or_else(|e| panic!("decode: {}", db_error(&e)))
        .get(0);
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["ip_version"], 6);
    assert_eq!(j["src_addr"], A6);
    assert_eq!(j["dst_addr"], B6);
    assert_eq!(j["protocol"], 58);
    assert_eq!(j["icmp_type"], 128);
    assert_eq!(j["length"], ping6.len());
    let j: String = au
        .query_one("SELECT pgvpn.decode('\\x00'::bytea)::text", &[])
        .unwrap()
        .get(0);
    assert!(j.contains("error"), "decode of junk reports an error: {j}");
}

// ---------------------------------------------------------------------------------------
// 5c. Routing: longest prefix, updates, removal
// ---------------------------------------------------------------------------------------

#[test]
fn routing_longest_prefix_and_updates() {
    let cluster = setup(&[("a", &[A4])]);
    let mut admin = cluster.superuser(DB);
    cluster.create_login_role("gw");
    cluster.create_login_role("sub");
    add_peer(
        &mut admin,
        "gw",
        "gw",
        &["198.18.2.0/24", "fd00:5067:7670:2::/64"],
    );
    add_peer(&mut admin, "sub", "sub", &["198.18.2.128/25"]);
    let mut a = cluster.connect("a", DB);
    let mut gw = cluster.connect("gw", DB);
    let mut sub = cluster.connect("sub", DB);

    assert_eq!(
        send(
            &mut a,
            &[
                udp_tagged(A4, "198.18.2.5", "r1"),
                udp_tagged(A4, "198.18.2.200", "r2"),
                udp_tagged(A4, "198.18.2.127", "r3"),
                udp_tagged(A4, "198.18.2.128", "r4"),
            ]
        ),
        4
    );
    // a has no IPv6 prefix: its IPv6 source is spoofed.
    assert_eq!(
        send(
            &mut a,
            &[packet::ping(
                "fd00:5067:7670:1::1",
                "fd00:5067:7670:2::9",
                1,
                1,
                b""
            )]
        ),
        0
    );
    assert_eq!(tags(&recv(&mut gw, 0, 100)), ["r1", "r3"]);
    assert_eq!(tags(&recv(&mut sub, 0, 100)), ["r2", "r4"]);
    // gw may send from any address in its /24 except what sub owns more specifically.
    assert_eq!(
        send(&mut gw, &[udp_tagged("198.18.2.77", A4, "from-gw")]),
        1
    );
    assert_eq!(
        send(&mut gw, &[udp_tagged("198.18.2.177", A4, "gw-as-sub")]),
        0,
        "gw cannot use sub's addresses"
    );
    assert_eq!(tags(&recv(&mut a, 0, 100)), ["from-gw"]);

    // Move sub elsewhere: its old range falls back to gw.
    sql::set_allowed_ips(&mut admin, "sub", &["198.18.3.0/24"]);
    let last_gw = recv(&mut gw, 0, 100).last().unwrap().0;
    let last_sub = recv(&mut sub, 0, 100).last().unwrap().0;
    assert_eq!(
        send(
            &mut a,
            &[
                udp_tagged(A4, "198.18.2.200", "r5"),
                udp_tagged(A4, "198.18.3.1", "r6")
            ]
        ),
        2
    );
    assert_eq!(tags(&recv(&mut gw, last_gw, 100)), ["r5"]);
    assert_eq!(tags(&recv(&mut sub, last_sub, 100)), ["r6"]);

    // Remove gw: its range becomes unroutable.
    remove_peer(&mut admin, "gw");
    assert_eq!(send(&mut a, &[udp_tagged(A4, "198.18.2.5", "r7")]), 0);
    let mut su = cluster.superuser(DB);
    let n = scalar_i64(
        &mut su,
        "SELECT packets FROM pgvpn.reject_totals WHERE peer = 'a' AND reason = 'no_route'",
    );
    assert_eq!(n, 1);
}

// ---------------------------------------------------------------------------------------
// 6. Prune
// ---------------------------------------------------------------------------------------

fn partitions(c: &mut Client) -> i64 {
    scalar_i64(
        c,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgvpn.packets'::regclass",
    )
}

#[test]
fn prune_drops_old_chunks_and_sending_continues() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut su = cluster.superuser(DB);
    su.batch_execute("SET pgvpn.retention = '1s'; SET pgvpn.chunk_interval = '1s'")
        .unwrap_or_else(|e| panic!("SET GUCs as superuser: {}", db_error(&e)));
    let retention: String = su.query_one("SHOW pgvpn.retention", &[]).unwrap().get(0);
    assert_eq!(retention, "1s");

    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let old: Vec<Vec<u8>> = (0..20)
        .map(|i| udp_tagged(A4, B4, &format!("old{i}")))
        .collect();
    assert_eq!(send(&mut a, &old), 20);
    let before = partitions(&mut su);
    eprintln!("partitions before pruning: {before}");
    assert!(before >= 1);
    assert_eq!(
        scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"),
        20
    );

    // Prune repeatedly over a few seconds (each call rolls the open chunk once it is
    // older than chunk_interval and drops chunks closed longer ago than retention).
    let mut dropped = 0i64;
    let mut max_parts = before;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1300));
        let d: i32 = su
            .query_one("SELECT pgvpn.prune()", &[])
            .unwrap_or_else(|e| panic!("prune: {}", db_error(&e)))
            .get(0);
        dropped += d as i64;
        max_parts = max_parts.max(partitions(&mut su));
        eprintln!(
            "prune() dropped {d}; partitions now {}",
            partitions(&mut su)
        );
    }
    let after = partitions(&mut su);
    assert!(dropped >= 1, "prune dropped no chunk");
    assert!(
        max_parts > before || after < before,
        "prune rolled a new chunk"
    );
    assert!(
        after <= before,
        "old chunks dropped: before {before}, after {after}"
    );
    assert_eq!(
        scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"),
        0,
        "old packets gone"
    );

    // New sends still work and are delivered.
    let new: Vec<Vec<u8>> = (0..5)
        .map(|i| udp_tagged(A4, B4, &format!("new{i}")))
        .collect();
    assert_eq!(send(&mut a, &new), 5);
    let got = recv(&mut b, 0, 1024);
    assert_eq!(tags(&got), ["new0", "new1", "new2", "new3", "new4"]);
    let ack: i64 = b
        .query_one("SELECT pgvpn.ack($1)", &[&got.last().unwrap().0])
        .unwrap()
        .get(0);
    assert_eq!(ack, got.last().unwrap().0);
    // The counters survive pruning.
    assert_eq!(
        scalar_i64(
            &mut su,
            "SELECT sent_packets FROM pgvpn.peer_stats WHERE peer = 'a'"
        ),
        25
    );
    // An idle prune keeps exactly the one open chunk.
    std::thread::sleep(Duration::from_millis(1300));
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap();
    assert!(partitions(&mut su) >= 1);
    assert_eq!(scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"), 5);
}

/// The open chunk has no per-row host-pair index (it halves small-packet throughput);
/// prune() builds one per closed chunk, so audits by host pair stay indexed.
#[test]
fn closed_chunks_get_a_host_pair_index() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut su = cluster.superuser(DB);
    su.batch_execute("SET pgvpn.retention = '1h'; SET pgvpn.chunk_interval = '1s'")
        .unwrap();
    let mut a = cluster.connect("a", DB);
    let batch: Vec<Vec<u8>> = (0..50)
        .map(|i| udp_tagged(A4, B4, &format!("p{i}")))
        .collect();
    assert_eq!(send(&mut a, &batch), 50);
    let indexed = |su: &mut Client| {
        scalar_i64(
            su,
            "SELECT count(*) FROM pgvpn.chunks c JOIN pg_index i ON i.indrelid = c.relid \
                        JOIN pg_class x ON x.oid = i.indexrelid WHERE x.relname LIKE '%_hosts'",
        )
    };
    assert_eq!(indexed(&mut su), 0, "the open chunk has no host-pair index");
    std::thread::sleep(Duration::from_millis(1200));
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap(); // closes the chunk
    assert_eq!(indexed(&mut su), 0, "not in the transaction that closed it");
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap(); // indexes it
    assert_eq!(indexed(&mut su), 1);
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap();
    assert_eq!(indexed(&mut su), 1, "built once");
    su.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = on")
        .unwrap();
    let plan: Vec<String> = su
        .query(
            &format!("EXPLAIN SELECT * FROM pgvpn.packet_log WHERE src_addr = '{A4}' AND dst_addr = '{B4}'"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("_hosts")),
        "the audit uses the index: {plan:#?}"
    );
    assert_eq!(
        scalar_i64(&mut su, &format!("SELECT count(*) FROM pgvpn.packet_log WHERE src_addr = '{A4}' AND dst_addr = '{B4}'")),
        50
    );
}

/// The API forces generic plans for its own statements only: the session's setting is
/// restored on return, and also when the call fails.
#[test]
fn session_settings_survive_api_errors() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut b = cluster.connect("b", DB);
    b.batch_execute("SET plan_cache_mode = force_custom_plan")
        .unwrap();
    expect_sqlstate(
        b.query("SELECT * FROM pgvpn.recv(0, 10, -1)", &[]),
        "22023",
        "bad wait",
    );
    let mode: String = b.query_one("SHOW plan_cache_mode", &[]).unwrap().get(0);
    assert_eq!(mode, "force_custom_plan");
    assert!(recv(&mut b, 0, 10).is_empty());
    let mode: String = b.query_one("SHOW plan_cache_mode", &[]).unwrap().get(0);
    assert_eq!(mode, "force_custom_plan");
}
