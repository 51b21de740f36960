//! `pgvpn.recv()` (a long poll) → tun → `pgvpn.ack()`, on one connection.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::backoff::{retry_open, GaveUp};
use crate::error::{DbError, ErrorClass};
use crate::io::{Database, DownlinkSession, Tun};
use crate::runtime::{sleep_unless_stopped, Shared};
use crate::stats::Stats;

/// Rows asked of one pgvpn.recv() call. A full page means "more may be waiting".
pub const RECV_PAGE: usize = 1024;

/// Longest long poll in `pgvpn.recv`, so a stop request is noticed promptly.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Pause before reconnecting after an error that is not a broken connection, so a call
/// the database keeps failing does not spin.
const OTHER_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// When to store the delivery cursor: never per packet.
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    /// At most this long after the oldest packet not yet acked was written.
    pub interval: Duration,
    /// Or as soon as this many packets were written since the last ack.
    pub every: u64,
}

/// Where delivery stands. Survives reconnects: after one, recv resumes after
/// `last_written` (not the stored cursor, which may lag and would cause duplicates).
#[derive(Debug)]
pub struct Progress {
    pub last_written: i64,
    pub last_acked: i64,
    /// When the oldest packet not yet acked was written. The ack clock starts there, not
    /// at the last ack: after an idle spell, the first packet's ack then waits its turn
    /// instead of costing a durable commit right on the latency path.
    pub first_unacked_at: Option<Instant>,
    /// Packets written since the last ack.
    pub unacked: u64,
}

impl Progress {
    pub fn new(cursor: i64) -> Progress {
        Progress {
            last_written: cursor,
            last_acked: cursor,
            first_unacked_at: None,
            unacked: 0,
        }
    }

    /// Records a packet written to the tun device.
    pub fn written(&mut self, id: i64, now: Instant) {
        self.last_written = id;
        self.unacked += 1;
        self.first_unacked_at.get_or_insert(now);
    }

    /// True when the cursor should be stored now: something is unacked and either
    /// `every` packets have been written or the oldest of them is `interval` old.
    pub fn ack_due(&self, now: Instant, policy: &AckPolicy) -> bool {
        self.last_written > self.last_acked
            && (self.unacked >= policy.every
                || self.until_ack(now, policy).is_some_and(|d| d.is_zero()))
    }

    /// How long a wait may last without delaying a pending ack.
    pub fn until_ack(&self, now: Instant, policy: &AckPolicy) -> Option<Duration> {
        self.first_unacked_at
            .filter(|_| self.last_written > self.last_acked)
            .map(|t| (t + policy.interval).saturating_duration_since(now))
    }
}

/// The downlink thread. `dl` is the session opened at startup; delivery starts at its
/// stored cursor. Reconnects through `db`.
pub fn run<D: Database, T: Tun>(
    tun: &T,
    db: &D,
    mut dl: D::Downlink,
    policy: &AckPolicy,
    shared: &Shared,
) {
    let mut p = Progress::new(dl.stored_cursor());
    shared.stats.last_acked_id.store(p.last_acked, Relaxed);
    loop {
        let err = match serve(&mut dl, tun, policy, shared, &mut p) {
            Ok(()) => break, // stopping
            Err(e) => e,
        };
        match err.class {
            ErrorClass::Denied => {
                return shared.fatal(err.class.exit_code(), format!("downlink: {err}"));
            }
            ErrorClass::Other => {
                log::warn!("downlink: {err}; reconnecting");
                if !sleep_unless_stopped(OTHER_ERROR_PAUSE, shared) {
                    return;
                }
            }
            ErrorClass::Transient => {
                log::info!("downlink: database connection lost, reconnecting");
                log::debug!("downlink: {err}");
            }
        }
        let reopened = retry_open(
            "downlink",
            false,
            || db.open_downlink(),
            |d| sleep_unless_stopped(d, shared),
        );
        match reopened {
            Ok(new) => {
                dl = new;
                Stats::add(&shared.stats.reconnects, 1);
                log::info!(
                    "downlink: reconnected, resuming after id {}",
                    p.last_written
                );
            }
            Err(GaveUp::Stopped) => return, // no connection for a final ack
            Err(GaveUp::Fatal(e)) => {
                return shared.fatal(e.class.exit_code(), format!("downlink: {e}"));
            }
        }
    }
    // Stopping: store how far we got, so a restart resumes there.
    if p.last_written > p.last_acked {
        match ack(&mut dl, &mut p, shared) {
            Ok(()) => log::debug!("downlink: final ack at id {}", p.last_acked),
            Err(e) => log::warn!("downlink: final ack failed: {e}"),
        }
    }
}

/// Runs until the shim stops (Ok) or the connection fails (Err).
fn serve<S: DownlinkSession, T: Tun>(
    dl: &mut S,
    tun: &T,
    policy: &AckPolicy,
    shared: &Shared,
    p: &mut Progress,
) -> Result<(), DbError> {
    let stats = &shared.stats;
    let mut warned_write = false;
    // After a full page more is waiting: ask again at once. Otherwise let the database
    // wait for the next packet (woken when a send to us commits), but not past a due ack.
    let mut wait = Duration::ZERO;
    loop {
        if shared.stopping() {
            return Ok(());
        }
        let after = p.last_written;
        let rows = dl.recv(after, RECV_PAGE, wait, &mut |id, payload| {
            Stats::add(&stats.received, 1);
            let res = match payload {
                Some(pkt) => tun.send(pkt).map(|()| pkt.len()),
                None => Err(std::io::Error::other("NULL payload")),
            };
            match res {
                Ok(len) => {
                    Stats::add(&stats.written, 1);
                    Stats::add(&stats.written_bytes, len as u64);
                }
                Err(e) => {
                    // Skipped, not retried: one bad packet must not stall the rest.
                    Stats::add(&stats.write_errors, 1);
                    if !warned_write {
                        log::warn!("downlink: writing packet {id} to {}: {e}", tun.name());
                        warned_write = true;
                    } else {
                        log::debug!("downlink: writing packet {id} to {}: {e}", tun.name());
                    }
                }
            }
            p.written(id, Instant::now());
        })?;
        if p.ack_due(Instant::now(), policy) {
            ack(dl, p, shared)?;
        }
        wait = if rows >= RECV_PAGE {
            Duration::ZERO
        } else {
            let now = Instant::now();
            p.until_ack(now, policy)
                .map_or(STOP_CHECK, |a| a.min(STOP_CHECK))
        };
    }
}

fn ack<S: DownlinkSession>(dl: &mut S, p: &mut Progress, shared: &Shared) -> Result<(), DbError> {
    let stored = dl.ack(p.last_written)?;
    p.last_acked = stored.max(p.last_written);
    p.first_unacked_at = None;
    p.unacked = 0;
    shared.stats.last_acked_id.store(stored, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{eventually, pkt, FakeDb, FakeDownlink, FakeTun};
    use crate::runtime::{EXIT_DENIED, EXIT_OK};

    fn policy(interval_ms: u64, every: u64) -> AckPolicy {
        AckPolicy {
            interval: Duration::from_millis(interval_ms),
            every,
        }
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn ack_policy() {
        let c = policy(200, 4096);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Progress::new(10);
        assert!(
            !p.ack_due(t0 + Duration::from_secs(9), &c),
            "nothing written"
        );
        assert_eq!(p.until_ack(t0, &c), None);

        // After an idle spell the first packet is not acked at once: its clock starts now.
        p.written(11, t0);
        assert!(!p.ack_due(t0, &c));
        assert!(!p.ack_due(t0 + ms(199), &c));
        p.written(12, t0 + ms(100));
        assert!(
            p.ack_due(t0 + ms(200), &c),
            "the oldest unacked packet is 200 ms old"
        );
        assert_eq!(p.until_ack(t0 + ms(50), &c), Some(ms(150)));
        assert_eq!(
            p.until_ack(t0 + Duration::from_secs(1), &c),
            Some(Duration::ZERO)
        );

        // `every` packets: at once.
        let mut q = Progress::new(0);
        for id in 1..=4096 {
            q.written(id, t0);
        }
        assert!(q.ack_due(t0, &c), "ack_every packets written");
        let c3 = policy(200, 3);
        let mut r = Progress::new(0);
        r.written(1, t0);
        r.written(2, t0);
        assert!(!r.ack_due(t0, &c3));
        r.written(3, t0);
        assert!(r.ack_due(t0, &c3));
    }

    /// Runs the downlink on `dl` until `done` holds, then sets the stop flag (SIGTERM)
    /// and waits for it to end.
    fn run_until(
        tun: &FakeTun,
        db: &FakeDb,
        dl: FakeDownlink,
        policy: AckPolicy,
        shared: &Shared,
        done: impl Fn() -> bool,
    ) {
        std::thread::scope(|s| {
            s.spawn(|| run(tun, db, dl, &policy, shared));
            eventually("downlink condition", done);
            shared.request_stop();
        });
    }

    #[test]
    fn delivers_in_order_and_acks_on_sigterm() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.set_cursor(10);
        for id in 8..=15 {
            db.deliver(id, pkt(id as u8, 50)); // 8..=10 were delivered by a previous run
        }
        let shared = Shared::new();
        run_until(
            &tun,
            &db,
            db.open_downlink().unwrap(),
            policy(HOUR, 1 << 20),
            &shared,
            || tun.written().len() == 5,
        );
        let want: Vec<Vec<u8>> = (11..=15).map(|i| pkt(i, 50)).collect();
        assert_eq!(tun.written(), want, "resumed after the stored cursor");
        // Nothing was due by time or count: the only ack is the final one, at the last id.
        assert_eq!(db.acks(), [15]);
        assert_eq!(db.cursor(), 15);
        assert_eq!(shared.stats.last_acked_id.load(Relaxed), 15);
        assert_eq!(shared.stats.received.load(Relaxed), 5);
        assert_eq!(shared.stats.written.load(Relaxed), 5);
        assert_eq!(shared.stats.written_bytes.load(Relaxed), 250);
        assert_eq!(shared.exit_code(), EXIT_OK);
    }

    #[test]
    fn acks_every_n_packets_per_page_not_per_packet() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.set_page(3);
        for id in 1..=10 {
            db.deliver(id, pkt(id as u8, 20));
        }
        let shared = Shared::new();
        // every = 4: checked after each page of 3 → acks after 6 and after 10.
        run_until(
            &tun,
            &db,
            db.open_downlink().unwrap(),
            policy(HOUR, 4),
            &shared,
            || db.acks().len() == 2,
        );
        assert_eq!(db.acks(), [6, 10]);
        assert_eq!(tun.written().len(), 10);
    }

    #[test]
    fn acks_after_the_interval_when_traffic_stops() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.deliver(1, pkt(1, 20));
        let shared = Shared::new();
        let start = Instant::now();
        run_until(
            &tun,
            &db,
            db.open_downlink().unwrap(),
            policy(150, 1 << 20),
            &shared,
            || db.acks().len() == 1,
        );
        let waited = start.elapsed();
        assert_eq!(db.acks(), [1]);
        assert!(
            waited >= Duration::from_millis(150),
            "acked too early: {waited:?}"
        );
        // The long poll was cut short for the ack instead of running its 100 ms slices
        // on and on: it came well before the test's own deadline.
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        // No long poll outlasted STOP_CHECK, nor the time left until the ack was due.
        let waits = db.recv_waits();
        assert!(waits.iter().all(|w| *w <= STOP_CHECK), "{waits:?}");
        assert!(
            waits.iter().any(|w| *w < STOP_CHECK && !w.is_zero()),
            "a wait was cut short for the ack: {waits:?}"
        );
    }

    #[test]
    fn reconnects_and_resumes_after_the_last_written_packet() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.set_page(3);
        for id in 1..=9 {
            db.deliver(id, pkt(id as u8, 20));
        }
        let dl = db.open_downlink().unwrap();
        // The second recv fails: ids 1..=3 were written but never acked. The first
        // attempt to reconnect is refused.
        db.fail_recv_call(2, DbError::new(ErrorClass::Transient, "connection closed"));
        db.fail_next_open(DbError::new(ErrorClass::Transient, "connection refused"));
        let shared = Shared::new();
        run_until(&tun, &db, dl, policy(HOUR, 1 << 20), &shared, || {
            tun.written().len() == 9
        });
        let want: Vec<Vec<u8>> = (1..=9).map(|i| pkt(i, 20)).collect();
        assert_eq!(tun.written(), want, "each packet once, in order");
        let afters = db.recv_afters();
        assert_eq!(
            &afters[..4],
            [0, 3, 3, 6],
            "resumed after 3, not the stored 0"
        );
        assert_eq!(shared.stats.reconnects.load(Relaxed), 1);
        assert_eq!(
            db.downlink_opens(),
            3,
            "startup, a refused attempt, the reconnect"
        );
        assert_eq!(db.acks(), [9], "final ack on the new session");
    }

    #[test]
    fn sigterm_while_the_database_is_down_ends_without_an_ack() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.deliver(1, pkt(1, 20));
        let shared = Shared::new();
        run_until(
            &tun,
            &db,
            db.open_downlink().unwrap(),
            policy(HOUR, 1 << 20),
            &shared,
            || {
                if tun.written().len() == 1 {
                    db.set_up(false);
                }
                db.downlink_opens() >= 3
            },
        );
        assert!(db.acks().is_empty());
        assert_eq!(shared.exit_code(), EXIT_OK);
    }

    #[test]
    fn a_bad_packet_is_skipped_not_retried() {
        let tun = FakeTun::new();
        tun.fail_writes_of(pkt(2, 20));
        let db = FakeDb::new();
        for id in 1..=3 {
            db.deliver(id, pkt(id as u8, 20));
        }
        db.deliver_null(4);
        db.deliver(5, pkt(5, 20));
        let shared = Shared::new();
        run_until(
            &tun,
            &db,
            db.open_downlink().unwrap(),
            policy(HOUR, 1 << 20),
            &shared,
            || tun.written().len() == 3,
        );
        assert_eq!(tun.written(), [pkt(1, 20), pkt(3, 20), pkt(5, 20)]);
        assert_eq!(shared.stats.write_errors.load(Relaxed), 2);
        assert_eq!(shared.stats.received.load(Relaxed), 5);
        assert_eq!(db.acks(), [5], "skipped packets count as delivered");
    }

    #[test]
    fn denied_is_fatal() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.fail_recv_call(1, DbError::new(ErrorClass::Denied, "permission denied"));
        let shared = Shared::new();
        let dl = db.open_downlink().unwrap();
        run(&tun, &db, dl, &policy(HOUR, 1), &shared);
        assert_eq!(shared.exit_code(), EXIT_DENIED);
    }
}
