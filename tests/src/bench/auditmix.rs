//! The traffic `make bench-audit` logs: a small company network of [`SITES`] sites (one
//! peer each, a /24 of hosts), with a few servers per site and [`CLIENTS`] clients, and
//! the packet mix a VPN between them carries — mostly TCP streams (ssh, web, database)
//! whose segments arrive in runs of a few dozen per batch, some DNS and NTP (one flow per
//! query), and pings.
//!
//! Everything here is pure (no database): [`Site::batch`] returns the next batch a
//! site's shim would send, plus the packets the other side of each conversation answers
//! with, which the caller hands to the owner of that site ([`Handoff`]).
//!
//! Sizes are kept small-ish on purpose (mean about 200 bytes per packet, see the test):
//! the log must reach 50M packets on one disk. A packet's payload is a slice of one
//! random buffer: the database never compresses it (`STORAGE EXTERNAL`), so its
//! content does not matter, only its length.

use etherparse::{PacketBuilder, TcpHeader};
use pgvpn_tests::packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN};
use pgvpn_tests::Rng;
use std::collections::VecDeque;
use std::net::Ipv4Addr;

/// Sites; site `i` is peer `site<i>` with 198.18.(16+i).0/24.
pub const SITES: usize = 8;
/// Clients per site: hosts .10 to .10+CLIENTS-1.
pub const CLIENTS: u8 = 32;
/// Servers per site: .1 web (443, 80), .2 DNS (53) and NTP (123), .3 ssh (22),
/// .4 PostgreSQL (5432).
pub const WEB: u8 = 1;
pub const DNS: u8 = 2;
pub const SSH: u8 = 3;
pub const DB: u8 = 4;
/// The host part of probe clients (see [`probe`]): .200 and up, never in the mix.
pub const PROBE_HOST: u8 = 200;

pub fn site_prefix(site: usize) -> String {
    format!("198.18.{}.0/24", 16 + site)
}

pub fn site_peer(site: usize) -> String {
    format!("site{site}")
}

pub fn host(site: usize, h: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16 + site as u8, h)
}

/// Which site an address of the mix belongs to.
pub fn site_of(a: Ipv4Addr) -> usize {
    (a.octets()[2] - 16) as usize
}

const PAYLOAD_POOL: usize = 1 << 20;
/// The largest TCP payload (an MSS of 1400 bytes; 1440-byte packets).
const MSS: usize = 1400;

/// Random bytes that payloads are cut from.
pub struct Pool(Vec<u8>);

impl Pool {
    pub fn new(seed: u64) -> Pool {
        let mut v = vec![0u8; PAYLOAD_POOL + MSS];
        Rng::new(seed).fill(&mut v);
        Pool(v)
    }

    fn slice(&self, rng: &mut Rng, len: usize) -> &[u8] {
        let at = rng.below(PAYLOAD_POOL as u64) as usize;
        &self.0[at..at + len.min(MSS)]
    }
}

/// How one direction of a TCP conversation sizes its segments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// Share of pure ACKs (no payload), per mille.
    pub ack: u64,
    /// Share of full-size segments among data segments, per mille.
    pub full: u64,
    /// Other data segments: uniform in this range of payload bytes.
    pub min: usize,
    pub max: usize,
}

impl Profile {
    fn payload_len(&self, rng: &mut Rng) -> usize {
        if rng.below(1000) < self.ack {
            0
        } else if rng.below(1000) < self.full {
            MSS
        } else {
            self.min + rng.below((self.max - self.min + 1) as u64) as usize
        }
    }
}

/// The kinds of TCP conversation, their server and port, and how big each side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ssh,
    Web,
    Db,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Ssh, Kind::Web, Kind::Db];

    fn server(self) -> u8 {
        match self {
            Kind::Ssh => SSH,
            Kind::Web => WEB,
            Kind::Db => DB,
        }
    }

    fn port(self, rng: &mut Rng) -> u16 {
        match self {
            Kind::Ssh => 22,
            Kind::Web if rng.below(5) == 0 => 80,
            Kind::Web => 443,
            Kind::Db => 5432,
        }
    }

    /// (client side, server side).
    fn profiles(self) -> (Profile, Profile) {
        let p = |ack, full, min, max| Profile {
            ack,
            full,
            min,
            max,
        };
        match self {
            // Keystrokes and their echo.
            Kind::Ssh => (p(300, 0, 36, 180), p(300, 0, 36, 180)),
            // Requests and ACKs one way, responses the other.
            Kind::Web => (p(800, 0, 200, 700), p(50, 100, 100, 600)),
            Kind::Db => (p(300, 0, 100, 400), p(200, 100, 80, 600)),
        }
    }

    /// Packets per side: uniform in 20..=limit (so the mean is about limit / 2).
    fn length(self, rng: &mut Rng, server: bool) -> u32 {
        let limit = match (self, server) {
            (Kind::Ssh, _) => 240,
            (Kind::Web, false) => 40,
            (Kind::Web, true) => 160,
            (Kind::Db, false) => 100,
            (Kind::Db, true) => 160,
        };
        20 + rng.below(limit - 19) as u32
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a batch is made of, in packets per mille: the TCP kinds (both directions),
/// then DNS, NTP and ping (queries and answers).
const SHARE_SSH: u64 = 400;
const SHARE_WEB: u64 = 300;
const SHARE_DB: u64 = 150;
const SHARE_DNS: u64 = 100;
const SHARE_NTP: u64 = 20;
/// The rest (30 per mille): pings.
const SHARE_TCP: u64 = SHARE_SSH + SHARE_WEB + SHARE_DB;

/// One direction of a TCP conversation, as its sender sees it.
#[derive(Clone, Debug)]
pub struct Stream {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// The server side answers the client's SYN with SYN+ACK.
    pub server: bool,
    pub profile: Profile,
    /// Packets still to send (the first is the SYN, the last the FIN).
    pub left: u32,
    pub sent: u32,
}

impl Stream {
    fn next_packet(&mut self, rng: &mut Rng, pool: &Pool) -> Vec<u8> {
        let (flags, len) = if self.sent == 0 {
            (
                if self.server {
                    TCP_SYN | TCP_ACK
                } else {
                    TCP_SYN
                },
                0,
            )
        } else if self.left == 1 {
            (TCP_FIN | TCP_ACK, 0)
        } else {
            match self.profile.payload_len(rng) {
                0 => (TCP_ACK, 0),
                n => (TCP_PSH | TCP_ACK, n),
            }
        };
        self.sent += 1;
        self.left -= 1;
        tcp(
            self.src,
            self.dst,
            self.sport,
            self.dport,
            flags,
            pool.slice(rng, len),
        )
    }
}

/// What one site passes to the owner of another: the other side of a conversation it
/// started, or answers to its queries.
#[derive(Debug)]
pub enum Handoff {
    Stream { site: usize, kind: Kind, s: Stream },
    Answer { site: usize, packet: Vec<u8> },
}

/// One site's traffic state.
pub struct Site {
    pub index: usize,
    rng: Rng,
    /// Open conversations (this side), per kind.
    open: [Vec<Stream>; 3],
    /// Answers to other sites' queries, sent with the next batches.
    answers: VecDeque<Vec<u8>>,
    next_port: u16,
    ping_seq: u16,
}

/// Most answers kept waiting (beyond, the oldest are dropped: an overloaded server).
const MAX_ANSWERS: usize = 20_000;
/// Open conversations per kind below which a new one starts.
const MIN_OPEN: usize = 3;

pub fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = TcpHeader::new(sport, dport, 1000, 65535);
    h.fin = flags & TCP_FIN != 0;
    h.syn = flags & TCP_SYN != 0;
    h.psh = flags & TCP_PSH != 0;
    h.ack = flags & TCP_ACK != 0;
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp_header(h);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build a TCP packet");
    out
}

pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build a UDP packet");
    out
}

fn icmp_echo(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    reply: bool,
    payload: &[u8],
) -> Vec<u8> {
    let ip = PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    let b = if reply {
        ip.icmpv4_echo_reply(id, seq)
    } else {
        ip.icmpv4_echo_request(id, seq)
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build an ICMP packet");
    out
}

impl Site {
    pub fn new(index: usize, seed: u64) -> Site {
        Site {
            index,
            rng: Rng::new(seed ^ ((index as u64 + 1) * 0x1000_0001)),
            open: [Vec::new(), Vec::new(), Vec::new()],
            answers: VecDeque::new(),
            next_port: 32768,
            ping_seq: 0,
        }
    }

    /// Takes what another site handed over.
    pub fn accept(&mut self, h: Handoff) {
        match h {
            Handoff::Stream { kind, s, .. } => self.open[kind.index()].push(s),
            Handoff::Answer { packet, .. } => {
                if self.answers.len() >= MAX_ANSWERS {
                    self.answers.pop_front();
                }
                self.answers.push_back(packet);
            }
        }
    }

    fn ephemeral(&mut self) -> u16 {
        self.next_port = if self.next_port >= 60999 {
            32768
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    fn client(&mut self) -> Ipv4Addr {
        host(self.index, 10 + self.rng.below(u64::from(CLIENTS)) as u8)
    }

    /// Another site than this one.
    fn other_site(&mut self) -> usize {
        (self.index + 1 + self.rng.below(SITES as u64 - 1) as usize) % SITES
    }

    /// A new conversation of `kind` from one of this site's clients: its client side
    /// stays here, the server side is handed to the server's site.
    fn start(&mut self, kind: Kind, out: &mut Vec<Handoff>) {
        let (cp, sp) = kind.profiles();
        let (src, site) = (self.client(), self.other_site());
        let dst = host(site, kind.server());
        let (sport, dport) = (self.ephemeral(), kind.port(&mut self.rng));
        let client = Stream {
            src,
            dst,
            sport,
            dport,
            server: false,
            profile: cp,
            left: kind.length(&mut self.rng, false),
            sent: 0,
        };
        let server = Stream {
            src: dst,
            dst: src,
            sport: dport,
            dport: sport,
            server: true,
            profile: sp,
            left: kind.length(&mut self.rng, true),
            sent: 0,
        };
        self.open[kind.index()].push(client);
        out.push(Handoff::Stream {
            site,
            kind,
            s: server,
        });
    }

    /// A run of up to `n` segments from one open conversation of `kind` (a new one if
    /// few are open).
    fn tcp_run(
        &mut self,
        kind: Kind,
        n: usize,
        pool: &Pool,
        batch: &mut Vec<Vec<u8>>,
        out: &mut Vec<Handoff>,
    ) {
        let k = kind.index();
        if self.open[k].len() < MIN_OPEN || self.rng.below(40) == 0 {
            self.start(kind, out);
        }
        let i = self.rng.below(self.open[k].len() as u64) as usize;
        let s = &mut self.open[k][i];
        for _ in 0..n {
            if s.left == 0 {
                break;
            }
            batch.push(s.next_packet(&mut self.rng, pool));
        }
        if s.left == 0 {
            self.open[k].swap_remove(i);
        }
    }

    /// One DNS or NTP query from a client here, its answer handed to the server's site.
    fn udp_query(
        &mut self,
        ntp: bool,
        pool: &Pool,
        batch: &mut Vec<Vec<u8>>,
        out: &mut Vec<Handoff>,
    ) {
        let (src, site) = (self.client(), self.other_site());
        let dst = host(site, DNS);
        let sport = self.ephemeral();
        let (port, q, a) = if ntp {
            (123, 48, 48)
        } else {
            let q = 20 + self.rng.below(40) as usize;
            (53, q, q + 16 + self.rng.below(200) as usize)
        };
        batch.push(udp(src, dst, sport, port, pool.slice(&mut self.rng, q)));
        out.push(Handoff::Answer {
            site,
            packet: udp(dst, src, port, sport, pool.slice(&mut self.rng, a)),
        });
    }

    fn ping(&mut self, pool: &Pool, batch: &mut Vec<Vec<u8>>, out: &mut Vec<Handoff>) {
        let (src, site) = (self.client(), self.other_site());
        let dst = host(site, 1 + self.rng.below(4) as u8);
        self.ping_seq = self.ping_seq.wrapping_add(1);
        let id = 0x5000 + self.index as u16;
        let data = pool.slice(&mut self.rng, 56);
        batch.push(icmp_echo(src, dst, id, self.ping_seq, false, data));
        out.push(Handoff::Answer {
            site,
            packet: icmp_echo(dst, src, id, self.ping_seq, true, data),
        });
    }

    /// The next batch this site sends (about `size` packets): waiting answers first,
    /// then runs of TCP segments and single queries drawn by the shares above. What the
    /// other sides of new conversations and queries will send goes to `out`.
    pub fn batch(&mut self, size: usize, pool: &Pool, out: &mut Vec<Handoff>) -> Vec<Vec<u8>> {
        let mut batch = Vec::with_capacity(size + 64);
        let answers = self.answers.len().min(size / 4);
        batch.extend(self.answers.drain(..answers));
        while batch.len() < size {
            let pick = self.rng.below(1000);
            if pick < SHARE_TCP {
                let kind = if pick < SHARE_SSH {
                    Kind::Ssh
                } else if pick < SHARE_SSH + SHARE_WEB {
                    Kind::Web
                } else {
                    Kind::Db
                };
                // A run's mean length is what a shim reads of one stream between two
                // sends; the shares above count packets, so draw runs in proportion.
                let run = 4 + self.rng.below(44) as usize;
                self.tcp_run(kind, run, pool, &mut batch, out);
            } else if pick < SHARE_TCP + SHARE_DNS {
                self.udp_query(false, pool, &mut batch, out);
            } else if pick < SHARE_TCP + SHARE_DNS + SHARE_NTP {
                self.udp_query(true, pool, &mut batch, out);
            } else {
                self.ping(pool, &mut batch, out);
            }
        }
        batch
    }
}

/// The probe conversation before measurement point `k`: a client that never appears
/// in the mix (site 0, host .200+k) and site 1's ssh server, [`PROBE_STREAMS`] ssh
/// streams of [`PROBE_SEGMENTS`] segments each way and [`PROBE_PINGS`] pings each way.
/// Returns (client, server, what the client sends, what the server sends): the audit
/// query "every packet between two hosts" must then return exactly
/// [`probe_packets`] rows, at every size of the log.
pub const PROBE_STREAMS: u16 = 3;
pub const PROBE_SEGMENTS: u32 = 40;
pub const PROBE_PINGS: u16 = 5;

pub fn probe_packets() -> usize {
    2 * (PROBE_STREAMS as usize * PROBE_SEGMENTS as usize + PROBE_PINGS as usize)
}

pub type Probe = (Ipv4Addr, Ipv4Addr, Vec<Vec<u8>>, Vec<Vec<u8>>);

pub fn probe(k: u8, pool: &Pool) -> Probe {
    let client = host(0, PROBE_HOST + k);
    let server = host(1, SSH);
    let mut rng = Rng::new(u64::from(k) + 77);
    let (mut c, mut s) = (Vec::new(), Vec::new());
    let (cp, sp) = Kind::Ssh.profiles();
    for i in 0..PROBE_STREAMS {
        let sport = 40000 + i;
        let mut up = Stream {
            src: client,
            dst: server,
            sport,
            dport: 22,
            server: false,
            profile: cp,
            left: PROBE_SEGMENTS,
            sent: 0,
        };
        let mut down = Stream {
            src: server,
            dst: client,
            sport: 22,
            dport: sport,
            server: true,
            profile: sp,
            left: PROBE_SEGMENTS,
            sent: 0,
        };
        while up.left > 0 {
            c.push(up.next_packet(&mut rng, pool));
            s.push(down.next_packet(&mut rng, pool));
        }
    }
    for seq in 0..PROBE_PINGS {
        let data = pool.slice(&mut rng, 56);
        c.push(icmp_echo(
            client,
            server,
            0x7000 + u16::from(k),
            seq,
            false,
            data,
        ));
        s.push(icmp_echo(
            server,
            client,
            0x7000 + u16::from(k),
            seq,
            true,
            data,
        ));
    }
    (client, server, c, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvpn_core::decode;

    /// Runs every site for a while, handing over as the builder does.
    fn simulate(batches: usize) -> (Vec<Vec<u8>>, usize) {
        let pool = Pool::new(1);
        let mut sites: Vec<Site> = (0..SITES).map(|i| Site::new(i, 9)).collect();
        let mut all = Vec::new();
        let mut out = Vec::new();
        for n in 0..batches {
            let i = n % SITES;
            all.extend(sites[i].batch(128, &pool, &mut out));
            for h in out.drain(..) {
                let site = match &h {
                    Handoff::Stream { site, .. } | Handoff::Answer { site, .. } => *site,
                };
                sites[site].accept(h);
            }
        }
        let open = sites
            .iter()
            .map(|s| s.open.iter().map(Vec::len).sum::<usize>())
            .sum();
        (all, open)
    }

    #[test]
    fn the_mix_is_valid_routed_and_small() {
        let (packets, open) = simulate(800);
        assert!(packets.len() >= 800 * 128);
        assert!(open < 2000, "conversations end: {open} open");
        let (mut tcp, mut udp, mut icmp, mut syn, mut bytes) = (0, 0, 0, 0, 0);
        for p in &packets {
            let h = decode(p).expect("decodes");
            let (s, d) = match (h.src_addr, h.dst_addr) {
                (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => (s, d),
                other => panic!("v4 only: {other:?}"),
            };
            assert_ne!(site_of(s), site_of(d), "crosses the VPN");
            assert!(site_of(s) < SITES && site_of(d) < SITES);
            bytes += p.len();
            match h.protocol {
                6 => {
                    tcp += 1;
                    if h.tcp_flags == Some(u16::from(TCP_SYN)) {
                        syn += 1;
                    }
                }
                17 => udp += 1,
                1 => icmp += 1,
                other => panic!("protocol {other}"),
            }
        }
        let n = packets.len() as f64;
        let mean = bytes as f64 / n;
        assert!((150.0..260.0).contains(&mean), "mean packet {mean:.0} B");
        let share = |x: usize| x as f64 / n;
        assert!(share(tcp) > 0.75, "mostly TCP: {}", share(tcp));
        assert!(
            // DNS and other datagrams: a few per conversation, against TCP's many.
            (0.005..0.2).contains(&share(udp)),
            "some UDP: {}",
            share(udp)
        );
        assert!(
            (0.001..0.08).contains(&share(icmp)),
            "a few pings: {}",
            share(icmp)
        );
        assert!(syn > 100, "conversations start with a SYN: {syn}");
    }

    #[test]
    fn the_probe_is_its_own_conversation() {
        let pool = Pool::new(1);
        let (c, s, up, down) = probe(0, &pool);
        assert_eq!(up.len() + down.len(), probe_packets());
        assert_eq!((site_of(c), site_of(s)), (0, 1));
        for p in up.iter().chain(&down) {
            let h = decode(p).expect("decodes");
            assert!(h.src_addr == c || h.dst_addr == c);
        }
        assert_ne!(probe(1, &pool).0, c, "a new client per measurement point");
    }
}
