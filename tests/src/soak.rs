//! The soak: a steady UDP stream through the tunnel for a long time while retention
//! works underneath, and what stays flat.
//!
//! Two hosts in network namespaces with a `pgvpn-shim` each (as in tests/tunnel.rs);
//! `pgvpn-netcheck udp-send` in alice's sends numbered datagrams to bob at a fixed rate,
//! `udp-recv` in bob's counts them. The database rotates its log every
//! `chunk_interval` and keeps `retention` (both set with ALTER DATABASE); a pruner calls
//! `pgvpn.prune()` every `prune_every`. Meanwhile:
//!
//! * a follower reads every packet logged for bob (superuser, in id order per receiver,
//!   as recv does) long before its chunk can expire, and notes each datagram's sequence
//!   number, so that the log's content is known after its chunks are gone;
//! * every `sample_every`: the log's size (its chunks' relations), the rows in it, the
//!   packets written into bob's tun (delivered), the shims' RSS and their backends'
//!   private RSS (`/proc/PID/status`), autovacuum and autoanalyze runs and dead rows of
//!   the pgvpn tables (`pg_stat_all_tables`).
//!
//! At the end, exactly once across every chunk drop: bob received every logged
//! datagram once and nothing that was not logged; the log has no datagram twice; the
//! traffic counter for bob equals the rows the follower saw; no packet expired unread.

use crate::cluster::{db_error, Cluster};
use crate::netns::{Bg, Netns};
use crate::shim::{Shim, ShimSpec};
use crate::sql::{create_peer, scalar_i64};
use postgres::{Client, NoTls};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const ALICE: &str = "198.18.9.1";
const BOB: &str = "198.18.9.2";
const PORT: u16 = 5010;
const TAG: u32 = 0x50414b; // "PAK"

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub duration: Duration,
    /// Datagrams per second, and their UDP payload size.
    pub pps: u32,
    pub size: usize,
    pub chunk_interval_s: u32,
    pub retention_s: u32,
    pub prune_every: Duration,
    pub sample_every: Duration,
    /// Throughput is reported (and held to ±15 %) per bucket of this length.
    pub bucket: Duration,
    /// `pgvpn-netcheck`.
    pub netcheck: PathBuf,
}

impl Config {
    /// `make soak`: 12 minutes at 1000 datagrams/s, chunks of 5 s, a minute kept.
    pub fn long(netcheck: PathBuf) -> Config {
        Config {
            duration: Duration::from_secs(12 * 60),
            pps: 1000,
            size: 200,
            chunk_interval_s: 5,
            retention_s: 60,
            prune_every: Duration::from_secs(3),
            sample_every: Duration::from_secs(10),
            bucket: Duration::from_secs(60),
            netcheck,
        }
    }

    /// The test suite's: 90 s, chunks of 3 s, 20 s kept.
    pub fn short(netcheck: PathBuf) -> Config {
        Config {
            duration: Duration::from_secs(90),
            pps: 500,
            size: 200,
            chunk_interval_s: 3,
            retention_s: 20,
            prune_every: Duration::from_secs(2),
            sample_every: Duration::from_secs(5),
            bucket: Duration::from_secs(15),
            netcheck,
        }
    }
}

/// pgvpn's tables that live as long as the database (not the log's chunks, whose
/// statistics go with them): their autovacuum runs add up over the whole soak.
const PERMANENT: &str = "pg_stat_all_tables WHERE schemaname = 'pgvpn' AND relname !~ '_[0-9]{6}$'";

/// One sample.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub t: f64,
    pub delivered: u64,
    pub logged: u64,
    pub log_bytes: i64,
    pub log_rows: i64,
    pub chunks: i64,
    pub db_bytes: i64,
    pub shim_rss_kb: [u64; 2],
    pub backend_anon_kb_max: u64,
    pub backend_anon_kb_sum: u64,
    pub autovacuums: i64,
    pub autoanalyzes: i64,
    /// Dead rows in the permanent tables.
    pub dead_rows: i64,
    /// Autovacuum and autoanalyze runs on the chunks that exist at the moment.
    pub chunk_autovacuums: i64,
    pub dropped_chunks: u64,
}

impl Sample {
    fn json(&self) -> Value {
        json!({
            "t": self.t, "delivered": self.delivered, "logged": self.logged,
            "log_bytes": self.log_bytes, "log_rows": self.log_rows, "chunks": self.chunks,
            "db_bytes": self.db_bytes, "shim_rss_kb": self.shim_rss_kb,
            "backend_anon_kb_max": self.backend_anon_kb_max,
            "backend_anon_kb_sum": self.backend_anon_kb_sum,
            "autovacuums": self.autovacuums, "autoanalyzes": self.autoanalyzes,
            "dead_rows": self.dead_rows, "chunk_autovacuums": self.chunk_autovacuums,
            "dropped_chunks": self.dropped_chunks,
        })
    }
}

/// What the soak found.
#[derive(Debug, Default)]
pub struct Report {
    pub config: String,
    pub samples: Vec<Sample>,
    /// Per bucket: (start s, delivered, logged).
    pub buckets: Vec<(u64, u64, u64)>,
    pub sent: u64,
    pub logged_stream: u64,
    pub logged_twice: u64,
    pub delivered_distinct: u64,
    pub delivered_dups: u64,
    pub rows_to_bob: u64,
    pub counter_to_bob: i64,
    pub expired_unread: i64,
    pub dropped_chunks: u64,
    pub prunes: u64,
    pub shim_drops: i64,
    pub rejected: i64,
    /// Problems found; empty means the soak held.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// A table for the console and docs/backup.md.
    pub fn render(&self) -> String {
        let mut s = format!("soak: {}\n", self.config);
        s.push_str(&format!(
            "{:>6} {:>9} {:>9} {:>7} {:>7} {:>6} {:>13} {:>10} {:>11} {:>5} {:>8}\n",
            "t[s]",
            "delivered",
            "logged",
            "log MB",
            "rows",
            "chunks",
            "shim RSS MB",
            "backend MB",
            "autovac v/a",
            "dead",
            "chunk av"
        ));
        for x in &self.samples {
            s.push_str(&format!(
                "{:>6.0} {:>9} {:>9} {:>7.1} {:>7} {:>6} {:>6.1}/{:<6.1} {:>10.1} {:>11} {:>5} {:>8}\n",
                x.t,
                x.delivered,
                x.logged,
                x.log_bytes as f64 / 1e6,
                x.log_rows,
                x.chunks,
                x.shim_rss_kb[0] as f64 / 1024.0,
                x.shim_rss_kb[1] as f64 / 1024.0,
                x.backend_anon_kb_max as f64 / 1024.0,
                format!("{}/{}", x.autovacuums, x.autoanalyzes),
                x.dead_rows,
                x.chunk_autovacuums
            ));
        }
        s.push_str("throughput per bucket (start s: delivered, logged):\n");
        for (t, d, l) in &self.buckets {
            s.push_str(&format!("  {t:>5}: {d:>8} {l:>8}\n"));
        }
        s.push_str(&format!(
            "sent {}, logged {} (twice: {}), delivered {} distinct ({} duplicates), rows to bob {}, \
             bob's counter {}, expired unread {}, shim drops {}, rejected {}; {} prunes dropped {} chunks\n",
            self.sent,
            self.logged_stream,
            self.logged_twice,
            self.delivered_distinct,
            self.delivered_dups,
            self.rows_to_bob,
            self.counter_to_bob,
            self.expired_unread,
            self.shim_drops,
            self.rejected,
            self.prunes,
            self.dropped_chunks
        ));
        if self.ok() {
            s.push_str("verdict: OK\n");
        } else {
            s.push_str(&format!(
                "verdict: FAILED\n  {}\n",
                self.problems.join("\n  ")
            ));
        }
        s
    }

    pub fn json(&self) -> Value {
        json!({
            "config": self.config,
            "samples": self.samples.iter().map(Sample::json).collect::<Vec<_>>(),
            "buckets": self.buckets,
            "sent": self.sent, "logged": self.logged_stream, "logged_twice": self.logged_twice,
            "delivered_distinct": self.delivered_distinct, "delivered_duplicates": self.delivered_dups,
            "rows_to_bob": self.rows_to_bob, "counter_to_bob": self.counter_to_bob,
            "expired_unread": self.expired_unread, "dropped_chunks": self.dropped_chunks,
            "prunes": self.prunes, "shim_drops": self.shim_drops, "rejected": self.rejected,
            "problems": self.problems,
        })
    }
}

/// A field of /proc/PID/status in kB (0 if the process is gone).
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What the follower knows about the log.
#[derive(Default)]
struct Followed {
    last_id: i64,
    rows: u64,
    /// Times each datagram sequence number was logged.
    seen: Vec<u8>,
    stream_rows: u64,
    /// Logged datagrams per bucket (by the follower's clock).
    per_bucket: BTreeMap<u64, u64>,
}

fn follow(c: &mut Client, bob: i32, f: &mut Followed, t: f64, bucket: f64) {
    loop {
        let rows = c
            .query(
                "SELECT id, protocol = 17 AND dst_port = $3 AND length(payload) >= 36, \
                        substring(payload from 29 for 8) \
                   FROM pgvpn.packets WHERE dst_peer = $1 AND id > $2 ORDER BY id LIMIT 20000",
                &[&bob, &f.last_id, &i32::from(PORT)],
            )
            .unwrap_or_else(|e| panic!("follower: {}", db_error(&e)));
        if rows.is_empty() {
            return;
        }
        for r in &rows {
            f.last_id = r.get(0);
            f.rows += 1;
            if r.get::<_, bool>(1) {
                let head: Vec<u8> = r.get(2);
                let tag = u32::from_be_bytes(head[0..4].try_into().unwrap());
                let seq = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
                if tag == TAG && seq < f.seen.len() {
                    f.seen[seq] = f.seen[seq].saturating_add(1);
                    f.stream_rows += 1;
                    *f.per_bucket.entry((t / bucket) as u64).or_default() += 1;
                }
            }
        }
        if rows.len() < 20000 {
            return;
        }
    }
}

fn sample(su: &mut Client, ns_b: &Netns, shims: &[&Shim; 2], backends: &[u32]) -> Sample {
    let r = su
        .query_one(
            &format!(
            "SELECT coalesce(sum(pg_total_relation_size(c.relid)), 0)::bigint, count(*), \
                    pg_database_size(current_database()), \
                    (SELECT coalesce(sum(autovacuum_count), 0)::bigint FROM {PERMANENT}), \
                    (SELECT coalesce(sum(autoanalyze_count), 0)::bigint FROM {PERMANENT}), \
                    (SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM {PERMANENT}), \
                    (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::bigint \
                       FROM pg_stat_all_tables WHERE schemaname = 'pgvpn' AND relname ~ '_[0-9]{{6}}$') \
               FROM pgvpn.chunks c"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("sample: {}", db_error(&e)));
    let anon: Vec<u64> = backends.iter().map(|p| status_kb(*p, "RssAnon:")).collect();
    Sample {
        log_bytes: r.get(0),
        chunks: r.get(1),
        db_bytes: r.get(2),
        autovacuums: r.get(3),
        autoanalyzes: r.get(4),
        dead_rows: r.get(5),
        chunk_autovacuums: r.get(6),
        log_rows: scalar_i64(su, "SELECT count(*) FROM pgvpn.packets"),
        delivered: ns_b.dev_packets(TUN).0,
        shim_rss_kb: [
            status_kb(shims[0].pid(), "VmRSS:"),
            status_kb(shims[1].pid(), "VmRSS:"),
        ],
        backend_anon_kb_max: anon.iter().copied().max().unwrap_or(0),
        backend_anon_kb_sum: anon.iter().sum(),
        ..Sample::default()
    }
}

fn finish(mut bg: Bg, out: &Path, timeout: Duration, what: &str) -> Value {
    let st = bg.wait_timeout(timeout);
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
    match st {
        None => {
            bg.kill();
            panic!("{what} did not finish within {timeout:?}; stderr:\n{err}");
        }
        Some(st) if !st.success() => panic!("{what} failed ({st}); stderr:\n{err}"),
        Some(_) => {}
    }
    let text = std::fs::read_to_string(out).unwrap_or_default();
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: bad output {text:?}: {e}; stderr:\n{err}"))
}

/// Within `tolerance` (a fraction) of their mean?
fn flat(values: &[f64], tolerance: f64) -> Result<(), String> {
    if values.is_empty() {
        return Ok(());
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    match values
        .iter()
        .find(|v| (**v - mean).abs() > tolerance * mean)
    {
        Some(v) => Err(format!(
            "{v:.0} is more than {:.0} % from the mean {mean:.0} ({values:?})",
            tolerance * 100.0
        )),
        None => Ok(()),
    }
}

/// Runs the soak (needs root, the extension installed, the shim built).
pub fn run(cfg: &Config) -> Report {
    let count = cfg.pps as u64 * cfg.duration.as_secs();
    let mut rep = Report {
        config: format!(
            "{} s at {} datagrams/s of {} bytes; chunk_interval {} s, retention {} s, prune every {:?}",
            cfg.duration.as_secs(),
            cfg.pps,
            cfg.size,
            cfg.chunk_interval_s,
            cfg.retention_s,
            cfg.prune_every
        ),
        ..Report::default()
    };
    let cluster = Cluster::with_pgvpn(DB);
    create_peer(&cluster, DB, "alice", &[&format!("{ALICE}/32")]);
    let bob = create_peer(&cluster, DB, "bob", &[&format!("{BOB}/32")]);
    cluster
        .superuser(DB)
        .batch_execute(&format!(
            "ALTER DATABASE {DB} SET pgvpn.chunk_interval = '{}s'; \
             ALTER DATABASE {DB} SET pgvpn.retention = '{}s'",
            cfg.chunk_interval_s, cfg.retention_s
        ))
        .unwrap_or_else(|e| panic!("ALTER DATABASE: {}", db_error(&e)));
    let ns_a = Netns::new("soaka");
    let ns_b = Netns::new("soakb");
    let shim_a = Shim::start(
        &ns_a,
        &cluster,
        &ShimSpec::new(&cluster, DB, "alice", &format!("{ALICE}/24"), TUN),
    );
    let shim_b = Shim::start(
        &ns_b,
        &cluster,
        &ShimSpec::new(&cluster, DB, "bob", &format!("{BOB}/24"), TUN),
    );
    let backends: Vec<u32> = shim_a
        .backend_pids
        .iter()
        .chain(&shim_b.backend_pids)
        .map(|p| *p as u32)
        .collect();
    let tmp = crate::pgtools::Scratch::new("soak");

    // Retention underneath: a pruner on its own session.
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let prunes = Arc::new(AtomicU64::new(0));
    let prune_error = Arc::new(Mutex::new(None::<String>));
    let pruner = {
        let (stop, dropped, prunes, err) = (
            Arc::clone(&stop),
            Arc::clone(&dropped),
            Arc::clone(&prunes),
            Arc::clone(&prune_error),
        );
        let info = cluster.conninfo("postgres", DB);
        let every = cfg.prune_every;
        std::thread::spawn(move || {
            let mut c = Client::connect(&info, NoTls).expect("pruner connect");
            while !stop.load(Ordering::SeqCst) {
                match c.query_one("SELECT pgvpn.prune()", &[]) {
                    Ok(r) => {
                        dropped.fetch_add(r.get::<_, i32>(0) as u64, Ordering::SeqCst);
                        prunes.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        *err.lock().unwrap() = Some(db_error(&e));
                        return;
                    }
                }
                std::thread::sleep(every);
            }
        })
    };

    let rx_out = tmp.file("udp-recv.out");
    let rx = ns_b.spawn(
        &[
            cfg.netcheck.to_str().unwrap(),
            "udp-recv",
            &format!("0.0.0.0:{PORT}"),
            &count.to_string(),
            "8000",
            &TAG.to_string(),
        ],
        Some(&rx_out),
        Some(&rx_out.with_extension("err")),
    );
    // Before the first datagram: the counter's start.
    let mut su = cluster.superuser(DB);
    let counter_sql = "SELECT received_packets FROM pgvpn.peer_stats WHERE peer = 'bob'";
    let counter_start = scalar_i64(&mut su, counter_sql);
    std::thread::sleep(Duration::from_millis(300));
    let tx_out = tmp.file("udp-send.out");
    let mut tx = ns_a.spawn(
        &[
            cfg.netcheck.to_str().unwrap(),
            "udp-send",
            &format!("{BOB}:{PORT}"),
            &count.to_string(),
            &cfg.pps.to_string(),
            &cfg.size.to_string(),
            &TAG.to_string(),
        ],
        Some(&tx_out),
        Some(&tx_out.with_extension("err")),
    );

    let start = Instant::now();
    let mut follower = cluster.superuser(DB);
    let mut followed = Followed {
        seen: vec![0; count as usize],
        ..Followed::default()
    };
    let bucket = cfg.bucket.as_secs_f64();
    let mut per_bucket_delivered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_delivered = ns_b.dev_packets(TUN).0;
    let mut next_sample = Duration::ZERO;
    let deadline = cfg.duration + Duration::from_secs(60);
    loop {
        let t = start.elapsed();
        follow(&mut follower, bob, &mut followed, t.as_secs_f64(), bucket);
        let delivered = ns_b.dev_packets(TUN).0;
        *per_bucket_delivered
            .entry((t.as_secs_f64() / bucket) as u64)
            .or_default() += delivered - last_delivered;
        last_delivered = delivered;
        let sending = tx.try_wait().is_none();
        if t >= next_sample || !sending {
            let mut s = sample(&mut su, &ns_b, &[&shim_a, &shim_b], &backends);
            s.t = t.as_secs_f64();
            s.logged = followed.stream_rows;
            s.dropped_chunks = dropped.load(Ordering::SeqCst);
            eprintln!(
                "[soak] t={:.0}s delivered={} logged={} log={:.1}MB rows={} chunks={} shims={}/{}kB backends<={}kB",
                s.t, s.delivered, s.logged, s.log_bytes as f64 / 1e6, s.log_rows, s.chunks,
                s.shim_rss_kb[0], s.shim_rss_kb[1], s.backend_anon_kb_max
            );
            rep.samples.push(s);
            next_sample += cfg.sample_every;
        }
        if !sending {
            break;
        }
        if t > deadline {
            rep.problems
                .push("the sender did not finish in time".into());
            break;
        }
        if let Some(e) = prune_error.lock().unwrap().clone() {
            rep.problems.push(format!("prune() failed: {e}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sent = finish(tx, &tx_out, Duration::from_secs(30), "udp-send");
    let got = finish(rx, &rx_out, Duration::from_secs(60), "udp-recv");
    // What was still in flight at the end.
    std::thread::sleep(Duration::from_millis(500));
    follow(
        &mut follower,
        bob,
        &mut followed,
        start.elapsed().as_secs_f64(),
        bucket,
    );
    let delivered = ns_b.dev_packets(TUN).0;
    *per_bucket_delivered
        .entry((start.elapsed().as_secs_f64() / bucket) as u64)
        .or_default() += delivered - last_delivered;
    stop.store(true, Ordering::SeqCst);
    pruner.join().expect("pruner panicked");
    if let Some(e) = prune_error.lock().unwrap().clone() {
        rep.problems.push(format!("prune() failed: {e}"));
    }

    rep.sent = sent["sent"].as_u64().unwrap_or(0);
    rep.logged_stream = followed.seen.iter().filter(|&&n| n > 0).count() as u64;
    rep.logged_twice = followed.seen.iter().filter(|&&n| n > 1).count() as u64;
    rep.delivered_distinct = got["distinct"].as_u64().unwrap_or(0);
    rep.delivered_dups = got["duplicates"].as_u64().unwrap_or(0);
    rep.rows_to_bob = followed.rows;
    rep.counter_to_bob = scalar_i64(&mut su, counter_sql) - counter_start;
    let has_expired = scalar_i64(
        &mut su,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pgvpn.peer_stats'::regclass \
          AND attname = 'expired_unread'",
    ) > 0;
    if has_expired {
        rep.expired_unread = scalar_i64(
            &mut su,
            "SELECT expired_unread FROM pgvpn.peer_stats WHERE peer = 'bob'",
        );
    }
    rep.dropped_chunks = dropped.load(Ordering::SeqCst);
    rep.prunes = prunes.load(Ordering::SeqCst);
    rep.rejected = scalar_i64(
        &mut su,
        "SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'alice'",
    );
    let (mut shim_a, mut shim_b) = (shim_a, shim_b);
    shim_a.stop();
    shim_b.stop();
    let sa =
        crate::shim::parse_summary(&std::fs::read_to_string(shim_a.log_path()).unwrap_or_default())
            .unwrap_or_default();
    rep.shim_drops = ["dropped_queue_full", "dropped_db_down", "dropped_db_error"]
        .iter()
        .map(|k| sa.get(*k).copied().unwrap_or(0))
        .sum();
    // Buckets: the full ones only (the last is cut by the end of the stream).
    let full = (cfg.duration.as_secs_f64() / bucket).floor() as u64;
    rep.buckets = (0..full)
        .map(|b| {
            (
                b * cfg.bucket.as_secs(),
                per_bucket_delivered.get(&b).copied().unwrap_or(0),
                followed.per_bucket.get(&b).copied().unwrap_or(0),
            )
        })
        .collect();
    judge(cfg, &mut rep);
    drop(shim_a);
    drop(shim_b);
    drop(ns_a);
    drop(ns_b);
    drop(cluster);
    rep
}

/// The verdict: exactly once, and flat.
fn judge(cfg: &Config, rep: &mut Report) {
    let p = &mut rep.problems;
    if rep.sent != cfg.pps as u64 * cfg.duration.as_secs() {
        p.push(format!("the sender sent {} datagrams", rep.sent));
    }
    if rep.logged_twice > 0 {
        p.push(format!("{} datagrams were logged twice", rep.logged_twice));
    }
    if rep.delivered_dups > 0 {
        p.push(format!(
            "{} datagrams were delivered twice",
            rep.delivered_dups
        ));
    }
    if rep.delivered_distinct != rep.logged_stream {
        p.push(format!(
            "delivered {} distinct datagrams, the log had {} (every logged one must arrive, nothing unlogged can)",
            rep.delivered_distinct, rep.logged_stream
        ));
    }
    if rep.rows_to_bob as i64 != rep.counter_to_bob {
        p.push(format!(
            "the follower saw {} rows for bob, bob's counter says {} (a row skipped in id order?)",
            rep.rows_to_bob, rep.counter_to_bob
        ));
    }
    if rep.expired_unread != 0 {
        p.push(format!(
            "{} packets expired before bob read them",
            rep.expired_unread
        ));
    }
    let lost = rep.sent as i64 - rep.logged_stream as i64;
    if lost != rep.shim_drops + rep.rejected {
        p.push(format!(
            "{lost} datagrams never reached the log, the shim accounts for {} (drops) + {} (rejects)",
            rep.shim_drops, rep.rejected
        ));
    }
    // Retention really worked during the run.
    let expected_drops = (cfg.duration.as_secs() as i64 - i64::from(cfg.retention_s))
        / i64::from(cfg.chunk_interval_s)
        / 2;
    if (rep.dropped_chunks as i64) < expected_drops.max(1) {
        p.push(format!(
            "only {} chunks were dropped (expected at least {expected_drops})",
            rep.dropped_chunks
        ));
    }
    // Flat throughput.
    let delivered: Vec<f64> = rep.buckets.iter().map(|b| b.1 as f64).collect();
    if let Err(e) = flat(&delivered, 0.15) {
        p.push(format!("delivered per bucket: {e}"));
    }
    // Bounded log: once retention applies, at most retention + two chunks + a prune
    // interval or two of traffic, and no growth from the middle to the end.
    let settle =
        f64::from(cfg.retention_s + 2 * cfg.chunk_interval_s) + 2.0 * cfg.prune_every.as_secs_f64();
    let bound = (f64::from(cfg.pps) * (settle + 2.0)) as i64;
    let late: Vec<&Sample> = rep.samples.iter().filter(|s| s.t > settle).collect();
    if let Some(s) = late.iter().find(|s| s.log_rows > bound) {
        p.push(format!(
            "at {:.0} s the log held {} rows, more than retention allows ({bound})",
            s.t, s.log_rows
        ));
    }
    if late.len() >= 4 {
        let half = late.len() / 2;
        let max_of =
            |v: &[&Sample], f: &dyn Fn(&Sample) -> f64| v.iter().map(|s| f(s)).fold(0.0, f64::max);
        type Check<'a> = (&'a str, &'a dyn Fn(&Sample) -> f64, f64);
        let checks: [Check; 5] = [
            ("log bytes", &|s| s.log_bytes as f64, 0.25),
            ("alice's shim RSS", &|s| s.shim_rss_kb[0] as f64, 0.20),
            ("bob's shim RSS", &|s| s.shim_rss_kb[1] as f64, 0.20),
            (
                "backends' private RSS",
                &|s| s.backend_anon_kb_max as f64,
                0.20,
            ),
            ("dead rows", &|s| s.dead_rows as f64, 1.0),
        ];
        for (what, f, slack) in checks {
            let (first, second) = (max_of(&late[..half], f), max_of(&late[half..], f));
            // Small absolute wobble is not growth (allocator pages, a few rows).
            if second > first * (1.0 + slack) + 2048.0 {
                p.push(format!(
                    "{what} grew from {first:.0} to {second:.0} between the first and the second half of the steady state"
                ));
            }
        }
    }
}
