//! The exactly-once driver (the outbox "sequence gap" trap): concurrent senders whose
//! commits interleave out of id order, one reader polling from its cursor, and a report
//! of what it saw against what was committed. The delivery spec runs it against pgvpn
//! and a naive outbox (which must fail it), the retention spec while chunks roll.

use super::{tag_of, udp_tagged, Api};
use crate::cluster::{db_error, Cluster};
use crate::util::Rng;
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The reader's page size.
const PAGE: i32 = 1024;

/// What the reader saw against what the senders committed.
#[derive(Debug, Default)]
pub struct ExactlyOnceReport {
    pub committed: usize,
    pub rolled_back: usize,
    pub seen: usize,
    pub missing: Vec<String>,
    pub duplicates: Vec<String>,
    pub from_rolled_back: Vec<String>,
    pub unknown: Vec<String>,
    pub order_violations: Vec<(i64, i64)>,
    pub accepted_mismatch: Vec<String>,
    pub per_sender_seen: BTreeMap<String, usize>,
    pub per_sender_committed: BTreeMap<String, usize>,
}

impl ExactlyOnceReport {
    /// Every committed packet seen exactly once, in id order, and nothing else.
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.duplicates.is_empty()
            && self.from_rolled_back.is_empty()
            && self.unknown.is_empty()
            && self.order_violations.is_empty()
            && self.accepted_mismatch.is_empty()
            && self.seen == self.committed
    }
    pub fn summary(&self) -> String {
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
pub fn run_exactly_once(
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
                    .query(&stmt, &[&last, &PAGE, &0i32])
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
