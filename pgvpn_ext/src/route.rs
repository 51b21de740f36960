//! Cryptokey-routing without the crypto: WireGuard's AllowedIPs rules, pure Rust.
//!
//! A packet goes to the peer whose prefixes contain its destination (longest prefix
//! wins). A packet is accepted from a sender only if its *source* routes back to that
//! sender, as WireGuard checks inner source addresses: a peer that owns
//! 198.18.0.0/16 still cannot forge an address another peer owns more specifically.
use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

pub type PeerId = i32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = String;

    /// Parses Postgres `cidr` text output: `198.18.0.0/15`, `fd00::/64`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("no prefix length in {s:?}"))?;
        let addr: IpAddr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix length over {max}"));
        }
        Ok(Prefix { addr, len })
    }
}

/// Why a packet was not delivered. The names are the `reason` column of the reject log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    Malformed,
    NoRoute,
    Spoofed,
    Loop,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::NoRoute => "no_route",
            Reject::Spoofed => "spoofed",
            Reject::Loop => "loop",
        }
    }
}

#[derive(Debug, Default)]
pub struct Table {
    /// Longest prefixes first, so the first match is the longest-prefix match.
    entries: Vec<(Prefix, PeerId)>,
}

impl Table {
    pub fn new(mut entries: Vec<(Prefix, PeerId)>) -> Table {
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len));
        Table { entries }
    }

    pub fn lookup(&self, a: IpAddr) -> Option<PeerId> {
        self.entries
            .iter()
            .find(|(p, _)| p.contains(a))
            .map(|&(_, peer)| peer)
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

/// Remembers lookups for one batch: a batch is mostly a few flows, and the table is a
/// linear scan.
pub struct Router<'t> {
    table: &'t Table,
    sender: PeerId,
    memo: HashMap<(IpAddr, IpAddr), Result<PeerId, Reject>>,
}

impl<'t> Router<'t> {
    pub fn new(table: &'t Table, sender: PeerId) -> Self {
        Router {
            table,
            sender,
            memo: HashMap::new(),
        }
    }

    pub fn route(&mut self, src: IpAddr, dst: IpAddr) -> Result<PeerId, Reject> {
        let (table, sender) = (self.table, self.sender);
        *self
            .memo
            .entry((src, dst))
            .or_insert_with(|| table.route(sender, src, dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> Table {
        Table::new(vec![
            ("198.18.0.1/32".parse().unwrap(), 1),
            ("198.18.0.2/32".parse().unwrap(), 2),
            ("198.18.0.0/16".parse().unwrap(), 3), // a gateway for the rest of the /16
            ("fd00::1/128".parse().unwrap(), 1),
            ("fd00::/64".parse().unwrap(), 2),
        ])
    }

    #[test]
    fn parses_cidr_text() {
        assert_eq!("10.0.0.0/8".parse::<Prefix>().unwrap().len, 8);
        assert!("10.0.0.0".parse::<Prefix>().is_err());
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("fd00::/129".parse::<Prefix>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Prefix>()
            .unwrap()
            .contains(ip("203.0.113.9")));
        assert!(!"0.0.0.0/0".parse::<Prefix>().unwrap().contains(ip("::1")));
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
    fn router_memo_agrees_with_table() {
        let t = table();
        let mut r = Router::new(&t, 1);
        for _ in 0..3 {
            assert_eq!(r.route(ip("198.18.0.1"), ip("198.18.0.2")), Ok(2));
            assert_eq!(
                r.route(ip("198.18.0.2"), ip("198.18.0.2")),
                Err(Reject::Spoofed)
            );
        }
    }
}
