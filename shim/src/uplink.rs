//! tun → `pgvpn.send()`.
//!
//! A reader thread drains the tun device into a bounded queue as fast as the kernel hands
//! packets over (a full tun queue drops packets); a sender thread takes everything queued
//! so far as one batch and sends it.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::device::Tun;
use crate::session::{self, describe, retry_open, ErrorClass, GaveUp, Uplink};
use crate::stats::Stats;
use crate::Shared;

/// Slots in the queue between the reader and the sender (about 6 MB of 1500-byte packets).
pub const QUEUE_SLOTS: usize = 4096;

/// How long the reader waits in poll(2) before looking at the stop flag again.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Reads at most this many packets per poll(2) wake-up, so a flood cannot hide a stop.
const READS_PER_POLL: usize = 256;

/// Blocks for the first packet, then takes whatever else is already queued, up to `max`
/// packets. A lone packet goes out at once. `None` once the queue is closed and empty.
pub fn next_batch(rx: &Receiver<Vec<u8>>, max: usize) -> Option<Vec<Vec<u8>>> {
    let first = rx.recv().ok()?;
    let mut batch = Vec::with_capacity(max.min(64));
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Receives for `d` and drops what arrives, counting it as `dropped_db_down`: the database
/// is unreachable, and packets must not pile up. False if the shim is stopping.
pub fn drain_for(rx: &Receiver<Vec<u8>>, d: Duration, shared: &Shared) -> bool {
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
pub fn run_reader(tun: &Tun, tx: SyncSender<Vec<u8>>, shared: &Shared) {
    let mut buf = vec![0u8; 65536];
    let stats = &shared.stats;
    while !shared.stopping() {
        match tun.wait_readable(POLL_TIMEOUT) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return shared.fatal(crate::EXIT_FATAL, format!("polling tun device: {e}")),
        }
        for _ in 0..READS_PER_POLL {
            let n = match tun.read_packet(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    let msg = format!("reading tun device {}: {e}", tun.name());
                    return shared.fatal(crate::EXIT_FATAL, msg);
                }
            };
            Stats::add(&stats.tun_read_packets, 1);
            Stats::add(&stats.tun_read_bytes, n as u64);
            match tx.try_send(buf[..n].to_vec()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => Stats::add(&stats.dropped_queue_full, 1),
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// The sender thread: batches from the queue → pgvpn.send(). Ends when the reader has
/// stopped and the queue is flushed, on shutdown during an outage, or on a fatal error.
pub fn run_sender(mut up: Uplink, rx: Receiver<Vec<u8>>, cfg: &Config, shared: &Shared) {
    let stats = &shared.stats;
    let mut last_warning: Option<Instant> = None;
    while let Some(batch) = next_batch(&rx, cfg.batch_max) {
        let n = batch.len() as u64;
        let err = match up.send(&batch) {
            Ok(accepted) => {
                Stats::add(&stats.sent, n);
                Stats::add(&stats.accepted, accepted.min(n));
                continue;
            }
            Err(e) => e,
        };
        let class = session::classify(&err);
        if class == ErrorClass::Denied {
            Stats::add(&stats.dropped_db_error, n);
            return shared.fatal(class.exit_code(), format!("uplink: {}", describe(&err)));
        }
        if class == ErrorClass::Other && !up.is_closed() {
            // The connection is fine; the database refused this batch. Say so now and
            // then, and carry on.
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                log::warn!(
                    "uplink: pgvpn.send failed, {n} packets lost: {}",
                    describe(&err)
                );
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
        log::debug!("uplink: {}", describe(&err));
        match retry_open(
            "uplink",
            false,
            || Uplink::open(&cfg.pg),
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
            Err(GaveUp::Fatal(class, msg)) => {
                return shared.fatal(class.exit_code(), format!("uplink: {msg}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::mpsc::sync_channel;

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
        let shared = Shared::new(std::sync::Arc::new(false.into()));
        let (tx, rx) = sync_channel(16);
        for i in 0..3u8 {
            tx.send(vec![i]).unwrap();
        }
        assert!(drain_for(&rx, Duration::from_millis(20), &shared));
        assert_eq!(shared.stats.dropped_db_down.load(SeqCst), 3);
        shared.stop.store(true, SeqCst);
        assert!(!drain_for(&rx, Duration::from_secs(5), &shared));
        shared.stop.store(false, SeqCst);
        drop(tx);
        assert!(
            !drain_for(&rx, Duration::from_secs(5), &shared),
            "reader gone"
        );
    }
}
