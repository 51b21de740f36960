//! tun → `pgvpn.send()`.
//!
//! A reader thread drains the tun device into a bounded queue as fast as the kernel hands
//! packets over (a full tun queue drops packets); a sender thread takes everything queued
//! so far as one batch and sends it.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::backoff::{retry_open, GaveUp};
use crate::error::ErrorClass;
use crate::io::{Database, Tun, UplinkSession};
use crate::runtime::{Shared, EXIT_FATAL};
use crate::stats::Stats;
use pgvpn_core::limits::{MAX_PACKET, MAX_TXN_BYTES};

/// Slots in the queue between the reader and the sender (about 6 MB of 1500-byte packets).
pub const QUEUE_SLOTS: usize = 4096;

/// How long the reader waits for a packet before looking at the stop flag again.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Reads at most this many packets per wake-up, so a flood cannot hide a stop.
const READS_PER_POLL: usize = 256;

/// Largest packet a tun device hands over.
const READ_BUF: usize = 65536;

/// Say at most this often that the database refused a batch.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The queue between the reader and the sender: a bounded FIFO today. Everything that
/// touches it is in this module ([`queue`], the reader's `try_send`, [`next_batch`],
/// [`drain_for`]), so another discipline can replace it here.
pub type QueueTx = SyncSender<Vec<u8>>;
pub type QueueRx = Receiver<Vec<u8>>;

pub fn queue() -> (QueueTx, QueueRx) {
    sync_channel(QUEUE_SLOTS)
}

/// Blocks for the first packet, then takes whatever else is already queued, up to `max`
/// packets. A lone packet goes out at once. `None` once the queue is closed and empty.
pub fn next_batch(rx: &QueueRx, max: usize) -> Option<Vec<Vec<u8>>> {
    let first = rx.recv().ok()?;
    let mut bytes = first.len();
    let mut batch = Vec::with_capacity(max.min(64));
    batch.push(first);
    // A transaction may send at most MAX_TXN_BYTES: stop while any packet still fits.
    while batch.len() < max && bytes + MAX_PACKET <= MAX_TXN_BYTES {
        match rx.try_recv() {
            Ok(p) => {
                bytes += p.len();
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    Some(batch)
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
        match rx.recv_timeout(left.min(POLL_TIMEOUT)) {
            Ok(_) => Stats::add(&shared.stats.dropped_db_down, 1),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
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
        for _ in 0..READS_PER_POLL {
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
            match tx.try_send(buf[..n].to_vec()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => Stats::add(&stats.dropped_queue_full, 1),
                Err(TrySendError::Disconnected(_)) => return,
            }
            next = tun.try_recv(&mut buf);
        }
    }
}

/// The sender thread: batches from the queue → pgvpn.send() on `up`, reopened from `db`
/// when the connection breaks. Ends when the reader has stopped and the queue is flushed,
/// on shutdown during an outage, or on a fatal error.
pub fn run_sender<D: Database>(
    db: &D,
    mut up: D::Uplink,
    rx: QueueRx,
    batch_max: usize,
    shared: &Shared,
) {
    let stats = &shared.stats;
    let mut last_warning: Option<Instant> = None;
    while let Some(batch) = next_batch(&rx, batch_max) {
        let n = batch.len() as u64;
        let err = match up.send(&batch) {
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
        match retry_open(
            "uplink",
            false,
            || db.open_uplink(),
            |d| drain_for(&rx, d, shared),
        ) {
            Ok(u) => {
                up = u;
                Stats::add(&stats.reconnects, 1);
                log::info!("uplink: reconnected");
            }
            Err(GaveUp::Stopped) => {
                Stats::add(&stats.dropped_db_down, rx.try_iter().count() as u64);
                return;
            }
            Err(GaveUp::Fatal(e)) => {
                return shared.fatal(e.class.exit_code(), format!("uplink: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DbError;
    use crate::fakes::{eventually, pkt, FakeDb, FakeTun};
    use crate::runtime::EXIT_DENIED;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn batches_stay_below_the_transaction_byte_limit() {
        let (tx, rx) = sync_channel(400);
        for _ in 0..300 {
            tx.send(vec![0; 60_000]).unwrap();
        }
        let b = next_batch(&rx, 256).unwrap();
        let bytes: usize = b.iter().map(Vec::len).sum();
        assert!(bytes <= MAX_TXN_BYTES, "{bytes}");
        assert!(
            bytes + MAX_PACKET > MAX_TXN_BYTES,
            "as full as it may be: {bytes}"
        );
        assert_eq!(
            b.len() + next_batch(&rx, 256).unwrap().len() + next_batch(&rx, 256).unwrap().len(),
            300
        );
    }

    #[test]
    fn lone_packet_goes_alone_queued_ones_together() {
        let (tx, rx) = sync_channel(16);
        tx.send(vec![1]).unwrap();
        assert_eq!(next_batch(&rx, 256).unwrap(), vec![vec![1]]);
        for i in 0..10u8 {
            tx.send(vec![i]).unwrap();
        }
        let b = next_batch(&rx, 4).unwrap();
        assert_eq!(b, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(next_batch(&rx, 4).unwrap().len(), 4);
        assert_eq!(next_batch(&rx, 4).unwrap(), vec![vec![8], vec![9]]);
        drop(tx);
        assert!(next_batch(&rx, 4).is_none());
    }

    #[test]
    fn batch_blocks_for_first_packet_without_delaying_it() {
        let (tx, rx) = sync_channel(16);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(vec![7]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            tx.send(vec![8]).unwrap();
        });
        let start = Instant::now();
        assert_eq!(next_batch(&rx, 256).unwrap(), vec![vec![7]]);
        assert!(start.elapsed() < Duration::from_millis(400));
        assert_eq!(next_batch(&rx, 256).unwrap(), vec![vec![8]]);
        t.join().unwrap();
        assert!(next_batch(&rx, 256).is_none());
    }

    #[test]
    fn flushes_what_is_left_after_the_reader_stopped() {
        let (tx, rx) = sync_channel(16);
        for i in 0..5u8 {
            tx.send(vec![i]).unwrap();
        }
        drop(tx);
        assert_eq!(next_batch(&rx, 3).unwrap().len(), 3);
        assert_eq!(next_batch(&rx, 3).unwrap().len(), 2);
        assert!(next_batch(&rx, 3).is_none());
    }

    #[test]
    fn drain_counts_drops_and_notices_stop() {
        let shared = Shared::new();
        let (tx, rx) = sync_channel(16);
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
        let (tx, rx) = sync_channel(4);
        std::thread::scope(|s| {
            s.spawn(|| run_reader(&tun, tx, &shared));
            eventually("all read", || {
                shared.stats.tun_read_packets.load(Relaxed) == 10
            });
            shared.request_stop();
        });
        assert_eq!(shared.stats.tun_read_bytes.load(Relaxed), 1000);
        assert_eq!(shared.stats.dropped_queue_full.load(Relaxed), 6);
        let queued: Vec<Vec<u8>> = rx.try_iter().collect();
        assert_eq!(queued, (0..4).map(|i| pkt(i, 100)).collect::<Vec<_>>());
        assert_eq!(shared.exit_code(), crate::runtime::EXIT_OK);
    }

    #[test]
    fn a_tun_read_error_is_fatal() {
        let tun = FakeTun::new();
        tun.fail_next_read(std::io::Error::other("device gone"));
        let shared = Shared::new();
        let (tx, _rx) = sync_channel(4);
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
