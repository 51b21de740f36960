//! `pgvpn.send`: decode and route a batch of packets now, log them when the transaction
//! commits.
//!
//! Gap-free delivery. Packet ids come from one sequence but become visible only when
//! their transaction commits; two senders to the same receiver could commit out of id
//! order, and a receiver asking for "id > N" would skip the late one forever. So ids
//! are taken late, in the transaction's pre-commit callback (`txn`, `log`), and only
//! after the sender holds an exclusive lock on each receiver it sends to, in receiver-id
//! order. The lock is held until the transaction ends, and PostgreSQL makes a commit
//! visible before it releases the transaction's locks. So for one receiver R: the
//! sender that holds R's lock takes its ids, commits, becomes visible, and only then
//! can the next sender to R take ids, which are therefore larger. When R sees id N,
//! every smaller id meant for R is already committed or was rolled back (a harmless
//! gap). Senders to different receivers never wait on each other, and because each
//! transaction takes all its receivers' locks at once, in one order, they cannot
//! deadlock, however many `send` calls a transaction makes.
//!
//! Bounded harm. The lock is taken after all of the caller's own SQL has run (pre-commit
//! runs no user code), and released when its commit ends: no `pg_sleep`, open
//! transaction, long statement or PREPARE TRANSACTION (refused) of a peer can hold it.
//! What it covers is our own insert, bounded by `limits::MAX_TXN_BYTES`, and the
//! commit's flush to disk (and to a synchronous standby).
//!
//! Tested by `tests/tests/delivery.rs`: concurrent senders whose commits interleave,
//! each packet delivered exactly once and in order, and a naive outbox run through the
//! same check loses packets (so the check can fail).
use crate::error::{Error, Result};
use crate::peers;
use crate::plans::{self, plan_slot};
use crate::shmem;
use crate::txn::{self, reject_index, Packet, Pending};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgvpn_core::limits::{MAX_BATCH_PACKETS, MAX_TXN_BYTES, SAMPLES_PER_BATCH, SAMPLE_HEAD};
use pgvpn_core::{decode, Header, Reject};
use std::sync::atomic::Ordering;

#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn send(packets: Array<&[u8]>) -> i64 {
    let batch: Vec<Option<&[u8]>> = packets.iter().collect();
    crate::error::or_raise(plans::isolated(|| send_batch(&batch)))
}

#[pg_extern(name = "send", security_definer, volatile, parallel_unsafe)]
fn send_one(packet: &[u8]) -> i64 {
    crate::error::or_raise(plans::isolated(|| send_batch(&[Some(packet)])))
}

struct Sample {
    reason: Reject,
    detail: String,
    length: i32,
    head: Vec<u8>,
}

#[derive(Default)]
struct Rejects {
    counts: [i64; shmem::N_REJECTS],
    samples: Vec<Sample>,
}

impl Rejects {
    fn add(&mut self, reason: Reject, detail: impl FnOnce() -> String, bytes: &[u8]) {
        self.counts[reject_index(reason)] += 1;
        if self.samples.len() < SAMPLES_PER_BATCH {
            self.samples.push(Sample {
                reason,
                detail: detail(),
                length: bytes.len() as i32,
                head: bytes[..bytes.len().min(SAMPLE_HEAD)].to_vec(),
            });
        }
    }
}

fn describe(h: &Header) -> String {
    format!("{} -> {} (protocol {})", h.src_addr, h.dst_addr, h.protocol)
}

fn send_batch(batch: &[Option<&[u8]>]) -> Result<i64> {
    txn::check_mode("send", true)?;
    if batch.len() > MAX_BATCH_PACKETS {
        return Err(Error::BatchTooLarge {
            got: batch.len(),
            max: MAX_BATCH_PACKETS,
        });
    }
    let bytes: usize = batch.iter().flatten().map(|p| p.len()).sum();
    if bytes > MAX_TXN_BYTES {
        return Err(Error::TooManyBytes {
            got: bytes,
            max: MAX_TXN_BYTES,
        });
    }
    let peers = peers::current_now()?;
    let me = peers.caller()?;
    let max_backlog = i64::from(crate::guc::MAX_BACKLOG.get());
    let mut accepted = Vec::new();
    let mut rejects = Rejects::default();
    for p in batch {
        let Some(bytes) = *p else {
            rejects.add(Reject::Malformed, || "NULL packet".into(), &[]);
            continue;
        };
        let h = match decode(bytes) {
            Ok(h) => h,
            Err(e) => {
                rejects.add(Reject::Malformed, || e.to_string(), bytes);
                continue;
            }
        };
        match peers.table.route(me.id, h.src_addr, h.dst_addr) {
            Ok(dst) if max_backlog > 0 && backlog(peers.rel, dst) >= max_backlog => {
                rejects.add(Reject::Backlog, || describe(&h), bytes)
            }
            Ok(dst) => accepted.push(Packet {
                dst,
                header: h,
                bytes: bytes.to_vec(),
            }),
            Err(reason) => rejects.add(reason, || describe(&h), bytes),
        }
    }
    let n = accepted.len() as i64;
    // SAFETY: inside our SECURITY DEFINER function the current user is its owner.
    let owner = unsafe { pg_sys::GetUserId() };
    let (rel, gen) = (peers.rel, peers.gen);
    txn::add(
        || Pending::new(owner, rel, me.id, gen),
        accepted,
        rejects.counts,
    )?;
    if !rejects.samples.is_empty() {
        sample_rejects(me.id, rejects.samples)?;
    }
    Ok(n)
}

/// Packets routed to `dst` and not yet acknowledged, as the shared counters see it.
fn backlog(rel: pg_sys::Oid, dst: i32) -> i64 {
    shmem::existing_slot(rel, dst).map_or(0, |s| {
        s.live.rx_packets.load(Ordering::Relaxed) - s.rx_acked.load(Ordering::Relaxed)
    })
}

plan_slot!(SAMPLE_REJECTS);
const SAMPLE_REJECTS_SQL: &str =
    "INSERT INTO pgvpn.reject_samples (at, peer, reason, detail, length, head) \
    SELECT statement_timestamp(), $1, r, d, l, h \
    FROM unnest($2::text[], $3::text[], $4::int4[], $5::bytea[]) AS u(r, d, l, h)";

/// A few rejected packets with their headers, for auditors (inserted now: a rolled-back
/// savepoint takes them with it, as it takes its packets).
fn sample_rejects(me: i32, samples: Vec<Sample>) -> Result<()> {
    let mut reasons = Vec::new();
    let mut details = Vec::new();
    let mut lengths = Vec::new();
    let mut heads = Vec::new();
    for s in samples {
        reasons.push(s.reason.as_str());
        details.push(s.detail);
        lengths.push(s.length);
        heads.push(s.head);
    }
    Spi::connect_mut(|client| {
        let types = [
            pg_sys::INT4OID,
            pg_sys::TEXTARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::INT4ARRAYOID,
            pg_sys::BYTEAARRAYOID,
        ];
        let plan = plans::get(&SAMPLE_REJECTS, client, SAMPLE_REJECTS_SQL, &types, true)?;
        client.update(
            plan,
            None,
            &[
                me.into(),
                reasons.into(),
                details.into(),
                lengths.into(),
                heads.into(),
            ],
        )?;
        Ok(())
    })
}
