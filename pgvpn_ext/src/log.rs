//! Writing the log at commit, and the counters' way into the tables.
//!
//! `log_pending` runs in a sending transaction's pre-commit callback (see `txn`): it
//! takes the routing lock (shared), re-routes if peers changed since `send`, takes each
//! receiver's ordering lock in receiver-id order, and only then takes ids and inserts.
//! The locks are heavyweight locks on objects of our own (class = the `pgvpn.peers`
//! table, object = the receiver's id; 0 = the routing table): no SQL can take them,
//! and they are held only from here to the end of the commit, during which no user code
//! runs. See `send.rs` for why this orders every receiver's packets.
use crate::error::Result;
use crate::heap;
use crate::inet::inet_datum;
use crate::peers;
use crate::plans::{self, plan_slot};
use crate::shmem::{self, N_REJECTS};
use crate::txn::{reject_index, Packet, Pending};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgvpn_core::Reject;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

/// The routing table's lock object; receivers use their peer id (ids start at 1).
const ROUTING: u32 = 0;

fn lock_object(rel: pg_sys::Oid, obj: u32, mode: u32) {
    // SAFETY: locks an object of our own class (the peers table's oid) until the end of
    // the transaction; an ERROR (deadlock, cancel) unwinds through pgrx's guard.
    unsafe { pg_sys::LockDatabaseObject(rel, pg_sys::Oid::from(obj), 0, mode as pg_sys::LOCKMODE) };
}

/// Held by a transaction that changed peers, from its pre-commit to its end.
pub fn lock_routing_exclusive(rel: pg_sys::Oid) {
    lock_object(rel, ROUTING, pg_sys::ExclusiveLock);
}

/// What a commit adds to the shared state once it is visible.
pub struct Logged {
    rel: pg_sys::Oid,
    sender: i32,
    pub rows: usize,
    tx: (i64, i64),
    rx: BTreeMap<i32, (i64, i64)>,
    rejects: [i64; N_REJECTS],
    at: i64,
}

impl Logged {
    /// Runs after the commit: atomic adds and wake-ups only, nothing that can fail.
    pub fn apply(self) {
        let me = shmem::slot(self.rel, self.sender);
        let c = &me.live;
        c.tx_packets.fetch_add(self.tx.0, Ordering::Relaxed);
        c.tx_bytes.fetch_add(self.tx.1, Ordering::Relaxed);
        if self.tx.0 > 0 {
            c.tx_at.fetch_max(self.at, Ordering::Relaxed);
        }
        if self.rejects.iter().any(|&n| n > 0) {
            for (r, n) in c.rejects.iter().zip(self.rejects) {
                r.fetch_add(n, Ordering::Relaxed);
            }
            c.reject_at.fetch_max(self.at, Ordering::Relaxed);
        }
        for (&dst, &(n, b)) in &self.rx {
            let s = shmem::slot(self.rel, dst);
            s.live.rx_packets.fetch_add(n, Ordering::Relaxed);
            s.live.rx_bytes.fetch_add(b, Ordering::Relaxed);
            s.live.rx_at.fetch_max(self.at, Ordering::Relaxed);
            s.wake();
        }
        if self.rows > 0 {
            shmem::wake_log();
        }
    }
}

thread_local! {
    /// Chunks for the sequence's position are known to exist (checked once per backend;
    /// afterwards prune() keeps spares ahead).
    static CHUNKS_READY: Cell<bool> = const { Cell::new(false) };
}

plan_slot!(ENSURE_CHUNKS);
const ENSURE_CHUNKS_SQL: &str = "SELECT pgvpn._ensure_chunks()";

/// Logs a transaction's buffered packets; returns what to apply after the commit.
pub fn log_pending(pending: Pending) -> Result<Logged> {
    let (rel, sender, gen) = (pending.rel, pending.sender, pending.gen);
    let (mut packets, mut rejects) = pending.into_parts();
    lock_object(rel, ROUTING, pg_sys::ShareLock);
    Spi::connect_mut(|client| {
        let peers = peers::current(client)?;
        if peers.gen != gen {
            // Peers changed between `send` and now: route again with the current table,
            // so that a removed peer or a moved prefix applies to this packet too.
            let still_a_peer = peers.names.contains_key(&sender);
            packets.retain_mut(|p| {
                let verdict = if still_a_peer {
                    peers
                        .table
                        .route(sender, p.header.src_addr, p.header.dst_addr)
                } else {
                    Err(Reject::Spoofed)
                };
                match verdict {
                    Ok(dst) => {
                        p.dst = dst;
                        true
                    }
                    Err(r) => {
                        rejects[reject_index(r)] += 1;
                        false
                    }
                }
            });
        }
        let mut rx: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for p in &packets {
            let e = rx.entry(p.dst).or_default();
            e.0 += 1;
            e.1 += p.bytes.len() as i64;
        }
        let tx = rx
            .values()
            .fold((0i64, 0i64), |(n, b), &(dn, db)| (n + dn, b + db));
        // SAFETY: reads the clock.
        let at = unsafe { pg_sys::GetCurrentTimestamp() };
        if !packets.is_empty() {
            // Ordering locks in receiver-id order: no two senders can deadlock on them.
            for &dst in rx.keys() {
                lock_object(rel, dst as u32, pg_sys::ExclusiveLock);
            }
            if !CHUNKS_READY.with(Cell::get) {
                let plan = plans::get(&ENSURE_CHUNKS, client, ENSURE_CHUNKS_SQL, &[], true)?;
                client.update(plan, None, &[])?;
                CHUNKS_READY.with(|c| c.set(true));
            }
            insert(sender, &packets, at)?;
        }
        Ok(Logged {
            rel,
            sender,
            rows: packets.len(),
            tx,
            rx,
            rejects,
            at,
        })
    })
}

/// Takes the packets' ids and writes their rows (see `heap`).
fn insert(sender: i32, packets: &[Packet], at: i64) -> Result<()> {
    let seq = heap::relid(c"packet_id");
    let parent = heap::relid(c"packets");
    let ids = heap::next_ids(seq, packets.len());
    let opt = |v: Option<pg_sys::Datum>| (v.unwrap_or(pg_sys::Datum::from(0)), v.is_none());
    let rows = packets
        .iter()
        .zip(&ids)
        .map(|(p, &id)| {
            let h = &p.header;
            let cols = [
                (pg_sys::Datum::from(id), false),
                (pg_sys::Datum::from(at), false),
                (pg_sys::Datum::from(sender), false),
                (pg_sys::Datum::from(p.dst), false),
                (pg_sys::Datum::from(i16::from(h.ip_version)), false),
                (inet_datum(h.src_addr), false),
                (inet_datum(h.dst_addr), false),
                (pg_sys::Datum::from(i16::from(h.protocol)), false),
                opt(h.src_port.map(|v| pg_sys::Datum::from(i32::from(v)))),
                opt(h.dst_port.map(|v| pg_sys::Datum::from(i32::from(v)))),
                opt(h.icmp_type.map(|v| pg_sys::Datum::from(i16::from(v)))),
                opt(h.tcp_flags.map(|v| pg_sys::Datum::from(v as i16))),
                (pg_sys::Datum::from(p.bytes.len() as i32), false),
                (heap::bytea(&p.bytes), false),
            ];
            let (values, nulls) = cols.into_iter().unzip();
            ((id >> 40) as i32, heap::Row { values, nulls })
        })
        .collect();
    heap::insert(parent, "packets", "relid", rows)?;
    insert_flows(sender, packets, &ids, at)
}

/// One flow of a transaction: the packets' shared header fields (and their chunk, so a
/// flow row never spans two chunks).
#[derive(PartialEq, Eq, Hash)]
struct FlowKey {
    chunk: i32,
    dst: i32,
    ip_version: u8,
    protocol: u8,
    src_addr: std::net::IpAddr,
    dst_addr: std::net::IpAddr,
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

#[derive(Default)]
struct FlowSum {
    first_id: i64,
    last_id: i64,
    packets: i32,
    bytes: i64,
    tcp_flags: Option<u16>,
    syns: i32,
}

/// TCP SYN without ACK: a connection attempt.
const SYN: u16 = 0x02;
const ACK: u16 = 0x10;

/// The flow index (see sql/schema.sql, `flow_log`): one row per flow of the transaction.
fn insert_flows(sender: i32, packets: &[Packet], ids: &[i64], at: i64) -> Result<()> {
    let mut flows: HashMap<FlowKey, FlowSum> = HashMap::new();
    for (p, &id) in packets.iter().zip(ids) {
        let h = &p.header;
        let key = FlowKey {
            chunk: (id >> 40) as i32,
            dst: p.dst,
            ip_version: h.ip_version,
            protocol: h.protocol,
            src_addr: h.src_addr,
            dst_addr: h.dst_addr,
            src_port: h.src_port,
            dst_port: h.dst_port,
        };
        let f = flows.entry(key).or_insert_with(|| FlowSum {
            first_id: id,
            ..FlowSum::default()
        });
        f.last_id = id;
        f.packets += 1;
        f.bytes += p.bytes.len() as i64;
        if let Some(fl) = h.tcp_flags {
            f.tcp_flags = Some(f.tcp_flags.unwrap_or(0) | fl);
            if fl & (SYN | ACK) == SYN {
                f.syns += 1;
            }
        }
    }
    let opt = |v: Option<pg_sys::Datum>| (v.unwrap_or(pg_sys::Datum::from(0)), v.is_none());
    let mut rows: Vec<(i32, heap::Row)> = flows
        .into_iter()
        .map(|(k, f)| {
            let cols = [
                (pg_sys::Datum::from(f.first_id), false),
                (pg_sys::Datum::from(f.last_id), false),
                (pg_sys::Datum::from(at), false),
                (pg_sys::Datum::from(sender), false),
                (pg_sys::Datum::from(k.dst), false),
                (pg_sys::Datum::from(i16::from(k.ip_version)), false),
                (pg_sys::Datum::from(i16::from(k.protocol)), false),
                (inet_datum(k.src_addr), false),
                (inet_datum(k.dst_addr), false),
                opt(k.src_port.map(|v| pg_sys::Datum::from(i32::from(v)))),
                opt(k.dst_port.map(|v| pg_sys::Datum::from(i32::from(v)))),
                (pg_sys::Datum::from(f.packets), false),
                (pg_sys::Datum::from(f.bytes), false),
                opt(f.tcp_flags.map(|v| pg_sys::Datum::from(v as i16))),
                (pg_sys::Datum::from(f.syns), false),
            ];
            let (values, nulls) = cols.into_iter().unzip();
            (k.chunk, heap::Row { values, nulls })
        })
        .collect();
    // By chunk, then first id: `heap::insert` takes each chunk's rows in one go.
    rows.sort_by_key(|(chunk, r)| (*chunk, r.values[0].value()));
    heap::insert(heap::relid(c"flow_log"), "flow_log", "flow_relid", rows)
}

// ---------------------------------------------------------------------------------
// Counters into the tables
// ---------------------------------------------------------------------------------

/// How often the shared counters are written to the tables (at most), in µs. A crash
/// loses at most this much counting; the log itself is never affected.
const FLUSH_EVERY_US: i64 = 1_000_000;

/// Counter deltas written by this transaction, applied to the `flushed` marks after it
/// commits.
pub struct Flushed {
    deltas: Vec<(&'static shmem::Slot, [i64; 4 + N_REJECTS])>,
    at: i64,
}

impl Flushed {
    /// Applies at the end of the current transaction (see `txn`); returns how many
    /// peers' counters it wrote.
    pub fn defer(self) -> i32 {
        let n = self.deltas.len() as i32;
        crate::txn::defer_flushed(self);
        n
    }

    pub fn apply(self) {
        for (slot, d) in self.deltas {
            for (mark, n) in slot.flushed.counts().iter().zip(d) {
                mark.fetch_add(n, Ordering::Relaxed);
            }
        }
        shmem::end_flush(Some(self.at));
    }
}

// Each row takes what its slot counted beyond the row's mark (all of it when the mark
// is from another life of the slot: see `shmem::Slot::epoch`), and the new mark: the
// views add `live - mark` to the row (see `stats`).
plan_slot!(FLUSH_TRAFFIC);
const FLUSH_TRAFFIC_SQL: &str = "UPDATE pgvpn.traffic t \
    SET packets = t.packets + d.p - CASE WHEN t.mark_epoch = d.e THEN t.mark_packets ELSE 0 END, \
        bytes = t.bytes + d.b - CASE WHEN t.mark_epoch = d.e THEN t.mark_bytes ELSE 0 END, \
        mark_packets = d.p, mark_bytes = d.b, mark_epoch = d.e, \
        last_at = greatest(t.last_at, pgvpn._ts(d.at)) \
    FROM unnest($1::int4[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
        AS d(peer, dir, p, b, at, e) \
    WHERE t.peer = d.peer AND t.direction = d.dir::\"char\"";

plan_slot!(FLUSH_REJECTS);
const FLUSH_REJECTS_SQL: &str =
    "INSERT INTO pgvpn.reject_counts AS c (peer, reason, packets, last_at, mark, mark_epoch) \
    SELECT d.peer, d.reason, d.n, pgvpn._ts(d.at), d.n, d.e \
    FROM unnest($1::int4[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) AS d(peer, reason, n, at, e) \
    WHERE EXISTS (SELECT FROM pgvpn.peers p WHERE p.id = d.peer) \
    ON CONFLICT (peer, reason) DO UPDATE \
    SET packets = c.packets + excluded.mark \
            - CASE WHEN c.mark_epoch = excluded.mark_epoch THEN c.mark ELSE 0 END, \
        mark = excluded.mark, mark_epoch = excluded.mark_epoch, \
        last_at = greatest(c.last_at, excluded.last_at)";

/// Writes the counters that moved since the last flush, if the last one is a second
/// old and nobody else is flushing. Runs in pre-commit (as the owner) or in `flush()`.
pub fn flush_if_due() -> Result<Option<Flushed>> {
    if !shmem::available() {
        return Ok(None);
    }
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if !shmem::claim_flush(now, FLUSH_EVERY_US) {
        return Ok(None);
    }
    let written = pgrx::PgTryBuilder::new(|| write_counters(now))
        .catch_others(|e| {
            shmem::end_flush(None);
            e.rethrow()
        })
        .execute();
    match written {
        Ok(Some(f)) => Ok(Some(f)),
        other => {
            shmem::end_flush(None);
            other
        }
    }
}

/// Like `flush_if_due`, without waiting for the second to pass (for `prune()`).
pub fn flush_now() -> Result<Option<Flushed>> {
    if !shmem::available() {
        return Ok(None);
    }
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if !shmem::claim_flush(now, 0) {
        return Ok(None);
    }
    let written = pgrx::PgTryBuilder::new(|| write_counters(now))
        .catch_others(|e| {
            shmem::end_flush(None);
            e.rethrow()
        })
        .execute();
    match written {
        Ok(Some(f)) => Ok(Some(f)),
        other => {
            shmem::end_flush(None);
            other
        }
    }
}

fn write_counters(now: i64) -> Result<Option<Flushed>> {
    Spi::connect_mut(|client| {
        let rel = peers::current(client)?.rel;
        let mut deltas = Vec::new();
        let (mut t_peer, mut t_dir, mut t_p, mut t_b, mut t_at, mut t_e) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut r_peer, mut r_reason, mut r_n, mut r_at, mut r_e) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (peer, slot) in shmem::slots_of(rel) {
            let live = slot.live.counts().map(|a| a.load(Ordering::Relaxed));
            let done = slot.flushed.counts().map(|a| a.load(Ordering::Relaxed));
            let mut d = [0i64; 4 + N_REJECTS];
            for i in 0..d.len() {
                d[i] = live[i] - done[i];
            }
            if d.iter().all(|&x| x == 0) {
                continue;
            }
            let at = |a: &std::sync::atomic::AtomicI64| a.load(Ordering::Relaxed);
            let epoch = slot.epoch.load(Ordering::Relaxed);
            // What moved is written as the slot's totals; the SQL subtracts the marks.
            if d[0] != 0 || d[1] != 0 {
                t_peer.push(peer);
                t_dir.push("t");
                t_p.push(live[0]);
                t_b.push(live[1]);
                t_at.push(at(&slot.live.tx_at));
                t_e.push(epoch);
            }
            if d[2] != 0 || d[3] != 0 {
                t_peer.push(peer);
                t_dir.push("r");
                t_p.push(live[2]);
                t_b.push(live[3]);
                t_at.push(at(&slot.live.rx_at));
                t_e.push(epoch);
            }
            for (i, r) in Reject::ALL.iter().enumerate() {
                if d[4 + i] != 0 {
                    r_peer.push(peer);
                    r_reason.push(r.as_str());
                    r_n.push(live[4 + i]);
                    r_at.push(at(&slot.live.reject_at));
                    r_e.push(epoch);
                }
            }
            deltas.push((slot, d));
        }
        if deltas.is_empty() {
            return Ok(None);
        }
        if !t_peer.is_empty() {
            let types = [
                pg_sys::INT4ARRAYOID,
                pg_sys::TEXTARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
            ];
            let plan = plans::get(&FLUSH_TRAFFIC, client, FLUSH_TRAFFIC_SQL, &types, true)?;
            client.update(
                plan,
                None,
                &[
                    t_peer.into(),
                    t_dir.into(),
                    t_p.into(),
                    t_b.into(),
                    t_at.into(),
                    t_e.into(),
                ],
            )?;
        }
        if !r_peer.is_empty() {
            let types = [
                pg_sys::INT4ARRAYOID,
                pg_sys::TEXTARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
            ];
            let plan = plans::get(&FLUSH_REJECTS, client, FLUSH_REJECTS_SQL, &types, true)?;
            client.update(
                plan,
                None,
                &[
                    r_peer.into(),
                    r_reason.into(),
                    r_n.into(),
                    r_at.into(),
                    r_e.into(),
                ],
            )?;
        }
        Ok(Some(Flushed { deltas, at: now }))
    })
}
