//! Numbered UDP streams across a failure: what arrived when (from `pgvpn-arrivals`), what
//! the packet log holds (decoded back to sequence numbers), and the comparison of the two.
//!
//! Datagrams are netcheck's: `TAG(u32) SEQ(u32)` at the start of the UDP payload.

use crate::cluster::db_error;
use etherparse::{SlicedPacket, TransportSlice};
use postgres::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One datagram received: its sequence number and when (µs since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub seq: u32,
    pub at_us: u128,
}

/// The arrivals `pgvpn-arrivals` wrote so far (a partly written last line is skipped).
pub fn read_arrivals(path: &Path) -> Vec<Arrival> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let seq = f.next()?.parse().ok()?;
            let at_us = f.next()?.parse().ok()?;
            f.next().is_none().then_some(Arrival { seq, at_us })
        })
        .collect()
}

/// Now, in µs since the Unix epoch (the clock the arrivals are stamped with).
pub fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros()
}

pub fn us_to_duration(us: u128) -> Duration {
    Duration::from_micros(us as u64)
}

/// The sequence number of a netcheck datagram with `tag`, from a whole IP packet.
pub fn datagram_seq(ip_packet: &[u8], tag: u32) -> Option<u32> {
    let sliced = SlicedPacket::from_ip(ip_packet).ok()?;
    let Some(TransportSlice::Udp(udp)) = sliced.transport else {
        return None;
    };
    let data = udp.payload();
    (data.len() >= 8 && data[0..4] == tag.to_be_bytes())
        .then(|| u32::from_be_bytes(data[4..8].try_into().expect("4 bytes")))
}

/// The stream's datagrams in the log for peer `dst_peer`: (id, sequence number), by id.
pub fn logged_seqs(c: &mut Client, dst_peer: i32, port: u16, tag: u32) -> Vec<(i64, u32)> {
    let port = i32::from(port);
    c.query(
        "SELECT id, payload FROM pgvpn.packets \
         WHERE dst_peer = $1 AND protocol = 17 AND dst_port = $2 ORDER BY id",
        &[&dst_peer, &port],
    )
    .unwrap_or_else(|e| panic!("reading the log: {}", db_error(&e)))
    .iter()
    .filter_map(|r| {
        let payload: Vec<u8> = r.get(1);
        Some((r.get(0), datagram_seq(&payload, tag)?))
    })
    .collect()
}

/// What a receiver got, compared with what was sent and what is logged.
#[derive(Debug)]
pub struct Comparison {
    /// Distinct sequence numbers received.
    pub received: BTreeSet<u32>,
    /// Received more than once: (seq, times).
    pub duplicates: BTreeMap<u32, usize>,
    /// Sent (0..sent) and never received.
    pub missing: Vec<u32>,
    /// Received but not in the log: "delivered ⇒ logged" broken.
    pub delivered_not_logged: Vec<u32>,
    /// In the log but never received: skipped by the receiver.
    pub logged_not_delivered: Vec<u32>,
    /// Logged more than once.
    pub logged_twice: Vec<u32>,
}

pub fn compare(arrivals: &[Arrival], sent: u32, logged: &[(i64, u32)]) -> Comparison {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for a in arrivals {
        *counts.entry(a.seq).or_default() += 1;
    }
    let received: BTreeSet<u32> = counts.keys().copied().collect();
    let mut in_log: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, seq) in logged {
        *in_log.entry(*seq).or_default() += 1;
    }
    Comparison {
        duplicates: counts.into_iter().filter(|(_, n)| *n > 1).collect(),
        missing: (0..sent).filter(|s| !received.contains(s)).collect(),
        delivered_not_logged: received
            .iter()
            .filter(|s| !in_log.contains_key(s))
            .copied()
            .collect(),
        logged_not_delivered: in_log
            .keys()
            .filter(|s| !received.contains(s))
            .copied()
            .collect(),
        logged_twice: in_log
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect(),
        received,
    }
}

/// The first arrival at or after `t_us`.
pub fn first_at_or_after(arrivals: &[Arrival], t_us: u128) -> Option<Arrival> {
    arrivals.iter().copied().find(|a| a.at_us >= t_us)
}

/// The longest silence in the arrivals between `from_us` and `to_us`: (start, length), the
/// start being the last arrival before it (or `from_us`).
pub fn longest_gap(arrivals: &[Arrival], from_us: u128, to_us: u128) -> (u128, Duration) {
    let mut prev = from_us;
    let mut best = (from_us, 0u128);
    for a in arrivals
        .iter()
        .filter(|a| a.at_us >= from_us && a.at_us <= to_us)
    {
        if a.at_us - prev > best.1 {
            best = (prev, a.at_us - prev);
        }
        prev = a.at_us;
    }
    (best.0, us_to_duration(best.1))
}

/// Runs of consecutive numbers, for printing: `[3, 4, 5, 9]` → `"3-5, 9"`.
pub fn ranges(seqs: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_and_ranges() {
        let a = |seq, at_us| Arrival { seq, at_us };
        let arrivals = [a(0, 10), a(1, 20), a(1, 25), a(4, 90)];
        let logged = [(1, 0), (2, 1), (3, 3), (9, 4)];
        let c = compare(&arrivals, 6, &logged);
        assert_eq!(c.missing, [2, 3, 5]);
        assert_eq!(c.duplicates.into_iter().collect::<Vec<_>>(), [(1, 2)]);
        assert!(c.delivered_not_logged.is_empty());
        assert_eq!(c.logged_not_delivered, [3]);
        assert_eq!(ranges(&[3, 4, 5, 9]), "3-5, 9");
        assert_eq!(ranges(&[]), "none");
        assert_eq!(
            longest_gap(&arrivals, 0, 100),
            (25, Duration::from_micros(65))
        );
        assert_eq!(first_at_or_after(&arrivals, 21), Some(a(1, 25)));
        let udp = crate::packet::udp("198.18.0.1", "198.18.0.2", 1, 2, &[0, 0, 0, 7, 0, 0, 1, 2]);
        assert_eq!(datagram_seq(&udp, 7), Some(258));
        assert_eq!(datagram_seq(&udp, 8), None);
    }
}
