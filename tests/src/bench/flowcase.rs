//! The flow index's worst case: every packet a flow of its own, so `send` writes one
//! `pgvpn.flow_log` row per packet besides the packet's row. Measured against a batch of
//! one TCP flow (one flow row per batch), both with 64-byte packets in batches of
//! [`BATCH`], durable commits, one client, alternating so that both see the same
//! database; in a database of its own so that the rows do not skew the audit log.

use super::{check_interrupt, Result};
use pgvpn_tests::packet::{TCP_ACK, TCP_PSH};
use pgvpn_tests::sql::{create_peer, scalar_i64};
use pgvpn_tests::{db_error, packet, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const DB: &str = "flowcase";
pub const BATCH: usize = 256;
pub const SIZE: usize = 64;
const FROM: &str = "198.18.40.1";
const TO: &str = "198.18.41.1";

#[derive(Clone, Debug, Default)]
pub struct Case {
    pub packets: u64,
    pub secs: f64,
    pub flow_rows: i64,
}

impl Case {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.secs.max(1e-9)
    }
    pub fn rows_per_packet(&self) -> f64 {
        self.flow_rows as f64 / self.packets.max(1) as f64
    }
    fn to_json(&self) -> Value {
        json!({"packets": self.packets, "seconds": self.secs, "flow_rows": self.flow_rows,
               "pps": self.pps(), "flow_rows_per_packet": self.rows_per_packet()})
    }
}

#[derive(Clone, Debug, Default)]
pub struct FlowCase {
    /// 64-byte UDP, a new 5-tuple in every packet.
    pub new_flows: Case,
    /// 64-byte TCP segments of one flow.
    pub one_flow: Case,
}

impl FlowCase {
    pub fn ratio(&self) -> f64 {
        self.new_flows.pps() / self.one_flow.pps().max(1e-9)
    }
    pub fn to_json(&self) -> Value {
        json!({"batch": BATCH, "packet_bytes": SIZE, "new_flow_per_packet": self.new_flows.to_json(),
               "one_tcp_flow": self.one_flow.to_json(), "send_rate_ratio": self.ratio()})
    }
}

/// Batch `n` of the worst case: ports that no earlier packet used.
pub fn new_flow_batch(n: u64) -> Vec<Vec<u8>> {
    (0..BATCH as u64)
        .map(|i| {
            let k = n * BATCH as u64 + i;
            let (sport, dport) = (1024 + (k % 64_000) as u16, 1 + (k / 64_000 % 60_000) as u16);
            packet::udp(FROM, TO, sport, dport, &[0x5a; SIZE - 28])
        })
        .collect()
}

pub fn one_flow_batch() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|_| packet::tcp(FROM, TO, 40000, 443, TCP_ACK | TCP_PSH, &[0xa5; SIZE - 40]))
        .collect()
}

/// `rounds` × (new flows for `secs`, one flow for `secs`).
pub fn measure(cluster: &Cluster, secs: f64, rounds: usize) -> Result<FlowCase> {
    cluster.create_db(DB);
    cluster.create_extension(DB);
    let mut su = cluster.superuser(DB);
    // Durable, whatever the cluster's settings for building the audit log say.
    su.batch_execute(&format!(
        "ALTER DATABASE {DB} SET synchronous_commit = on; \
         ALTER DATABASE {DB} SET pgvpn.synchronous_commit = on"
    ))
    .map_err(|e| db_error(&e))?;
    create_peer(cluster, DB, "flow_a", &[&format!("{FROM}/32")]);
    create_peer(cluster, DB, "flow_b", &[&format!("{TO}/32")]);
    let mut a = cluster.connect("flow_a", DB);
    let one = one_flow_batch();
    let mut out = FlowCase::default();
    let mut n = 0u64;
    for _ in 0..rounds {
        for worst in [true, false] {
            let rows0 = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.flow_log");
            let t = Instant::now();
            let mut sent = 0u64;
            while t.elapsed() < Duration::from_secs_f64(secs) {
                check_interrupt()?;
                let batch = if worst {
                    new_flow_batch(n)
                } else {
                    one.clone()
                };
                n += 1;
                let got: i64 = a
                    .query_one(pgvpn_core::sql::SEND, &[&batch])
                    .map_err(|e| format!("send: {}", db_error(&e)))?
                    .get(0);
                if got != BATCH as i64 {
                    return Err(format!("send accepted {got} of {BATCH}"));
                }
                sent += BATCH as u64;
            }
            let c = if worst {
                &mut out.new_flows
            } else {
                &mut out.one_flow
            };
            c.secs += t.elapsed().as_secs_f64();
            c.packets += sent;
            c.flow_rows += scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.flow_log") - rows0;
        }
    }
    // The receiver never reads: drop what is waiting so that nothing else waits on it.
    let mut b = cluster.connect("flow_b", DB);
    let newest = scalar_i64(&mut su, "SELECT last_value FROM pgvpn.packet_id");
    b.execute(pgvpn_core::sql::ACK, &[&newest])
        .map_err(|e| db_error(&e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn worst_case_batches_are_all_new_flows() {
        let mut seen = HashSet::new();
        for n in 0..300 {
            for p in new_flow_batch(n) {
                assert_eq!(p.len(), SIZE);
                let h = pgvpn_core::decode(&p).unwrap();
                assert!(
                    seen.insert((h.src_port, h.dst_port)),
                    "a new flow each packet"
                );
            }
        }
        let one = one_flow_batch();
        assert!(one.iter().all(|p| p.len() == SIZE && p == &one[0]));
    }
}
