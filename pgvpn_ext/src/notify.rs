//! Coalesced wake-ups. `send` records which receivers got packets; just before the
//! transaction commits, each of them gets exactly one NOTIFY on its channel, however
//! many sends and packets the transaction held. NOTIFY takes a cluster-wide lock at
//! commit, so one per receiver per transaction is the most we can afford, and a row
//! trigger (one per packet) is far too many.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CString};

unsafe extern "C-unwind" {
    // commands/async.h; not in pgrx's bindings. The NOTIFY machinery itself.
    fn Async_Notify(channel: *const c_char, payload: *const c_char);
}

thread_local! {
    static PENDING: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Called from `_PG_init`: one permanent callback, so no per-transaction bookkeeping.
pub fn init() {
    // SAFETY: registers a static function with no argument; it stays valid for the life
    // of the backend (the library is never unloaded).
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) };
}

/// Queue wake-ups for these channels, sent when the current transaction commits.
pub fn wake(channels: impl IntoIterator<Item = String>) {
    PENDING.with(|p| p.borrow_mut().extend(channels));
}

/// Channels that will be notified if the current transaction commits.
#[cfg(any(test, feature = "pg_test"))]
pub fn pending() -> Vec<String> {
    PENDING.with(|p| p.borrow().iter().cloned().collect())
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    // Any other event (abort, prepare, parallel worker commit) just forgets them: no
    // rows were committed to wake anybody for.
    if event != pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT {
        return;
    }
    for channel in pending {
        // Names are validated ([a-z0-9_]) so they never contain NUL.
        if let Ok(c) = CString::new(channel) {
            // SAFETY: both strings are NUL-terminated and outlive the call. Guarded: a
            // Postgres ERROR inside must unwind through Rust, not longjmp over it.
            unsafe {
                pg_sys::ffi::pg_guard_ffi_boundary(|| Async_Notify(c.as_ptr(), c"".as_ptr()))
            };
        }
    }
}
