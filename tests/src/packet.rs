//! Raw IP packets for the SQL-level tests and the bench: well-formed ones are built by
//! etherparse's `PacketBuilder` (lengths and checksums right), the malformed ones it
//! refuses to build are in [`bad`], and [`parse`] reads a packet back with etherparse's
//! slicing.

use etherparse::{IpHeaders, NetSlice, PacketBuilder, PacketBuilderStep, SlicedPacket};
use etherparse::{TcpHeader, TransportSlice};
use std::net::IpAddr;

/// TCP flag bits, as the log's `tcp_flags` column stores them.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

const TTL: u8 = 64;

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad address {s}"))
}

/// The IP layer of a packet from `src` to `dst` (both v4 or both v6).
fn ip(src: &str, dst: &str) -> (PacketBuilderStep<IpHeaders>, bool) {
    match (addr(src), addr(dst)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (PacketBuilder::ipv4(s.octets(), d.octets(), TTL), false),
        (IpAddr::V6(s), IpAddr::V6(d)) => (PacketBuilder::ipv6(s.octets(), d.octets(), TTL), true),
        (s, d) => panic!("mixed address families: {s} -> {d}"),
    }
}

/// Serializes a finished builder step: every step type has its own inherent
/// `size`/`write`, so this is a macro rather than a generic function.
macro_rules! serialize {
    ($builder:expr, $payload:expr) => {{
        let (b, payload) = ($builder, $payload);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload)
            .unwrap_or_else(|e| panic!("etherparse cannot build the packet: {e}"));
        out
    }};
}

/// UDP packet; addresses as strings (v4 or v6).
pub fn udp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    serialize!(ip(src, dst).0.udp(sport, dport), payload)
}

/// TCP segment with the given flags (`TCP_*` bits), sequence number 1000.
pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let known = TCP_FIN | TCP_SYN | TCP_RST | TCP_PSH | TCP_ACK;
    assert_eq!(flags & !known, 0, "unsupported TCP flags {flags:#04x}");
    let mut h = TcpHeader::new(sport, dport, 1000, 65535);
    h.fin = flags & TCP_FIN != 0;
    h.syn = flags & TCP_SYN != 0;
    h.rst = flags & TCP_RST != 0;
    h.psh = flags & TCP_PSH != 0;
    h.ack = flags & TCP_ACK != 0;
    serialize!(ip(src, dst).0.tcp_header(h), payload)
}

/// ICMP / ICMPv6 echo request.
pub fn ping(src: &str, dst: &str, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    match ip(src, dst) {
        (b, false) => serialize!(b.icmpv4_echo_request(id, seq), payload),
        (b, true) => serialize!(b.icmpv6_echo_request(id, seq), payload),
    }
}

/// Malformed packets: what etherparse (rightly) will not build.
pub mod bad {
    /// Empty.
    pub fn empty() -> Vec<u8> {
        Vec::new()
    }
    /// Random junk whose first nibble is neither 4 nor 6.
    pub fn junk() -> Vec<u8> {
        b"\x13this is not an IP packet at all".to_vec()
    }
    /// A valid packet cut in the middle of its IP header.
    pub fn truncated_header(p: &[u8]) -> Vec<u8> {
        p[..p.len().min(12)].to_vec()
    }
    /// IPv4 whose total-length field claims more bytes than there are.
    pub fn v4_length_lies(p: &[u8]) -> Vec<u8> {
        let mut q = p.to_vec();
        let claimed = (q.len() + 100) as u16;
        q[2..4].copy_from_slice(&claimed.to_be_bytes());
        q
    }
    /// IPv4 with IHL < 5.
    pub fn v4_bad_ihl(p: &[u8]) -> Vec<u8> {
        let mut q = p.to_vec();
        q[0] = 0x43;
        q
    }
    /// IPv6 whose payload-length field is larger than the data.
    pub fn v6_length_lies(p: &[u8]) -> Vec<u8> {
        let mut q = p.to_vec();
        let claimed = (q.len() - 40 + 50) as u16;
        q[4..6].copy_from_slice(&claimed.to_be_bytes());
        q
    }
}

/// Parsed summary of a packet (only what the tests need).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub version: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number of the transport (`etherparse::IpNumber::UDP.0`, ...).
    pub protocol: u8,
    /// Transport payload (after the UDP/TCP/ICMP header).
    pub payload: Vec<u8>,
}

/// An IP packet carrying UDP, TCP or ICMP(v6); None if etherparse cannot slice it.
pub fn parse(p: &[u8]) -> Option<Summary> {
    let s = SlicedPacket::from_ip(p).ok()?;
    let (version, src, dst) = match s.net.as_ref()? {
        NetSlice::Ipv4(ip) => (
            4,
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            6,
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Arp(_) => return None,
    };
    let protocol = s.ip_payload()?.ip_number.0;
    let payload = match s.transport.as_ref()? {
        TransportSlice::Udp(u) => u.payload(),
        TransportSlice::Tcp(t) => t.payload(),
        TransportSlice::Icmpv4(i) => i.payload(),
        TransportSlice::Icmpv6(i) => i.payload(),
        TransportSlice::Igmp(_) => return None,
    };
    Some(Summary {
        version,
        src,
        dst,
        protocol,
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, NetHeaders, PacketHeaders, TransportHeader};

    /// The checksums etherparse wrote verify when recomputed from the parsed headers.
    fn checksums_verify(p: &[u8]) -> bool {
        let h = PacketHeaders::from_ip_slice(p).expect("parses");
        let payload = h.payload.slice();
        let l4 = match (h.net.as_ref().unwrap(), h.transport.as_ref().unwrap()) {
            (NetHeaders::Ipv4(ip, _), TransportHeader::Udp(u)) => {
                u.calc_checksum_ipv4(ip, payload).unwrap() == u.checksum
            }
            (NetHeaders::Ipv4(ip, _), TransportHeader::Tcp(t)) => {
                t.calc_checksum_ipv4(ip, payload).unwrap() == t.checksum
            }
            (NetHeaders::Ipv6(ip, _), TransportHeader::Tcp(t)) => {
                t.calc_checksum_ipv6(ip, payload).unwrap() == t.checksum
            }
            (NetHeaders::Ipv6(ip, _), TransportHeader::Icmpv6(i)) => {
                i.icmp_type
                    .calc_checksum(ip.source, ip.destination, payload)
                    .unwrap()
                    == i.checksum
            }
            (_, TransportHeader::Icmpv4(i)) => i.icmp_type.calc_checksum(payload) == i.checksum,
            other => panic!("no checksum check for {other:?}"),
        };
        let ip_ok = match h.net.as_ref().unwrap() {
            NetHeaders::Ipv4(ip, _) => ip.calc_header_checksum() == ip.header_checksum,
            _ => true,
        };
        l4 && ip_ok
    }

    #[test]
    fn ipv4_udp_layout_and_checksums() {
        let p = udp("198.18.0.1", "198.18.0.2", 1234, 5678, b"hello");
        assert_eq!(p.len(), 20 + 8 + 5);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert!(checksums_verify(&p));
        let s = parse(&p).unwrap();
        assert_eq!(s.payload, b"hello");
        assert_eq!(s.protocol, IpNumber::UDP.0);
        // pgvpn's own decoder reads the same packet.
        let d = pgvpn_core::decode(&p).unwrap();
        assert_eq!(
            (d.src_port, d.dst_port, d.length),
            (Some(1234), Some(5678), 33)
        );
    }

    #[test]
    fn ipv6_tcp_and_icmp() {
        let p = tcp(
            "fd00:5067:7670::1",
            "fd00:5067:7670::2",
            40000,
            80,
            TCP_SYN | TCP_ACK,
            b"",
        );
        assert_eq!(p.len(), 40 + 20);
        assert_eq!(p[6], IpNumber::TCP.0);
        assert!(checksums_verify(&p));
        assert_eq!(pgvpn_core::decode(&p).unwrap().tcp_flags, Some(0x12));
        let e = ping("fd00:5067:7670::1", "fd00:5067:7670::2", 7, 1, b"abc");
        assert_eq!(e[40], 128);
        assert!(checksums_verify(&e));
        assert_eq!(parse(&e).unwrap().payload, b"abc");
        let e4 = ping("198.18.0.1", "198.18.0.2", 7, 1, b"abcd");
        assert_eq!(e4[20], 8);
        assert!(checksums_verify(&e4));
        let t4 = tcp("198.18.0.1", "198.18.0.2", 1, 2, TCP_ACK, b"data");
        assert!(checksums_verify(&t4));
        assert_eq!(parse(&t4).unwrap().payload, b"data");
    }

    #[test]
    fn malformed_variants_do_not_parse() {
        let p = udp("198.18.0.1", "198.18.0.2", 1, 2, b"x");
        assert!(parse(&bad::empty()).is_none());
        assert!(parse(&bad::junk()).is_none());
        assert!(parse(&bad::truncated_header(&p)).is_none());
        assert!(parse(&bad::v4_length_lies(&p)).is_none());
        assert!(parse(&bad::v4_bad_ihl(&p)).is_none());
        let q = udp("fd00::1", "fd00::2", 1, 2, b"x");
        assert!(parse(&bad::v6_length_lies(&q)).is_none());
    }
}
