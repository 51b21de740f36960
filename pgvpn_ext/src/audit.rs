//! `pgvpn.decode(bytea) → jsonb`: any packet's header, for auditors and for debugging.
use pgrx::prelude::*;
use pgrx::JsonB;
use pgvpn_core::decode;

/// A malformed packet is not an error here (auditors decode reject samples, which are
/// malformed by definition): it yields `{"error": "<why>"}`.
#[pg_extern(name = "decode", immutable, parallel_safe, strict)]
fn decode_packet(packet: &[u8]) -> JsonB {
    JsonB(match decode(packet) {
        Ok(h) => h.to_json(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    })
}

/// A token that changes after every committed transaction that logged packets. A
/// follower of the whole log (`pgvpn capture --follow`) reads it, reads new rows, and if
/// there are none waits with `log_wait(token)`: a commit between its read and its wait
/// still ends the wait, because the token moves only after the commit is visible.
#[pg_extern(volatile, parallel_restricted)]
fn log_generation() -> i64 {
    crate::shmem::require();
    crate::shmem::log_gen() as i64
}

/// Waits until the log's token differs from `since` or `wait_ms` passes (at most the
/// long-poll limit); returns the token then. Woken by commits, not by a timer.
#[pg_extern(volatile, parallel_unsafe)]
fn log_wait(since: i64, wait_ms: i32) -> i64 {
    crate::shmem::require();
    let limit = pgvpn_core::limits::MAX_WAIT_MS;
    if !(0..=limit).contains(&wait_ms) {
        crate::error::Error::BadWait {
            got: wait_ms,
            max: limit,
        }
        .raise();
    }
    crate::shmem::wait_log_change(since as u64, i64::from(wait_ms));
    crate::shmem::log_gen() as i64
}
