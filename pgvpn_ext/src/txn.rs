//! What a transaction has sent, held until it commits, and what happens at commit.
//!
//! `send` decodes and routes at once (so it can answer how many packets it accepted)
//! but only *buffers* the accepted packets here. They are logged in the transaction's
//! pre-commit callback, after every piece of the caller's own SQL has run: that is where
//! ids are taken, under the receivers' ordering locks (see `send.rs` for why this gives
//! gap-free delivery), and nothing a peer does can keep those locks held. After the
//! commit, the commit callback adds the counts to the shared counters and wakes the
//! receivers. A rolled-back savepoint forgets what was sent inside it; an aborted
//! transaction forgets everything; PREPARE TRANSACTION is refused.
use crate::error::{Error, Result};
use crate::guc;
use crate::log::{self, Logged};
use crate::peers;
use crate::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgvpn_core::{Header, Reject};
use std::cell::{Cell, RefCell};
use std::ffi::c_void;

/// One accepted packet, waiting for commit.
pub struct Packet {
    pub dst: i32,
    pub header: Header,
    pub bytes: Vec<u8>,
}

/// What one `send` call buffered, tagged with its subtransaction.
struct Batch {
    subid: pg_sys::SubTransactionId,
    packets: Vec<Packet>,
    rejects: [i64; shmem::N_REJECTS],
}

/// Everything a transaction sent so far.
pub struct Pending {
    /// The extension owner (`send` runs as it): the log is written with its rights.
    pub owner: pg_sys::Oid,
    pub rel: pg_sys::Oid,
    pub sender: i32,
    /// Routing generation the packets were routed with.
    pub gen: peers::Gen,
    batches: Vec<Batch>,
    bytes: usize,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
    /// Set by the trigger on pgvpn.peers: the routing table changes at commit. Holds
    /// the peers table's oid.
    static PEERS_CHANGED: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
    /// Counts this backend's changes of pgvpn.peers, so that its own routing cache sees
    /// them before they commit.
    static LOCAL_CHANGES: Cell<u64> = const { Cell::new(0) };
    /// What the pre-commit logged, applied to the shared state after the commit.
    static LOGGED: RefCell<Option<Logged>> = const { RefCell::new(None) };
    /// Counter deltas a flush in this transaction wrote to the tables.
    static FLUSHED: RefCell<Option<log::Flushed>> = const { RefCell::new(None) };
}

/// Called from `_PG_init`: permanent callbacks, no per-transaction registration.
pub fn init() {
    // SAFETY: static functions without arguments, valid for the life of the backend.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

pub fn peers_changed() {
    // SAFETY: a catalog lookup by name in the current transaction; pgvpn.peers exists
    // (the trigger fires on it).
    let rel = unsafe {
        pg_sys::get_relname_relid(
            c"peers".as_ptr(),
            pg_sys::get_namespace_oid(c"pgvpn".as_ptr(), false),
        )
    };
    PEERS_CHANGED.with(|c| c.set(Some(rel)));
    LOCAL_CHANGES.with(|c| c.set(c.get() + 1));
}

pub fn local_peer_changes() -> u64 {
    LOCAL_CHANGES.with(Cell::get)
}

/// Refuses isolation levels and transaction modes in which `what` cannot keep its
/// promises: a transaction snapshot would read stale peers (authorization), and a
/// read-only transaction could not log at commit.
pub fn check_mode(what: &'static str, writes: bool) -> Result<()> {
    // SAFETY: plain reads of backend globals.
    let (iso, ro) = unsafe { (pg_sys::XactIsoLevel, pg_sys::XactReadOnly) };
    match iso as u32 {
        pg_sys::XACT_REPEATABLE_READ => return Err(Error::WrongIsolation(what, "REPEATABLE READ")),
        pg_sys::XACT_SERIALIZABLE => return Err(Error::WrongIsolation(what, "SERIALIZABLE")),
        _ => {}
    }
    if writes && ro {
        return Err(Error::ReadOnly);
    }
    Ok(())
}

/// Buffers one call's accepted packets (and counts its rejects) until commit.
pub fn add(
    head: impl FnOnce() -> Pending,
    packets: Vec<Packet>,
    rejects: [i64; shmem::N_REJECTS],
) -> Result<()> {
    let bytes: usize = packets.iter().map(|p| p.bytes.len()).sum();
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let pending = p.get_or_insert_with(head);
        let total = pending.bytes + bytes;
        if total > pgvpn_core::limits::MAX_TXN_BYTES {
            return Err(Error::TooManyBytes {
                got: total,
                max: pgvpn_core::limits::MAX_TXN_BYTES,
            });
        }
        pending.bytes = total;
        pending.batches.push(Batch {
            // SAFETY: a plain read of the transaction state.
            subid: unsafe { pg_sys::GetCurrentSubTransactionId() },
            packets,
            rejects,
        });
        Ok(())
    })
}

impl Pending {
    pub fn new(owner: pg_sys::Oid, rel: pg_sys::Oid, sender: i32, gen: peers::Gen) -> Pending {
        Pending {
            owner,
            rel,
            sender,
            gen,
            batches: Vec::new(),
            bytes: 0,
        }
    }

    /// Every buffered packet, and the rejects counted so far.
    pub fn into_parts(self) -> (Vec<Packet>, [i64; shmem::N_REJECTS]) {
        let mut rejects = [0i64; shmem::N_REJECTS];
        let mut packets = Vec::new();
        for b in self.batches {
            for (r, n) in rejects.iter_mut().zip(b.rejects) {
                *r += n;
            }
            packets.extend(b.packets);
        }
        (packets, rejects)
    }
}

/// Index of a reject reason in the counters.
pub fn reject_index(r: Reject) -> usize {
    Reject::ALL.iter().position(|&x| x == r).unwrap_or(0)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    // Subtransaction ids grow within a transaction and only the innermost one runs, so
    // everything buffered at or above the aborted id was sent inside it.
    PENDING.with(|p| {
        if let Some(pending) = p.borrow_mut().as_mut() {
            pending.batches.retain(|b| b.subid < my_subid);
            pending.bytes = pending
                .batches
                .iter()
                .flat_map(|b| &b.packets)
                .map(|p| p.bytes.len())
                .sum();
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => pre_commit(),
        XACT_EVENT_PRE_PREPARE => {
            let busy =
                PENDING.with(|p| p.borrow().is_some()) || PEERS_CHANGED.with(|c| c.get().is_some());
            if busy {
                Error::Prepare.raise();
            }
        }
        XACT_EVENT_COMMIT => after_commit(),
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => forget(),
        _ => {}
    }
}

/// Logs what the transaction sent. Runs after all of the caller's SQL; may still raise
/// (the transaction then aborts and nothing was logged).
fn pre_commit() {
    let changed = PEERS_CHANGED.with(|c| c.get());
    let pending = PENDING.with(|p| p.borrow_mut().take());
    // Callbacks run for every transaction of every database of the cluster: cost
    // nothing unless this one used pgvpn.
    if changed.is_none() && pending.is_none() {
        return;
    }
    let owner = pending.as_ref().map(|p| p.owner);
    // The statements have ended and their snapshots with them; our SQL needs one. Under
    // READ COMMITTED (the only level the API accepts) this is a fresh one.
    // SAFETY: pushed here, popped below on success; an ERROR aborts the transaction,
    // whose cleanup pops it.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    crate::error::or_raise(crate::plans::isolated(|| -> Result<()> {
        if let Some(rel) = changed {
            // Waits for in-flight sending commits, and holds new ones back until this
            // change is committed and the routing generation bumped (see `log`).
            log::lock_routing_exclusive(rel);
        }
        let logged = match pending {
            Some(p) => Some(as_owner(p.owner, || log::log_pending(p))?),
            None => None,
        };
        let forced = logged.as_ref().is_some_and(|l| l.rows > 0);
        LOGGED.with(|l| *l.borrow_mut() = logged);
        // Sending transactions also carry the counters to the tables, once a second.
        if let Some(owner) = owner {
            if let Some(flushed) = as_owner(owner, log::flush_if_due)? {
                FLUSHED.with(|f| *f.borrow_mut() = Some(flushed));
            }
        }
        if forced {
            force_durability();
        }
        Ok(())
    }));
    // SAFETY: the snapshot pushed above is still the active one.
    unsafe { pg_sys::PopActiveSnapshot() };
}

/// A flush done outside the pre-commit (`flush_counters`): applied after the commit.
pub fn defer_flushed(f: log::Flushed) {
    FLUSHED.with(|x| *x.borrow_mut() = Some(f));
}

/// Runs `f` as the extension owner, in a security-restricted context, as SECURITY
/// DEFINER functions do: the pre-commit callback runs as the session's role.
fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut uid, mut ctx) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads the current user and security context into locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx) };
    let restricted =
        ctx | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32;
    // SAFETY: switches to a valid role (the owner of our functions); restored below,
    // also when `f` raises.
    unsafe { pg_sys::SetUserIdAndSecContext(owner, restricted) };
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        // SAFETY: restores exactly what was read above.
        .finally(|| unsafe { pg_sys::SetUserIdAndSecContext(uid, ctx) })
        .execute()
}

/// A transaction that logged packets commits with `pgvpn.synchronous_commit`, whatever
/// the session set: delivered ⇒ logged must not be the peer's choice. Set LOCAL, so the
/// session's own value is back after this commit.
fn force_durability() {
    let Some(level) = guc::SYNCHRONOUS_COMMIT.get().forced() else {
        return;
    };
    // SAFETY: both strings are NUL-terminated; PGC_SUSET/PGC_S_SESSION lets our own
    // superuser-only setting win, GUC_ACTION_LOCAL undoes it at transaction end.
    unsafe {
        pg_sys::set_config_option(
            c"synchronous_commit".as_ptr(),
            level.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

/// After the commit is visible: counts, wake-ups. Must not raise.
fn after_commit() {
    if let Some(logged) = LOGGED.with(|l| l.borrow_mut().take()) {
        logged.apply();
    }
    if let Some(flushed) = FLUSHED.with(|f| f.borrow_mut().take()) {
        flushed.apply();
    }
    if PEERS_CHANGED.with(|c| c.take()).is_some() && shmem::available() {
        shmem::bump_routing_gen();
    }
    PENDING.with(|p| p.borrow_mut().take());
}

fn forget() {
    PENDING.with(|p| p.borrow_mut().take());
    LOGGED.with(|l| l.borrow_mut().take());
    if PEERS_CHANGED.with(|c| c.take()).is_some() {
        // What this backend cached included changes that are now rolled back.
        LOCAL_CHANGES.with(|c| c.set(c.get() + 1));
    }
    if FLUSHED.with(|f| f.borrow_mut().take()).is_some() {
        shmem::end_flush(None);
    }
}

/// Logs what the transaction has buffered now, as its commit would, and applies it:
/// `#[pg_test]`s run in one transaction that is rolled back, and still want to `recv`
/// what they sent.
#[cfg(any(test, feature = "pg_test"))]
pub fn log_now() {
    pre_commit();
    if let Some(logged) = LOGGED.with(|l| l.borrow_mut().take()) {
        logged.apply();
    }
    if let Some(flushed) = FLUSHED.with(|f| f.borrow_mut().take()) {
        flushed.apply();
    }
}

/// Packets a transaction has buffered so far (for tests).
#[cfg(any(test, feature = "pg_test"))]
pub fn pending_packets() -> usize {
    PENDING.with(|p| {
        p.borrow()
            .as_ref()
            .map_or(0, |p| p.batches.iter().map(|b| b.packets.len()).sum())
    })
}

/// Receivers that will be woken if the current transaction commits (for tests).
#[cfg(any(test, feature = "pg_test"))]
pub fn pending_receivers() -> Vec<i32> {
    PENDING.with(|p| {
        let mut v: Vec<i32> = p
            .borrow()
            .as_ref()
            .map(|p| {
                p.batches
                    .iter()
                    .flat_map(|b| &b.packets)
                    .map(|p| p.dst)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    })
}
