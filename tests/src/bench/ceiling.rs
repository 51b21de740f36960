//! The database ceiling: the same packets straight into `pgvpn.send` from one client, no
//! tun, no shim — as peer alice, batches of 256 (fewer for jumbo packets: a transaction
//! sends at most `MAX_TXN_BYTES`) valid IPv4/UDP packets from alice's
//! address to bob's, each call its own (durable) transaction; then `pgvpn.recv` reads
//! them back as bob, 1024 per page.

use super::cpu::{sample_tree, tree_delta};
use super::topology::{ALICE, BOB, DB};
use super::{check_interrupt, Result};
use pgvpn_core::limits::MAX_TXN_BYTES;
use pgvpn_tests::sql::{cursor, recv, scalar_i64};
use pgvpn_tests::{db_error, packet, Cluster, Rng};
use std::time::{Duration, Instant};

pub const BATCH: usize = 256;
pub const PAGE: i32 = 1024;
/// The sizes compared with COPY and with the baseline (issue #12's 64, 1400, 8000 B).
pub const COMPARED_SIZES: [usize; 3] = [64, 1400, 8000];

#[derive(Clone, Debug)]
pub struct Ceiling {
    /// IP packet size in bytes.
    pub size: usize,
    pub sent: u64,
    pub send_secs: f64,
    pub received: u64,
    pub recv_secs: f64,
    /// CPU seconds of the database's processes while `send` ran (None if unreadable).
    pub send_db_cpu_s: Option<f64>,
}

impl Ceiling {
    pub fn send_pps(&self) -> f64 {
        self.sent as f64 / self.send_secs
    }
    pub fn send_mbit(&self) -> f64 {
        self.send_pps() * self.size as f64 * 8.0 / 1e6
    }
    pub fn recv_pps(&self) -> f64 {
        self.received as f64 / self.recv_secs
    }
    /// Database CPU seconds per GB (10^9 bytes of packets) sent.
    pub fn send_cpu_s_per_gb(&self) -> Option<f64> {
        let gb = self.sent as f64 * self.size as f64 / 1e9;
        Some(self.send_db_cpu_s? / gb).filter(|_| gb > 0.0)
    }
}

/// Packets per batch: [`BATCH`], fewer where that would pass the cap on a
/// transaction's bytes (`MAX_TXN_BYTES`: 129 packets at 65000 B).
pub fn batch_len(size: usize) -> usize {
    BATCH.min(MAX_TXN_BYTES / size.max(1)).max(1)
}

/// One batch of [`batch_len`] UDP packets of `size` bytes (IP header included), random
/// payloads.
pub fn batch(size: usize) -> Vec<Vec<u8>> {
    assert!(size >= 28, "an IPv4/UDP packet has 28 bytes of headers");
    let mut rng = Rng::new(size as u64);
    (0..batch_len(size))
        .map(|i| {
            let mut payload = vec![0u8; size - 28];
            rng.fill(&mut payload);
            packet::udp(ALICE, BOB, 40000 + (i % 64) as u16, 9, &payload)
        })
        .collect()
}

/// `batch` sent by `client` in `db` back to back for `limit`; returns the packets sent.
/// Every packet must be accepted: a short accept is an error that lists the rejects.
pub fn send_for(
    cluster: &Cluster,
    db: &str,
    client: &mut postgres::Client,
    batch: &[Vec<u8>],
    limit: Duration,
) -> Result<u64> {
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < limit {
        check_interrupt()?;
        let n: i64 = client
            .query_one(pgvpn_core::sql::SEND, &[&batch])
            .map_err(|e| format!("pgvpn.send in {db}: {}", db_error(&e)))?
            .get(0);
        if n != batch.len() as i64 {
            let why: Option<String> = cluster
                .superuser(db)
                .query_one(
                    "SELECT string_agg(peer || ' ' || reason || ' ' || packets, ', ') \
                       FROM pgvpn.reject_totals",
                    &[],
                )
                .map_err(|e| db_error(&e))?
                .get(0);
            return Err(format!(
                "pgvpn.send in {db} accepted {n} of {} packets (rejects so far: {})",
                batch.len(),
                why.unwrap_or_else(|| "none".into())
            ));
        }
        sent += batch.len() as u64;
    }
    Ok(sent)
}

/// Send for `secs`, then read back for at most `secs`. Afterwards bob's cursor is moved
/// past everything sent, so bob's shim starts the next session with nothing queued.
pub fn measure(cluster: &Cluster, size: usize, secs: f64) -> Result<Ceiling> {
    let packets = batch(size);
    let mut alice = cluster.connect("alice", DB);
    let mut bob = cluster.connect("bob", DB);
    let start_cursor = cursor(&mut bob);

    let limit = Duration::from_secs_f64(secs);
    let postmaster = cluster.postmaster_pid();
    let cpu_before = postmaster.map(sample_tree);
    let t = Instant::now();
    let sent = send_for(cluster, DB, &mut alice, &packets, limit)?;
    let send_secs = t.elapsed().as_secs_f64();
    let send_db_cpu_s = postmaster
        .zip(cpu_before)
        .map(|(pm, before)| tree_delta(&before, &sample_tree(pm)).values().sum());

    let t = Instant::now();
    let (mut after, mut received, mut drained) = (start_cursor, 0u64, false);
    while t.elapsed() < limit {
        check_interrupt()?;
        let page = recv(&mut bob, after, PAGE);
        let Some((last, _)) = page.last() else {
            drained = true;
            break;
        };
        if let Some((_, p)) = page.iter().find(|(_, p)| p.len() != size) {
            return Err(format!(
                "pgvpn.recv returned a {}-byte packet, expected {size}",
                p.len()
            ));
        }
        after = *last;
        received += page.len() as u64;
    }
    let recv_secs = t.elapsed().as_secs_f64();
    if drained && received != sent {
        return Err(format!("sent {sent} packets but bob received {received}"));
    }

    let newest = scalar_i64(
        &mut cluster.superuser(DB),
        "SELECT last_value FROM pgvpn.packet_id",
    );
    bob.execute(pgvpn_core::sql::ACK, &[&newest])
        .map_err(|e| format!("pgvpn.ack: {}", db_error(&e)))?;
    Ok(Ceiling {
        size,
        sent,
        send_secs,
        received,
        recv_secs,
        send_db_cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_packets_are_valid_udp_of_the_size() {
        for size in [1400, 16000, 65000] {
            let b = batch(size);
            assert_eq!(b.len(), batch_len(size));
            assert!(b.len() * size <= MAX_TXN_BYTES);
            for p in &b {
                assert_eq!(p.len(), size);
                let s = packet::parse(p).expect("parses");
                assert_eq!(
                    (s.src.to_string().as_str(), s.dst.to_string().as_str()),
                    (ALICE, BOB)
                );
                assert_eq!(s.protocol, etherparse::IpNumber::UDP.0);
            }
        }
    }
}
