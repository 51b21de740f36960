//! State that every backend of the cluster shares: one slot per peer with its wake-up
//! condition variable and its traffic counters, and a generation number of the routing
//! table. It lives in shared memory, so pgvpn must be in `shared_preload_libraries`.
//!
//! Why not tables and NOTIFY (wave 1):
//! * NOTIFY takes a cluster-wide lock at every commit that notifies, any role can LISTEN
//!   on any channel (a channel name leaks when a peer receives), and any NOTIFY in the
//!   database sets every listener's latch. A per-peer condition variable wakes exactly
//!   the peer's own `recv`, costs no lock, and has no name anybody could listen on.
//! * Counters updated in place per `send` are hot rows: one role holding a snapshot open
//!   pins their dead versions and slows every sender. Here a committed transaction adds
//!   its counts with atomic adds; the tables get the totals at most once a second
//!   (`flush`), which keeps them for crashes, dumps and restarts.
//!
//! Slots are found by open addressing on (database, extension instance, peer id) and are
//! never freed while the server runs (a removed peer keeps its slot until a restart),
//! so lookups need no lock: a slot's key is written once, before its `state` is set.
use pgrx::pg_sys;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use pgvpn_core::Reject;

/// Counters kept per peer; the order is the order of `Counters::ALL` and of the flush.
pub const N_REJECTS: usize = Reject::ALL.len();

#[repr(C)]
pub struct Counters {
    pub tx_packets: AtomicI64,
    pub tx_bytes: AtomicI64,
    pub rx_packets: AtomicI64,
    pub rx_bytes: AtomicI64,
    /// Latest send by / to the peer (TimestampTz; 0 = none since start).
    pub tx_at: AtomicI64,
    pub rx_at: AtomicI64,
    pub rejects: [AtomicI64; N_REJECTS],
    pub reject_at: AtomicI64,
}

impl Counters {
    /// Every monotonic count, in a fixed order (timestamps excluded).
    pub fn counts(&self) -> [&AtomicI64; 4 + N_REJECTS] {
        let mut out = [&self.tx_packets; 4 + N_REJECTS];
        out[1] = &self.tx_bytes;
        out[2] = &self.rx_packets;
        out[3] = &self.rx_bytes;
        for (i, r) in self.rejects.iter().enumerate() {
            out[4 + i] = r;
        }
        out
    }
}

/// One peer's shared state.
#[repr(C)]
pub struct Slot {
    /// `(database oid << 32) | oid of pgvpn.peers`: a re-created extension is a new key.
    owner: AtomicU64,
    peer: AtomicI32,
    /// 0 free, 1 in use (written last, after the key).
    state: AtomicU32,
    /// Bumped after every committed transaction that routed packets to this peer.
    pub gen: AtomicU64,
    /// When the slot was taken (a TimestampTz): names this life of `live`, which counts
    /// from zero from then on. A flush stores it beside the counts it wrote
    /// (`mark_epoch` in `pgvpn.traffic` and `pgvpn.reject_counts`), so a row written in
    /// an earlier life (before a restart, or in the database a dump came from) is known
    /// to hold none of `live`.
    pub epoch: AtomicI64,
    /// Everything counted since the slot was taken.
    pub live: Counters,
    /// How much of `live` is already in the tables (advanced when a flush commits; only
    /// tells a flush whether anything moved: the views use the tables' marks).
    pub flushed: Counters,
    /// `live.rx_packets` minus what was still unacknowledged at the peer's last ack:
    /// the backlog is `live.rx_packets - rx_acked` (see `deliver::ack`).
    pub rx_acked: AtomicI64,
    /// Where `recv` sleeps; broadcast with `gen`.
    cv: pg_sys::ConditionVariable,
}

#[repr(C)]
struct Header {
    nslots: u32,
    /// Bumped after every committed change of `pgvpn.peers` in any database.
    routing_gen: AtomicU64,
    /// Bumped after every committed transaction that logged packets (for followers
    /// of the whole log, such as `pgvpn capture --follow`).
    log_gen: AtomicU64,
    /// When the counters were last flushed to the tables, and who is flushing now.
    last_flush: AtomicI64,
    flusher: AtomicI32,
    lock: AtomicPtr<pg_sys::LWLock>,
    log_cv: pg_sys::ConditionVariable,
}

static SHARED: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
const NAME: &std::ffi::CStr = c"pgvpn";

fn size(nslots: usize) -> usize {
    std::mem::size_of::<Header>() + nslots * std::mem::size_of::<Slot>()
}

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn install_hooks() {
    // SAFETY: _PG_init runs once per process before any hook can fire; chaining the
    // previous hooks is the documented protocol.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_request() {
    // SAFETY: runs in the postmaster during shmem sizing, the only time these may be called.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size(crate::guc::max_peers()));
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    // SAFETY: runs in the postmaster (and in each backend on EXEC_BACKEND builds) with
    // AddinShmemInitLock semantics provided by ShmemInitStruct's `found` flag: only the
    // first caller initializes; the memory is sized as requested in on_request.
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let nslots = crate::guc::max_peers();
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(NAME.as_ptr(), size(nslots), &mut found).cast::<Header>();
        if !found {
            std::ptr::write_bytes(p.cast::<u8>(), 0, size(nslots));
            (*p).nslots = nslots as u32;
            (*p).lock.store(
                std::ptr::addr_of_mut!((*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock),
                Ordering::Release,
            );
            pg_sys::ConditionVariableInit(std::ptr::addr_of_mut!((*p).log_cv));
            let slots = p.add(1).cast::<Slot>();
            for i in 0..nslots {
                pg_sys::ConditionVariableInit(std::ptr::addr_of_mut!((*slots.add(i)).cv));
            }
        }
        SHARED.store(p, Ordering::Release);
    }
}

fn header() -> &'static Header {
    let p = SHARED.load(Ordering::Acquire);
    if p.is_null() {
        crate::error::Error::NotPreloaded.raise();
    }
    // SAFETY: set once by on_startup to memory that lives as long as the server.
    unsafe { &*p }
}

/// True if the library was loaded with shared_preload_libraries (checked by the API).
pub fn available() -> bool {
    !SHARED.load(Ordering::Acquire).is_null()
}

fn slots(h: &'static Header) -> &'static [Slot] {
    // SAFETY: `nslots` slots follow the header, initialized by on_startup.
    unsafe {
        std::slice::from_raw_parts(
            (h as *const Header).add(1).cast::<Slot>(),
            h.nslots as usize,
        )
    }
}

fn owner_key(peers_rel: pg_sys::Oid) -> u64 {
    // SAFETY: MyDatabaseId is set before any SQL runs in a backend.
    let db = unsafe { pg_sys::MyDatabaseId };
    (u64::from(db.to_u32()) << 32) | u64::from(peers_rel.to_u32())
}

fn start(owner: u64, peer: i32, n: usize) -> usize {
    let h = owner ^ (peer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 17) as usize % n
}

/// The slot of `peer` (of the pgvpn whose peers table is `peers_rel`), created on first
/// use. Raises an error if all `pgvpn.max_peers` slots are taken.
pub fn slot(peers_rel: pg_sys::Oid, peer: i32) -> &'static Slot {
    let h = header();
    let all = slots(h);
    let owner = owner_key(peers_rel);
    let find = || -> Result<&'static Slot, Option<usize>> {
        let first = start(owner, peer, all.len());
        for k in 0..all.len() {
            let i = (first + k) % all.len();
            let s = &all[i];
            if s.state.load(Ordering::Acquire) == 0 {
                return Err(Some(i));
            }
            if s.owner.load(Ordering::Relaxed) == owner && s.peer.load(Ordering::Relaxed) == peer {
                return Ok(s);
            }
        }
        Err(None)
    };
    if let Ok(s) = find() {
        return s;
    }
    let lock = h.lock.load(Ordering::Acquire);
    // SAFETY: our own named LWLock from on_startup; held only for the probe below, which
    // cannot raise an error (LWLocks are released on error anyway).
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let got = match find() {
        Ok(s) => Some(s),
        Err(Some(i)) => {
            let s = &all[i];
            s.owner.store(owner, Ordering::Relaxed);
            s.peer.store(peer, Ordering::Relaxed);
            // SAFETY: reads the clock.
            s.epoch
                .store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
            s.state.store(1, Ordering::Release);
            Some(s)
        }
        Err(None) => None,
    };
    // SAFETY: acquired above.
    unsafe { pg_sys::LWLockRelease(lock) };
    got.unwrap_or_else(|| crate::error::Error::TooManyPeers(h.nslots).raise())
}

/// The slot of `peer` if it has one (for reading counters without creating slots).
pub fn existing_slot(peers_rel: pg_sys::Oid, peer: i32) -> Option<&'static Slot> {
    let h = header();
    let all = slots(h);
    let owner = owner_key(peers_rel);
    let first = start(owner, peer, all.len());
    (0..all.len())
        .map(|k| &all[(first + k) % all.len()])
        .take_while(|s| s.state.load(Ordering::Acquire) != 0)
        .find(|s| {
            s.owner.load(Ordering::Relaxed) == owner && s.peer.load(Ordering::Relaxed) == peer
        })
}

impl Slot {
    /// Wakes whoever waits in `recv` for this peer. Called after commit: never errors.
    pub fn wake(&'static self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the condition variable was initialized at startup; broadcasting takes
        // only its spinlock and sets latches.
        unsafe { pg_sys::ConditionVariableBroadcast(self.cv_ptr()) };
    }

    fn cv_ptr(&'static self) -> *mut pg_sys::ConditionVariable {
        std::ptr::addr_of!(self.cv).cast_mut()
    }

    /// Sleeps until `gen` differs from `seen` or `timeout_ms` passes. Interrupts (cancel,
    /// terminate) are honoured inside the wait. True if woken by a change.
    pub fn wait_change(&'static self, seen: u64, timeout_ms: i64) -> bool {
        wait_on(self.cv_ptr(), &self.gen, seen, timeout_ms)
    }
}

fn wait_on(
    cv: *mut pg_sys::ConditionVariable,
    gen: &AtomicU64,
    seen: u64,
    timeout_ms: i64,
) -> bool {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.max(0) as u64);
    // SAFETY: `cv` is an initialized shared condition variable; PrepareToSleep/TimedSleep
    // and CancelSleep are always paired below.
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let changed = loop {
        if gen.load(Ordering::Acquire) != seen {
            break true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break false;
        }
        // SAFETY: as above. A `true` result means the timeout expired.
        let timed_out = unsafe {
            pg_sys::ConditionVariableTimedSleep(
                cv,
                left.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        if timed_out && gen.load(Ordering::Acquire) == seen {
            break false;
        }
    };
    // SAFETY: paired with PrepareToSleep above.
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    changed
}

/// The routing table's generation: changes after every committed change of peers.
pub fn routing_gen() -> u64 {
    header().routing_gen.load(Ordering::Acquire)
}

pub fn bump_routing_gen() {
    header().routing_gen.fetch_add(1, Ordering::AcqRel);
}

/// The log's generation and a wait for its change (followers of the whole log).
pub fn log_gen() -> u64 {
    header().log_gen.load(Ordering::Acquire)
}

pub fn wake_log() {
    let h = header();
    h.log_gen.fetch_add(1, Ordering::AcqRel);
    // SAFETY: initialized at startup; see Slot::wake.
    unsafe { pg_sys::ConditionVariableBroadcast(std::ptr::addr_of!(h.log_cv).cast_mut()) };
}

pub fn wait_log_change(seen: u64, timeout_ms: i64) -> bool {
    let h = header();
    wait_on(
        std::ptr::addr_of!(h.log_cv).cast_mut(),
        &h.log_gen,
        seen,
        timeout_ms,
    )
}

/// Claims the right to flush counters if the last flush is `every_us` old and nobody
/// flushes now. The claim ends with `end_flush` (commit or abort of the flushing xact).
pub fn claim_flush(now: i64, every_us: i64) -> bool {
    let h = header();
    if now - h.last_flush.load(Ordering::Relaxed) < every_us {
        return false;
    }
    // SAFETY: MyProcPid is this backend's pid.
    let me = unsafe { pg_sys::MyProcPid };
    h.flusher
        .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Ends a claim; `committed_at` records a successful flush.
pub fn end_flush(committed_at: Option<i64>) {
    let h = header();
    if let Some(t) = committed_at {
        h.last_flush.store(t, Ordering::Relaxed);
    }
    // SAFETY: MyProcPid is this backend's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let _ = h
        .flusher
        .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
}

/// Every slot in use for the pgvpn whose peers table is `peers_rel`: (peer id, slot).
pub fn slots_of(peers_rel: pg_sys::Oid) -> impl Iterator<Item = (i32, &'static Slot)> {
    let owner = owner_key(peers_rel);
    slots(header())
        .iter()
        .filter(move |s| {
            s.state.load(Ordering::Acquire) == 1 && s.owner.load(Ordering::Relaxed) == owner
        })
        .map(|s| (s.peer.load(Ordering::Relaxed), s))
}

/// Raise unless pgvpn was preloaded (the API needs the shared state).
pub fn require() {
    let _ = header();
}

#[allow(dead_code)]
fn _assert_send_sync(_: *mut c_void) {}
