//! Decode one raw IP packet, exactly as a Linux tun device with IFF_NO_PI
//! hands it over (no link-layer header), into the header fields pgvpn logs.
//!
//! It runs inside PostgreSQL (pgvpn_ext calls it for every packet), so it
//! must never panic: all parsing goes through etherparse's bounds-checked
//! slice types, and the only indexing we do ourselves uses `get`. The fuzz
//! target `decode` (`make fuzz`) holds it to that.
//!
//! Policy: the IP layer is validated strictly (a VPN audit log must be
//! exact, and tun always delivers exactly one whole packet), while the
//! transport layer is best effort (see `read_transport`). Checksums are
//! never verified: with tun offloads they may legitimately be partial, and
//! the receiving kernel validates them anyway.

use std::fmt;
use std::net::IpAddr;

use crate::limits::MAX_PACKET;

use etherparse::{
    err, ip_number, Icmpv4Slice, Icmpv6Slice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice,
    Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, TcpHeaderSlice,
    UdpHeaderSlice,
};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub ip_version: u8,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    /// IPv4: the protocol field as is. IPv6: the upper-layer protocol after
    /// all extension headers (for a non-first fragment: the fragment
    /// header's next header, since nothing after it is visible).
    pub protocol: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub icmp_type: Option<u8>,
    /// FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10 URG=0x20 ECE=0x40 CWR=0x80 NS=0x100
    pub tcp_flags: Option<u16>,
    pub length: u16,
    pub fragment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    /// Larger than any IPv4 packet or non-jumbo IPv6 packet we log.
    TooLong {
        len: usize,
    },
    BadVersion(u8),
    /// A header (named by `what`) needs more bytes than are present.
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    Ipv4HeaderLengthTooSmall {
        ihl: u8,
    },
    Ipv4TotalLengthMismatch {
        total_len: u16,
        packet_len: usize,
    },
    Ipv6PayloadLengthMismatch {
        payload_len: u16,
        packet_len: usize,
    },
    /// payload_length 0 with data behind the header: a jumbogram (RFC 2675),
    /// which tun never delivers with a 16-bit length; we refuse to guess.
    Ipv6Jumbogram {
        packet_len: usize,
    },
    Ipv6HopByHopNotFirst,
    Ipv6AuthHeaderZeroLength,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecodeError::*;
        match self {
            Empty => write!(f, "empty packet"),
            TooLong { len } => write!(f, "packet of {len} bytes exceeds {MAX_PACKET}"),
            BadVersion(v) => write!(f, "IP version {v} is not 4 or 6"),
            Truncated { what, need, got } => {
                write!(f, "truncated: {what} needs {need} bytes, got {got}")
            }
            Ipv4HeaderLengthTooSmall { ihl } => {
                write!(f, "IPv4 header length (IHL) {ihl} is less than 5")
            }
            Ipv4TotalLengthMismatch {
                total_len,
                packet_len,
            } => write!(
                f,
                "IPv4 total length {total_len} does not match packet size {packet_len}"
            ),
            Ipv6PayloadLengthMismatch {
                payload_len,
                packet_len,
            } => write!(
                f,
                "IPv6 payload length {payload_len} + 40 does not match packet size {packet_len}"
            ),
            Ipv6Jumbogram { packet_len } => write!(
                f,
                "IPv6 payload length 0 (jumbogram) is not supported, packet size {packet_len}"
            ),
            Ipv6HopByHopNotFirst => {
                write!(
                    f,
                    "IPv6 hop-by-hop header not directly after the fixed header"
                )
            }
            Ipv6AuthHeaderZeroLength => write!(f, "IPv6 authentication header has length 0"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn truncated(what: &'static str, e: err::LenError) -> DecodeError {
    DecodeError::Truncated {
        what,
        need: e.required_len,
        got: e.len,
    }
}

/// Decode one whole IP packet. See the module docs for the policy.
pub fn decode(packet: &[u8]) -> Result<Header, DecodeError> {
    let first = *packet.first().ok_or(DecodeError::Empty)?;
    // `length` is a u16 and neither IPv4 nor non-jumbo IPv6 can express more.
    if packet.len() > MAX_PACKET {
        return Err(DecodeError::TooLong { len: packet.len() });
    }
    let length = packet.len() as u16; // MAX_PACKET fits
    match first >> 4 {
        4 => decode_v4(packet, length),
        6 => decode_v6(packet, length),
        v => Err(DecodeError::BadVersion(v)),
    }
}

fn decode_v4(packet: &[u8], length: u16) -> Result<Header, DecodeError> {
    use err::ipv4::{HeaderError, HeaderSliceError};
    // etherparse checks IHL >= 5 and that the header incl. options fits.
    let ip = Ipv4HeaderSlice::from_slice(packet).map_err(|e| match e {
        HeaderSliceError::Len(e) => truncated("IPv4 header", e),
        HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number }) => {
            DecodeError::BadVersion(version_number)
        }
        HeaderSliceError::Content(HeaderError::HeaderLengthSmallerThanHeader { ihl }) => {
            DecodeError::Ipv4HeaderLengthTooSmall { ihl }
        }
    })?;
    // etherparse only requires total_len <= slice len (it ignores trailing
    // bytes), but tun delivers exactly one packet, so anything else is
    // malformed. Equality also implies total_len >= header length here.
    if ip.total_len() != length {
        return Err(DecodeError::Ipv4TotalLengthMismatch {
            total_len: ip.total_len(),
            packet_len: packet.len(),
        });
    }
    let offset = ip.fragments_offset().value();
    let mut h = Header {
        ip_version: 4,
        src_addr: ip.source_addr().into(),
        dst_addr: ip.destination_addr().into(),
        // The raw protocol field: we do not look through IPv4 AH (51).
        protocol: ip.protocol().0,
        src_port: None,
        dst_port: None,
        icmp_type: None,
        tcp_flags: None,
        length,
        fragment: ip.more_fragments() || offset != 0,
    };
    // Only the first fragment (offset 0) carries the transport header.
    if offset == 0 {
        let payload = packet.get(ip.slice().len()..).unwrap_or_default();
        read_transport(&mut h, payload);
    }
    Ok(h)
}

fn decode_v6(packet: &[u8], length: u16) -> Result<Header, DecodeError> {
    use err::ipv6::{HeaderError, HeaderSliceError};
    let ip = Ipv6HeaderSlice::from_slice(packet).map_err(|e| match e {
        HeaderSliceError::Len(e) => truncated("IPv6 header", e),
        HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number }) => {
            DecodeError::BadVersion(version_number)
        }
    })?;
    // etherparse treats payload_length 0 as "jumbogram, use the rest of the
    // slice" and ignores trailing bytes; we want an exact match instead.
    // A bare 40-byte header with payload_length 0 (e.g. next header 59,
    // "no next header") does match exactly and is accepted.
    let payload_len = ip.payload_length();
    if payload_len == 0 && packet.len() > 40 {
        return Err(DecodeError::Ipv6Jumbogram {
            packet_len: packet.len(),
        });
    }
    if usize::from(payload_len) + 40 != packet.len() {
        return Err(DecodeError::Ipv6PayloadLengthMismatch {
            payload_len,
            packet_len: packet.len(),
        });
    }

    // Walk the extension headers ourselves (with etherparse's per-header
    // slices) instead of using Ipv6ExtensionsSlice, because the latter keeps
    // parsing past a fragment header: in a non-first fragment the bytes
    // after it are mid-datagram data, not headers.
    let mut next = ip.next_header();
    let mut rest = packet.get(40..).unwrap_or_default();
    let mut fragment = false;
    let mut first_fragment = true;
    let mut at_start = true;
    loop {
        let consumed = match next {
            ip_number::IPV6_HOP_BY_HOP if !at_start => {
                return Err(DecodeError::Ipv6HopByHopNotFirst)
            }
            ip_number::IPV6_HOP_BY_HOP | ip_number::IPV6_ROUTE | ip_number::IPV6_DEST_OPTIONS => {
                let what = match next {
                    ip_number::IPV6_HOP_BY_HOP => "IPv6 hop-by-hop options header",
                    ip_number::IPV6_ROUTE => "IPv6 routing header",
                    _ => "IPv6 destination options header",
                };
                let ext =
                    Ipv6RawExtHeaderSlice::from_slice(rest).map_err(|e| truncated(what, e))?;
                next = ext.next_header();
                ext.slice().len()
            }
            ip_number::IPV6_FRAG => {
                let frag = Ipv6FragmentHeaderSlice::from_slice(rest)
                    .map_err(|e| truncated("IPv6 fragment header", e))?;
                // Any fragment header counts, even an "atomic" one (offset 0,
                // M=0), because it is on the wire and the log should say so.
                fragment = true;
                first_fragment = frag.fragment_offset().value() == 0;
                next = frag.next_header();
                frag.slice().len()
            }
            // AH is an IPv6 extension header (RFC 8200 §4) and is not
            // encrypted, so the transport header behind it is readable.
            // ESP (50) is opaque and ends the walk like any upper layer.
            ip_number::AUTH => {
                use err::ip_auth::{HeaderError, HeaderSliceError};
                let ah = IpAuthHeaderSlice::from_slice(rest).map_err(|e| match e {
                    HeaderSliceError::Len(e) => truncated("IPv6 authentication header", e),
                    HeaderSliceError::Content(HeaderError::ZeroPayloadLen) => {
                        DecodeError::Ipv6AuthHeaderZeroLength
                    }
                })?;
                next = ah.next_header();
                ah.slice().len()
            }
            _ => break,
        };
        rest = rest.get(consumed..).unwrap_or_default();
        at_start = false;
        // Stop at a non-first fragment: `next` is then the first header of
        // the fragmentable part and its bytes are not in this packet.
        if !first_fragment {
            break;
        }
    }

    let mut h = Header {
        ip_version: 6,
        src_addr: ip.source_addr().into(),
        dst_addr: ip.destination_addr().into(),
        protocol: next.0,
        src_port: None,
        dst_port: None,
        icmp_type: None,
        tcp_flags: None,
        length,
        fragment,
    };
    if first_fragment {
        read_transport(&mut h, rest);
    }
    Ok(h)
}

/// Fill ports / ICMP type / TCP flags from the upper-layer header, if the
/// whole transport header is present and well-formed.
///
/// A missing or malformed transport header is NOT an error: the IP header
/// was valid, so the packet is routable and must still be logged (and a
/// first fragment may legitimately be too short). The fields stay None,
/// which is the honest answer. Partial headers are not half-read either:
/// we report all of a header or none of it.
fn read_transport(h: &mut Header, payload: &[u8]) {
    match (h.ip_version, IpNumber(h.protocol)) {
        (_, ip_number::TCP) => {
            if let Ok(tcp) = TcpHeaderSlice::from_slice(payload) {
                h.src_port = Some(tcp.source_port());
                h.dst_port = Some(tcp.destination_port());
                h.tcp_flags = Some(tcp_flags(&tcp));
            }
        }
        (_, ip_number::UDP) => {
            // Header only: UdpSlice would also check the UDP length field,
            // which covers the whole datagram and so fails on first fragments.
            if let Ok(udp) = UdpHeaderSlice::from_slice(payload) {
                h.src_port = Some(udp.source_port());
                h.dst_port = Some(udp.destination_port());
            }
        }
        (4, ip_number::ICMP) => {
            h.icmp_type = Icmpv4Slice::from_slice(payload).ok().map(|s| s.type_u8())
        }
        (6, ip_number::IPV6_ICMP) => {
            h.icmp_type = Icmpv6Slice::from_slice(payload).ok().map(|s| s.type_u8())
        }
        _ => {}
    }
}

/// Flag names in wire bit order (bit 0 = FIN ... bit 8 = NS).
const TCP_FLAG_NAMES: [&str; 9] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS"];

fn tcp_flags(tcp: &TcpHeaderSlice<'_>) -> u16 {
    [
        tcp.fin(),
        tcp.syn(),
        tcp.rst(),
        tcp.psh(),
        tcp.ack(),
        tcp.urg(),
        tcp.ece(),
        tcp.cwr(),
        tcp.ns(),
    ]
    .iter()
    .enumerate()
    .fold(0, |acc, (bit, &set)| acc | (u16::from(set) << bit))
}

impl Header {
    /// JSON object for SQL `pgvpn.decode(bytea) returns jsonb`.
    pub fn to_json(&self) -> Value {
        let protocol_name = match self.protocol {
            6 => Some("tcp"),
            17 => Some("udp"),
            1 => Some("icmp"),
            58 => Some("icmpv6"),
            _ => None,
        };
        let tcp_flag_names = self.tcp_flags.map(|flags| {
            TCP_FLAG_NAMES
                .iter()
                .enumerate()
                .filter(|(bit, _)| flags & (1 << bit) != 0)
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
        });
        json!({
            "ip_version": self.ip_version,
            "src_addr": self.src_addr.to_string(),
            "dst_addr": self.dst_addr.to_string(),
            "protocol": self.protocol,
            "protocol_name": protocol_name,
            "src_port": self.src_port,
            "dst_port": self.dst_port,
            "icmp_type": self.icmp_type,
            "tcp_flags": self.tcp_flags,
            "tcp_flag_names": tcp_flag_names,
            "length": self.length,
            "fragment": self.fragment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex with free whitespace, so captures can be laid out by header field.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    // Hand-written captures; checksums are valid although decode ignores them.

    /// 10.0.0.2:54321 -> 93.184.216.34:443 TCP SYN with MSS/SACK/TS/WS options.
    const V4_TCP_SYN: &str = "
        45 00 003c 1c46 4000 40 06 de99 0a000002 5db8d822
        d431 01bb 6b8b4567 00000000 a0 02 faf0 a411 0000
        020405b4 0402 080a 0001e240 00000000 01 030307";
    /// 10.0.0.2:53000 -> 1.1.1.1:53 UDP DNS query for example.com A.
    const V4_UDP_DNS: &str = "
        45 00 0039 beef 0000 40 11 afc1 0a000002 01010101
        cf08 0035 0025 a927
        abcd 0100 0001 0000 0000 0000 076578616d706c6503636f6d00 0001 0001";
    /// 10.0.0.2 -> 8.8.8.8 ICMP echo request id 0x1234 seq 1.
    const V4_ICMP_ECHO: &str = "
        45 00 0024 0001 4000 40 01 20c7 0a000002 08080808
        08 00 6fb0 1234 0001 706776706e212121";
    /// IHL 6: Router Alert option, then UDP 1234 -> 5678.
    const V4_OPTS_UDP: &str = "
        46 00 0022 1c46 0000 01 11 1e7e 0a000002 e0000001 94040000
        04d2 162e 000a 926d 6869";
    /// First fragment (MF, offset 0) of a 32-byte UDP datagram 5000 -> 6000.
    const V4_FRAG_FIRST: &str = "
        45 00 0024 4242 2000 40 11 d8aa 0a000002 5db8d822
        1388 1770 0020 1234 4142434445464748";
    /// Last fragment (offset 2 = 16 bytes) of the same datagram.
    const V4_FRAG_LATER: &str = "
        45 00 0024 4242 0002 40 11 f8a8 0a000002 5db8d822
        494a4b4c4d4e4f505152535455565758";
    /// [fd00::2]:40000 -> [2001:db8::1]:53 UDP DNS query.
    const V6_UDP: &str = "
        6 00 00000 0025 11 40
        fd000000000000000000000000000002 20010db8000000000000000000000001
        9c40 0035 0025 bd36
        abcd 0100 0001 0000 0000 0000 076578616d706c6503636f6d00 0001 0001";
    /// fd00::2 -> 2001:db8::1 ICMPv6 echo request.
    const V6_ICMP_ECHO: &str = "
        6 00 00000 000c 3a 40
        fd000000000000000000000000000002 20010db8000000000000000000000001
        80 00 75e2 0042 0007 70696e67";
    /// Hop-by-hop (PadN) -> destination options (PadN) -> UDP 1111 -> 2222.
    const V6_HBH_DST_UDP: &str = "
        6 00 00000 001c 00 40
        fd000000000000000000000000000002 20010db8000000000000000000000001
        3c 00 0104 00000000
        11 00 0104 00000000
        0457 08ae 000c ef51 64617461";
    /// Fragment header (offset 0, M=1) -> UDP 3333 -> 4444.
    const V6_FRAG_FIRST: &str = "
        6 00 00000 0018 2c 40
        fd000000000000000000000000000002 20010db8000000000000000000000001
        11 00 0001 deadbeef
        0d05 115c 0028 1234 4142434445464748";
    /// Fragment header (offset 2 = 16 bytes, M=0), then mid-datagram data.
    const V6_FRAG_LATER: &str = "
        6 00 00000 0020 2c 40
        fd000000000000000000000000000002 20010db8000000000000000000000001
        11 00 0010 deadbeef
        494a4b4c4d4e4f505152535455565758595a303132333435";

    /// IPv6 TCP SYN+ACK built with etherparse, as a cross-check of our literals.
    fn v6_tcp_synack() -> Vec<u8> {
        let src: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let builder = etherparse::PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .tcp(443, 50000, 0x1000, 65535)
            .syn()
            .ack(0x6b8b4568);
        let mut out = Vec::new();
        builder.write(&mut out, b"").unwrap();
        out
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = [
            V4_TCP_SYN,
            V4_UDP_DNS,
            V4_ICMP_ECHO,
            V4_OPTS_UDP,
            V4_FRAG_FIRST,
            V4_FRAG_LATER,
            V6_UDP,
            V6_ICMP_ECHO,
            V6_HBH_DST_UDP,
            V6_FRAG_FIRST,
            V6_FRAG_LATER,
        ]
        .iter()
        .map(|s| hex(s))
        .collect();
        v.push(v6_tcp_synack());
        v
    }

    #[test]
    fn all_samples_decode_with_exact_length() {
        for p in samples() {
            let h = decode(&p).unwrap_or_else(|e| panic!("{e}: {p:02x?}"));
            assert_eq!(usize::from(h.length), p.len());
        }
    }

    #[test]
    fn ipv4_tcp_syn() {
        let h = decode(&hex(V4_TCP_SYN)).unwrap();
        assert_eq!(
            h,
            Header {
                ip_version: 4,
                src_addr: ip("10.0.0.2"),
                dst_addr: ip("93.184.216.34"),
                protocol: 6,
                src_port: Some(54321),
                dst_port: Some(443),
                icmp_type: None,
                tcp_flags: Some(0x02),
                length: 60,
                fragment: false,
            }
        );
    }

    #[test]
    fn ipv4_udp() {
        let h = decode(&hex(V4_UDP_DNS)).unwrap();
        assert_eq!(
            (h.protocol, h.src_port, h.dst_port),
            (17, Some(53000), Some(53))
        );
        assert_eq!((h.tcp_flags, h.icmp_type, h.fragment), (None, None, false));
        assert_eq!(h.dst_addr, ip("1.1.1.1"));
    }

    #[test]
    fn ipv4_icmp_echo() {
        let h = decode(&hex(V4_ICMP_ECHO)).unwrap();
        assert_eq!((h.protocol, h.icmp_type, h.src_port), (1, Some(8), None));
    }

    #[test]
    fn ipv4_with_options() {
        let p = hex(V4_OPTS_UDP);
        assert_eq!(p[0] & 0x0f, 6);
        let h = decode(&p).unwrap();
        assert_eq!(
            (h.protocol, h.src_port, h.dst_port),
            (17, Some(1234), Some(5678))
        );
    }

    #[test]
    fn ipv4_fragments() {
        let first = decode(&hex(V4_FRAG_FIRST)).unwrap();
        assert!(first.fragment);
        assert_eq!(
            (first.protocol, first.src_port, first.dst_port),
            (17, Some(5000), Some(6000))
        );

        let later = decode(&hex(V4_FRAG_LATER)).unwrap();
        assert!(later.fragment);
        // The payload starts with "IJKL": must not be read as ports.
        assert_eq!(
            (later.protocol, later.src_port, later.dst_port),
            (17, None, None)
        );
    }

    #[test]
    fn ipv4_truncated_transport_is_ok_without_ports() {
        // Unfragmented TCP packet with only 8 of 20 TCP header bytes.
        let mut p = hex(V4_TCP_SYN)[..28].to_vec();
        p[3] = 28;
        let h = decode(&p).unwrap();
        assert_eq!(
            (h.protocol, h.src_port, h.tcp_flags, h.fragment),
            (6, None, None, false)
        );
    }

    #[test]
    fn ipv6_tcp() {
        let h = decode(&v6_tcp_synack()).unwrap();
        assert_eq!(h.ip_version, 6);
        assert_eq!((h.src_addr, h.dst_addr), (ip("fd00::2"), ip("2001:db8::1")));
        assert_eq!(
            (h.protocol, h.src_port, h.dst_port),
            (6, Some(443), Some(50000))
        );
        assert_eq!(h.tcp_flags, Some(0x12));
        assert_eq!((h.length, h.fragment), (60, false));
    }

    #[test]
    fn ipv6_udp() {
        let h = decode(&hex(V6_UDP)).unwrap();
        assert_eq!(
            (h.protocol, h.src_port, h.dst_port),
            (17, Some(40000), Some(53))
        );
        assert_eq!(h.length, 77);
    }

    #[test]
    fn ipv6_icmpv6_echo() {
        let h = decode(&hex(V6_ICMP_ECHO)).unwrap();
        assert_eq!((h.protocol, h.icmp_type, h.src_port), (58, Some(128), None));
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        let h = decode(&hex(V6_HBH_DST_UDP)).unwrap();
        assert_eq!(
            (h.protocol, h.src_port, h.dst_port),
            (17, Some(1111), Some(2222))
        );
        assert!(!h.fragment);
    }

    #[test]
    fn ipv6_fragments() {
        let first = decode(&hex(V6_FRAG_FIRST)).unwrap();
        assert!(first.fragment);
        assert_eq!(
            (first.protocol, first.src_port, first.dst_port),
            (17, Some(3333), Some(4444))
        );

        let later = decode(&hex(V6_FRAG_LATER)).unwrap();
        assert!(later.fragment);
        assert_eq!(
            (later.protocol, later.src_port, later.dst_port),
            (17, None, None)
        );

        // A non-first fragment whose fragmentable part starts with a
        // destination options header: its data must not be parsed as one.
        let mut p = hex(V6_FRAG_LATER);
        p[40] = 60;
        let h = decode(&p).unwrap();
        assert_eq!((h.protocol, h.fragment, h.src_port), (60, true, None));
    }

    #[test]
    fn malformed_packets_are_rejected() {
        use DecodeError::*;
        let syn = hex(V4_TCP_SYN);
        let v6 = hex(V6_UDP);

        assert_eq!(decode(&[]), Err(Empty));

        let mut v5 = syn.clone();
        v5[0] = 0x55;
        assert_eq!(decode(&v5), Err(BadVersion(5)));

        assert_eq!(
            decode(&syn[..12]),
            Err(Truncated {
                what: "IPv4 header",
                need: 20,
                got: 12
            })
        );

        let mut ihl4 = syn.clone();
        ihl4[0] = 0x44;
        assert_eq!(decode(&ihl4), Err(Ipv4HeaderLengthTooSmall { ihl: 4 }));

        // Header says 60 bytes, only 40 arrived.
        assert_eq!(
            decode(&syn[..40]),
            Err(Ipv4TotalLengthMismatch {
                total_len: 60,
                packet_len: 40
            })
        );
        // Header says 60 bytes, 64 arrived (trailing garbage).
        let mut long = syn.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode(&long),
            Err(Ipv4TotalLengthMismatch {
                total_len: 60,
                packet_len: 64
            })
        );

        assert_eq!(
            decode(&v6[..30]),
            Err(Truncated {
                what: "IPv6 header",
                need: 40,
                got: 30
            })
        );

        let mut bad_plen = v6.clone();
        bad_plen[5] += 1;
        assert_eq!(
            decode(&bad_plen),
            Err(Ipv6PayloadLengthMismatch {
                payload_len: 0x26,
                packet_len: 77
            })
        );

        let mut jumbo = v6.clone();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(decode(&jumbo), Err(Ipv6Jumbogram { packet_len: 77 }));

        let mut huge = syn.clone();
        huge.resize(70_000, 0);
        assert_eq!(decode(&huge), Err(TooLong { len: 70_000 }));

        // Destination options header claiming 24 bytes with only 20 left.
        let mut ext = hex(V6_HBH_DST_UDP);
        ext[49] = 2;
        assert_eq!(
            decode(&ext),
            Err(Truncated {
                what: "IPv6 destination options header",
                need: 24,
                got: 20
            })
        );

        // Hop-by-hop is only allowed first.
        let mut hbh_late = hex(V6_HBH_DST_UDP);
        hbh_late[48] = 0;
        assert_eq!(decode(&hbh_late), Err(Ipv6HopByHopNotFirst));
    }

    #[test]
    fn error_messages() {
        assert_eq!(DecodeError::Empty.to_string(), "empty packet");
        assert_eq!(
            DecodeError::BadVersion(5).to_string(),
            "IP version 5 is not 4 or 6"
        );
        assert_eq!(
            decode(&hex(V4_TCP_SYN)[..12]).unwrap_err().to_string(),
            "truncated: IPv4 header needs 20 bytes, got 12"
        );
        assert_eq!(
            decode(&hex(V4_TCP_SYN)[..40]).unwrap_err().to_string(),
            "IPv4 total length 60 does not match packet size 40"
        );
    }

    #[test]
    fn json_view() {
        let j = decode(&hex(V4_TCP_SYN)).unwrap().to_json();
        assert_eq!(
            j,
            json!({
                "ip_version": 4, "src_addr": "10.0.0.2", "dst_addr": "93.184.216.34",
                "protocol": 6, "protocol_name": "tcp", "src_port": 54321, "dst_port": 443,
                "icmp_type": null, "tcp_flags": 2, "tcp_flag_names": ["SYN"],
                "length": 60, "fragment": false,
            })
        );
        let j = decode(&v6_tcp_synack()).unwrap().to_json();
        assert_eq!(j["tcp_flag_names"], json!(["SYN", "ACK"]));
        let j = decode(&hex(V6_ICMP_ECHO)).unwrap().to_json();
        assert_eq!(
            (&j["protocol_name"], &j["icmp_type"]),
            (&json!("icmpv6"), &json!(128))
        );
        assert_eq!(
            (&j["src_port"], &j["tcp_flags"], &j["tcp_flag_names"]),
            (&Value::Null, &Value::Null, &Value::Null)
        );
        let mut p = hex(V4_TCP_SYN);
        p[9] = 47; // GRE: no name
        assert_eq!(decode(&p).unwrap().to_json()["protocol_name"], Value::Null);
    }

    /// Cheap fuzzing: every prefix, random byte flips of every sample and
    /// random strings must decode or error, never panic. Ok results must
    /// always cover the whole input.
    #[test]
    fn never_panics() {
        let mut gen = crate::rng::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut rng = move || gen.next_u64();
        let check = |p: &[u8]| {
            if let Ok(h) = decode(p) {
                assert_eq!(usize::from(h.length), p.len());
            }
        };
        for sample in samples() {
            for n in 0..=sample.len() {
                check(&sample[..n]);
            }
            for _ in 0..2000 {
                let mut p = sample.clone();
                for _ in 0..1 + rng() % 4 {
                    let i = (rng() as usize) % p.len();
                    p[i] = rng() as u8;
                }
                check(&p);
            }
        }
        for _ in 0..20_000 {
            let len = (rng() % 120) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| rng() as u8).collect();
            // Steer half of them past the version check.
            if let Some(b) = p.first_mut() {
                if rng() % 2 == 0 {
                    *b = if rng() % 2 == 0 { 0x45 } else { 0x60 };
                }
            }
            check(&p);
        }
    }
}
