//! The COPY reference for the database ceiling: the rows `pgvpn.send` writes for a
//! ceiling batch, written instead by `COPY … FROM STDIN (FORMAT binary)` from one client
//! into an identical table with a chunk's indexes — (dst_peer, id), (id),
//! brin(sent_at, id) — each batch its own durable transaction, as each `send` is.
//!
//! `send` also writes the flow index: one `pgvpn.flow_log` row per flow and transaction
//! (a ceiling batch holds 64 flows), with its four indexes. The reference is measured
//! both ways: the packet rows alone, and packet rows plus the same flow rows into a copy
//! of a flow chunk (two COPYs in one transaction) — the latter is the same work `send`
//! does, minus what only `send` needs (decoding, routing, ids from the sequence, the
//! ordering lock, the shared counters).

use super::ceiling;
use super::{check_interrupt, Result};
use pgvpn_core::{decode, Header};
use pgvpn_tests::{db_error, Cluster};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::Client;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

const SCHEMA: &str = "bench_copy";

/// The two tables, made like a chunk of the log and of the flow index (retention.sql).
const SETUP: &str = "
    DROP SCHEMA IF EXISTS bench_copy CASCADE;
    CREATE SCHEMA bench_copy;
    CREATE TABLE bench_copy.packets (LIKE pgvpn.packets INCLUDING DEFAULTS INCLUDING STORAGE)
        WITH (toast_tuple_target = 8160);
    CREATE INDEX ON bench_copy.packets (dst_peer, id);
    CREATE INDEX ON bench_copy.packets (id);
    CREATE INDEX ON bench_copy.packets USING brin (sent_at, id);
    CREATE TABLE bench_copy.flows (LIKE pgvpn.flow_log INCLUDING DEFAULTS);
    CREATE INDEX ON bench_copy.flows (src_addr, last_id);
    CREATE INDEX ON bench_copy.flows (dst_addr, last_id);
    CREATE INDEX ON bench_copy.flows (dst_port, last_id);
    CREATE INDEX ON bench_copy.flows USING brin (at, first_id);";

/// Drops the reference tables (they are rebuilt empty by the next [`setup`]).
pub const TEARDOWN: &str = "DROP SCHEMA IF EXISTS bench_copy CASCADE";

const PACKET_TYPES: [Type; 14] = [
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::INT4,
    Type::INT2,
    Type::INET,
    Type::INET,
    Type::INT2,
    Type::INT4,
    Type::INT4,
    Type::INT2,
    Type::INT2,
    Type::INT4,
    Type::BYTEA,
];

const FLOW_TYPES: [Type; 15] = [
    Type::INT8,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::INT4,
    Type::INT2,
    Type::INT2,
    Type::INET,
    Type::INET,
    Type::INT4,
    Type::INT4,
    Type::INT4,
    Type::INT8,
    Type::INT2,
    Type::INT4,
];

/// A batch with its headers decoded once.
pub struct Batch {
    packets: Vec<(Header, Vec<u8>)>,
}

impl Batch {
    pub fn new(size: usize) -> Batch {
        Batch {
            packets: ceiling::batch(size)
                .into_iter()
                .map(|p| (decode(&p).expect("ceiling packets decode"), p))
                .collect(),
        }
    }

    /// The flow rows `send` writes for this batch: (5-tuple → first index, last index,
    /// packets, bytes, OR of TCP flags, SYNs).
    fn flows(&self) -> Vec<FlowRow> {
        let mut m: BTreeMap<FlowKey, FlowRow> = BTreeMap::new();
        for (i, (h, p)) in self.packets.iter().enumerate() {
            let key = (h.protocol, h.src_addr, h.dst_addr, h.src_port, h.dst_port);
            let f = m.entry(key).or_insert_with(|| FlowRow {
                first: i,
                last: i,
                header: h.clone(),
                packets: 0,
                bytes: 0,
                flags: None,
                syns: 0,
            });
            f.last = i;
            f.packets += 1;
            f.bytes += p.len() as i64;
            if let Some(fl) = h.tcp_flags {
                f.flags = Some(f.flags.unwrap_or(0) | fl as i16);
                if fl & 0x12 == 0x02 {
                    f.syns += 1;
                }
            }
        }
        let mut v: Vec<FlowRow> = m.into_values().collect();
        v.sort_by_key(|f| f.first);
        v
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }
}

/// A flow as `send` groups packets (the peers are the same for the whole batch):
/// protocol, addresses, ports.
type FlowKey = (u8, IpAddr, IpAddr, Option<u16>, Option<u16>);

struct FlowRow {
    first: usize,
    last: usize,
    header: Header,
    packets: i32,
    bytes: i64,
    flags: Option<i16>,
    syns: i32,
}

#[derive(Clone, Copy, Debug)]
pub struct CopyRate {
    pub rows: u64,
    pub secs: f64,
}

impl CopyRate {
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.secs.max(1e-9)
    }
}

pub fn setup(su: &mut Client) -> Result<()> {
    su.batch_execute(SETUP)
        .map_err(|e| format!("COPY reference tables: {}", db_error(&e)))
}

fn copy_packets(
    t: &mut postgres::Transaction<'_>,
    b: &Batch,
    first_id: i64,
    peers: (i32, i32),
) -> Result<()> {
    let sink = t
        .copy_in(&format!("COPY {SCHEMA}.packets FROM STDIN (FORMAT binary)"))
        .map_err(|e| db_error(&e))?;
    let mut w = BinaryCopyInWriter::new(sink, &PACKET_TYPES);
    let now = SystemTime::now();
    for (i, (h, p)) in b.packets.iter().enumerate() {
        let id = first_id + i as i64;
        let (ipv, proto) = (i16::from(h.ip_version), i16::from(h.protocol));
        let sport = h.src_port.map(i32::from);
        let dport = h.dst_port.map(i32::from);
        let icmp = h.icmp_type.map(i16::from);
        let flags = h.tcp_flags.map(|f| f as i16);
        let len = p.len() as i32;
        let row: [&(dyn ToSql + Sync); 14] = [
            &id,
            &now,
            &peers.0,
            &peers.1,
            &ipv,
            &h.src_addr,
            &h.dst_addr,
            &proto,
            &sport,
            &dport,
            &icmp,
            &flags,
            &len,
            p,
        ];
        w.write(&row).map_err(|e| db_error(&e))?;
    }
    w.finish().map_err(|e| db_error(&e))?;
    Ok(())
}

fn copy_flows(
    t: &mut postgres::Transaction<'_>,
    flows: &[FlowRow],
    first_id: i64,
    peers: (i32, i32),
) -> Result<()> {
    let sink = t
        .copy_in(&format!("COPY {SCHEMA}.flows FROM STDIN (FORMAT binary)"))
        .map_err(|e| db_error(&e))?;
    let mut w = BinaryCopyInWriter::new(sink, &FLOW_TYPES);
    let now = SystemTime::now();
    for f in flows {
        let (a, z) = (first_id + f.first as i64, first_id + f.last as i64);
        let h = &f.header;
        let (ipv, proto) = (i16::from(h.ip_version), i16::from(h.protocol));
        let sport = h.src_port.map(i32::from);
        let dport = h.dst_port.map(i32::from);
        let row: [&(dyn ToSql + Sync); 15] = [
            &a,
            &z,
            &now,
            &peers.0,
            &peers.1,
            &ipv,
            &proto,
            &h.src_addr,
            &h.dst_addr,
            &sport,
            &dport,
            &f.packets,
            &f.bytes,
            &f.flags,
            &f.syns,
        ];
        w.write(&row).map_err(|e| db_error(&e))?;
    }
    w.finish().map_err(|e| db_error(&e))?;
    Ok(())
}

/// COPY batches of `size`-byte packets for `secs`; `flows`: the flow rows too.
pub fn measure(
    cluster: &Cluster,
    db: &str,
    size: usize,
    secs: f64,
    flows: bool,
    peers: (i32, i32),
) -> Result<CopyRate> {
    let b = Batch::new(size);
    let flow_rows = b.flows();
    let mut c = cluster.superuser(db);
    let mut next_id: i64 = c
        .query_one(
            &format!("SELECT coalesce(max(id), 0) + 1 FROM {SCHEMA}.packets"),
            &[],
        )
        .map_err(|e| db_error(&e))?
        .get(0);
    let (limit, t) = (Duration::from_secs_f64(secs), Instant::now());
    let mut rows = 0u64;
    while t.elapsed() < limit {
        check_interrupt()?;
        let mut tx = c.transaction().map_err(|e| db_error(&e))?;
        copy_packets(&mut tx, &b, next_id, peers)?;
        if flows {
            copy_flows(&mut tx, &flow_rows, next_id, peers)?;
        }
        tx.commit().map_err(|e| db_error(&e))?;
        next_id += b.len() as i64;
        rows += b.len() as u64;
    }
    Ok(CopyRate {
        rows,
        secs: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_rows_like_send() {
        let b = Batch::new(1400);
        let f = b.flows();
        // ceiling batches: 64 source ports, 4 packets each.
        assert_eq!(f.len(), 64);
        assert!(f
            .iter()
            .all(|r| r.packets == 4 && r.bytes == 4 * 1400 && r.flags.is_none()));
        assert_eq!(f.iter().map(|r| r.packets as usize).sum::<usize>(), b.len());
        assert!(f.windows(2).all(|w| w[0].first < w[1].first));
    }
}
