//! Hand-built raw IP packets (IPv4/IPv6 carrying UDP, TCP or ICMP echo) for SQL-level
//! tests. Lengths are always correct; checksums are computed (IPv4 header, UDP/TCP/ICMP
//! with the pseudo-header where the protocol has one).

use std::net::IpAddr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The transport part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
    },
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    /// ICMP (v4) or ICMPv6 echo request (`reply = false`) / reply.
    Echo {
        id: u16,
        seq: u16,
        reply: bool,
    },
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += proto as u32;
            acc += len as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += (len as u32) >> 16;
            acc += (len as u32) & 0xffff;
            acc += proto as u32;
        }
        _ => panic!("mixed address families"),
    }
    acc
}

/// Build the transport segment (header + payload) with its checksum.
fn transport(src: IpAddr, dst: IpAddr, l4: &L4, payload: &[u8]) -> (u8, Vec<u8>) {
    let v6 = src.is_ipv6();
    let (proto, mut seg, csum_at) = match *l4 {
        L4::Udp { sport, dport } => {
            let len = 8 + payload.len();
            let mut s = Vec::with_capacity(len);
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&(len as u16).to_be_bytes());
            s.extend_from_slice(&[0, 0]);
            (PROTO_UDP, s, 6)
        }
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
        } => {
            let mut s = Vec::with_capacity(20 + payload.len());
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&seq.to_be_bytes());
            s.extend_from_slice(&ack.to_be_bytes());
            s.push(5 << 4); // data offset: 5 words, no options
            s.push(flags);
            s.extend_from_slice(&65535u16.to_be_bytes()); // window
            s.extend_from_slice(&[0, 0]); // checksum
            s.extend_from_slice(&[0, 0]); // urgent pointer
            (PROTO_TCP, s, 16)
        }
        L4::Echo { id, seq, reply } => {
            let ty = match (v6, reply) {
                (false, false) => 8,
                (false, true) => 0,
                (true, false) => 128,
                (true, true) => 129,
            };
            let mut s = vec![ty, 0, 0, 0];
            s.extend_from_slice(&id.to_be_bytes());
            s.extend_from_slice(&seq.to_be_bytes());
            (if v6 { PROTO_ICMPV6 } else { PROTO_ICMP }, s, 2)
        }
    };
    seg.extend_from_slice(payload);
    let acc = if proto == PROTO_ICMP {
        0
    } else {
        pseudo_sum(src, dst, proto, seg.len())
    };
    let mut c = fold(sum16(&seg, acc));
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    (proto, seg)
}

/// Wrap a transport segment in an IPv4 or IPv6 header.
pub fn ip_wrap(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + seg.len();
            assert!(total <= 65535, "IPv4 packet too large");
            let mut p = Vec::with_capacity(total);
            p.push(0x45);
            p.push(0);
            p.extend_from_slice(&(total as u16).to_be_bytes());
            p.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
            p.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
            p.push(64); // TTL
            p.push(proto);
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(seg);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Vec::with_capacity(40 + seg.len());
            p.extend_from_slice(&0x6000_0000u32.to_be_bytes());
            p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            p.push(proto);
            p.push(64); // hop limit
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(seg);
            p
        }
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// A complete IP packet.
pub fn build(src: IpAddr, dst: IpAddr, l4: L4, payload: &[u8]) -> Vec<u8> {
    let (proto, seg) = transport(src, dst, &l4, payload);
    ip_wrap(src, dst, proto, &seg)
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad address {s}"))
}

/// UDP packet; addresses as strings (v4 or v6).
pub fn udp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    build(addr(src), addr(dst), L4::Udp { sport, dport }, payload)
}

/// TCP segment with the given flags.
pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    build(
        addr(src),
        addr(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1000,
            ack: 0,
        },
        payload,
    )
}

/// ICMP / ICMPv6 echo request.
pub fn ping(src: &str, dst: &str, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    build(
        addr(src),
        addr(dst),
        L4::Echo {
            id,
            seq,
            reply: false,
        },
        payload,
    )
}

/// Some kinds of malformed packets.
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
    pub protocol: u8,
    /// Transport payload (after the UDP/TCP/ICMP header).
    pub payload: Vec<u8>,
}

/// Parse a packet built by this module (IPv4 without options / IPv6 without extension
/// headers). Returns None if it does not look like one.
pub fn parse(p: &[u8]) -> Option<Summary> {
    let version = *p.first()? >> 4;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match version {
        4 => {
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*p.get(2)?, *p.get(3)?]) as usize;
            if ihl < 20 || p.len() < total || total < ihl {
                return None;
            }
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            (s.into(), d.into(), p[9], &p[ihl..total])
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let plen = u16::from_be_bytes([p[4], p[5]]) as usize;
            if p.len() < 40 + plen {
                return None;
            }
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            (s.into(), d.into(), p[6], &p[40..40 + plen])
        }
        _ => return None,
    };
    let hdr = match proto {
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        PROTO_TCP => ((*l4.get(12)? >> 4) as usize) * 4,
        _ => 0,
    };
    Some(Summary {
        version,
        src,
        dst,
        protocol: proto,
        payload: l4.get(hdr..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_udp_layout_and_checksums() {
        let p = udp("198.18.0.1", "198.18.0.2", 1234, 5678, b"hello");
        assert_eq!(p.len(), 20 + 8 + 5);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum verifies");
        let acc = pseudo_sum(addr("198.18.0.1"), addr("198.18.0.2"), PROTO_UDP, 13);
        assert_eq!(fold(sum16(&p[20..], acc)), 0, "UDP checksum verifies");
        let s = parse(&p).unwrap();
        assert_eq!(s.payload, b"hello");
        assert_eq!(s.protocol, PROTO_UDP);
    }

    #[test]
    fn ipv6_tcp_and_icmp() {
        let p = tcp(
            "fd00:5067:7670::1",
            "fd00:5067:7670::2",
            40000,
            80,
            TCP_SYN,
            b"",
        );
        assert_eq!(p.len(), 40 + 20);
        assert_eq!(p[6], PROTO_TCP);
        let acc = pseudo_sum(
            addr("fd00:5067:7670::1"),
            addr("fd00:5067:7670::2"),
            PROTO_TCP,
            20,
        );
        assert_eq!(fold(sum16(&p[40..], acc)), 0);
        let e = ping("fd00:5067:7670::1", "fd00:5067:7670::2", 7, 1, b"abc");
        assert_eq!(e[40], 128);
        assert_eq!(parse(&e).unwrap().payload, b"abc");
        let e4 = ping("198.18.0.1", "198.18.0.2", 7, 1, b"abcd");
        assert_eq!(e4[20], 8);
        assert_eq!(checksum(&e4[20..]), 0);
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
