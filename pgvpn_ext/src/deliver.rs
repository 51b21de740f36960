//! Delivery: `recv`, `ack`, `cursor`. Read-only on the log; the only state is one
//! cursor row per peer (never an UPDATE per packet).
use crate::error::{or_raise, Error, Result};
use crate::peers::{self, Caller};
use crate::plans::{self, plan_slot};
use crate::shmem;
use crate::txn;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgvpn_core::limits::{MAX_RECV_BYTES, MAX_RECV_PACKETS, MAX_WAIT_MS};
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

plan_slot!(RECV);
const RECV_SQL: &str = "SELECT id, payload FROM pgvpn.packets \
    WHERE dst_peer = $1 AND id > $2 ORDER BY id LIMIT $3";

/// Rows fetched from the cursor at a time: what a page holds in memory at once.
const FETCH: i64 = 32;

thread_local! {
    /// The last `recv` that found nothing: (peer, after_id, the peer's wake-up
    /// generation then). A repeat of it with the generation unchanged cannot find
    /// anything either, so it sleeps first and queries after: no query, and no lock on
    /// the log, while it waits.
    static LAST_EMPTY: Cell<Option<(i32, i64, u64)>> = const { Cell::new(None) };
}

/// The calling peer's packets with id > after_id, in id order: at most `max_packets`
/// rows and about `max_bytes` bytes (always at least one row if there is one). Gap-free:
/// see send.rs.
///
/// With `wait_ms` > 0 and nothing to return yet, it waits (a long poll) until a send to
/// this peer commits or the time is up. The sender's commit wakes exactly this peer's
/// waiters (a condition variable in shared memory, see `shmem`), nobody else's, and
/// nothing another role does can wake it. Rows stream out as the caller reads them.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn recv(
    after_id: i64,
    max_packets: default!(i32, 1024),
    wait_ms: default!(i32, 0),
    max_bytes: default!(i32, 4_194_304),
) -> TableIterator<'static, (name!(id, i64), name!(payload, Vec<u8>))> {
    TableIterator::new(or_raise(plans::isolated(|| {
        open_page(after_id, max_packets, wait_ms, max_bytes)
    })))
}

/// One page of `recv`, read lazily from a cursor.
struct Page {
    cursor: Option<String>,
    buf: VecDeque<(i64, Vec<u8>)>,
    rows_left: i64,
    bytes_left: i64,
}

impl Iterator for Page {
    type Item = (i64, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rows_left <= 0 || self.bytes_left <= 0 {
            self.close();
            return None;
        }
        if self.buf.is_empty() {
            if let Some(name) = &self.cursor {
                self.buf = or_raise(fetch_named(name));
            }
        }
        let Some(row) = self.buf.pop_front() else {
            self.close();
            return None;
        };
        self.rows_left -= 1;
        self.bytes_left -= row.1.len() as i64;
        Some(row)
    }
}

impl Page {
    fn close(&mut self) {
        if let Some(name) = self.cursor.take() {
            // Dropping a found cursor closes its portal.
            let _ = Spi::connect(|c| c.find_cursor(&name).map(drop));
        }
        self.buf.clear();
    }
}

fn fetch_named(name: &str) -> Result<VecDeque<(i64, Vec<u8>)>> {
    Spi::connect(|c| {
        let mut cursor = c.find_cursor(name)?;
        let rows = read_rows(cursor.fetch(FETCH as _)?)?;
        let _ = cursor.detach_into_name();
        Ok(rows)
    })
}

fn read_rows(t: pgrx::spi::SpiTupleTable<'_>) -> Result<VecDeque<(i64, Vec<u8>)>> {
    let mut out = VecDeque::with_capacity(t.len());
    for row in t {
        let id: i64 = row.get(1)?.unwrap_or_default();
        let payload: Vec<u8> = row.get(2)?.unwrap_or_default();
        out.push_back((id, payload));
    }
    Ok(out)
}

fn open_page(after_id: i64, max_packets: i32, wait_ms: i32, max_bytes: i32) -> Result<Page> {
    txn::check_mode("recv", false)?;
    if !(1..=MAX_RECV_PACKETS).contains(&max_packets) {
        return Err(Error::BadMaxPackets {
            got: max_packets,
            max: MAX_RECV_PACKETS,
        });
    }
    if !(1..=MAX_RECV_BYTES).contains(&max_bytes) {
        return Err(Error::BadMaxBytes {
            got: max_bytes,
            max: MAX_RECV_BYTES,
        });
    }
    if !(0..=MAX_WAIT_MS).contains(&wait_ms) {
        return Err(Error::BadWait {
            got: wait_ms,
            max: MAX_WAIT_MS,
        });
    }
    if after_id < 0 {
        return Err(Error::NegativeAfter(after_id));
    }
    let peers = peers::current_now()?;
    let me = peers.caller()?;
    report_expired(&me, after_id)?;
    let slot = shmem::slot(peers.rel, me.id);
    let deadline = Instant::now() + Duration::from_millis(wait_ms as u64);
    loop {
        let gen = slot.gen.load(Ordering::Acquire);
        if LAST_EMPTY.with(Cell::get) != Some((me.id, after_id, gen)) {
            if let Some(page) = probe(&me, after_id, max_packets, max_bytes)? {
                LAST_EMPTY.with(|c| c.set(None));
                return Ok(page);
            }
            LAST_EMPTY.with(|c| c.set(Some((me.id, after_id, gen))));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Page {
                cursor: None,
                buf: VecDeque::new(),
                rows_left: 0,
                bytes_left: 0,
            });
        }
        slot.wait_change(gen, left.as_millis() as i64);
    }
}

thread_local! {
    /// (peer, expired_upto, when read): how far retention dropped this peer's unread
    /// packets, re-read every few seconds (it changes only when prune() drops a chunk);
    /// and the expired_upto we last told the caller about.
    static EXPIRED: Cell<Option<(i32, i64, Instant)>> = const { Cell::new(None) };
    static TOLD: Cell<Option<(i32, i64)>> = const { Cell::new(None) };
}

plan_slot!(EXPIRED_SQL_PLAN);
const EXPIRED_SQL: &str = "SELECT expired_upto, expired_packets FROM pgvpn.cursors WHERE peer = $1";

/// A receiver that asks from below what retention dropped unread is told so, once, with
/// a NOTICE (the shim logs it and counts the packets): delivery goes on from what is left,
/// but nobody should think the gap was delivered.
fn report_expired(me: &Caller, after_id: i64) -> Result<()> {
    let cached = EXPIRED
        .with(Cell::get)
        .filter(|&(peer, _, at)| peer == me.id && at.elapsed() < Duration::from_secs(5));
    let upto = match cached {
        Some((_, upto, _)) => upto,
        None => {
            let upto = Spi::connect(|c| -> Result<i64> {
                let plan =
                    plans::get(&EXPIRED_SQL_PLAN, c, EXPIRED_SQL, &[pg_sys::INT4OID], false)?;
                Ok(c.select(plan, Some(1), &[me.id.into()])?
                    .first()
                    .get::<i64>(1)?
                    .unwrap_or(0))
            })?;
            EXPIRED.with(|e| e.set(Some((me.id, upto, Instant::now()))));
            upto
        }
    };
    if after_id < upto && TOLD.with(Cell::get) != Some((me.id, upto)) {
        let lost = Spi::connect(|c| -> Result<i64> {
            let plan = plans::get(&EXPIRED_SQL_PLAN, c, EXPIRED_SQL, &[pg_sys::INT4OID], false)?;
            Ok(c.select(plan, Some(1), &[me.id.into()])?
                .first()
                .get::<i64>(2)?
                .unwrap_or(0))
        })?;
        TOLD.with(|t| t.set(Some((me.id, upto))));
        ereport!(
            PgLogLevel::NOTICE,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "pgvpn: packets for peer \"{}\" expired unread: retention dropped {lost} of them, ids up to {upto}",
                me.name
            ),
            // For programs (the shim counts them): key=value, always this shape.
            format!("expired_packets={lost} expired_upto={upto}")
        );
    }
    Ok(())
}

/// Opens the page's cursor and reads its first rows; None if there are none.
fn probe(me: &Caller, after_id: i64, max_packets: i32, max_bytes: i32) -> Result<Option<Page>> {
    // A chunk attached while we waited must reach our cached plan: the lock we already
    // hold on the log would not make PostgreSQL read the invalidation by itself.
    // SAFETY: processes pending catalog invalidations, as any lock acquisition does.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    Spi::connect_mut(|client| {
        let types = [pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT4OID];
        let plan = plans::get(&RECV, client, RECV_SQL, &types, true)?;
        let mut cursor =
            client.open_cursor_mut(plan, &[me.id.into(), after_id.into(), max_packets.into()]);
        let first = read_rows(cursor.fetch(FETCH as _)?)?;
        if first.is_empty() {
            return Ok(None);
        }
        Ok(Some(Page {
            cursor: Some(cursor.detach_into_name()),
            buf: first,
            rows_left: i64::from(max_packets),
            bytes_left: i64::from(max_bytes),
        }))
    })
}

// The cursor may only move up to the peer's own newest packet: a typo there would
// silently skip packets not yet sent. Checked against the peer's packets, not the global
// id counter, so that the error tells a peer nothing about anybody else's traffic.
plan_slot!(ACK);
const ACK_SQL: &str = "UPDATE pgvpn.cursors \
    SET acked_id = greatest(acked_id, $2), acked_at = statement_timestamp() \
    WHERE peer = $1 AND ($2 <= acked_id \
        OR $2 <= (SELECT max(id) FROM pgvpn.packets WHERE dst_peer = $1)) \
    RETURNING acked_id";

plan_slot!(UNACKED);
const UNACKED_SQL: &str = "SELECT count(*) FROM (SELECT FROM pgvpn.packets \
    WHERE dst_peer = $1 AND id > $2 LIMIT $3) AS waiting";

/// Stores the calling peer's delivery cursor: every packet up to `upto_id` has been
/// handled. It only moves forward, and cannot point past the caller's newest packet.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn ack(upto_id: i64) -> i64 {
    or_raise(plans::isolated(|| store_cursor(upto_id)))
}

fn store_cursor(upto_id: i64) -> Result<i64> {
    txn::check_mode("ack", true)?;
    if upto_id < 0 {
        return Err(Error::NegativeAck(upto_id));
    }
    let peers = peers::current_now()?;
    let me = peers.caller()?;
    let slot = shmem::slot(peers.rel, me.id);
    Spi::connect_mut(|client| {
        // The backlog baseline (for pgvpn.max_backlog and the metrics): what was routed
        // to us minus what is still waiting beyond the new cursor. Counted before the
        // update, so a packet committed meanwhile counts as waiting (never as acked).
        let rx_now = slot.live.rx_packets.load(Ordering::Acquire);
        let limit = i64::from(crate::guc::MAX_BACKLOG.get()).max(1) + 1;
        let types = [pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID];
        let plan = plans::get(&UNACKED, client, UNACKED_SQL, &types, false)?;
        let waiting: i64 = client
            .select(plan, Some(1), &[me.id.into(), upto_id.into(), limit.into()])?
            .first()
            .get(1)?
            .unwrap_or(0);

        let types = [pg_sys::INT4OID, pg_sys::INT8OID];
        let plan = plans::get(&ACK, client, ACK_SQL, &types, true)?;
        let row = client.update(plan, Some(1), &[me.id.into(), upto_id.into()])?;
        if row.is_empty() {
            return Err(Error::AckBeyondNewest {
                upto_id,
                peer: me.name.clone(),
            });
        }
        slot.rx_acked.store(rx_now - waiting, Ordering::Release);
        Ok(row.first().get::<i64>(1)?.unwrap_or_default())
    })
}

plan_slot!(CURSOR);
const CURSOR_SQL: &str = "SELECT acked_id FROM pgvpn.cursors WHERE peer = $1";

/// The calling peer's stored cursor (0 before the first ack): where a restarted shim resumes.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn cursor() -> i64 {
    or_raise(plans::isolated(|| {
        txn::check_mode("cursor", false)?;
        let me = peers::current_now()?.caller()?;
        Spi::connect(|client| {
            let plan = plans::get(&CURSOR, client, CURSOR_SQL, &[pg_sys::INT4OID], false)?;
            Ok(client
                .select(plan, Some(1), &[me.id.into()])?
                .first()
                .get::<i64>(1)?
                .unwrap_or(0))
        })
    }))
}
