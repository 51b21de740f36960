//! The shared counters as SQL: what has been counted since the last flush to the
//! tables. The views (`peer_stats`, `reject_totals`) add these to the tables' totals,
//! so they are exact at any moment without a count over the log.
use crate::error::or_raise;
use crate::shmem;
use pgrx::prelude::*;
use pgvpn_core::Reject;
use std::sync::atomic::Ordering::Relaxed;

fn peers_rel() -> pg_sys::Oid {
    or_raise(
        Spi::get_one::<pg_sys::Oid>("SELECT 'pgvpn.peers'::regclass::oid")
            .map_err(Into::into)
            .map(|o| o.unwrap_or(pg_sys::InvalidOid)),
    )
}

/// Per peer: counts not yet in `pgvpn.traffic`, latest activity (µs since 2000, 0 =
/// none since the server started; `pgvpn._ts` converts), and the backlog estimate.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
pub fn _live_counters() -> TableIterator<
    'static,
    (
        name!(peer, i32),
        name!(tx_packets, i64),
        name!(tx_bytes, i64),
        name!(rx_packets, i64),
        name!(rx_bytes, i64),
        name!(tx_at, i64),
        name!(rx_at, i64),
        name!(backlog, i64),
    ),
> {
    shmem::require();
    let rows: Vec<_> = shmem::slots_of(peers_rel())
        .map(|(peer, s)| {
            let d = |live: &std::sync::atomic::AtomicI64, done: &std::sync::atomic::AtomicI64| {
                live.load(Relaxed) - done.load(Relaxed)
            };
            (
                peer,
                d(&s.live.tx_packets, &s.flushed.tx_packets),
                d(&s.live.tx_bytes, &s.flushed.tx_bytes),
                d(&s.live.rx_packets, &s.flushed.rx_packets),
                d(&s.live.rx_bytes, &s.flushed.rx_bytes),
                s.live.tx_at.load(Relaxed),
                s.live.rx_at.load(Relaxed),
                (s.live.rx_packets.load(Relaxed) - s.rx_acked.load(Relaxed)).max(0),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Per peer and reason: rejects not yet in `pgvpn.reject_counts`.
#[pg_extern(volatile, parallel_restricted)]
pub fn _live_rejects() -> TableIterator<
    'static,
    (
        name!(peer, i32),
        name!(reason, String),
        name!(packets, i64),
        name!(at, i64),
    ),
> {
    shmem::require();
    let mut rows = Vec::new();
    for (peer, s) in shmem::slots_of(peers_rel()) {
        for (i, r) in Reject::ALL.iter().enumerate() {
            let n = s.live.rejects[i].load(Relaxed) - s.flushed.rejects[i].load(Relaxed);
            if n != 0 {
                rows.push((
                    peer,
                    r.as_str().to_string(),
                    n,
                    s.live.reject_at.load(Relaxed),
                ));
            }
        }
    }
    TableIterator::new(rows)
}

/// Writes the counters to the tables now (prune() calls it; cron may too). Returns how
/// many peers' counters moved.
#[pg_extern(volatile, parallel_unsafe)]
fn flush_counters() -> i32 {
    shmem::require();
    let flushed = or_raise(crate::log::flush_now());
    match flushed {
        Some(f) => f.defer(),
        None => 0,
    }
}
