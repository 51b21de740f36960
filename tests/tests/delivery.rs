//! Delivery: every committed packet reaches its receiver exactly once, in id order, and
//! a receiver's place in its stream (its cursor) is durable. Senders to one receiver
//! become visible to it in id order whatever order they commit in; batches for several
//! receivers never deadlock. Plus the long poll, and API errors that leave the session
//! as it was.
//!
//! Real roles and connections to a private PostgreSQL 15 cluster (one per test). Needs
//! root (initdb/pg_ctl run as `postgres` via runuser) and the extension installed. The
//! negative controls run the same checks against naive outboxes, without the extension.

use pgvpn_core::limits::{MAX_RECV_PACKETS, MAX_WAIT_MS};
use pgvpn_core::sql::{ACK, RECV};
use pgvpn_tests::spec::exactly_once::run_exactly_once;
use pgvpn_tests::spec::interleave::{Interleaving, Op::*, Outcome, Step};
use pgvpn_tests::spec::naive::{self, NAIVE, NAIVE_LOCKING};
use pgvpn_tests::spec::{
    expect_sqlstate, setup, tag_of, tags, udp_tagged, A4, B4, C4, DB, PGVPN, R4, S4,
};
use pgvpn_tests::sql::{ack, cursor, recv, send};
use pgvpn_tests::{db_error, Cluster};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Exactly once under concurrency (the outbox "sequence gap" trap)
// ---------------------------------------------------------------------------------------

#[test]
fn exactly_once_under_concurrency() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4]), ("r", &[R4])]);
    let rep = run_exactly_once(
        &cluster,
        DB,
        &PGVPN,
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
    assert_eq!(cursor(&mut r), 0);
    let again = recv(&mut r, 0, MAX_RECV_PACKETS).len();
    assert_eq!(again, rep.committed);
}

/// Negative control: the same driver against a naive outbox (bigserial ids, recv = "id >
/// after") must detect lost packets. Proves the test above can fail. Needs no extension.
#[test]
fn exactly_once_check_catches_a_naive_outbox() {
    let cluster = Cluster::start();
    cluster.create_db(DB);
    for r in ["a", "b", "c", "r"] {
        cluster.create_login_role(r);
    }
    naive::install_naive(&cluster, DB);
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
// Visible order and deadlock freedom, schedule by schedule
// ---------------------------------------------------------------------------------------

/// Every peer the schedules below name, with its address.
const PEERS: &[(&str, &str)] = &[("a", A4), ("b", B4), ("c", C4), ("r", R4), ("s", S4)];

/// The peers of [`PEERS`] (r before s: today's send locks receivers in peer id order).
fn vpn_with_peers() -> Cluster {
    setup(&[
        ("a", &[A4]),
        ("b", &[B4]),
        ("c", &[C4]),
        ("r", &[R4]),
        ("s", &[S4]),
    ])
}

/// The same login roles without the extension, for the naive controls.
fn plain_cluster_with_roles() -> Cluster {
    let cluster = Cluster::start();
    cluster.create_db(DB);
    for (role, _) in PEERS {
        cluster.create_login_role(role);
    }
    cluster
}

/// What every schedule must come to, whoever waited for whom: every step succeeds
/// (no 40P01), each receiver gets every committed packet exactly once and never sees a
/// new id below one it has seen, ids follow commit order, and a sender that waited was
/// released by another transaction ending.
#[track_caller]
fn assert_delivered_in_order_exactly_once(o: &Outcome) {
    let t = o.trace();
    let none: Vec<String> = Vec::new();
    assert_eq!(o.failures(), none, "every step succeeds:\n{t}");
    assert_eq!(o.not_exactly_once(), none, "exactly once:\n{t}");
    assert_eq!(
        o.seen_out_of_order(),
        none,
        "no new id below one seen:\n{t}"
    );
    assert_eq!(
        o.ids_against_commit_order(),
        none,
        "ids in commit order:\n{t}"
    );
    assert_eq!(
        o.unexplained_waits(),
        none,
        "waits end with a transaction:\n{t}"
    );
}

/// Three senders to r open transactions and send twice each; then `endings`.
fn three_senders_to_r(endings: [Step; 3]) -> Vec<Step> {
    let mut s = vec![
        ("a", Begin),
        ("a", Send(&["r", "r"])),
        ("b", Begin),
        // today b waits here until a commits; a design with ids at commit does not wait
        ("b", Send(&["r", "r"])),
        ("c", Begin),
        ("c", Send(&["r"])),
        ("a", Send(&["r"])),
        ("b", Send(&["r"])),
        ("c", Send(&["r", "r"])),
    ];
    s.extend(endings);
    s
}

/// Senders to one receiver become visible to it in id order, whatever order their
/// transactions commit in: a receiver that has seen id N never later sees a new id below
/// N, and it sees every committed packet exactly once. The senders end in every order,
/// and once with one of them rolling back.
#[test]
fn senders_to_one_receiver_become_visible_in_id_order() {
    let cluster = vpn_with_peers();
    let vpn = Interleaving::new(&cluster, DB, &PGVPN, PEERS);
    let mut endings: Vec<[Step; 3]> = Vec::new();
    for [x, y, z] in [
        ["a", "b", "c"],
        ["a", "c", "b"],
        ["b", "a", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["c", "b", "a"],
    ] {
        endings.push([(x, Commit), (y, Commit), (z, Commit)]);
    }
    endings.push([("b", Rollback), ("c", Commit), ("a", Commit)]);
    for e in endings {
        let o = vpn.run(&three_senders_to_r(e));
        eprintln!("schedule {e:?}:\n{}", o.trace());
        assert_delivered_in_order_exactly_once(&o);
    }
}

/// Negative control: against a naive outbox (bigserial ids, recv "id > after") the
/// later sender commits first, the receiver's cursor passes its ids, and the earlier
/// sender's lower ids appear behind it. Proves the test above can fail.
#[test]
fn visible_order_check_catches_a_naive_outbox() {
    let cluster = plain_cluster_with_roles();
    naive::install_naive(&cluster, DB);
    let o = Interleaving::new(&cluster, DB, &NAIVE, PEERS).run(&[
        ("a", Begin),
        ("a", Send(&["r", "r"])),
        ("b", Begin),
        ("b", Send(&["r", "r"])),
        ("b", Commit),
        ("a", Commit),
    ]);
    let t = o.trace();
    eprintln!("naive outbox:\n{t}");
    assert_eq!(o.failures(), Vec::<String>::new(), "the control ran:\n{t}");
    assert!(
        !o.seen_out_of_order().is_empty(),
        "late lower ids noticed:\n{t}"
    );
    assert!(
        !o.not_exactly_once().is_empty(),
        "skipped packets noticed:\n{t}"
    );
    assert!(
        !o.ids_against_commit_order().is_empty(),
        "ids against commit order noticed:\n{t}"
    );
}

/// Two batches naming r and s in opposite orders, sent in open transactions by a and
/// b while c's open transaction has sent to r. With per-row locking in batch order this
/// deadlocks once c commits: a takes r and waits for s, which b took before it began to
/// wait for r.
fn opposite_batches(endings: [Step; 2]) -> Vec<Step> {
    let mut s = vec![
        ("c", Begin),
        ("c", Send(&["r"])),
        ("a", Begin),
        ("a", Send(&["r", "s", "r", "s"])),
        ("b", Begin),
        ("b", Send(&["s", "r", "s", "r"])),
        ("c", Commit),
    ];
    s.extend(endings);
    s
}

/// Multi-receiver batches never deadlock: both sessions commit, in either order, without
/// SQLSTATE 40P01, and r and s each see everything once, in order.
#[test]
fn multi_receiver_batches_never_deadlock() {
    let cluster = vpn_with_peers();
    let vpn = Interleaving::new(&cluster, DB, &PGVPN, PEERS);
    for e in [
        [("a", Commit), ("b", Commit)],
        [("b", Commit), ("a", Commit)],
    ] {
        let o = vpn.run(&opposite_batches(e));
        eprintln!("schedule {e:?}:\n{}", o.trace());
        assert_eq!(o.deadlocks(), 0, "no 40P01:\n{}", o.trace());
        assert_delivered_in_order_exactly_once(&o);
    }
}

/// Negative control: per-row locking in batch order deadlocks on that schedule. Proves
/// the test above can fail.
#[test]
fn deadlock_check_catches_naive_per_row_locking() {
    let cluster = plain_cluster_with_roles();
    naive::install_naive_locking(&cluster, DB, &[R4, S4]);
    let o = Interleaving::new(&cluster, DB, &NAIVE_LOCKING, PEERS)
        .run(&opposite_batches([("a", Commit), ("b", Commit)]));
    eprintln!("naive per-row locking:\n{}", o.trace());
    assert_eq!(
        o.deadlocks(),
        1,
        "one of a and b aborted with 40P01:\n{}",
        o.trace()
    );
}

/// Two transactions that each call send several times, for overlapping receivers in
/// opposite orders, both commit (in either order) without 40P01. Today each send holds
/// its receivers' row locks until commit, so this deadlocks (README, "Wake-ups"); the
/// send redesign, which assigns ids at commit, must make it pass.
#[test]
fn transactions_sending_to_overlapping_receivers_in_opposite_orders_commit() {
    let cluster = vpn_with_peers();
    let vpn = Interleaving::new(&cluster, DB, &PGVPN, PEERS);
    for e in [
        [("a", Commit), ("b", Commit)],
        [("b", Commit), ("a", Commit)],
    ] {
        let mut schedule = vec![
            ("a", Begin),
            ("a", Send(&["r"])),
            ("b", Begin),
            ("b", Send(&["s"])),
            ("a", Send(&["s", "r"])),
            ("b", Send(&["r", "s"])),
        ];
        schedule.extend(e);
        let o = vpn.run(&schedule);
        eprintln!("schedule {e:?}:\n{}", o.trace());
        assert_eq!(o.deadlocks(), 0, "no 40P01:\n{}", o.trace());
        assert_delivered_in_order_exactly_once(&o);
    }
}

// ---------------------------------------------------------------------------------------
// The cursor: ack, persistence across reconnects and a crash
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
    assert_eq!(cursor(&mut b), 0, "cursor starts at 0");
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

    let acked: i64 = ack(&mut b, ids[4]);
    assert_eq!(acked, ids[4]);
    assert_eq!(cursor(&mut b), ids[4]);
    drop(b);

    // Reconnect: cursor kept; resume from it.
    let mut b = cluster.connect("b", DB);
    let cur = cursor(&mut b);
    assert_eq!(cur, ids[4], "cursor survives a reconnect");
    let rest = recv(&mut b, cur, 1024);
    assert_eq!(tags(&rest), ["m5", "m6", "m7", "m8", "m9"]);
    // The cursor only moves forward.
    let back: i64 = ack(&mut b, ids[1]);
    assert_eq!(back, ids[4], "ack backwards does not move the cursor back");
    // a's cursor is independent.
    assert_eq!(cursor(&mut a), 0);
    // Acked inside a rolled-back transaction: not stored.
    {
        let mut tx = b.transaction().unwrap();
        tx.query_one(ACK, &[&ids[9]]).unwrap();
        tx.rollback().unwrap();
    }
    assert_eq!(cursor(&mut b), ids[4]);
    let acked: i64 = ack(&mut b, ids[8]);
    assert_eq!(acked, ids[8]);
    drop(a);
    drop(b);

    // A committed ack is durable: crash the server (immediate stop) and come back.
    cluster.restart_immediate();
    let mut b = cluster.connect("b", DB);
    assert_eq!(cursor(&mut b), ids[8], "cursor survives a crash restart");
    assert_eq!(tags(&recv(&mut b, ids[8], 1024)), ["m9"]);
    // And the log survived too.
    assert_eq!(recv(&mut b, 0, 1024).len(), 10);
}

// ---------------------------------------------------------------------------------------
// The long poll, and errors that leave the session as it was
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
        .query(RECV, &[&0i64, &10i32, &10_000i32])
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
    let rows = b2.query(RECV, &[&last, &10i32, &300i32]).unwrap();
    assert!(rows.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(300));
}

/// recv's bounds are the figures in `pgvpn_core::limits`, which the shim reads too: the
/// largest page and the longest wait are accepted, one more is refused (22023).
#[test]
fn recv_bounds_are_the_limits_in_pgvpn_core() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    // Something to deliver, so that the longest wait returns at once.
    assert_eq!(send(&mut a, &[udp_tagged(A4, B4, "one")]), 1);
    let rows = b
        .query(RECV, &[&0i64, &MAX_RECV_PACKETS, &MAX_WAIT_MS])
        .unwrap_or_else(|e| panic!("recv at the limits: {}", db_error(&e)));
    assert_eq!(rows.len(), 1);
    expect_sqlstate(
        b.query(RECV, &[&0i64, &(MAX_RECV_PACKETS + 1), &0i32]),
        "22023",
        "a page above MAX_RECV_PACKETS",
    );
    expect_sqlstate(
        b.query(RECV, &[&0i64, &10i32, &(MAX_WAIT_MS + 1)]),
        "22023",
        "a wait above MAX_WAIT_MS",
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
    expect_sqlstate(b.query(RECV, &[&0i64, &10i32, &-1i32]), "22023", "bad wait");
    let mode: String = b.query_one("SHOW plan_cache_mode", &[]).unwrap().get(0);
    assert_eq!(mode, "force_custom_plan");
    assert!(recv(&mut b, 0, 10).is_empty());
    let mode: String = b.query_one("SHOW plan_cache_mode", &[]).unwrap().get(0);
    assert_eq!(mode, "force_custom_plan");
}
