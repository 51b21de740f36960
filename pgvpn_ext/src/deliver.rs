//! Delivery: `recv`, `ack`, `cursor`, `channel`. Read-only on the log; the only state is
//! one cursor row per peer (never an UPDATE per packet).
use crate::error::{or_raise, Error, Result};
use crate::peers::{self, channel_of};
use crate::plans::{self, plan_slot};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Largest page `recv` hands out at once.
const MAX_PACKETS: i32 = 65_536;

plan_slot!(RECV);
const RECV_SQL: &str = "SELECT id, payload FROM pgvpn.packets \
    WHERE dst_peer = $1 AND id > $2 ORDER BY id LIMIT $3";

/// The calling peer's packets with id > after_id, in id order. Gap-free: see send.rs.
///
/// With `wait_ms` > 0 and nothing to return yet, it waits (a long poll) until packets
/// arrive or the time is up. The wake-up is the peer's own NOTIFY: a session that has
/// run `LISTEN pgvpn_<name>` gets its latch set when a send to it commits, so the wait
/// ends within microseconds of the commit and costs nothing while idle. (The
/// notification itself still reaches the client afterwards; a shim may ignore it.)
#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn recv(
    after_id: i64,
    max_packets: default!(i32, 1024),
    wait_ms: default!(i32, 0),
) -> TableIterator<'static, (name!(id, i64), name!(payload, Vec<u8>))> {
    TableIterator::new(or_raise(plans::isolated(|| {
        recv_page(after_id, max_packets, wait_ms)
    })))
}

/// Longest long poll: keeps a waiting statement (and its snapshot) short-lived.
const MAX_WAIT_MS: i32 = 60_000;

fn recv_page(after_id: i64, max_packets: i32, wait_ms: i32) -> Result<Vec<(i64, Vec<u8>)>> {
    if !(1..=MAX_PACKETS).contains(&max_packets) {
        return Err(Error::BadMaxPackets {
            got: max_packets,
            max: MAX_PACKETS,
        });
    }
    if !(0..=MAX_WAIT_MS).contains(&wait_ms) {
        return Err(Error::BadWait {
            got: wait_ms,
            max: MAX_WAIT_MS,
        });
    }
    let deadline = Instant::now() + Duration::from_millis(wait_ms as u64);
    let me = Spi::connect(peers::caller)?;
    loop {
        // A fresh snapshot each time round (a mutating plan is not run read-only), so
        // packets committed while we waited are seen.
        let page = Spi::connect_mut(|client| -> Result<Vec<(i64, Vec<u8>)>> {
            let types = [pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT4OID];
            let plan = plans::get(&RECV, client, RECV_SQL, &types, true)?;
            let rows = client.update(
                plan,
                None,
                &[me.id.into(), after_id.into(), max_packets.into()],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.get(1)?.unwrap_or_default();
                let payload: Vec<u8> = row.get(2)?.unwrap_or_default();
                out.push((id, payload));
            }
            Ok(out)
        })?;
        let left = deadline.saturating_duration_since(Instant::now());
        if !page.is_empty() || left.is_zero() {
            return Ok(page);
        }
        wait_for_latch(left);
    }
}

/// Sleeps until our latch is set (a NOTIFY for a channel we listen on, among others)
/// or `d` passes. Cancels and shutdowns are honoured right away.
fn wait_for_latch(d: Duration) {
    let ms = d.as_millis().clamp(1, i64::from(MAX_WAIT_MS) as u128) as std::ffi::c_long;
    // SAFETY: MyLatch is this backend's own latch, valid for its whole life; waiting on
    // and resetting it is what it is for.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
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

/// Stores the calling peer's delivery cursor: every packet up to `upto_id` has been
/// handled. It only moves forward, and cannot point past the caller's newest packet.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn ack(upto_id: i64) -> i64 {
    or_raise(plans::isolated(|| store_cursor(upto_id)))
}

fn store_cursor(upto_id: i64) -> Result<i64> {
    if upto_id < 0 {
        return Err(Error::NegativeAck(upto_id));
    }
    Spi::connect_mut(|client| {
        let me = peers::caller(client)?;
        let types = [pg_sys::INT4OID, pg_sys::INT8OID];
        let plan = plans::get(&ACK, client, ACK_SQL, &types, true)?;
        let row = client.update(plan, Some(1), &[me.id.into(), upto_id.into()])?;
        if row.is_empty() {
            return Err(Error::AckBeyondNewest {
                upto_id,
                peer: me.name,
            });
        }
        Ok(row.first().get::<i64>(1)?.unwrap_or_default())
    })
}

plan_slot!(CURSOR);
const CURSOR_SQL: &str = "SELECT acked_id FROM pgvpn.cursors WHERE peer = $1";

/// The calling peer's stored cursor (0 before the first ack): where a restarted shim resumes.
#[pg_extern(security_definer, stable, parallel_unsafe)]
fn cursor() -> i64 {
    or_raise(plans::isolated(|| {
        Spi::connect(|client| {
            let me = peers::caller(client)?;
            let plan = plans::get(&CURSOR, client, CURSOR_SQL, &[pg_sys::INT4OID], false)?;
            Ok(client
                .select(plan, Some(1), &[me.id.into()])?
                .first()
                .get::<i64>(1)?
                .unwrap_or(0))
        })
    }))
}

/// The calling peer's LISTEN channel: `pgvpn_<peer name>`. One notification arrives per
/// committed transaction that sent it packets.
#[pg_extern(security_definer, stable, parallel_unsafe)]
fn channel() -> String {
    or_raise(plans::isolated(|| {
        Spi::connect(|client| Ok(channel_of(&peers::caller(client)?.name)))
    }))
}
