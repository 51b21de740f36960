//! In-memory stand-ins for the tun device and the database, for the loops' unit tests (no
//! root, no database, no tun device).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{DbError, ErrorClass};
use crate::io::{Database, DownlinkSession, Expired, Tun, UplinkSession};

/// A stand-in packet: `len` bytes of `tag`.
pub fn pkt(tag: u8, len: usize) -> Vec<u8> {
    vec![tag; len]
}

/// Waits (up to 10 s, then panics naming `what`) until `cond` holds.
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tun device: packets "arrive" from the test and are read by the loops; what the loops
/// write is recorded.
#[derive(Default)]
pub struct FakeTun {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    read_error: Mutex<Option<io::Error>>,
    written: Mutex<Vec<Vec<u8>>>,
    rejects: Mutex<Vec<Vec<u8>>>,
}

impl FakeTun {
    pub fn new() -> FakeTun {
        FakeTun::default()
    }

    /// A packet the kernel routed into the device.
    pub fn arrive(&self, p: Vec<u8>) {
        lock(&self.inbox).push_back(p);
        self.arrived.notify_all();
    }

    /// The next read fails (the device was deleted).
    pub fn fail_next_read(&self, e: io::Error) {
        *lock(&self.read_error) = Some(e);
        self.arrived.notify_all();
    }

    /// Writing this packet fails.
    pub fn fail_writes_of(&self, p: Vec<u8>) {
        lock(&self.rejects).push(p);
    }

    /// Packets arrived and not read yet.
    pub fn waiting(&self) -> usize {
        lock(&self.inbox).len()
    }

    /// Packets written to the device, in order.
    pub fn written(&self) -> Vec<Vec<u8>> {
        lock(&self.written).clone()
    }

    fn pop(&self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        let mut inbox = lock(&self.inbox);
        if inbox.is_empty() && !wait.is_zero() {
            inbox = self
                .arrived
                .wait_timeout(inbox, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(e) = lock(&self.read_error).take() {
            return Err(e);
        }
        Ok(inbox.pop_front().map(|p| {
            buf[..p.len()].copy_from_slice(&p);
            p.len()
        }))
    }
}

impl Tun for FakeTun {
    fn name(&self) -> &str {
        "faketun0"
    }

    fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        self.pop(buf, timeout)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.pop(buf, Duration::ZERO)
    }

    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        if lock(&self.rejects).iter().any(|r| r == pkt) {
            return Err(io::Error::other("rejected by the fake device"));
        }
        lock(&self.written).push(pkt.to_vec());
        Ok(())
    }
}

#[derive(Default)]
struct DbState {
    /// The server is down: sessions die, opens fail as transient.
    down: bool,
    /// Bumped by a restart or a failover: sessions opened before are dead (the server
    /// closed them; [`UplinkSession::check`] sees it).
    generation: u64,
    /// Uplink checks made, and how many found the connection closed.
    checks: usize,
    checks_failed: usize,
    /// Errors for the next opens (either kind), in order.
    open_errors: VecDeque<DbError>,
    uplink_opens: usize,
    downlink_opens: usize,
    /// Errors for the next sends, in order.
    send_errors: VecDeque<DbError>,
    /// Every batch handed to send, and whether the call succeeded.
    batches: Vec<(Vec<Vec<u8>>, bool)>,
    /// The peer's packets in the database, by id.
    mailbox: BTreeMap<i64, Option<Vec<u8>>>,
    /// At most this many rows per recv (0: no limit of its own).
    page: usize,
    recv_calls: usize,
    /// recv call number (1-based) → the error it fails with.
    recv_failures: HashMap<usize, DbError>,
    recv_afters: Vec<i64>,
    recv_waits: Vec<Duration>,
    acks: Vec<i64>,
    cursor: i64,
    /// Expiry reports the next recv sends (as pgvpn.recv()'s NOTICE).
    expired: Vec<Expired>,
}

struct DbInner {
    state: Mutex<DbState>,
    changed: Condvar,
}

/// A database with one peer: scripted failures, recorded calls.
#[derive(Clone)]
pub struct FakeDb(Arc<DbInner>);

fn down_error() -> DbError {
    DbError::new(
        ErrorClass::Transient,
        "error connecting to server: Connection refused",
    )
}

impl FakeDb {
    pub fn new() -> FakeDb {
        FakeDb(Arc::new(DbInner {
            state: Mutex::new(DbState::default()),
            changed: Condvar::new(),
        }))
    }

    fn state(&self) -> MutexGuard<'_, DbState> {
        lock(&self.0.state)
    }

    fn changed(&self, f: impl FnOnce(&mut DbState)) {
        f(&mut self.state());
        self.0.changed.notify_all();
    }

    /// The server stops (sessions die, new ones are refused) or comes back.
    pub fn set_up(&self, up: bool) {
        self.changed(|s| s.down = !up);
    }

    /// The server restarts while nobody is looking: every session dies, new ones work.
    pub fn restart(&self) {
        self.changed(|s| s.generation += 1);
    }

    /// A failover to a server that had received the log only up to `keep_upto` and the
    /// cursor `cursor` (asynchronous replication): every session dies, the packets after
    /// `keep_upto` are gone, and the new server hands out ids again from where its log
    /// ends (use [`FakeDb::deliver`] for what it logs next).
    pub fn fail_over(&self, keep_upto: i64, cursor: i64) {
        self.changed(|s| {
            s.generation += 1;
            s.mailbox.retain(|id, _| *id <= keep_upto);
            s.cursor = cursor;
        });
    }

    /// (checks made, checks that found the connection closed)
    pub fn checks(&self) -> (usize, usize) {
        let s = self.state();
        (s.checks, s.checks_failed)
    }

    /// The next recv reports that `packets` of the peer's packets (its total), ids up to
    /// `upto`, expired unread.
    pub fn report_expired(&self, packets: i64, upto: i64) {
        self.state().expired.push(Expired { packets, upto });
    }

    pub fn fail_next_open(&self, e: DbError) {
        self.state().open_errors.push_back(e);
    }

    pub fn fail_next_send(&self, e: DbError) {
        self.state().send_errors.push_back(e);
    }

    /// The `n`th recv call (1-based, over all sessions) fails with `e`.
    pub fn fail_recv_call(&self, n: usize, e: DbError) {
        self.state().recv_failures.insert(n, e);
    }

    pub fn set_page(&self, rows: usize) {
        self.state().page = rows;
    }

    pub fn set_cursor(&self, id: i64) {
        self.state().cursor = id;
    }

    /// A packet for the peer, committed with this id.
    pub fn deliver(&self, id: i64, p: Vec<u8>) {
        self.changed(|s| {
            s.mailbox.insert(id, Some(p));
        });
    }

    /// A row whose payload is NULL.
    pub fn deliver_null(&self, id: i64) {
        self.changed(|s| {
            s.mailbox.insert(id, None);
        });
    }

    pub fn batches(&self) -> Vec<(Vec<Vec<u8>>, bool)> {
        self.state().batches.clone()
    }

    /// The batches whose send succeeded.
    pub fn sent(&self) -> Vec<Vec<Vec<u8>>> {
        let s = self.state();
        s.batches
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(b, _)| b.clone())
            .collect()
    }

    pub fn uplink_opens(&self) -> usize {
        self.state().uplink_opens
    }

    pub fn downlink_opens(&self) -> usize {
        self.state().downlink_opens
    }

    pub fn acks(&self) -> Vec<i64> {
        self.state().acks.clone()
    }

    pub fn cursor(&self) -> i64 {
        self.state().cursor
    }

    /// The `after` argument of every recv call.
    pub fn recv_afters(&self) -> Vec<i64> {
        self.state().recv_afters.clone()
    }

    /// The `wait` argument of every recv call.
    pub fn recv_waits(&self) -> Vec<Duration> {
        self.state().recv_waits.clone()
    }

    fn open(&self, count: impl FnOnce(&mut DbState)) -> Result<(), DbError> {
        let mut s = self.state();
        count(&mut s);
        if s.down {
            return Err(down_error());
        }
        s.open_errors.pop_front().map_or(Ok(()), Err)
    }
}

impl Database for FakeDb {
    type Uplink = FakeUplink;
    type Downlink = FakeDownlink;

    fn open_uplink(&self) -> Result<FakeUplink, DbError> {
        self.open(|s| s.uplink_opens += 1)?;
        Ok(FakeUplink {
            generation: self.state().generation,
            db: self.clone(),
            dead: false,
        })
    }

    fn open_downlink(&self) -> Result<FakeDownlink, DbError> {
        self.open(|s| s.downlink_opens += 1)?;
        let s = self.state();
        Ok(FakeDownlink {
            stored_cursor: s.cursor,
            generation: s.generation,
            db: self.clone(),
            dead: false,
            notices: Vec::new(),
        })
    }
}

/// A session dies with the first transient error, or when the server it was opened on
/// restarted; a dead one fails every call.
fn check_alive(s: &DbState, generation: u64, dead: &mut bool) -> Result<(), DbError> {
    if s.down || s.generation != generation {
        *dead = true;
    }
    if *dead {
        return Err(DbError::new(ErrorClass::Transient, "connection closed"));
    }
    Ok(())
}

fn died(e: DbError, dead: &mut bool) -> DbError {
    if e.class == ErrorClass::Transient {
        *dead = true;
    }
    e
}

pub struct FakeUplink {
    db: FakeDb,
    generation: u64,
    dead: bool,
}

impl UplinkSession for FakeUplink {
    fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, DbError> {
        let mut s = self.db.state();
        let res = check_alive(&s, self.generation, &mut self.dead)
            .and_then(|()| s.send_errors.pop_front().map_or(Ok(()), Err))
            .map_err(|e| died(e, &mut self.dead));
        s.batches.push((batch.to_vec(), res.is_ok()));
        res.map(|()| batch.len() as u64)
    }

    fn is_closed(&self) -> bool {
        self.dead
    }

    fn check(&mut self) -> Result<(), DbError> {
        let mut s = self.db.state();
        s.checks += 1;
        let res = check_alive(&s, self.generation, &mut self.dead);
        if res.is_err() {
            s.checks_failed += 1;
        }
        res
    }
}

pub struct FakeDownlink {
    db: FakeDb,
    stored_cursor: i64,
    generation: u64,
    dead: bool,
    /// Reports received by this session, not yet taken.
    notices: Vec<Expired>,
}

impl DownlinkSession for FakeDownlink {
    fn stored_cursor(&self) -> i64 {
        self.stored_cursor
    }

    fn recv(
        &mut self,
        after: i64,
        limit: usize,
        wait: Duration,
        each: &mut dyn FnMut(i64, Option<&[u8]>),
    ) -> Result<usize, DbError> {
        let rows: Vec<(i64, Option<Vec<u8>>)> = {
            let mut s = self.db.state();
            s.recv_calls += 1;
            s.recv_afters.push(after);
            s.recv_waits.push(wait);
            let call = s.recv_calls;
            check_alive(&s, self.generation, &mut self.dead)?;
            if let Some(e) = s.recv_failures.remove(&call) {
                return Err(died(e, &mut self.dead));
            }
            self.notices.append(&mut s.expired);
            let limit = if s.page == 0 {
                limit
            } else {
                s.page.min(limit)
            };
            let pick = |s: &DbState| -> Vec<(i64, Option<Vec<u8>>)> {
                s.mailbox
                    .range(after + 1..)
                    .take(limit)
                    .map(|(id, p)| (*id, p.clone()))
                    .collect()
            };
            let mut rows = pick(&s);
            if rows.is_empty() && !wait.is_zero() {
                // The long poll: wait for a delivery, at most `wait`.
                s = self
                    .db
                    .0
                    .changed
                    .wait_timeout(s, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                check_alive(&s, self.generation, &mut self.dead)?;
                rows = pick(&s);
            }
            rows
        };
        for (id, p) in &rows {
            each(*id, p.as_deref());
        }
        Ok(rows.len())
    }

    fn ack(&mut self, upto: i64) -> Result<i64, DbError> {
        let mut s = self.db.state();
        check_alive(&s, self.generation, &mut self.dead)?;
        // As pgvpn.ack: only forward, and never past the peer's newest packet.
        let newest = s.mailbox.keys().next_back().copied().unwrap_or(0);
        if upto > s.cursor && upto > newest {
            return Err(DbError::new(
                ErrorClass::Other,
                format!("pgvpn.ack: {upto} is beyond the newest packet (SQLSTATE 22023)"),
            ));
        }
        s.acks.push(upto);
        s.cursor = s.cursor.max(upto);
        Ok(s.cursor)
    }

    fn take_expired(&mut self) -> Vec<Expired> {
        std::mem::take(&mut self.notices)
    }
}
