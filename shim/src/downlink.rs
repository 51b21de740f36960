//! `pgvpn.recv()` (a long poll) → tun → `pgvpn.ack()`, on one connection.
//!
//! After a reconnect, delivery resumes after the last packet written, if the server still
//! has it. A new primary that was behind the old one (asynchronous replication, a
//! cancelled synchronous wait) lacks the last packets this shim delivered, and its id
//! sequence is behind too: it hands out those ids again, for new packets. Resuming after
//! the last id written would skip them. So the shim remembers what it wrote lately (id and
//! a fingerprint, [`History`]), asks the new server whether it has the same packet under
//! the same id, and if not resumes after the newest one it does have ([`reconcile`]),
//! counting and loudly reporting the packets it delivered that are not in the log.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::backoff::{retry_open, GaveUp};
use crate::error::{DbError, ErrorClass};
use crate::io::{Database, DownlinkSession, Expired, Tun};
use crate::runtime::{sleep_unless_stopped, Shared};
use crate::stats::Stats;

/// Rows asked of one pgvpn.recv() call. A full page means "more may be waiting".
pub const RECV_PAGE: usize = 1024;

/// Longest long poll in `pgvpn.recv`, so a stop request is noticed promptly.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Pause before reconnecting after an error that is not a broken connection, so a call
/// the database keeps failing does not spin.
const OTHER_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Packets remembered (id and fingerprint) to check a new session against: more than the
/// unacked window (at most `ack_every` packets) and a few seconds of replication lag at
/// high rates. 16 bytes each.
pub const HISTORY: usize = 65536;

/// A packet's fingerprint covers its length and its first bytes: the IP and transport
/// headers (addresses, IP id, checksums, ports, TCP sequence numbers) and the start of the
/// data. Enough to tell two packets apart, and cheap on the delivery path.
const FINGERPRINT_BYTES: usize = 64;

pub fn fingerprint(payload: Option<&[u8]>) -> u64 {
    let mut h = DefaultHasher::new();
    match payload {
        None => h.write_u8(0),
        Some(p) => {
            h.write_u8(1);
            h.write_usize(p.len());
            h.write(&p[..p.len().min(FINGERPRINT_BYTES)]);
        }
    }
    h.finish()
}

/// The last packets written, oldest first: (id, fingerprint), ids increasing.
#[derive(Debug)]
pub struct History {
    recent: VecDeque<(i64, u64)>,
    cap: usize,
    /// Entries pushed out to make room (the history no longer reaches back to them).
    evicted: u64,
}

impl History {
    pub fn new(cap: usize) -> History {
        History {
            recent: VecDeque::with_capacity(cap.min(4096)),
            cap: cap.max(1),
            evicted: 0,
        }
    }

    pub fn push(&mut self, id: i64, fp: u64) {
        if self.recent.len() == self.cap {
            self.recent.pop_front();
            self.evicted += 1;
        }
        self.recent.push_back((id, fp));
    }

    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }

    pub fn last(&self) -> Option<(i64, u64)> {
        self.recent.back().copied()
    }

    /// How many remembered packets have an id above `id`.
    pub fn count_after(&self, id: i64) -> usize {
        self.recent.len() - self.recent.partition_point(|(i, _)| *i <= id)
    }

    /// Forgets the packets with an id above `id`.
    pub fn truncate_after(&mut self, id: i64) {
        let keep = self.recent.partition_point(|(i, _)| *i <= id);
        self.recent.truncate(keep);
    }

    /// True if packets were forgotten to make room since the history began.
    pub fn overflowed(&self) -> bool {
        self.evicted > 0
    }
}

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
    /// What was written lately, to check a new session against.
    pub history: History,
    /// The peer's total of packets expired unread in the last report heard (see
    /// [`note_expired`]).
    pub expired_seen: Option<i64>,
}

impl Progress {
    pub fn new(cursor: i64) -> Progress {
        Progress::with_history(cursor, HISTORY)
    }

    pub fn with_history(cursor: i64, cap: usize) -> Progress {
        Progress {
            last_written: cursor,
            last_acked: cursor,
            first_unacked_at: None,
            unacked: 0,
            history: History::new(cap),
            expired_seen: None,
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
    dl: D::Downlink,
    policy: &AckPolicy,
    shared: &Shared,
) {
    let p = Progress::new(dl.stored_cursor());
    run_from(tun, db, dl, p, policy, shared)
}

/// [`run`] from a given [`Progress`] (the unit tests choose the history's size).
pub fn run_from<D: Database, T: Tun>(
    tun: &T,
    db: &D,
    mut dl: D::Downlink,
    mut p: Progress,
    policy: &AckPolicy,
    shared: &Shared,
) {
    shared.stats.last_acked_id.store(p.last_acked, Relaxed);
    // Set when the session is new (after a reconnect): check it against what was written.
    let mut fresh = false;
    loop {
        let res = if fresh {
            reconcile(&mut dl, &mut p, Instant::now()).map(|r| {
                report(&r, &p, tun.name(), shared);
                fresh = false;
            })
        } else {
            Ok(())
        };
        let err = match res.and_then(|()| serve(&mut dl, tun, policy, shared, &mut p)) {
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
        match reopen(db, shared) {
            Some(new) => {
                dl = new;
                fresh = true;
            }
            None => return, // stopping (no connection for a final ack), or fatal
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

/// Opens a new downlink session. `None` if the shim is stopping or the error is fatal (then
/// the shim stops with it).
fn reopen<D: Database>(db: &D, shared: &Shared) -> Option<D::Downlink> {
    let reopened = retry_open(
        "downlink",
        false,
        || db.open_downlink(),
        |d| sleep_unless_stopped(d, shared),
    );
    match reopened {
        Ok(new) => {
            Stats::add(&shared.stats.reconnects, 1);
            log::info!("downlink: reconnected");
            Some(new)
        }
        Err(GaveUp::Stopped) => None,
        Err(GaveUp::Fatal(e)) => {
            shared.fatal(e.class.exit_code(), format!("downlink: {e}"));
            None
        }
    }
}

/// What [`reconcile`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The server has the last packet written: resume after it.
    Same,
    /// The server's stored cursor is behind what was written, and nothing was written
    /// since the shim started (so there is nothing to compare): resume after its cursor.
    /// Packets may repeat, none is skipped.
    CursorBehind { written: i64, cursor: i64 },
    /// The server lacks packets this shim wrote: its history diverged after `common`.
    Diverged {
        /// The newest packet written that the server has (or its cursor, if newer).
        common: i64,
        /// The newest id written.
        newest: i64,
        /// Packets written with ids above `common`: delivered, not in the server's log.
        lost: usize,
        /// The history does not reach back to `common`: `lost` is a lower bound.
        at_least: bool,
    },
}

/// Does the server have the packet `id` with this fingerprint for us?
fn has<S: DownlinkSession>(dl: &mut S, id: i64, fp: u64) -> Result<bool, DbError> {
    let mut found = false;
    dl.recv((id - 1).max(0), 1, Duration::ZERO, &mut |rid, payload| {
        found = rid == id && fingerprint(payload) == fp;
    })?;
    Ok(found)
}

/// Checks a new session against what was written, and sets where delivery resumes: after
/// the last packet written if the server has it, else after the newest one it has (found
/// by bisection: the packets of one receiver reach a standby in id order, so what it has
/// of ours is a prefix of what we wrote). Then the ack state follows the server's cursor.
pub fn reconcile<S: DownlinkSession>(
    dl: &mut S,
    p: &mut Progress,
    now: Instant,
) -> Result<Reconciled, DbError> {
    let cursor = dl.stored_cursor();
    let outcome = match p.history.last() {
        _ if cursor >= p.last_written => Reconciled::Same,
        None => {
            let written = p.last_written;
            p.last_written = cursor;
            Reconciled::CursorBehind { written, cursor }
        }
        Some((id, fp)) if has(dl, id, fp)? => Reconciled::Same,
        Some((newest, _)) => {
            // Entries [0, lo) are on the server, entry hi is not (the last one); in between,
            // bisect: what the server has of ours is a prefix of what we wrote.
            let (mut lo, mut hi) = (0, p.history.len() - 1);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let (id, fp) = p.history.recent[mid];
                if has(dl, id, fp)? {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let found = lo.checked_sub(1).map(|i| p.history.recent[i].0);
            let common = found.unwrap_or(cursor).max(cursor);
            let lost = p.history.count_after(common);
            let at_least = found.is_none() && p.history.overflowed();
            p.history.truncate_after(common);
            p.last_written = common;
            Reconciled::Diverged {
                common,
                newest,
                lost,
                at_least,
            }
        }
    };
    // The server's cursor is the truth now (an ack may not have reached it).
    p.last_acked = cursor.min(p.last_written);
    if p.last_written > p.last_acked {
        p.unacked = p.history.count_after(p.last_acked) as u64;
        p.first_unacked_at.get_or_insert(now);
    } else {
        p.unacked = 0;
        p.first_unacked_at = None;
    }
    Ok(outcome)
}

/// Says what [`reconcile`] found, and counts the packets lost.
fn report(r: &Reconciled, p: &Progress, tun: &str, shared: &Shared) {
    match r {
        Reconciled::Same => {
            log::info!("downlink: resuming after id {}", p.last_written);
        }
        Reconciled::CursorBehind { written, cursor } => {
            log::warn!(
                "downlink: the database's cursor ({cursor}) is behind the last packet delivered ({written}): resuming after its cursor; packets may be delivered twice"
            );
        }
        Reconciled::Diverged {
            common,
            newest,
            lost,
            at_least,
        } => {
            Stats::add(&shared.stats.diverged_lost, *lost as u64);
            let n = if *at_least {
                format!("at least {lost}")
            } else {
                lost.to_string()
            };
            log::error!(
                "downlink: THE DATABASE LOST PACKETS ALREADY DELIVERED: it has none of ours after id {common}, but ids up to {newest} were written to {tun} ({n} packets); \
                 it was behind the server we delivered them from (a failover to an asynchronous standby, or a cancelled synchronous commit). \
                 Those packets are not in the log. Resuming after id {common}, so that nothing logged on this server is skipped"
            );
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
            p.history.push(id, fingerprint(payload));
        })?;
        note_expired(&dl.take_expired(), p, tun.name(), shared);
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

/// Counts and logs what pgvpn.recv() reported expired unread: packets for us that
/// retention dropped before we read them (never delivered, and not coming). A report
/// carries the peer's total so far, so each adds what is new since the one before; the
/// first of a run adds all of it (some may have been counted by an earlier run already).
pub fn note_expired(reports: &[Expired], p: &mut Progress, tun: &str, shared: &Shared) {
    for r in reports {
        let new = (r.packets - p.expired_seen.unwrap_or(0)).max(0);
        p.expired_seen = Some(r.packets.max(p.expired_seen.unwrap_or(0)));
        if new == 0 {
            continue;
        }
        Stats::add(&shared.stats.expired_unread, new as u64);
        log::warn!(
            "downlink: {new} packets for {tun} expired unread: retention dropped them before they were read (ids up to {}; {} for this peer in all)",
            r.upto,
            r.packets
        );
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
        // After the reconnect, one lookup first (recv after 2, one row: is packet 3 still
        // there?), then the pages again.
        assert_eq!(
            &afters[..5],
            [0, 3, 2, 3, 6],
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
    fn history_counts_and_forgets() {
        let mut h = History::new(4);
        for id in [3, 5, 8, 9] {
            h.push(id, id as u64);
        }
        assert_eq!(h.count_after(4), 3);
        assert_eq!(h.count_after(9), 0);
        assert_eq!(h.count_after(0), 4);
        assert!(!h.overflowed());
        h.push(12, 12);
        assert!(h.overflowed(), "3 was pushed out");
        assert_eq!(h.len(), 4);
        h.truncate_after(8);
        assert_eq!(h.last(), Some((8, 8)));
        assert_eq!(h.len(), 2);
        // The fingerprint tells apart what a failover may put under the same id.
        assert_ne!(
            fingerprint(Some(&pkt(1, 20))),
            fingerprint(Some(&pkt(2, 20)))
        );
        assert_ne!(
            fingerprint(Some(&pkt(1, 20))),
            fingerprint(Some(&pkt(1, 21)))
        );
        assert_ne!(fingerprint(None), fingerprint(Some(&[])));
        assert_eq!(
            fingerprint(Some(&pkt(7, 100))),
            fingerprint(Some(&pkt(7, 100)))
        );
    }

    /// The shim wrote ids 1..=10 (tag = id); the new primary's log ends at `keep_upto`.
    fn written_then_failover(keep_upto: i64, cursor: i64, cap: usize) -> (FakeDb, Progress) {
        let db = FakeDb::new();
        let mut p = Progress::with_history(0, cap);
        let t0 = Instant::now();
        for id in 1..=10 {
            db.deliver(id, pkt(id as u8, 30));
            p.written(id, t0);
            p.history.push(id, fingerprint(Some(&pkt(id as u8, 30))));
        }
        p.last_acked = 4;
        db.fail_over(keep_upto, cursor);
        (db, p)
    }

    #[test]
    fn reconcile_finds_where_the_histories_part() {
        // Asynchronous standby: it had 1..=6 and cursor 4; it already logged new packets
        // under the ids 7 and 8 (its sequence was behind too).
        let (db, mut p) = written_then_failover(6, 4, HISTORY);
        db.deliver(7, pkt(107, 30));
        db.deliver(8, pkt(108, 30));
        let mut dl = db.open_downlink().unwrap();
        let r = reconcile(&mut dl, &mut p, Instant::now()).unwrap();
        assert_eq!(
            r,
            Reconciled::Diverged {
                common: 6,
                newest: 10,
                lost: 4,
                at_least: false
            }
        );
        assert_eq!(p.last_written, 6, "resume after the newest common packet");
        assert_eq!(p.last_acked, 4, "the server's cursor");
        assert_eq!(p.unacked, 2, "5 and 6 are to be acked on the new server");
        assert!(p.first_unacked_at.is_some());
        assert_eq!(p.history.last().map(|e| e.0), Some(6));
        // The last packet, then a bisection: a handful of one-row lookups, no scan.
        let looks = db.recv_afters();
        assert!(looks.len() <= 5, "{looks:?}");
        assert_eq!(looks[0], 9, "first: is packet 10 there?");

        // Synchronous standby: it has everything; its ids jumped ahead (pre-logged
        // sequence values). Resume after 10: nothing repeated.
        let (db, mut p) = written_then_failover(10, 4, HISTORY);
        db.deliver(43, pkt(143, 30));
        let mut dl = db.open_downlink().unwrap();
        assert_eq!(
            reconcile(&mut dl, &mut p, Instant::now()).unwrap(),
            Reconciled::Same
        );
        assert_eq!((p.last_written, p.last_acked, p.unacked), (10, 4, 6));
        assert_eq!(db.recv_afters(), [9], "one lookup");

        // The server lost everything after its cursor, and the history has been cut short:
        // resume after the cursor, and say the count is a lower bound.
        let (db, mut p) = written_then_failover(2, 2, 4);
        let mut dl = db.open_downlink().unwrap();
        assert_eq!(
            reconcile(&mut dl, &mut p, Instant::now()).unwrap(),
            Reconciled::Diverged {
                common: 2,
                newest: 10,
                lost: 4,
                at_least: true
            }
        );
        assert_eq!((p.last_written, p.last_acked, p.unacked), (2, 2, 0));

        // Nothing written since the start, and the server's cursor is behind where this
        // run started: resume after its cursor (repeats possible, no skip).
        let db = FakeDb::new();
        db.set_cursor(3);
        let mut p = Progress::new(8);
        let mut dl = db.open_downlink().unwrap();
        assert_eq!(
            reconcile(&mut dl, &mut p, Instant::now()).unwrap(),
            Reconciled::CursorBehind {
                written: 8,
                cursor: 3
            }
        );
        assert_eq!((p.last_written, p.last_acked), (3, 3));
    }

    #[test]
    fn after_a_failover_to_a_server_that_was_behind_nothing_logged_there_is_skipped() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        db.set_page(4); // acks after 4 and 8
        for id in 1..=10 {
            db.deliver(id, pkt(id as u8, 30));
        }
        let shared = Shared::new();
        std::thread::scope(|s| {
            let dl = db.open_downlink().unwrap();
            s.spawn(|| run(&tun, &db, dl, &policy(HOUR, 4), &shared));
            eventually("1..=10 written", || tun.written().len() == 10);
            eventually("acked up to 8", || db.cursor() == 8);
            // The standby had 1..=6 and the cursor 4 (the ack of 8 did not reach it);
            // promoted, it logs new packets under the ids it hands out next: 7, 8, 9.
            db.fail_over(6, 4);
            for (id, tag) in [(7, 107), (8, 108), (9, 109)] {
                db.deliver(id, pkt(tag, 30));
            }
            eventually("new packets written", || tun.written().len() == 13);
            std::thread::sleep(Duration::from_millis(50));
            shared.request_stop();
        });
        let mut want: Vec<Vec<u8>> = (1..=10).map(|i| pkt(i, 30)).collect();
        want.extend([pkt(107, 30), pkt(108, 30), pkt(109, 30)]);
        assert_eq!(
            tun.written(),
            want,
            "the new server's 7, 8, 9 delivered; 5 and 6 not again"
        );
        assert_eq!(
            shared.stats.diverged_lost.load(Relaxed),
            4,
            "7..=10 of the old log"
        );
        assert_eq!(shared.stats.reconnects.load(Relaxed), 1);
        assert_eq!(db.cursor(), 9, "acked on the new server");
        let acks = db.acks();
        assert_eq!(&acks[..2], [4, 8], "{acks:?}");
        assert_eq!(acks.last(), Some(&9), "{acks:?}");
        assert_eq!(shared.exit_code(), EXIT_OK);
    }

    #[test]
    fn a_failover_without_loss_repeats_and_skips_nothing() {
        // Synchronous replication: the standby has every packet delivered; after the
        // promotion its ids jump ahead by up to 32 (pre-logged sequence values).
        let tun = FakeTun::new();
        let db = FakeDb::new();
        for id in 1..=5 {
            db.deliver(id, pkt(id as u8, 30));
        }
        let shared = Shared::new();
        std::thread::scope(|s| {
            let dl = db.open_downlink().unwrap();
            s.spawn(|| run(&tun, &db, dl, &policy(HOUR, 1 << 20), &shared));
            eventually("1..=5 written", || tun.written().len() == 5);
            db.fail_over(5, 0);
            db.deliver(38, pkt(38, 30));
            db.deliver(39, pkt(39, 30));
            eventually("new packets written", || tun.written().len() == 7);
            std::thread::sleep(Duration::from_millis(50));
            shared.request_stop();
        });
        let mut want: Vec<Vec<u8>> = (1..=5).map(|i| pkt(i, 30)).collect();
        want.extend([pkt(38, 30), pkt(39, 30)]);
        assert_eq!(tun.written(), want);
        assert_eq!(shared.stats.diverged_lost.load(Relaxed), 0);
        assert_eq!(db.acks(), [39]);
    }

    #[test]
    fn packets_expired_unread_are_counted_once_each() {
        let tun = FakeTun::new();
        let db = FakeDb::new();
        // Retention dropped 1..=4 before bob read them: 5 and 6 are left.
        db.deliver(5, pkt(5, 20));
        db.deliver(6, pkt(6, 20));
        db.report_expired(4, 4);
        let shared = Shared::new();
        std::thread::scope(|s| {
            let dl = db.open_downlink().unwrap();
            s.spawn(|| run(&tun, &db, dl, &policy(HOUR, 1 << 20), &shared));
            eventually("5, 6 written", || tun.written().len() == 2);
            eventually("counted", || shared.stats.expired_unread.load(Relaxed) == 4);
            // The same total again (another session, say) adds nothing; a later report of
            // the peer's total adds what is new.
            db.report_expired(4, 4);
            db.report_expired(10, 12);
            db.deliver(13, pkt(13, 20));
            eventually("13 written", || tun.written().len() == 3);
            std::thread::sleep(Duration::from_millis(50));
            shared.request_stop();
        });
        assert_eq!(shared.stats.expired_unread.load(Relaxed), 10);
        assert_eq!(tun.written(), [pkt(5, 20), pkt(6, 20), pkt(13, 20)]);
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
