//! The uplink queue: flow-fair, bounded by bytes and by time (fq_codel's ideas in a
//! software queue), between the tun reader and the sender.
//!
//! Why: a FIFO in front of the database makes every small packet (a ping, a TCP ACK, a
//! DNS query) wait behind megabytes of bulk, so an SSH session stalls while a file is
//! copied. Here each flow (5-tuple) has its own queue, served by deficit round robin, and
//! flows that have just become active ("new", as in fq_codel) are served before the
//! backlogged ones, so a sparse packet goes out in the very next batch. A flow whose
//! packets have waited longer than [`Codel::TARGET`] for a whole [`Codel::INTERVAL`]
//! loses packets at its head (CoDel), which tells TCP to slow down instead of letting
//! the queue grow; and the total is capped in bytes, dropping from the fattest flow.
//!
//! The sender adapts the size of its batches so that one `pgvpn.send` takes about
//! [`BATCH_TARGET`]: a packet that arrives while a batch is in flight waits for it,
//! so a batch's duration bounds the latency that bulk traffic adds to everyone else.
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long one `pgvpn.send` should take under load.
pub const BATCH_TARGET: Duration = Duration::from_millis(2);

/// Most bytes queued in the shim (about a quarter of a second at 100 Mbit/s).
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// The share of bandwidth one flow gets per round: about one full packet.
const QUANTUM: i64 = 9000;

/// The flow a packet belongs to: protocol, addresses and ports, read without a full
/// decode (anything unreadable is flow 0, which is fine: it is still queued).
pub fn flow_of(pkt: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match pgvpn_core::decode(pkt) {
        Ok(d) => {
            (d.protocol, d.src_addr, d.dst_addr, d.src_port, d.dst_port).hash(&mut h);
            h.finish()
        }
        Err(_) => 0,
    }
}

/// CoDel's state for one flow (RFC 8289, simplified: drop at the head while the queue's
/// sojourn time stays above TARGET, at intervals shrinking with the square root of the
/// drop count).
#[derive(Debug, Default)]
struct Codel {
    first_above: Option<Instant>,
    dropping: bool,
    drop_next: Option<Instant>,
    count: u32,
}

impl Codel {
    pub const TARGET: Duration = Duration::from_millis(5);
    pub const INTERVAL: Duration = Duration::from_millis(100);

    /// Should the head packet, queued for `sojourn`, be dropped at `now`?
    fn should_drop(&mut self, sojourn: Duration, now: Instant) -> bool {
        if sojourn < Self::TARGET {
            self.first_above = None;
            self.dropping = false;
            return false;
        }
        let first = *self.first_above.get_or_insert(now + Self::INTERVAL);
        if !self.dropping {
            if now >= first {
                self.dropping = true;
                self.count = self.count.max(1);
                self.drop_next = Some(now + Self::INTERVAL / isqrt(self.count));
                return true;
            }
            return false;
        }
        if self.drop_next.is_some_and(|t| now >= t) {
            self.count += 1;
            self.drop_next = Some(now + Self::INTERVAL / isqrt(self.count));
            return true;
        }
        false
    }
}

fn isqrt(n: u32) -> u32 {
    (n as f64).sqrt().max(1.0) as u32
}

#[derive(Debug, Default)]
struct Flow {
    packets: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    deficit: i64,
    codel: Codel,
    /// In the new-flows list (served first), the old-flows list, or neither.
    listed: Option<bool>,
}

/// What a push or a pop dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drops {
    /// The queue was full: dropped from the fattest flow.
    pub overflow: u64,
    /// CoDel: a flow's packets waited too long.
    pub codel: u64,
}

#[derive(Debug, Default)]
struct State {
    flows: HashMap<u64, Flow>,
    new_flows: VecDeque<u64>,
    old_flows: VecDeque<u64>,
    bytes: usize,
    packets: usize,
    closed: bool,
}

/// The queue. `push` from the reader thread, `pop_batch` from the sender thread.
#[derive(Debug)]
pub struct FlowQueue {
    state: Mutex<State>,
    ready: Condvar,
    max_bytes: usize,
}

impl FlowQueue {
    pub fn new(max_bytes: usize) -> FlowQueue {
        FlowQueue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a packet; returns what had to be dropped to make room (possibly this one).
    pub fn push(&self, pkt: Vec<u8>, now: Instant) -> Drops {
        let id = flow_of(&pkt);
        let mut s = self.lock();
        let mut drops = Drops::default();
        let len = pkt.len();
        {
            let f = s.flows.entry(id).or_default();
            f.bytes += len;
            f.packets.push_back((now, pkt));
            if f.listed.is_none() {
                f.listed = Some(true);
                f.deficit = QUANTUM;
                s.new_flows.push_back(id);
            }
        }
        s.bytes += len;
        s.packets += 1;
        while s.bytes > self.max_bytes {
            // The fattest flow pays (fq_codel's overload rule): a sparse flow keeps its
            // packets while a bulk transfer overruns the queue.
            let Some((&fat, _)) = s.flows.iter().max_by_key(|(_, f)| f.bytes) else {
                break;
            };
            let f = s.flows.get_mut(&fat).expect("present");
            let Some((_, p)) = f.packets.pop_front() else {
                break;
            };
            f.bytes -= p.len();
            s.bytes -= p.len();
            s.packets -= 1;
            drops.overflow += 1;
        }
        drop(s);
        self.ready.notify_one();
        drops
    }

    /// No more pushes: `pop_batch` returns what is left, then None.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    pub fn queued(&self) -> (usize, usize) {
        let s = self.lock();
        (s.packets, s.bytes)
    }

    /// Waits up to `wait` for a first packet, then takes packets, new flows first, then
    /// round robin: at most `max_packets`, while their [`cost`] is below `budget`, and
    /// never more than `max_bytes` in all (the first packet always goes). `None` once
    /// closed and empty; an empty batch if the wait ran out.
    pub fn pop_batch(
        &self,
        max_packets: usize,
        budget: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> (Option<Vec<Vec<u8>>>, Drops) {
        let mut s = self.lock();
        let deadline = Instant::now() + wait;
        while s.packets == 0 {
            if s.closed {
                return (None, Drops::default());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (Some(Vec::new()), Drops::default());
            }
            s = self
                .ready
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let mut spent = 0usize;
        let mut drops = Drops::default();
        while batch.len() < max_packets && (batch.is_empty() || spent < budget) {
            let (id, new) = match (s.new_flows.front(), s.old_flows.front()) {
                (Some(&id), _) => (id, true),
                (None, Some(&id)) => (id, false),
                (None, None) => break,
            };
            let State {
                flows,
                new_flows,
                old_flows,
                bytes: total,
                packets,
                ..
            } = &mut *s;
            let f = flows.get_mut(&id).expect("listed flows exist");
            if f.deficit <= 0 {
                f.deficit += QUANTUM;
                let id = if new {
                    new_flows.pop_front()
                } else {
                    old_flows.pop_front()
                };
                old_flows.extend(id);
                f.listed = Some(false);
                continue;
            }
            if f.packets
                .front()
                .is_some_and(|(_, p)| bytes + p.len() > max_bytes)
                && !batch.is_empty()
            {
                break;
            }
            let Some((at, pkt)) = f.packets.pop_front() else {
                // Empty: a new flow goes to the back of the old list once (so it cannot
                // come back as "new" at once), an old one leaves.
                if new {
                    new_flows.pop_front();
                    old_flows.push_back(id);
                    f.listed = Some(false);
                } else {
                    old_flows.pop_front();
                    f.listed = None;
                    flows.remove(&id);
                }
                continue;
            };
            f.bytes -= pkt.len();
            *total -= pkt.len();
            *packets -= 1;
            if f.codel.should_drop(now.saturating_duration_since(at), now) && !f.packets.is_empty()
            {
                // Never the last packet of a flow: a dropped tail is not noticed soon.
                drops.codel += 1;
                continue;
            }
            f.deficit -= pkt.len() as i64;
            bytes += pkt.len();
            spent += cost(&pkt);
            batch.push(pkt);
        }
        (Some(batch), drops)
    }
}

/// What a packet costs the database, in bytes of payload: a row costs about as much as
/// 1 KB of data on top of its own bytes (fitted to `make bench`'s send ceilings at 1400,
/// 8000 and 65000 bytes). Batches are budgeted in this unit, so a batch of small packets
/// takes about as long as one of large packets with the same budget.
pub const PER_PACKET_COST: usize = 1024;

pub fn cost(pkt: &[u8]) -> usize {
    pkt.len() + PER_PACKET_COST
}

/// Sizes batches so that one send takes about [`BATCH_TARGET`]. A send costs a fixed
/// part (the round trip and the commit's flush) plus its packets' [`cost`] at the
/// database's rate; both are fitted by least squares over the recent sends. To keep the
/// fit well posed under a steady load (where every batch would be the same size), the
/// budget alternates between 80% and 120% of its value. Where the fixed part alone is near
/// the target (a slow disk), a batch's variable part is made as long as the fixed part,
/// so throughput stays at half the rate or better instead of collapsing to tiny batches.
#[derive(Debug)]
pub struct BatchSizer {
    /// Weighted sums over recent sends of 1, x (cost), y (seconds), x², xy.
    sums: [f64; 5],
    /// The fit: seconds per send, seconds per cost unit.
    fixed: f64,
    per_cost: f64,
    larger: bool,
    min: usize,
    max: usize,
}

impl BatchSizer {
    /// How much the sums of older sends still count, per send.
    const KEEP: f64 = 0.95;

    pub fn new(min: usize, max: usize) -> BatchSizer {
        BatchSizer {
            sums: [0.0; 5],
            fixed: 0.0,
            per_cost: 1.0 / 100e6, // a start: 100 MB/s
            larger: false,
            min,
            max,
        }
    }

    /// The cost budget for the next batch.
    pub fn budget(&mut self) -> usize {
        let target = BATCH_TARGET.as_secs_f64();
        let room = (target - self.fixed).max(self.fixed);
        self.larger = !self.larger;
        let dither = if self.larger { 1.2 } else { 0.8 };
        ((room / self.per_cost * dither) as usize).clamp(self.min, self.max)
    }

    /// A send of packets costing `spent` took `took`.
    pub fn observe(&mut self, spent: usize, took: Duration) {
        let (x, y) = (spent as f64, took.as_secs_f64());
        for (s, v) in self.sums.iter_mut().zip([1.0, x, y, x * x, x * y]) {
            *s = *s * Self::KEEP + v;
        }
        let [n, sx, sy, sxx, sxy] = self.sums;
        let (mx, my) = (sx / n, sy / n);
        let var = sxx / n - mx * mx;
        // Too little spread in the sizes says nothing about the slope: keep the old fit.
        if n < 3.0 || var <= (0.05 * mx).powi(2) {
            return;
        }
        let slope = (sxy / n - mx * my) / var;
        if slope > 0.0 {
            self.per_cost = slope;
            self.fixed = (my - slope * mx).max(0.0);
        }
    }
}

/// The addresses of a packet, for tests and logs.
pub fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    pgvpn_core::decode(pkt)
        .ok()
        .map(|h| (h.src_addr, h.dst_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp(sport: u16, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(sport, 5000)
            .write(&mut out, &vec![0u8; len])
            .unwrap();
        out
    }

    #[test]
    fn a_sparse_packet_goes_out_in_the_next_batch_ahead_of_bulk() {
        let q = FlowQueue::new(MAX_QUEUED_BYTES);
        let t = Instant::now();
        for _ in 0..300 {
            q.push(udp(1000, 7000), t); // bulk
        }
        let (first, _) = q.pop_batch(256, 64 << 10, usize::MAX, Duration::ZERO);
        assert!(first.unwrap().len() < 20, "the byte budget holds");
        q.push(udp(2000, 50), t); // a ping
        let (b, _) = q.pop_batch(256, 64 << 10, usize::MAX, Duration::ZERO);
        let b = b.unwrap();
        assert_eq!(b[0].len(), udp(2000, 50).len(), "the new flow goes first");
    }

    #[test]
    fn flows_share_fairly_and_order_within_a_flow_is_kept() {
        let q = FlowQueue::new(MAX_QUEUED_BYTES);
        let t = Instant::now();
        for i in 0..100u16 {
            q.push(udp(1, 1000 + usize::from(i)), t);
            q.push(udp(2, 1000 + usize::from(i)), t);
        }
        let (b, _) = q.pop_batch(40, usize::MAX, usize::MAX, Duration::ZERO);
        let b = b.unwrap();
        let ones = b.iter().filter(|p| p[21] == 1).count();
        assert!((15..=25).contains(&ones), "{ones} of 40 from flow 1");
        let lens: Vec<usize> = b.iter().filter(|p| p[21] == 2).map(Vec::len).collect();
        assert!(
            lens.windows(2).all(|w| w[0] < w[1]),
            "in order within the flow"
        );
    }

    #[test]
    fn overflow_drops_from_the_fattest_flow() {
        let q = FlowQueue::new(100_000);
        let t = Instant::now();
        let mut drops = 0;
        for _ in 0..50 {
            drops += q.push(udp(1, 5000), t).overflow;
        }
        drops += q.push(udp(2, 100), t).overflow;
        assert!(drops >= 30);
        let (b, _) = q.pop_batch(1000, usize::MAX, usize::MAX, Duration::ZERO);
        assert!(
            b.unwrap().iter().any(|p| p.len() < 200),
            "the sparse flow's packet survived"
        );
        assert!(q.queued().1 == 0);
    }

    #[test]
    fn codel_drops_a_standing_queue_but_not_a_short_one() {
        let q = FlowQueue::new(MAX_QUEUED_BYTES);
        let t0 = Instant::now() - Duration::from_secs(1);
        for _ in 0..200 {
            q.push(udp(1, 1000), t0); // queued a second ago: far above the target
        }
        let mut codel = 0;
        for _ in 0..20 {
            let (_, d) = q.pop_batch(10, usize::MAX, usize::MAX, Duration::ZERO);
            codel += d.codel;
            std::thread::sleep(Duration::from_millis(15));
        }
        assert!(codel > 0, "a standing queue loses packets");
        let q = FlowQueue::new(MAX_QUEUED_BYTES);
        for _ in 0..50 {
            q.push(udp(1, 1000), Instant::now());
        }
        let (_, d) = q.pop_batch(100, usize::MAX, usize::MAX, Duration::ZERO);
        assert_eq!(d.codel, 0, "a fresh queue loses nothing");
    }

    #[test]
    fn blocks_for_the_first_packet_and_ends_when_closed() {
        let q = std::sync::Arc::new(FlowQueue::new(MAX_QUEUED_BYTES));
        let (b, _) = q.pop_batch(10, 1000, usize::MAX, Duration::from_millis(20));
        assert_eq!(b, Some(vec![]), "the wait ran out");
        let q2 = std::sync::Arc::clone(&q);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q2.push(udp(1, 10), Instant::now());
            q2.close();
        });
        let start = Instant::now();
        let (b, _) = q.pop_batch(10, 1000, usize::MAX, Duration::from_secs(5));
        assert_eq!(b.unwrap().len(), 1);
        assert!(start.elapsed() < Duration::from_secs(1));
        t.join().unwrap();
        assert_eq!(
            q.pop_batch(10, 1000, usize::MAX, Duration::from_secs(5)).0,
            None
        );
    }

    #[test]
    fn batches_size_themselves_to_the_target_time() {
        // A database whose sends cost 0.5 ms plus their packets at 50 MB/s.
        let send = |spent: usize| Duration::from_secs_f64(0.0005 + spent as f64 / 50e6);
        let mut s = BatchSizer::new(16 << 10, 8 << 20);
        for _ in 0..100 {
            // A steady load: every batch is as large as the budget allows.
            let spent = s.budget();
            s.observe(spent, send(spent));
        }
        let b = (s.budget() + s.budget()) / 2;
        let took = send(b);
        assert!(
            (took.as_secs_f64() - BATCH_TARGET.as_secs_f64()).abs() < 0.1e-3,
            "a batch takes {took:?} on average"
        );
        // A slow disk (3 ms a commit): batches as long as the floor again, not the minimum.
        let send = |spent: usize| Duration::from_secs_f64(0.003 + spent as f64 / 50e6);
        let mut s = BatchSizer::new(16 << 10, 8 << 20);
        for _ in 0..100 {
            let spent = s.budget();
            s.observe(spent, send(spent));
        }
        let expect = 50e6 * 0.003;
        let got = (s.budget() + s.budget()) as f64 / 2.0;
        assert!((got - expect).abs() / expect < 0.15, "{got} vs {expect}");
    }

    #[test]
    fn a_batch_never_exceeds_its_byte_limit() {
        let q = FlowQueue::new(usize::MAX);
        let t = Instant::now();
        for i in 0..10u16 {
            q.push(udp(i, 3000), t);
        }
        let one = udp(0, 3000).len();
        let (b, _) = q.pop_batch(100, usize::MAX, 3 * one + one / 2, Duration::ZERO);
        assert_eq!(b.unwrap().len(), 3, "the fourth would pass the limit");
        let (b, _) = q.pop_batch(100, usize::MAX, 10, Duration::ZERO);
        assert_eq!(b.unwrap().len(), 1, "the first packet always goes");
        assert_eq!(q.queued().0, 6);
    }
}
