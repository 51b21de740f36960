//! `pgvpn_core::route::Table` built from arbitrary prefixes (IPv4 and IPv6, every
//! length, host bits set, duplicates) against a linear longest-prefix scan, and
//! `Table::route` against its definition.
//!
//! Addresses are steered towards the table's own prefixes (an entry's address with one
//! bit flipped, or the same bytes in the other family) so that lookups land on prefix
//! boundaries and on the IPv4/IPv6 seam rather than mostly on empty space.
#![no_main]

use arbitrary::Arbitrary;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use pgvpn_core::{PeerId, Reject, Table};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<Entry>,
    lookups: Vec<Addr>,
    routes: Vec<(u8, Addr, Addr)>,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    addr: Addr,
    /// Reduced modulo (the family's maximum + 1): every length, 0 and the maximum too.
    len: u8,
    peer: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
    /// Entry `index` (modulo the count) with bit `bit` (modulo the width) flipped.
    NearEntry {
        index: u8,
        bit: u8,
    },
    /// Entry `index`'s address as is.
    Entry {
        index: u8,
    },
    /// Entry `index`'s bytes in the other family (IPv4-mapped IPv6, or the IPv6
    /// address's last four bytes): a lookup must never cross families.
    OtherFamily {
        index: u8,
    },
}

/// A small set of peers, so that the same peer owns several prefixes and `route`'s
/// sender often matches (loop) or nearly matches (spoofed) an owner.
fn peer(b: u8) -> PeerId {
    PeerId::from(b % 6) - 1
}

fn resolve(a: Addr, entries: &[(IpNet, PeerId)]) -> IpAddr {
    let pick = |index: u8| entries.get(usize::from(index) % entries.len().max(1));
    match a {
        Addr::V4(b) => IpAddr::from(b),
        Addr::V6(b) => IpAddr::from(b),
        Addr::Entry { index } => pick(index).map_or(IpAddr::from([0u8; 4]), |e| e.0.addr()),
        Addr::NearEntry { index, bit } => match pick(index).map(|e| e.0.addr()) {
            Some(IpAddr::V4(v4)) => {
                IpAddr::V4(Ipv4Addr::from(v4.to_bits() ^ (1u32 << (31 - bit % 32))))
            }
            Some(IpAddr::V6(v6)) => {
                IpAddr::V6(Ipv6Addr::from(v6.to_bits() ^ (1u128 << (127 - bit % 128))))
            }
            None => IpAddr::from([0u8; 16]),
        },
        Addr::OtherFamily { index } => match pick(index).map(|e| e.0.addr()) {
            Some(IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            Some(IpAddr::V6(v6)) => {
                let o = v6.octets();
                IpAddr::from([o[12], o[13], o[14], o[15]])
            }
            None => IpAddr::from([0u8; 16]),
        },
    }
}

/// Longest prefix wins; among entries of that length containing `a` (which are then
/// the very same network) the last one wins. `IpNet::contains` ignores host bits and
/// never matches across families.
fn linear_lookup(entries: &[(IpNet, PeerId)], a: IpAddr) -> Option<PeerId> {
    let mut best: Option<(u8, PeerId)> = None;
    for &(net, id) in entries {
        if net.contains(&a) && best.is_none_or(|(len, _)| net.prefix_len() >= len) {
            best = Some((net.prefix_len(), id));
        }
    }
    best.map(|(_, id)| id)
}

/// `Table::route`'s definition, in terms of the linear lookup.
fn linear_route(
    entries: &[(IpNet, PeerId)],
    sender: PeerId,
    src: IpAddr,
    dst: IpAddr,
) -> Result<PeerId, Reject> {
    if linear_lookup(entries, src) != Some(sender) {
        return Err(Reject::Spoofed);
    }
    match linear_lookup(entries, dst) {
        None => Err(Reject::NoRoute),
        Some(p) if p == sender => Err(Reject::Loop),
        Some(p) => Ok(p),
    }
}

/// Enough for a deep trie with shared prefixes. The edge checks below cost the square of
/// the table size: uncapped, the corpus grew tables of a few hundred entries and ran at
/// about 2,000 inputs a second instead of about 8,000.
const MAX_ENTRIES: usize = 64;

fuzz_target!(|input: Input| {
    // Entries may name earlier entries' addresses, so they resolve one by one.
    let mut entries: Vec<(IpNet, PeerId)> = Vec::with_capacity(MAX_ENTRIES);
    for e in input.entries.iter().take(MAX_ENTRIES) {
        let addr = resolve(e.addr, &entries);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let net = IpNet::new(addr, e.len % (max + 1)).expect("length reduced to its range");
        entries.push((net, peer(e.peer)));
    }
    let table = Table::new(entries.iter().copied());

    let check_lookup = |a: IpAddr| {
        assert_eq!(
            table.lookup(a),
            linear_lookup(&entries, a),
            "lookup({a}) in {entries:?}"
        );
    };
    // Every entry's own address, its network and broadcast ends, and the addresses
    // just outside them: the edges where a trie goes wrong.
    for &(net, _) in &entries {
        check_lookup(net.addr());
        for edge in [net.network(), net.broadcast()] {
            check_lookup(edge);
            for step in [-1i8, 1] {
                if let Some(a) = step_addr(edge, step) {
                    check_lookup(a);
                }
            }
        }
    }
    for &a in &input.lookups {
        check_lookup(resolve(a, &entries));
    }

    for &(sender, src, dst) in &input.routes {
        let (sender, src, dst) = (peer(sender), resolve(src, &entries), resolve(dst, &entries));
        assert_eq!(
            table.route(sender, src, dst),
            linear_route(&entries, sender, src, dst),
            "route({sender}, {src}, {dst}) in {entries:?}"
        );
    }
});

/// `a` plus or minus one, or None past the end of its family's space.
fn step_addr(a: IpAddr, step: i8) -> Option<IpAddr> {
    match a {
        IpAddr::V4(v4) => {
            let b = v4.to_bits();
            let b = if step > 0 {
                b.checked_add(1)
            } else {
                b.checked_sub(1)
            }?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        IpAddr::V6(v6) => {
            let b = v6.to_bits();
            let b = if step > 0 {
                b.checked_add(1)
            } else {
                b.checked_sub(1)
            }?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}
