//! Building a big log for `make bench-audit`: [`SITES`] peers sending the mix of
//! `auditmix` from several threads at once, each thread owning some sites (one
//! connection per site), handing the other sides of conversations to the threads that
//! own the answering sites. Senders run until the log holds the next measurement
//! point's packet count, then park, so that the measurements see a quiet database.

use super::auditmix::{self, Handoff, Pool, Site, SITES};
use super::{check_interrupt, interrupted, Result};
use pgvpn_tests::sql::create_peer;
use pgvpn_tests::{db_error, Cluster, Rng};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Packets per batch: uniform in this range (what a shim sends under load varies).
const BATCH_MIN: u64 = 32;
const BATCH_MAX: u64 = 256;

/// The sites' peers, each with its /24.
pub fn create_sites(cluster: &Cluster, db: &str) {
    for i in 0..SITES {
        create_peer(
            cluster,
            db,
            &auditmix::site_peer(i),
            &[&auditmix::site_prefix(i)],
        );
    }
}

/// What the senders share with the thread that measures.
#[derive(Default)]
pub struct Shared {
    /// Packets the database accepted so far.
    pub accepted: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    /// Packets `send` did not accept (none are expected: every packet routes).
    pub refused: AtomicU64,
    /// Senders run while `accepted` is below this.
    target: Mutex<u64>,
    resume: Condvar,
    parked: AtomicUsize,
    stop: AtomicBool,
    pub error: Mutex<Option<String>>,
}

impl Shared {
    /// Let the senders go on until `packets` are logged.
    pub fn run_until(&self, packets: u64) {
        *self.target.lock().expect("target lock") = packets;
        self.resume.notify_all();
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.target.lock().expect("target lock");
        self.resume.notify_all();
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn fail(&self, e: String) {
        self.error.lock().expect("error lock").get_or_insert(e);
        self.stop();
    }

    /// Blocks while the target is reached; false once stopped.
    fn gate(&self) -> bool {
        let mut t = self.target.lock().expect("target lock");
        while self.accepted.load(Ordering::SeqCst) >= *t && !self.stop.load(Ordering::SeqCst) {
            self.parked.fetch_add(1, Ordering::SeqCst);
            t = self
                .resume
                .wait_timeout(t, Duration::from_millis(200))
                .expect("target lock")
                .0;
            self.parked.fetch_sub(1, Ordering::SeqCst);
            if interrupted() {
                return false;
            }
        }
        !self.stop.load(Ordering::SeqCst) && !interrupted()
    }
}

/// Which sender thread owns a site.
fn owner(site: usize, threads: usize) -> usize {
    site % threads
}

/// One sender thread: its sites, their connections, its inbox and the other inboxes.
pub struct Feeder {
    pub index: usize,
    sites: Vec<(Site, postgres::Client)>,
    inbox: Receiver<Handoff>,
    outboxes: Vec<Sender<Handoff>>,
    rng: Rng,
}

/// `threads` senders (at most [`SITES`]), connected and ready.
pub fn senders(cluster: &Cluster, db: &str, threads: usize, seed: u64) -> Vec<Feeder> {
    let threads = threads.clamp(1, SITES);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..threads).map(|_| channel()).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(t, inbox)| Feeder {
            index: t,
            sites: (0..SITES)
                .filter(|s| owner(*s, threads) == t)
                .map(|s| {
                    (
                        Site::new(s, seed),
                        cluster.connect(&auditmix::site_peer(s), db),
                    )
                })
                .collect(),
            inbox,
            outboxes: txs.clone(),
            rng: Rng::new(seed + t as u64),
        })
        .collect()
}

impl Feeder {
    /// Sends until stopped (parking whenever the target is reached).
    pub fn run(mut self, shared: &Shared, pool: &Pool) {
        let threads = self.outboxes.len();
        let mut out = Vec::new();
        while shared.gate() {
            for h in self.inbox.try_iter() {
                let site = match &h {
                    Handoff::Stream { site, .. } | Handoff::Answer { site, .. } => *site,
                };
                if let Some((s, _)) = self.sites.iter_mut().find(|(s, _)| s.index == site) {
                    s.accept(h);
                }
            }
            for (site, client) in self.sites.iter_mut() {
                let size = BATCH_MIN + self.rng.below(BATCH_MAX - BATCH_MIN + 1);
                let batch = site.batch(size as usize, pool, &mut out);
                let bytes: usize = batch.iter().map(Vec::len).sum();
                let n = match client.query_one(pgvpn_core::sql::SEND, &[&batch]) {
                    Ok(r) => r.get::<_, i64>(0) as u64,
                    Err(e) => {
                        shared.fail(format!("site{}: pgvpn.send: {}", site.index, db_error(&e)));
                        return;
                    }
                };
                shared.accepted.fetch_add(n, Ordering::SeqCst);
                shared
                    .refused
                    .fetch_add(batch.len() as u64 - n, Ordering::Relaxed);
                shared.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                shared.batches.fetch_add(1, Ordering::Relaxed);
                for h in out.drain(..) {
                    let to = match &h {
                        Handoff::Stream { site, .. } | Handoff::Answer { site, .. } => *site,
                    };
                    // A closed inbox means that thread is gone (stopping): drop it.
                    let _ = self.outboxes[owner(to, threads)].send(h);
                }
            }
        }
    }
}

/// Waits until every sender is parked (or one failed); the log is quiet then.
pub fn wait_parked(shared: &Shared, threads: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        check_interrupt()?;
        if let Some(e) = shared.error.lock().expect("error lock").clone() {
            return Err(e);
        }
        if shared.parked() >= threads {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("senders did not stop within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends the probe conversation of measurement point `k` (see `auditmix::probe`) as
/// sites 0 and 1; returns (client, server).
pub fn send_probe(
    cluster: &Cluster,
    db: &str,
    k: u8,
    pool: &Pool,
) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let (client, server, up, down) = auditmix::probe(k, pool);
    let mut a = cluster.connect(&auditmix::site_peer(0), db);
    let mut b = cluster.connect(&auditmix::site_peer(1), db);
    // In turns, a run of each side at a time, as a conversation goes.
    for (u, d) in up.chunks(20).zip(down.chunks(20)) {
        for (c, part) in [(&mut a, u), (&mut b, d)] {
            let n: i64 = c
                .query_one(pgvpn_core::sql::SEND, &[&part.to_vec()])
                .map_err(|e| format!("probe send: {}", db_error(&e)))?
                .get(0);
            if n != part.len() as i64 {
                return Err(format!("probe: {n} of {} packets accepted", part.len()));
            }
        }
    }
    Ok((client, server))
}

/// Free bytes on the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then_some(st)
    }?;
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}
