//! `pgvpn.prune()`: the GUCs are read here, the chunk DDL lives in sql/retention.sql.
use crate::guc;
use pgrx::prelude::*;

/// Closes the open chunk if it is older than `pgvpn.chunk_interval`, builds the
/// host-pair index of chunks closed by an earlier call, and drops chunks whose packets
/// are all older than `pgvpn.retention`. Returns how many were dropped.
/// Schedule it (cron, pg_cron, a systemd timer) every few minutes; run it as the
/// extension owner.
#[pg_extern(volatile, parallel_unsafe)]
fn prune() -> i32 {
    let retention = f64::from(guc::RETENTION.get());
    let chunk = f64::from(guc::CHUNK_INTERVAL.get());
    Spi::get_one_with_args::<i32>(
        "SELECT pgvpn._prune(make_interval(secs => $1), make_interval(secs => $2))",
        &[retention.into(), chunk.into()],
    )
    .unwrap_or_else(|e| crate::error::Error::from(e).raise())
    .unwrap_or(0)
}
