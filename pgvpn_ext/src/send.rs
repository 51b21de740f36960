//! `pgvpn.send`: decode, route and log a batch of packets in one INSERT.
//!
//! Gap-free delivery. Packet ids come from one sequence, but become visible only when
//! their transaction commits; two senders to the same receiver could commit out of id
//! order, and a receiver asking for "id > N" would skip the late one forever. So before
//! taking ids, a send locks the receiver's `traffic` row (it updates that receiver's
//! counters, which it needs to do anyway) and holds the lock until commit. Senders to
//! one receiver are therefore serialized from id allocation to commit, and Postgres
//! makes a commit visible before it releases its locks: when a receiver sees id N,
//! every smaller id destined to it is already committed or was rolled back.
//! Senders to *different* receivers never wait on each other. Receivers are locked in
//! id order, so senders whose batches span several receivers cannot deadlock.
use crate::error::{Error, Result};
use crate::inet::inet_array;
use crate::notify;
use crate::peers::{self, channel_of};
use crate::plans::{self, plan_slot};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgvpn_core::limits::{MAX_BATCH_PACKETS, SAMPLES_PER_BATCH, SAMPLE_HEAD};
use pgvpn_core::{decode, Header, Reject};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[pg_extern(security_definer, volatile, parallel_unsafe)]
fn send(packets: Array<&[u8]>) -> i64 {
    let batch: Vec<Option<&[u8]>> = packets.iter().collect();
    crate::error::or_raise(plans::isolated(|| send_batch(&batch)))
}

#[pg_extern(name = "send", security_definer, volatile, parallel_unsafe)]
fn send_one(packet: &[u8]) -> i64 {
    crate::error::or_raise(plans::isolated(|| send_batch(&[Some(packet)])))
}

/// The accepted packets of a batch, column by column, ready for `unnest`.
#[derive(Default)]
struct Columns<'a> {
    dst_peer: Vec<i32>,
    ip_version: Vec<i16>,
    src_addr: Vec<IpAddr>,
    dst_addr: Vec<IpAddr>,
    protocol: Vec<i16>,
    src_port: Vec<Option<i32>>,
    dst_port: Vec<Option<i32>>,
    icmp_type: Vec<Option<i16>>,
    tcp_flags: Vec<Option<i16>>,
    length: Vec<i32>,
    payload: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, dst: i32, h: &Header, bytes: &'a [u8]) {
        self.dst_peer.push(dst);
        self.ip_version.push(i16::from(h.ip_version));
        self.src_addr.push(h.src_addr);
        self.dst_addr.push(h.dst_addr);
        self.protocol.push(i16::from(h.protocol));
        self.src_port.push(h.src_port.map(i32::from));
        self.dst_port.push(h.dst_port.map(i32::from));
        self.icmp_type.push(h.icmp_type.map(i16::from));
        self.tcp_flags.push(h.tcp_flags.map(|f| f as i16));
        self.length.push(bytes.len() as i32);
        self.payload.push(bytes);
    }
}

struct Sample {
    reason: Reject,
    detail: String,
    length: i32,
    head: Vec<u8>,
}

#[derive(Default)]
struct Rejects {
    counts: BTreeMap<Reject, i64>,
    samples: Vec<Sample>,
}

impl Rejects {
    fn add(&mut self, reason: Reject, detail: impl FnOnce() -> String, bytes: &[u8]) {
        *self.counts.entry(reason).or_default() += 1;
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

plan_slot!(BUMP_RX);
const BUMP_RX_SQL: &str = "UPDATE pgvpn.traffic \
    SET packets = packets + $2, bytes = bytes + $3, last_at = statement_timestamp() \
    WHERE peer = $1 AND direction = 'r'";

plan_slot!(BUMP_TX);
const BUMP_TX_SQL: &str = "UPDATE pgvpn.traffic \
    SET packets = packets + $2, bytes = bytes + $3, last_at = statement_timestamp() \
    WHERE peer = $1 AND direction = 't'";

// The unnests sit in a subquery's target list (a ProjectSet node, zipped in lockstep)
// rather than in FROM: a FROM-clause function scan would first copy every payload
// into a tuplestore. nextval() runs in the outer query, once per row, in array order.
plan_slot!(INSERT);
const INSERT_SQL: &str = "INSERT INTO pgvpn.packets (id, sent_at, src_peer, dst_peer, \
    ip_version, src_addr, dst_addr, protocol, src_port, dst_port, icmp_type, tcp_flags, \
    length, payload) \
    SELECT nextval('pgvpn.packet_id'), statement_timestamp(), $1, u.* \
    FROM (SELECT unnest($2::int4[]), unnest($3::int2[]), unnest($4::inet[]), \
                 unnest($5::inet[]), unnest($6::int2[]), unnest($7::int4[]), \
                 unnest($8::int4[]), unnest($9::int2[]), unnest($10::int2[]), \
                 unnest($11::int4[]), unnest($12::bytea[])) AS u";

plan_slot!(COUNT_REJECTS);
const COUNT_REJECTS_SQL: &str =
    "INSERT INTO pgvpn.reject_counts AS c (peer, reason, packets, last_at) \
    SELECT $1, r, n, statement_timestamp() FROM unnest($2::text[], $3::int8[]) AS u(r, n) \
    ON CONFLICT (peer, reason) DO UPDATE \
    SET packets = c.packets + excluded.packets, last_at = excluded.last_at";

plan_slot!(SAMPLE_REJECTS);
const SAMPLE_REJECTS_SQL: &str =
    "INSERT INTO pgvpn.reject_samples (at, peer, reason, detail, length, head) \
    SELECT statement_timestamp(), $1, r, d, l, h \
    FROM unnest($2::text[], $3::text[], $4::int4[], $5::bytea[]) AS u(r, d, l, h)";

fn send_batch(batch: &[Option<&[u8]>]) -> Result<i64> {
    if batch.len() > MAX_BATCH_PACKETS {
        return Err(Error::BatchTooLarge {
            got: batch.len(),
            max: MAX_BATCH_PACKETS,
        });
    }
    Spi::connect_mut(|client| {
        let peers = peers::load(client)?;
        let mut cols = Columns::default();
        let mut rejects = Rejects::default();
        // receiver -> (packets, bytes); BTreeMap so receivers are locked in id order.
        let mut per_dst: BTreeMap<i32, (i64, i64)> = BTreeMap::new();

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
            match peers.table.route(peers.me.id, h.src_addr, h.dst_addr) {
                Ok(dst) => {
                    let e = per_dst.entry(dst).or_default();
                    e.0 += 1;
                    e.1 += bytes.len() as i64;
                    cols.push(dst, &h, bytes);
                }
                Err(reason) => rejects.add(reason, || describe(&h), bytes),
            }
        }

        let me = peers.me.id;
        let (accepted, bytes) = per_dst
            .values()
            .fold((0i64, 0i64), |(n, b), &(dn, db)| (n + dn, b + db));
        if !per_dst.is_empty() {
            let (i4, i8) = (pg_sys::INT4OID, pg_sys::INT8OID);
            let bump_rx = plans::get(&BUMP_RX, client, BUMP_RX_SQL, &[i4, i8, i8], true)?;
            for (&dst, &(n, b)) in &per_dst {
                // Takes the receiver's row lock before any id is allocated (see top).
                client.update(bump_rx, None, &[dst.into(), n.into(), b.into()])?;
            }
            let types = [
                pg_sys::INT4OID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT2ARRAYOID,
                pg_sys::INETARRAYOID,
                pg_sys::INETARRAYOID,
                pg_sys::INT2ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT2ARRAYOID,
                pg_sys::INT2ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::BYTEAARRAYOID,
            ];
            let insert = plans::get(&INSERT, client, INSERT_SQL, &types, true)?;
            // SAFETY: both datums are inet[] arrays just built in this memory context,
            // which lives until the statement ends, after the INSERT below.
            let (src_addr, dst_addr) = unsafe {
                (
                    DatumWithOid::new(inet_array(&cols.src_addr), pg_sys::INETARRAYOID),
                    DatumWithOid::new(inet_array(&cols.dst_addr), pg_sys::INETARRAYOID),
                )
            };
            let args: Vec<DatumWithOid> = vec![
                me.into(),
                cols.dst_peer.into(),
                cols.ip_version.into(),
                src_addr,
                dst_addr,
                cols.protocol.into(),
                cols.src_port.into(),
                cols.dst_port.into(),
                cols.icmp_type.into(),
                cols.tcp_flags.into(),
                cols.length.into(),
                cols.payload.into(),
            ];
            client.update(insert, None, &args)?;
            let bump_tx = plans::get(&BUMP_TX, client, BUMP_TX_SQL, &[i4, i8, i8], true)?;
            client.update(bump_tx, None, &[me.into(), accepted.into(), bytes.into()])?;
            notify::wake(
                per_dst
                    .keys()
                    .filter_map(|d| peers.names.get(d))
                    .map(|n| channel_of(n)),
            );
        }

        if !rejects.counts.is_empty() {
            log_rejects(client, me, rejects)?;
        }
        Ok(accepted)
    })
}

fn log_rejects(client: &mut pgrx::spi::SpiClient<'_>, me: i32, r: Rejects) -> Result<()> {
    let (reasons, counts): (Vec<&str>, Vec<i64>) =
        r.counts.iter().map(|(k, &n)| (k.as_str(), n)).unzip();
    let types = [pg_sys::INT4OID, pg_sys::TEXTARRAYOID, pg_sys::INT8ARRAYOID];
    let plan = plans::get(&COUNT_REJECTS, client, COUNT_REJECTS_SQL, &types, true)?;
    client.update(plan, None, &[me.into(), reasons.into(), counts.into()])?;

    let mut reasons = Vec::new();
    let mut details = Vec::new();
    let mut lengths = Vec::new();
    let mut heads = Vec::new();
    for s in r.samples {
        reasons.push(s.reason.as_str());
        details.push(s.detail);
        lengths.push(s.length);
        heads.push(s.head);
    }
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
}
