//! Wake-ups: a receiver waiting in `recv(after, max, wait_ms)` (a long poll) is woken when
//! a transaction that sent it packets commits — once, however many sends and packets the
//! transaction held, with every packet there when it wakes. Nothing wakes it before the
//! commit, and an aborted or failed transaction wakes no one. (The wake-up is a condition
//! variable per peer in shared memory; there is no NOTIFY channel anybody could listen
//! to: tests/tests/hostile.rs.)
//!
//! Needs root and the extension installed (see `delivery.rs`).

use pgvpn_core::sql::{RECV, SEND};
use pgvpn_tests::spec::{setup, tag_of, udp_tagged, A4, B4, C4, DB};
use pgvpn_tests::sql::{recv, send};
use postgres::Client;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A long poll on its own thread: what it returned and when.
struct Poll(JoinHandle<(Vec<String>, Instant)>);

impl Poll {
    /// `recv(after, 1024, wait_ms)` as `role`.
    fn start(mut c: Client, after: i64, wait_ms: i32) -> Poll {
        Poll(thread::spawn(move || {
            let rows = c.query(RECV, &[&after, &1024i32, &wait_ms]).expect("recv");
            let tags = rows.iter().map(|r| tag_of(r.get::<_, &[u8]>(1))).collect();
            (tags, Instant::now())
        }))
    }

    fn done(&self) -> bool {
        self.0.is_finished()
    }

    fn result(self) -> (Vec<String>, Instant) {
        self.0.join().expect("poll thread")
    }
}

fn newest(c: &mut Client) -> i64 {
    recv(c, 0, 65_536).last().map_or(0, |r| r.0)
}

#[test]
fn one_wake_up_per_committed_transaction_and_none_before() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4])]);
    let mut a = cluster.connect("a", DB);
    let to = |dst: &str, tag: &str| udp_tagged(A4, dst, tag);

    // T1: three sends in one transaction, several packets to b, some to c.
    let pb = Poll::start(cluster.connect("b", DB), 0, 10_000);
    let pc = Poll::start(cluster.connect("c", DB), 0, 10_000);
    thread::sleep(Duration::from_millis(200));
    {
        let mut tx = a.transaction().unwrap();
        let n1: i64 = tx
            .query_one(
                SEND,
                &[&vec![to(B4, "t1-1"), to(B4, "t1-2"), to(B4, "t1-3")]],
            )
            .unwrap()
            .get(0);
        let n2: i64 = tx
            .query_one(
                SEND,
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
        thread::sleep(Duration::from_millis(300));
        assert!(!pb.done() && !pc.done(), "woken before the commit");
        let committed = Instant::now();
        tx.commit().unwrap();
        let (tb, at_b) = pb.result();
        let (tc, at_c) = pc.result();
        assert_eq!(
            tb,
            ["t1-1", "t1-2", "t1-3", "t1-4", "t1-5"],
            "b: everything, at once"
        );
        assert_eq!(tc, ["t1-c1", "t1-c2", "t1-c3"], "c: everything, at once");
        for at in [at_b, at_c] {
            assert!(
                at.duration_since(committed) < Duration::from_secs(1),
                "woken by the commit"
            );
        }
    }
    let mut b = cluster.connect("b", DB);
    let mut c = cluster.connect("c", DB);
    let (last_b, last_c) = (newest(&mut b), newest(&mut c));

    // T2: only b. c's poll is not woken.
    let pb = Poll::start(cluster.connect("b", DB), last_b, 10_000);
    let pc = Poll::start(cluster.connect("c", DB), last_c, 1_500);
    thread::sleep(Duration::from_millis(200));
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one(SEND, &[&vec![to(B4, "t2-1"), to(B4, "t2-2")]])
            .unwrap();
        tx.query_one("SELECT pgvpn.send($1::bytea)", &[&to(B4, "t2-3")])
            .unwrap();
        tx.commit().unwrap();
    }
    let started = Instant::now();
    assert_eq!(pb.result().0, ["t2-1", "t2-2", "t2-3"]);
    let (tc, at_c) = pc.result();
    assert!(tc.is_empty());
    assert!(
        at_c.duration_since(started) >= Duration::from_millis(1000),
        "c slept on"
    );
    let last_b = newest(&mut b);

    // T3: an aborted transaction wakes nobody and delivers nothing.
    let pb = Poll::start(cluster.connect("b", DB), last_b, 1_500);
    thread::sleep(Duration::from_millis(200));
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one(SEND, &[&vec![to(B4, "t3-1"), to(C4, "t3-c1")]])
            .unwrap();
        tx.rollback().unwrap();
    }
    assert!(pb.result().0.is_empty(), "woken by an aborted transaction");

    // T4: a transaction that failed after sending (error → rolled back): the same.
    let pb = Poll::start(cluster.connect("b", DB), last_b, 1_500);
    thread::sleep(Duration::from_millis(200));
    {
        let mut tx = a.transaction().unwrap();
        tx.query_one("SELECT pgvpn.send($1::bytea)", &[&to(B4, "t4-1")])
            .unwrap();
        assert!(tx.batch_execute("SELECT 1/0").is_err());
        let _ = tx.commit(); // COMMIT of a failed transaction is a rollback
    }
    assert!(pb.result().0.is_empty(), "woken by a failed transaction");

    // Autocommit: two statements are two transactions; the second finds the poll done.
    let pb = Poll::start(cluster.connect("b", DB), last_b, 10_000);
    thread::sleep(Duration::from_millis(200));
    send(&mut a, &[to(B4, "t5-1")]);
    assert_eq!(pb.result().0, ["t5-1"]);
    send(&mut a, &[to(B4, "t6-1"), to(B4, "t6-2")]);
    let all: Vec<String> = recv(&mut b, 0, 1024).iter().map(|r| tag_of(&r.1)).collect();
    assert_eq!(
        all,
        ["t1-1", "t1-2", "t1-3", "t1-4", "t1-5", "t2-1", "t2-2", "t2-3", "t5-1", "t6-1", "t6-2"]
    );
}
