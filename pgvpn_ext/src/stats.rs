//! The shared counters as SQL. The views (`peer_stats`, `reject_totals`, `metrics()`)
//! add to a table's total what the counters counted beyond the mark that total was
//! written with: `total + (live - mark)`, the row and its mark read in one snapshot.
//! A flush that commits while a view runs therefore changes nothing it shows: the view
//! sees either the old row and its old mark or the new row and its new mark, and `live`
//! only grows. No count over the log.
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

/// Per peer: the slot's life (`epoch`, see `shmem::Slot`), everything it counted in that
/// life, latest activity (µs since 2000, 0 = none; `pgvpn._ts` converts), and the
/// backlog estimate.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
pub fn _live_counters() -> TableIterator<
    'static,
    (
        name!(peer, i32),
        name!(epoch, i64),
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
            let l = &s.live;
            // Read once: the backlog is from the same count as the column.
            let rx_packets = l.rx_packets.load(Relaxed);
            (
                peer,
                s.epoch.load(Relaxed),
                l.tx_packets.load(Relaxed),
                l.tx_bytes.load(Relaxed),
                rx_packets,
                l.rx_bytes.load(Relaxed),
                l.tx_at.load(Relaxed),
                l.rx_at.load(Relaxed),
                (rx_packets - s.rx_acked.load(Relaxed)).max(0),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Per peer and reason with any: the slot's life and the rejects it counted in it.
#[pg_extern(volatile, parallel_restricted)]
pub fn _live_rejects() -> TableIterator<
    'static,
    (
        name!(peer, i32),
        name!(epoch, i64),
        name!(reason, String),
        name!(packets, i64),
        name!(at, i64),
    ),
> {
    shmem::require();
    let mut rows = Vec::new();
    for (peer, s) in shmem::slots_of(peers_rel()) {
        for (i, r) in Reject::ALL.iter().enumerate() {
            let n = s.live.rejects[i].load(Relaxed);
            if n != 0 {
                rows.push((
                    peer,
                    s.epoch.load(Relaxed),
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
