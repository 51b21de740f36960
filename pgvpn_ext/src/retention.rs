//! `pgvpn.prune()`: the GUCs are read here, the chunk DDL lives in sql/retention.sql.
use crate::error::{or_raise, Error};
use crate::guc;
use pgrx::prelude::*;

/// Writes the counters to the tables, closes the open chunk if it is older than
/// `pgvpn.chunk_interval`, builds the host-pair index of chunks closed by an earlier
/// call, and drops chunks whose packets are all older than `pgvpn.retention`. Returns
/// how many were dropped. Schedule it (cron, pg_cron, a systemd timer) every minute or
/// so, in a transaction of its own, as the extension owner.
#[pg_extern(volatile, parallel_unsafe)]
fn prune() -> i32 {
    if crate::shmem::available() {
        if let Some(f) = or_raise(crate::log::flush_now()) {
            f.defer();
        }
    }
    let retention = f64::from(guc::RETENTION.get());
    let chunk = f64::from(guc::CHUNK_INTERVAL.get());
    let lock_wait = guc::PRUNE_LOCK_TIMEOUT.get();
    Spi::get_one_with_args::<i32>(
        "SELECT pgvpn._prune(make_interval(secs => $1), make_interval(secs => $2), $3)",
        &[retention.into(), chunk.into(), lock_wait.into()],
    )
    .unwrap_or_else(|e| Error::from(e).raise())
    .unwrap_or(0)
}
