//! `pgvpn_core::decode` on arbitrary bytes: it runs inside PostgreSQL for every packet,
//! so it must never panic, and an `Ok` must describe exactly the bytes it was given.
//! Beyond that, every field it reports is checked against the raw bytes by a reading
//! written independently of etherparse (fixed offsets from RFC 791 / 8200 / 793 / 768).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgvpn_core::{decode, Header};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fuzz_target!(|p: &[u8]| {
    let h = match decode(p) {
        Ok(h) => h,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(usize::from(h.length), p.len(), "{h:?}");
    let json = h.to_json();
    assert_eq!(json["length"].as_u64(), Some(p.len() as u64));

    // Exactly one packet: one byte more or less never decodes.
    let mut longer = p.to_vec();
    longer.push(0);
    assert!(decode(&longer).is_err(), "one byte more decodes: {h:?}");
    assert!(decode(&p[..p.len() - 1]).is_err(), "one byte less decodes");

    assert_eq!(h.ip_version, p[0] >> 4);
    match h.ip_version {
        4 => check_v4(p, &h),
        6 => check_v6(p, &h),
        v => panic!("Ok with IP version {v}"),
    }
    check_field_consistency(&h);
});

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn v4_addr(p: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]))
}

fn v6_addr(p: &[u8], at: usize) -> IpAddr {
    let bytes: [u8; 16] = p[at..at + 16].try_into().unwrap();
    IpAddr::V6(Ipv6Addr::from(bytes))
}

fn check_v4(p: &[u8], h: &Header) {
    let ihl = usize::from(p[0] & 0x0f);
    assert!(
        ihl >= 5 && ihl * 4 <= p.len(),
        "IHL {ihl}, {} bytes",
        p.len()
    );
    assert_eq!(usize::from(be16(p, 2)), p.len(), "total length");
    assert_eq!(h.src_addr, v4_addr(p, 12));
    assert_eq!(h.dst_addr, v4_addr(p, 16));
    assert_eq!(h.protocol, p[9]);
    let flags_offset = be16(p, 6);
    let more_fragments = flags_offset & 0x2000 != 0;
    let offset = flags_offset & 0x1fff;
    assert_eq!(h.fragment, more_fragments || offset != 0);
    if offset == 0 {
        check_transport(h, 4, &p[ihl * 4..]);
    } else {
        assert_no_transport(h);
    }
}

/// The IPv6 extension headers decode walks.
const V6_EXTENSIONS: [u8; 5] = [0, 43, 44, 51, 60];

fn check_v6(p: &[u8], h: &Header) {
    assert!(p.len() >= 40);
    assert_eq!(usize::from(be16(p, 4)) + 40, p.len(), "payload length");
    assert_eq!(h.src_addr, v6_addr(p, 8));
    assert_eq!(h.dst_addr, v6_addr(p, 24));
    let next = p[6];
    if !V6_EXTENSIONS.contains(&next) {
        // No extension header: the upper layer starts right after the fixed header.
        assert_eq!(h.protocol, next);
        assert!(!h.fragment);
        check_transport(h, 6, &p[40..]);
    } else if next == 44 {
        // A fragment header first: always a fragment, and only the first one
        // (offset 0) may have its transport header read.
        assert!(h.fragment);
        let offset = be16(p, 42) >> 3;
        if offset != 0 {
            assert_eq!(h.protocol, p[40], "non-first fragment: its next header");
            assert_no_transport(h);
        } else if !V6_EXTENSIONS.contains(&p[40]) {
            assert_eq!(h.protocol, p[40]);
            check_transport(h, 6, &p[48..]);
        }
    }
}

/// Ports, flags and ICMP type against the upper-layer bytes: all of a header or none.
fn check_transport(h: &Header, version: u8, payload: &[u8]) {
    match (version, h.protocol) {
        (_, 17) => {
            if payload.len() >= 8 {
                assert_eq!(h.src_port, Some(be16(payload, 0)));
                assert_eq!(h.dst_port, Some(be16(payload, 2)));
            } else {
                assert_no_transport(h);
            }
        }
        (_, 6) => {
            let data_offset = payload.get(12).map_or(0, |b| usize::from(b >> 4));
            if payload.len() >= 20 && data_offset >= 5 && payload.len() >= data_offset * 4 {
                assert_eq!(h.src_port, Some(be16(payload, 0)));
                assert_eq!(h.dst_port, Some(be16(payload, 2)));
                let flags = u16::from(payload[13]) | (u16::from(payload[12] & 1) << 8);
                assert_eq!(h.tcp_flags, Some(flags));
            } else {
                assert_no_transport(h);
            }
        }
        (4, 1) | (6, 58) => {
            if let Some(t) = h.icmp_type {
                assert!(payload.len() >= 8);
                assert_eq!(t, payload[0]);
            }
        }
        _ => assert_no_transport(h),
    }
}

fn assert_no_transport(h: &Header) {
    assert_eq!(
        (h.src_port, h.dst_port, h.tcp_flags, h.icmp_type),
        (None, None, None, None),
        "{h:?}"
    );
}

/// What holds whatever the path through the headers was.
fn check_field_consistency(h: &Header) {
    let v4 = h.ip_version == 4;
    assert_eq!(h.src_addr.is_ipv4(), v4);
    assert_eq!(h.dst_addr.is_ipv4(), v4);
    assert_eq!(h.src_port.is_some(), h.dst_port.is_some());
    if h.src_port.is_some() {
        assert!(h.protocol == 6 || h.protocol == 17, "{h:?}");
    }
    if let Some(flags) = h.tcp_flags {
        assert!(h.protocol == 6 && h.src_port.is_some() && flags <= 0x1ff);
    }
    if h.protocol == 6 {
        assert_eq!(h.tcp_flags.is_some(), h.src_port.is_some());
    }
    if h.icmp_type.is_some() {
        assert!(
            (v4 && h.protocol == 1) || (!v4 && h.protocol == 58),
            "{h:?}"
        );
    }
}
