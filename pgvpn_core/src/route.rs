//! Cryptokey-routing without the crypto: WireGuard's AllowedIPs rules.
//!
//! A packet goes to the peer whose prefixes contain its destination (longest prefix
//! wins). A packet is accepted from a sender only if its *source* routes back to that
//! sender, as WireGuard checks inner source addresses: a peer that owns 198.18.0.0/16
//! still cannot forge an address another peer owns more specifically. Lookups use a
//! trie (`ip_network_table`, as boringtun's `AllowedIps` does), so their cost does not
//! grow with the number of peers.
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;
use std::net::IpAddr;

pub type PeerId = i32;

/// Why a packet was not delivered. The names are the `reason` column of the reject log
/// (`sql/schema.sql` checks the same list; a test compares the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    Malformed,
    NoRoute,
    Spoofed,
    Loop,
    /// The receiver has more than `pgvpn.max_backlog` packets waiting unacknowledged.
    Backlog,
}

impl Reject {
    pub const ALL: [Reject; 5] = [
        Reject::Malformed,
        Reject::NoRoute,
        Reject::Spoofed,
        Reject::Loop,
        Reject::Backlog,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::NoRoute => "no_route",
            Reject::Spoofed => "spoofed",
            Reject::Loop => "loop",
            Reject::Backlog => "backlog",
        }
    }
}

/// The routing table: every live peer's allowed prefixes.
#[derive(Default)]
pub struct Table {
    trie: IpNetworkTable<PeerId>,
}

impl Table {
    /// Host bits of a prefix are ignored (`198.18.0.1/24` routes 198.18.0.0/24). The very
    /// same prefix twice keeps the last entry; the SQL API refuses that case anyway.
    pub fn new(entries: impl IntoIterator<Item = (IpNet, PeerId)>) -> Table {
        let mut trie = IpNetworkTable::new();
        for (net, peer) in entries {
            let net = IpNetwork::new_truncate(net.addr(), net.prefix_len())
                .expect("an IpNet's prefix length is valid for its family");
            trie.insert(net, peer);
        }
        Table { trie }
    }

    /// The peer that owns `a` by longest prefix.
    pub fn lookup(&self, a: IpAddr) -> Option<PeerId> {
        self.trie.longest_match(a).map(|(_, &peer)| peer)
    }

    /// Routes one packet from `sender`: the receiving peer, or why not.
    pub fn route(&self, sender: PeerId, src: IpAddr, dst: IpAddr) -> Result<PeerId, Reject> {
        if self.lookup(src) != Some(sender) {
            return Err(Reject::Spoofed);
        }
        match self.lookup(dst) {
            None => Err(Reject::NoRoute),
            Some(peer) if peer == sender => Err(Reject::Loop),
            Some(peer) => Ok(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> Table {
        Table::new(
            [
                ("198.18.0.1/32", 1),
                ("198.18.0.2/32", 2),
                ("198.18.0.0/16", 3), // a gateway for the rest of the /16
                ("fd00::1/128", 1),
                ("fd00::/64", 2),
            ]
            .map(|(p, id)| (cidr::parse(p).unwrap(), id)),
        )
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(t.lookup(ip("198.18.0.2")), Some(2));
        assert_eq!(t.lookup(ip("198.18.7.7")), Some(3));
        assert_eq!(t.lookup(ip("198.19.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(1));
        assert_eq!(t.lookup(ip("fd00::2")), Some(2));
        assert_eq!(t.lookup(ip("fd01::2")), None);
        // families never mix, even for a default route
        let d = Table::new([(cidr::parse("0.0.0.0/0").unwrap(), 9)]);
        assert_eq!(d.lookup(ip("203.0.113.9")), Some(9));
        assert_eq!(d.lookup(ip("::1")), None);
    }

    #[test]
    fn routes_and_rejects() {
        let t = table();
        assert_eq!(t.route(1, ip("198.18.0.1"), ip("198.18.0.2")), Ok(2));
        assert_eq!(t.route(1, ip("198.18.0.1"), ip("198.18.9.9")), Ok(3));
        assert_eq!(
            t.route(1, ip("198.18.0.1"), ip("203.0.113.1")),
            Err(Reject::NoRoute)
        );
        assert_eq!(
            t.route(1, ip("198.18.0.1"), ip("198.18.0.1")),
            Err(Reject::Loop)
        );
        // Source owned by someone else, or by nobody: spoofed.
        assert_eq!(
            t.route(1, ip("198.18.0.2"), ip("198.18.0.2")),
            Err(Reject::Spoofed)
        );
        assert_eq!(
            t.route(1, ip("203.0.113.1"), ip("198.18.0.2")),
            Err(Reject::Spoofed)
        );
        // The /16 gateway cannot claim an address a /32 peer owns.
        assert_eq!(
            t.route(3, ip("198.18.0.1"), ip("198.18.0.2")),
            Err(Reject::Spoofed)
        );
        assert_eq!(t.route(3, ip("198.18.5.5"), ip("198.18.0.2")), Ok(2));
        assert_eq!(t.route(1, ip("fd00::1"), ip("fd00::9")), Ok(2));
    }

    #[test]
    fn host_bits_are_ignored() {
        let t = Table::new([(cidr::parse("198.18.0.1/24").unwrap(), 4)]);
        assert_eq!(t.lookup(ip("198.18.0.200")), Some(4));
    }

    /// The trie agrees with a linear longest-prefix scan on random tables.
    #[test]
    fn agrees_with_a_linear_scan() {
        let mut rng = crate::rng::Rng::new(42);
        for _ in 0..50 {
            let mut entries = Vec::new();
            for id in 0..40 {
                let addr = IpAddr::from([198, 18, rng.below(4) as u8, rng.below(256) as u8]);
                let len = 16 + rng.below(17) as u8;
                entries.push((IpNet::new(addr, len).unwrap().trunc(), id));
            }
            entries.dedup_by_key(|e| e.0);
            let t = Table::new(entries.clone());
            for _ in 0..200 {
                let a = IpAddr::from([198, 18, rng.below(4) as u8, rng.below(256) as u8]);
                let linear = entries
                    .iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|&(n, id)| {
                        // the same prefix twice: the last one wins, as in the trie
                        entries
                            .iter()
                            .rev()
                            .find(|(m, _)| *m == n)
                            .map_or(id, |e| e.1)
                    });
                assert_eq!(t.lookup(a), linear, "{a} in {entries:?}");
            }
        }
    }
}
