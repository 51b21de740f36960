//! Counters shared by the threads, and the shutdown summary.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    /// Packets / bytes read from the tun device.
    pub tun_read_packets: AtomicU64,
    pub tun_read_bytes: AtomicU64,
    /// Packets handed to a pgvpn.send() call that returned.
    pub sent: AtomicU64,
    /// Of those, how many the database accepted (logged + routed).
    pub accepted: AtomicU64,
    /// Read from tun but the queue to the sender was full.
    pub dropped_queue_full: AtomicU64,
    /// Read from tun while the database connection was down.
    pub dropped_db_down: AtomicU64,
    /// In a pgvpn.send() call that failed with a (non-connection) database error.
    pub dropped_db_error: AtomicU64,
    /// Packets returned by pgvpn.recv().
    pub received: AtomicU64,
    /// Of those, written to the tun device / failed to write.
    pub written: AtomicU64,
    pub written_bytes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Successful reconnections (uplink and downlink connections each count).
    pub reconnects: AtomicU64,
    /// Packets written to the tun device that a new primary's log does not have: its
    /// history diverged (a failover to a standby that was behind; downlink.rs).
    pub diverged_lost: AtomicU64,
    /// Packets for this peer that retention dropped before they were read, as pgvpn.recv()
    /// reported them (downlink.rs).
    pub expired_unread: AtomicU64,
    /// The delivery cursor last stored with pgvpn.ack() (or read at start).
    pub last_acked_id: AtomicI64,
    /// Packets in the pgvpn.send() call under way (for --metrics).
    pub send_in_flight: AtomicU64,
    /// How long pgvpn.send() calls took (for --metrics).
    pub send_latency: Histogram,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Upper bounds, in seconds, of the pgvpn.send() latency buckets: a commit's flush takes
/// from ~0.1 ms (fast local disk) to tens of ms (network storage, a synchronous standby).
pub const SEND_LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram of lock-free counters: one per bucket (plus one above the last
/// bound), and the sum. The count is the sum of the buckets, so a reader never sees a
/// count that disagrees with them.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; SEND_LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = SEND_LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(SEND_LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations per bucket (not cumulative; the last is above every bound) and the
    /// sum in seconds.
    pub fn read(&self) -> (Vec<u64>, f64) {
        let counts = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        (counts, self.sum_ns.load(Relaxed) as f64 / 1e9)
    }
}

/// `key=value` pairs on one line, printed on stdout at shutdown.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let sent = g(&self.sent);
        let accepted = g(&self.accepted);
        write!(
            f,
            "tun_read_packets={} tun_read_bytes={} sent={} accepted={} rejected_by_db={} \
             dropped_queue_full={} dropped_db_down={} dropped_db_error={} received={} \
             written={} written_bytes={} write_errors={} reconnects={} diverged_lost={} \
             expired_unread={} last_acked_id={}",
            g(&self.tun_read_packets),
            g(&self.tun_read_bytes),
            sent,
            accepted,
            sent.saturating_sub(accepted),
            g(&self.dropped_queue_full),
            g(&self.dropped_db_down),
            g(&self.dropped_db_error),
            g(&self.received),
            g(&self.written),
            g(&self.written_bytes),
            g(&self.write_errors),
            g(&self.reconnects),
            g(&self.diverged_lost),
            g(&self.expired_unread),
            self.last_acked_id.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let s = Stats::default();
        Stats::add(&s.sent, 10);
        Stats::add(&s.accepted, 7);
        Stats::add(&s.expired_unread, 5);
        s.last_acked_id.store(42, Relaxed);
        let line = s.to_string();
        assert!(line.starts_with("tun_read_packets=0 "), "{line}");
        assert!(
            line.contains(" sent=10 accepted=7 rejected_by_db=3 "),
            "{line}"
        );
        assert!(
            line.ends_with(" diverged_lost=0 expired_unread=5 last_acked_id=42"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn histogram_buckets() {
        use std::time::Duration;
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // first bucket
        h.observe(Duration::from_micros(100)); // on the bound: still the first
        h.observe(Duration::from_millis(3)); // 0.005
        h.observe(Duration::from_secs(9)); // above the last bound
        let (counts, sum) = h.read();
        assert_eq!(counts.len(), SEND_LATENCY_BUCKETS.len() + 1);
        assert_eq!(counts[0], 2);
        assert_eq!(counts[5], 1);
        assert_eq!(counts[SEND_LATENCY_BUCKETS.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert!((sum - 9.00315).abs() < 1e-9, "{sum}");
    }
}
