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
    /// The delivery cursor last stored with pgvpn.ack() (or read at start).
    pub last_acked_id: AtomicI64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
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
             written={} written_bytes={} write_errors={} reconnects={} last_acked_id={}",
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
        s.last_acked_id.store(42, Relaxed);
        let line = s.to_string();
        assert!(line.starts_with("tun_read_packets=0 "), "{line}");
        assert!(
            line.contains(" sent=10 accepted=7 rejected_by_db=3 "),
            "{line}"
        );
        assert!(line.ends_with(" last_acked_id=42"), "{line}");
        assert!(!line.contains('\n'));
    }
}
