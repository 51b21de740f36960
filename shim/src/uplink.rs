//! tun → `pgvpn.send()`.
//!
//! A reader thread drains the tun device into the queue as fast as the kernel hands
//! packets over (a full tun queue drops packets); a sender thread takes a batch from it
//! and sends it. The queue is flow-fair and bounded by bytes and by time (fq.rs), so a
//! ping or an ACK is not stuck behind a bulk transfer; batches are sized to take about
//! [`fq::BATCH_TARGET`], since a packet that arrives during a send waits for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::{retry_open, GaveUp};
use crate::error::ErrorClass;
use crate::fq::{self, BatchSizer, Drops, FlowQueue};
use crate::io::{Database, Tun, UplinkSession};
use crate::runtime::{Shared, EXIT_FATAL};
use crate::stats::Stats;
use pgvpn_core::limits::MAX_TXN_BYTES;

/// How long the reader waits for a packet before looking at the stop flag again.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Reads at most this many packets per wake-up, so a flood cannot hide a stop.
const READS_PER_POLL: usize = 256;

/// Largest packet a tun device hands over.
const READ_BUF: usize = 65536;

/// Say at most this often that the database refused a batch.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Smallest batch budget ([`fq::cost`] units): a few full-size packets.
const MIN_BUDGET: usize = 32 << 10;

/// The queue between the reader and the sender. Everything that touches it is in this
/// module ([`queue`], the reader's push, [`next_batch`], [`drain_for`]).
struct Chan {
    q: FlowQueue,
    /// The sender is gone: the reader stops.
    rx_gone: AtomicBool,
}

/// The reader's end; dropping it closes the queue (the sender flushes what is left).
pub struct QueueTx(Arc<Chan>);
/// The sender's end.
pub struct QueueRx(Arc<Chan>);

/// The receiving end is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

impl QueueTx {
    /// Queues a packet; what had to be dropped to make room is counted by the caller.
    pub fn send(&self, pkt: Vec<u8>) -> Result<Drops, Closed> {
        if self.0.rx_gone.load(Ordering::Relaxed) {
            return Err(Closed);
        }
        Ok(self.0.q.push(pkt, Instant::now()))
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        self.0.q.close();
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.0.rx_gone.store(true, Ordering::Relaxed);
    }
}

impl QueueRx {
    /// Takes everything queued, without waiting.
    pub fn take_all(&self) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        while let (Some(b), _) =
            self.0
                .q
                .pop_batch(usize::MAX, usize::MAX, usize::MAX, Duration::ZERO)
        {
            if b.is_empty() {
                break;
            }
            all.extend(b);
        }
        all
    }
}

pub fn queue() -> (QueueTx, QueueRx) {
    queue_with(fq::MAX_QUEUED_BYTES)
}

/// A queue holding at most `max_bytes`.
pub fn queue_with(max_bytes: usize) -> (QueueTx, QueueRx) {
    let chan = Arc::new(Chan {
        q: FlowQueue::new(max_bytes),
        rx_gone: AtomicBool::new(false),
    });
    (QueueTx(Arc::clone(&chan)), QueueRx(chan))
}

/// Blocks for the first packet, then takes what else is queued: up to `max` packets
/// costing about `budget`, and never more than a transaction may send (MAX_TXN_BYTES). A
/// lone packet goes out at once. Packets CoDel drops on the way are counted as
/// `dropped_queue_full` (the queue dropped them). `None` once the queue is closed and
/// empty.
pub fn next_batch(rx: &QueueRx, max: usize, budget: usize, stats: &Stats) -> Option<Vec<Vec<u8>>> {
    loop {
        let (batch, drops) = rx.0.q.pop_batch(max, budget, MAX_TXN_BYTES, POLL_TIMEOUT);
        count_drops(stats, drops);
        match batch {
            Some(b) if b.is_empty() => continue,
            other => return other,
        }
    }
}

fn count_drops(stats: &Stats, d: Drops) {
    Stats::add(&stats.dropped_queue_full, d.overflow + d.codel);
}

/// Receives for `d` and drops what arrives, counting it as `dropped_db_down`: the database
/// is unreachable, and packets must not pile up. False if the shim is stopping.
pub fn drain_for(rx: &QueueRx, d: Duration, shared: &Shared) -> bool {
    let end = Instant::now() + d;
    loop {
        if shared.stopping() {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let wait = left.min(POLL_TIMEOUT);
        match rx.0.q.pop_batch(usize::MAX, usize::MAX, usize::MAX, wait) {
            (Some(b), drops) => {
                count_drops(&shared.stats, drops);
                Stats::add(&shared.stats.dropped_db_down, b.len() as u64);
            }
            (None, _) => return false,
        }
    }
}

/// The tun reader thread. Returns when the shim stops or the sender is gone; a read error
/// is fatal (the device was deleted under us).
pub fn run_reader<T: Tun>(tun: &T, tx: QueueTx, shared: &Shared) {
    let mut buf = vec![0u8; READ_BUF];
    let stats = &shared.stats;
    while !shared.stopping() {
        let mut next = tun.recv_timeout(&mut buf, POLL_TIMEOUT);
        for i in 1..=READS_PER_POLL {
            let n = match next {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    let msg = format!("reading tun device {}: {e}", tun.name());
                    return shared.fatal(EXIT_FATAL, msg);
                }
            };
            Stats::add(&stats.tun_read_packets, 1);
            Stats::add(&stats.tun_read_bytes, n as u64);
            match tx.send(buf[..n].to_vec()) {
                Ok(drops) => count_drops(stats, drops),
                Err(Closed) => return,
            }
            // Not after the last: a packet read here would be overwritten by the next
            // wake-up's read, lost and never counted.
            if i == READS_PER_POLL {
                break;
            }
            next = tun.try_recv(&mut buf);
        }
    }
}

/// The first send after this much silence looks whether the server closed the connection
/// meanwhile (a restart, a failover; [`UplinkSession::check`]). A direction that was idle
/// would otherwise learn it only when its first packet's send fails, and lose that packet.
/// The look costs about a millisecond, on the first packet after an idle spell only.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A batch held back while reconnecting (it was never sent) goes out on the new connection,
/// unless getting one took longer than this: then it is stale, and dropped like everything
/// read meanwhile.
pub const HOLD_MAX: Duration = Duration::from_secs(10);

/// The sender thread: batches from the queue → pgvpn.send() on `up`, reopened from `db`
/// when the connection breaks. Ends when the reader has stopped and the queue is flushed,
/// on shutdown during an outage, or on a fatal error.
pub fn run_sender<D: Database>(
    db: &D,
    up: D::Uplink,
    rx: QueueRx,
    batch_max: usize,
    shared: &Shared,
) {
    run_sender_with(db, up, rx, batch_max, IDLE_CHECK, shared)
}

/// [`run_sender`] with the idle spell after which the connection is looked at first.
pub fn run_sender_with<D: Database>(
    db: &D,
    mut up: D::Uplink,
    rx: QueueRx,
    batch_max: usize,
    idle_check: Duration,
    shared: &Shared,
) {
    let stats = &shared.stats;
    let mut last_warning: Option<Instant> = None;
    // When the last call on `up` ended (or it was opened).
    let mut last_used = Instant::now();
    let mut sizer = BatchSizer::new(MIN_BUDGET, MAX_TXN_BYTES);
    while let Some(batch) = next_batch(&rx, batch_max, sizer.budget(), stats) {
        let n = batch.len() as u64;
        if last_used.elapsed() >= idle_check {
            if let Err(e) = up.check() {
                // Nothing of this batch reached the server: hold it, reconnect, send it.
                log::info!("uplink: the database closed the connection while idle, reconnecting");
                log::debug!("uplink: {e}");
                let held_since = Instant::now();
                match reconnect(db, &rx, shared) {
                    Some(u) => up = u,
                    None => return Stats::add(&stats.dropped_db_down, n),
                }
                if held_since.elapsed() > HOLD_MAX {
                    Stats::add(&stats.dropped_db_down, n);
                    last_used = Instant::now();
                    continue;
                }
            }
        }
        let started = Instant::now();
        let res = up.send(&batch);
        last_used = Instant::now();
        if res.is_ok() {
            sizer.observe(batch.iter().map(|p| fq::cost(p)).sum(), last_used - started);
        }
        let err = match res {
            Ok(accepted) => {
                Stats::add(&stats.sent, n);
                Stats::add(&stats.accepted, accepted.min(n));
                continue;
            }
            Err(e) => e,
        };
        if err.class == ErrorClass::Denied {
            Stats::add(&stats.dropped_db_error, n);
            return shared.fatal(err.class.exit_code(), format!("uplink: {err}"));
        }
        if err.class == ErrorClass::Other && !up.is_closed() {
            // The connection is fine; the database refused this batch. Say so now and
            // then, and carry on.
            if last_warning.is_none_or(|t| t.elapsed() > WARN_EVERY) {
                log::warn!("uplink: pgvpn.send failed, {n} packets lost: {err}");
                last_warning = Some(Instant::now());
            }
            Stats::add(&stats.dropped_db_error, n);
            continue;
        }
        // The batch in flight is never resent: it may have committed before the
        // connection broke, and a packet is logged at most once. It counts as lost;
        // TCP retransmits what matters.
        Stats::add(&stats.dropped_db_down, n);
        log::info!("uplink: database connection lost, reconnecting");
        log::debug!("uplink: {err}");
        match reconnect(db, &rx, shared) {
            Some(u) => up = u,
            None => return,
        }
        last_used = Instant::now();
    }
}

/// Opens a new uplink session, dropping (and counting) what is read meanwhile. `None` if
/// the thread must end: the shim is stopping (what is still queued is counted as dropped)
/// or the error is fatal (then the shim stops with it).
fn reconnect<D: Database>(db: &D, rx: &QueueRx, shared: &Shared) -> Option<D::Uplink> {
    let stats = &shared.stats;
    match retry_open(
        "uplink",
        false,
        || db.open_uplink(),
        |d| drain_for(rx, d, shared),
    ) {
        Ok(u) => {
            Stats::add(&stats.reconnects, 1);
            log::info!("uplink: reconnected");
            Some(u)
        }
        Err(GaveUp::Stopped) => {
            Stats::add(&stats.dropped_db_down, rx.take_all().len() as u64);
            None
        }
        Err(GaveUp::Fatal(e)) => {
            shared.fatal(e.class.exit_code(), format!("uplink: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DbError;
    use crate::fakes::{eventually, pkt, FakeDb, FakeTun};
    use crate::runtime::EXIT_DENIED;
    use pgvpn_core::limits::MAX_PACKET;
    use std::sync::atomic::Ordering::Relaxed;

    /// A batch with no cost budget (only the packet count and the transaction's bytes).
    fn nb(rx: &QueueRx, max: usize) -> Option<Vec<Vec<u8>>> {
        next_batch(rx, max, usize::MAX, &Stats::default())
    }

    #[test]
    fn batches_stay_below_the_transaction_byte_limit() {
        let (tx, rx) = queue_with(usize::MAX);
        for _ in 0..300 {
            tx.send(vec![0; 60_000]).unwrap();
        }
        let b = nb(&rx, 256).unwrap();
        let bytes: usize = b.iter().map(Vec::len).sum();
        assert!(bytes <= MAX_TXN_BYTES, "{bytes}");
        assert!(
            bytes + MAX_PACKET > MAX_TXN_BYTES,
            "as full as it may be: {bytes}"
        );
        assert_eq!(
            b.len() + nb(&rx, 256).unwrap().len() + nb(&rx, 256).unwrap().len(),
            300
        );
    }

    #[test]
    fn lone_packet_goes_alone_queued_ones_together() {
        let (tx, rx) = queue_with(1 << 20);
        tx.send(vec![1]).unwrap();
        assert_eq!(nb(&rx, 256).unwrap(), vec![vec![1]]);
        for i in 0..10u8 {
            tx.send(vec![i]).unwrap();
        }
        let b = nb(&rx, 4).unwrap();
        assert_eq!(b, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(nb(&rx, 4).unwrap().len(), 4);
        assert_eq!(nb(&rx, 4).unwrap(), vec![vec![8], vec![9]]);
        drop(tx);
        assert!(nb(&rx, 4).is_none());
    }

    #[test]
    fn batch_blocks_for_first_packet_without_delaying_it() {
        let (tx, rx) = queue_with(1 << 20);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(vec![7]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            tx.send(vec![8]).unwrap();
        });
        let start = Instant::now();
        assert_eq!(nb(&rx, 256).unwrap(), vec![vec![7]]);
        assert!(start.elapsed() < Duration::from_millis(400));
        assert_eq!(nb(&rx, 256).unwrap(), vec![vec![8]]);
        t.join().unwrap();
        assert!(nb(&rx, 256).is_none());
    }

    #[test]
    fn flushes_what_is_left_after_the_reader_stopped() {
        let (tx, rx) = queue_with(1 << 20);
        for i in 0..5u8 {
            tx.send(vec![i]).unwrap();
        }
        drop(tx);
        assert_eq!(nb(&rx, 3).unwrap().len(), 3);
        assert_eq!(nb(&rx, 3).unwrap().len(), 2);
        assert!(nb(&rx, 3).is_none());
    }

    #[test]
    fn drain_counts_drops_and_notices_stop() {
        let shared = Shared::new();
        let (tx, rx) = queue_with(1 << 20);
        for i in 0..3u8 {
            tx.send(vec![i]).unwrap();
        }
        assert!(drain_for(&rx, Duration::from_millis(20), &shared));
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 3);
        shared.request_stop();
        assert!(!drain_for(&rx, Duration::from_secs(5), &shared));
        shared.stop.store(false, Relaxed);
        drop(tx);
        assert!(
            !drain_for(&rx, Duration::from_secs(5), &shared),
            "reader gone"
        );
    }

    #[test]
    fn reader_counts_packets_and_queue_overflow_and_stops() {
        let tun = FakeTun::new();
        for i in 0..10 {
            tun.arrive(pkt(i, 100));
        }
        let shared = Shared::new();
        let (tx, rx) = queue_with(400);
        std::thread::scope(|s| {
            s.spawn(|| run_reader(&tun, tx, &shared));
            eventually("all read", || {
                shared.stats.tun_read_packets.load(Relaxed) == 10
            });
            shared.request_stop();
        });
        assert_eq!(shared.stats.tun_read_bytes.load(Relaxed), 1000);
        assert_eq!(shared.stats.dropped_queue_full.load(Relaxed), 6);
        // Dropped at the head, as fq_codel does: the newest packets are kept.
        assert_eq!(
            rx.take_all(),
            (6..10).map(|i| pkt(i, 100)).collect::<Vec<_>>()
        );
        assert_eq!(shared.exit_code(), crate::runtime::EXIT_OK);
    }

    #[test]
    fn a_flood_longer_than_one_wake_up_loses_no_packet() {
        // More than READS_PER_POLL packets waiting: the reader yields after each
        // READS_PER_POLL and must lose none at the boundary (the bench's log check once
        // found tun tx_packets 2,541 above the shim's reads after a 64 B flood).
        let n = 3 * READS_PER_POLL + 7;
        let tun = FakeTun::new();
        for i in 0..n {
            tun.arrive(pkt(i as u8, 64));
        }
        let shared = Shared::new();
        let (tx, rx) = queue_with(1 << 20);
        std::thread::scope(|s| {
            s.spawn(|| run_reader(&tun, tx, &shared));
            // Stop whatever the wait says: a failing assertion must not leave the reader
            // running and the scope waiting for it.
            let end = Instant::now() + Duration::from_secs(10);
            while tun.waiting() > 0 && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            shared.request_stop();
        });
        assert_eq!(tun.waiting(), 0, "the reader drained the device");
        // The reader has ended: everything it read is counted and queued, or was lost.
        assert_eq!(shared.stats.tun_read_packets.load(Relaxed), n as u64);
        assert_eq!(
            rx.take_all().len(),
            n,
            "every packet read reached the queue"
        );
        assert_eq!(shared.stats.dropped_queue_full.load(Relaxed), 0);
    }

    #[test]
    fn a_tun_read_error_is_fatal() {
        let tun = FakeTun::new();
        tun.fail_next_read(std::io::Error::other("device gone"));
        let shared = Shared::new();
        let (tx, _rx) = queue_with(400);
        run_reader(&tun, tx, &shared);
        assert!(shared.stopping());
        assert_eq!(shared.exit_code(), EXIT_FATAL);
    }

    #[test]
    fn sigterm_flushes_the_queue_before_the_sender_ends() {
        // The whole uplink: packets read before the stop flag is set are all sent.
        let tun = FakeTun::new();
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| run_reader(&tun, tx, &shared));
            s.spawn(|| run_sender(&db, up, rx, 3, &shared));
            for i in 0..20 {
                tun.arrive(pkt(i, 60));
            }
            eventually("all read", || {
                shared.stats.tun_read_packets.load(Relaxed) == 20
            });
            shared.request_stop(); // SIGTERM
        });
        // After the scope: both threads ended on their own.
        let sent: Vec<Vec<u8>> = db.sent().into_iter().flatten().collect();
        assert_eq!(sent, (0..20).map(|i| pkt(i, 60)).collect::<Vec<_>>());
        assert!(db.batches().iter().all(|(b, _)| b.len() <= 3), "batch_max");
        assert_eq!(shared.stats.sent.load(Relaxed), 20);
        assert_eq!(shared.stats.accepted.load(Relaxed), 20);
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 0);
    }

    #[test]
    fn sender_flushes_whatever_is_queued_when_the_reader_stops() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        for i in 0..10 {
            tx.send(pkt(i, 10)).unwrap();
        }
        drop(tx); // the reader ended
        shared.request_stop();
        run_sender(&db, db.open_uplink().unwrap(), rx, 4, &shared);
        let sizes: Vec<usize> = db.batches().iter().map(|(b, _)| b.len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        assert_eq!(shared.stats.sent.load(Relaxed), 10);
    }

    #[test]
    fn reconnects_after_the_connection_dies_and_never_resends() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| run_sender(&db, up, rx, 256, &shared));
            tx.send(pkt(1, 10)).unwrap();
            eventually("sent 1", || db.batches().len() == 1);
            // The server goes away mid-statement: the batch may or may not have committed.
            db.fail_next_send(DbError::new(ErrorClass::Transient, "connection closed"));
            tx.send(pkt(2, 10)).unwrap();
            eventually("reconnected", || shared.stats.reconnects.load(Relaxed) == 1);
            tx.send(pkt(3, 10)).unwrap();
            eventually("sent 3", || db.batches().len() == 3);
            drop(tx);
        });
        let batches = db.batches();
        assert_eq!(
            batches,
            [
                (vec![pkt(1, 10)], true),
                (vec![pkt(2, 10)], false),
                (vec![pkt(3, 10)], true)
            ],
            "packet 2 was tried once and not resent"
        );
        assert_eq!(db.uplink_opens(), 2);
        assert_eq!(shared.stats.sent.load(Relaxed), 2);
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 1);
        assert_eq!(shared.exit_code(), crate::runtime::EXIT_OK);
    }

    #[test]
    fn counts_drops_while_the_database_is_down() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| run_sender(&db, up, rx, 256, &shared));
            db.set_up(false); // the database restarts
            tx.send(pkt(1, 10)).unwrap();
            eventually("send failed", || db.batches().len() == 1);
            eventually("retrying", || db.uplink_opens() >= 2);
            for i in 2..=5 {
                tx.send(pkt(i, 10)).unwrap();
            }
            // Drained, not queued: nothing piles up while it is down.
            eventually("dropped", || {
                shared.stats.dropped_db_down.load(Relaxed) == 5
            });
            db.set_up(true);
            eventually("reconnected", || shared.stats.reconnects.load(Relaxed) == 1);
            tx.send(pkt(6, 10)).unwrap();
            eventually("sent 6", || shared.stats.sent.load(Relaxed) == 1);
            drop(tx);
        });
        let batches = db.batches();
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert_eq!(batches[1], (vec![pkt(6, 10)], true));
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 5);
        assert!(db.uplink_opens() >= 3, "it retried: {}", db.uplink_opens());
    }

    #[test]
    fn sigterm_during_an_outage_ends_the_sender() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        db.set_up(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| run_sender(&db, up, rx, 256, &shared));
            tx.send(pkt(1, 10)).unwrap();
            eventually("retrying", || db.uplink_opens() >= 2);
            for i in 2..=3 {
                tx.send(pkt(i, 10)).unwrap();
            }
            shared.request_stop();
            eventually("ended", || h.is_finished());
        });
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 3);
        assert_eq!(shared.exit_code(), crate::runtime::EXIT_OK);
    }

    /// Runs the sender with `idle_check` through `script`, then closes the queue.
    fn with_sender(
        db: &FakeDb,
        idle_check: Duration,
        script: impl FnOnce(&QueueTx, &Shared),
    ) -> Shared {
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| run_sender_with(db, up, rx, 256, idle_check, &shared));
            script(&tx, &shared);
            drop(tx);
        });
        shared
    }

    #[test]
    fn an_idle_uplink_keeps_its_first_packet_after_a_restart() {
        let idle = Duration::from_millis(30);
        let script = |db: &FakeDb| {
            let db2 = db.clone();
            move |tx: &QueueTx, _: &Shared| {
                tx.send(pkt(1, 10)).unwrap();
                eventually("sent 1", || db2.batches().len() == 1);
                // The server restarts while this direction is idle.
                db2.restart();
                std::thread::sleep(idle * 3);
                tx.send(pkt(2, 10)).unwrap();
                eventually("2 tried", || db2.batches().len() == 2);
            }
        };
        let db = FakeDb::new();
        let shared = with_sender(&db, idle, script(&db));
        assert_eq!(
            db.batches(),
            [(vec![pkt(1, 10)], true), (vec![pkt(2, 10)], true)],
            "packet 2 was held back, not sent into the dead connection"
        );
        assert_eq!(db.checks(), (1, 1), "one look, after the idle spell");
        assert_eq!(db.uplink_opens(), 2);
        assert_eq!(shared.stats.reconnects.load(Relaxed), 1);
        assert_eq!(shared.stats.sent.load(Relaxed), 2);
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 0);

        // The control: without the look, the same script loses packet 2 (the old defect).
        let db = FakeDb::new();
        let shared = with_sender(&db, Duration::from_secs(3600), script(&db));
        assert_eq!(db.batches()[1], (vec![pkt(2, 10)], false));
        assert_eq!(db.checks(), (0, 0));
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 1);
    }

    #[test]
    fn a_busy_uplink_does_not_look_before_every_send() {
        let db = FakeDb::new();
        let shared = with_sender(&db, Duration::from_secs(3600), |tx, _| {
            for i in 0..20 {
                tx.send(pkt(i, 10)).unwrap();
            }
            eventually("all sent", || {
                db.sent().iter().map(Vec::len).sum::<usize>() == 20
            });
        });
        assert_eq!(db.checks(), (0, 0));
        assert_eq!(shared.stats.sent.load(Relaxed), 20);
        // After an idle spell, one look per spell, not one per packet.
        let db = FakeDb::new();
        with_sender(&db, Duration::from_millis(30), |tx, _| {
            std::thread::sleep(Duration::from_millis(60));
            for i in 0..5 {
                tx.send(pkt(i, 10)).unwrap();
            }
            eventually("all sent", || {
                db.sent().iter().map(Vec::len).sum::<usize>() == 5
            });
        });
        assert_eq!(db.checks(), (1, 0), "a healthy connection passes the look");
    }

    #[test]
    fn a_held_batch_waits_for_the_new_primary_and_the_rest_is_dropped() {
        let db = FakeDb::new();
        let idle = Duration::from_millis(30);
        let shared = with_sender(&db, idle, |tx, shared| {
            tx.send(pkt(1, 10)).unwrap();
            eventually("sent 1", || db.batches().len() == 1);
            // The primary dies while this direction is idle; no server for a while.
            db.restart();
            db.set_up(false);
            std::thread::sleep(idle * 3);
            tx.send(pkt(2, 10)).unwrap(); // held: never sent into the dead connection
            eventually("retrying", || db.uplink_opens() >= 3);
            for i in 3..=5 {
                tx.send(pkt(i, 10)).unwrap();
            }
            eventually("dropped meanwhile", || {
                shared.stats.dropped_db_down.load(Relaxed) == 3
            });
            db.set_up(true); // the standby is promoted
            eventually("held batch sent", || db.batches().len() == 2);
        });
        assert_eq!(
            db.batches(),
            [(vec![pkt(1, 10)], true), (vec![pkt(2, 10)], true)]
        );
        assert_eq!(shared.stats.dropped_db_down.load(Relaxed), 3);
        assert_eq!(shared.stats.reconnects.load(Relaxed), 1);
    }

    #[test]
    fn a_refused_batch_is_counted_and_the_session_kept() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        db.fail_next_send(DbError::new(ErrorClass::Other, "pgvpn.send: bad packet"));
        tx.send(pkt(1, 10)).unwrap();
        tx.send(pkt(2, 10)).unwrap();
        drop(tx);
        run_sender(&db, db.open_uplink().unwrap(), rx, 1, &shared);
        assert_eq!(db.uplink_opens(), 1, "no reconnect");
        assert_eq!(shared.stats.dropped_db_error.load(Relaxed), 1);
        assert_eq!(shared.stats.sent.load(Relaxed), 1);
        assert_eq!(db.batches().len(), 2, "packet 1 not resent");
    }

    #[test]
    fn denied_is_fatal() {
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        db.fail_next_send(DbError::new(ErrorClass::Denied, "permission denied"));
        tx.send(pkt(1, 10)).unwrap();
        run_sender(&db, db.open_uplink().unwrap(), rx, 1, &shared);
        assert_eq!(shared.exit_code(), EXIT_DENIED);
        assert_eq!(shared.stats.dropped_db_error.load(Relaxed), 1);
        // Denied on reconnect is fatal as well.
        let db = FakeDb::new();
        let shared = Shared::new();
        let (tx, rx) = queue();
        let up = db.open_uplink().unwrap();
        db.fail_next_send(DbError::new(ErrorClass::Transient, "connection closed"));
        db.fail_next_open(DbError::new(ErrorClass::Denied, "role is not a peer"));
        tx.send(pkt(1, 10)).unwrap();
        run_sender(&db, up, rx, 1, &shared);
        assert_eq!(shared.exit_code(), EXIT_DENIED);
    }
}
