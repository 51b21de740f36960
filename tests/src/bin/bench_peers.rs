//! `make bench-peers`: many peers active at once. 2, 8, 32 and 64 concurrent SQL peers
//! (postgres client threads, no tun), each sending batches of packets to random other
//! active peers for a few seconds, every batch its own durable transaction. Reports per
//! level: the aggregate packets/s, Jain's fairness index over the per-peer rates, what
//! the senders' backends wait for (pg_stat_activity and pg_locks, `bench::waits`) —
//! the receivers' ordering locks, WAL, NOTIFY's commit lock — and the NOTIFYs per
//! commit, counted by a session LISTENing on every peer's channel as 0.1.0 named them
//! (`pgvpn_<peer>`; 0.2.0 wakes receivers through shared memory instead). Run as root:
//!
//! ```text
//! cargo run --release -p pgvpn-tests --bin bench-peers -- [--seconds S] [--peers 2,8,32,64]
//! ```
//!
//! Writes `<target>/bench/peers-<timestamp>.json` and `peers-latest.json`. Exits 0
//! whatever the speed; 1 if a measurement failed, 2 on bad flags, 130 when interrupted.

#[allow(
    dead_code,
    reason = "modules shared by the bench binaries; each uses a part"
)]
#[path = "../bench/mod.rs"]
mod bench;

use bench::report::{self, num};
use bench::topology::BENCH_CONF;
use bench::waits::{self, Wait};
use bench::{check_interrupt, interrupted, Result};
use pgvpn_core::sql::quote_ident;
use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::sql::create_peer;
use pgvpn_tests::{db_error, packet, Cluster, Rng};
use postgres::fallible_iterator::FallibleIterator;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DB: &str = "peers";
/// Packets per `send` and their size (IP header included): small, as interactive
/// traffic between many hosts is.
const BATCH: usize = 32;
const SIZE: usize = 200;
/// The application_name prefix of the senders (`peer-N`), as `waits` groups them.
const APP: &str = "peer-";
const GROUP: &str = "peer";

const USAGE: &str = "usage: bench-peers [--seconds S] [--peers N,N,...]
  --seconds S     how long each level sends (default 5)
  --peers LIST    the numbers of concurrent peers (default 2,8,32,64; at most 200)";

struct Settings {
    seconds: u64,
    levels: Vec<usize>,
}

fn parse_args(args: &[String]) -> std::result::Result<Settings, String> {
    let mut s = Settings {
        seconds: 5,
        levels: vec![2, 8, 32, 64],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                s.seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|v| *v > 0)
                    .ok_or("--seconds needs a positive number")?
            }
            "--peers" => {
                s.levels = it
                    .next()
                    .ok_or("--peers needs a list")?
                    .split(',')
                    .map(|v| v.parse().ok().filter(|n| (2..=200).contains(n)))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or("--peers: numbers from 2 to 200, comma-separated")?
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(s)
}

/// Peer `i` (0-based): its role name and address.
fn peer(i: usize) -> (String, String) {
    (
        format!("p{}", i + 1),
        format!("198.18.{}.{}", i / 250, i % 250 + 1),
    )
}

/// What one sender did.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    accepted: u64,
    offered: u64,
    commits: u64,
}

/// Jain's fairness index: (Σx)² / (n·Σx²); 1 when all are equal, 1/n when one has all.
fn jain(x: &[f64]) -> f64 {
    let (sum, sq): (f64, f64) = x.iter().fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
    if x.is_empty() || sq == 0.0 {
        return 0.0;
    }
    sum * sum / (x.len() as f64 * sq)
}

/// Peer `me` of `active` sends batches to random others until `stop`.
fn sender(
    cluster: &Cluster,
    me: usize,
    active: usize,
    start: &Barrier,
    stop: &AtomicBool,
) -> Result<Sent> {
    let (name, addr) = peer(me);
    let mut c = cluster
        .try_connect(&name, DB)
        .map_err(|e| format!("connect as {name}: {e}"))?;
    c.batch_execute(&format!("SET application_name = '{APP}{me}'"))
        .map_err(|e| db_error(&e))?;
    // One packet to every other active peer; a batch picks among them.
    let to: Vec<Vec<u8>> = (0..active)
        .filter(|&j| j != me)
        .map(|j| packet::udp(&addr, &peer(j).1, 40000 + me as u16, 9, &[0x5a; SIZE - 28]))
        .collect();
    let mut rng = Rng::new(me as u64 + 1);
    let mut done = Sent::default();
    start.wait();
    while !stop.load(Ordering::SeqCst) {
        let batch: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| to[rng.below(to.len() as u64) as usize].clone())
            .collect();
        let n: i64 = c
            .query_one(pgvpn_core::sql::SEND, &[&batch])
            .map_err(|e| format!("send as {name}: {}", db_error(&e)))?
            .get(0);
        done.accepted += n as u64;
        done.offered += BATCH as u64;
        done.commits += 1;
    }
    Ok(done)
}

/// Counts the notifications on every peer's 0.1.0-style channel until `stop`.
fn listener(cluster: &Cluster, peers: usize, ready: &Barrier, stop: &AtomicBool) -> Result<u64> {
    let mut c = cluster.superuser(DB);
    let listen: String = (0..peers)
        .map(|i| format!("LISTEN {};", quote_ident(&format!("pgvpn_{}", peer(i).0))))
        .collect();
    c.batch_execute(&listen).map_err(|e| db_error(&e))?;
    ready.wait();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut notes = c.notifications();
        let mut it = notes.timeout_iter(Duration::from_millis(100));
        while it.next().map_err(|e| db_error(&e))?.is_some() {
            n += 1;
        }
    }
    Ok(n)
}

/// One level: `k` peers sending for `secs`.
fn level(cluster: &Cluster, k: usize, secs: u64) -> Result<Value> {
    let stop = AtomicBool::new(false);
    // The senders, the listener and this thread start together.
    let start = Barrier::new(k + 2);
    let (sent, notifies, waits, elapsed) = std::thread::scope(|sc| {
        let senders: Vec<_> = (0..k)
            .map(|i| {
                let (start, stop) = (&start, &stop);
                sc.spawn(move || {
                    let r = sender(cluster, i, k, start, stop);
                    if r.is_err() {
                        // Release the others rather than leave them waiting for us.
                        stop.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        let listen = sc.spawn(|| listener(cluster, k, &start, &stop));
        let sampler = sc.spawn(|| waits::sample(cluster, DB, APP, &stop));
        start.wait();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) && !stop.load(Ordering::SeqCst) {
            if interrupted() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::SeqCst);
        let elapsed = t.elapsed().as_secs_f64();
        let sent: Vec<Result<Sent>> = senders
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a sender panicked".into())))
            .collect();
        let notifies = listen
            .join()
            .unwrap_or_else(|_| Err("the listener panicked".into()));
        let waits = sampler
            .join()
            .unwrap_or_else(|_| Err("the sampler panicked".into()));
        (sent, notifies, waits, elapsed)
    });
    // Senders may stop a batch after `stop` (one more commit each): counted, and the
    // rate is over the senders' own time, which ends with that batch.
    check_interrupt()?;
    let sent: Vec<Sent> = sent.into_iter().collect::<Result<_>>()?;
    let (notifies, waits) = (notifies?, waits?);
    let rates: Vec<f64> = sent.iter().map(|s| s.accepted as f64 / elapsed).collect();
    let total: f64 = rates.iter().sum();
    let commits: u64 = sent.iter().map(|s| s.commits).sum();
    let offered: u64 = sent.iter().map(|s| s.offered).sum();
    let accepted: u64 = sent.iter().map(|s| s.accepted).sum();
    let shares: serde_json::Map<String, Value> = Wait::ALL
        .iter()
        .map(|w| (w.name().to_string(), waits.share(GROUP, *w).into()))
        .collect();
    Ok(json!({
        "peers": k,
        "seconds": elapsed,
        "packets_per_s": total,
        "accepted": accepted,
        "offered": offered,
        "commits": commits,
        "commits_per_s": commits as f64 / elapsed,
        "jain_fairness": jain(&rates),
        "per_peer_packets_per_s": rates,
        "notifies_received": notifies,
        "notifies_per_commit": notifies as f64 / commits.max(1) as f64,
        "notify_lock_wait_pct": waits.lock_share(GROUP, "notify"),
        "ordering_lock_wait_pct": waits.lock_share(GROUP, "receiver"),
        "routing_lock_wait_pct": waits.lock_share(GROUP, "routing"),
        "backend_wait_pct": shares,
        "waits": waits.to_json(),
    }))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let s = bench::start("bench-peers", USAGE, &args, parse_args, &["runuser"]);
    std::process::exit(run(&s));
}

fn run(s: &Settings) -> i32 {
    let t0 = Instant::now();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let most = s.levels.iter().copied().max().unwrap_or(2);
    eprintln!("[bench-peers] a private PostgreSQL cluster with {most} peers…");
    let mut conf: Vec<String> = BENCH_CONF.iter().map(|l| l.to_string()).collect();
    // Every sender, the listener, the sampler and the harness's own sessions.
    conf.push(format!("max_connections = {}", most + 20));
    let cluster = Cluster::start_with(ClusterOptions {
        extra_conf: conf,
        ..ClusterOptions::default()
    });
    cluster.create_db(DB);
    cluster.create_extension(DB);
    for i in 0..most {
        let (name, addr) = peer(i);
        create_peer(&cluster, DB, &name, &[&format!("{addr}/32")]);
    }
    let env = report::environment(&cluster, DB, started);

    let mut levels = Vec::new();
    let mut errors = Vec::new();
    for &k in &s.levels {
        eprintln!("[bench-peers] {k} peers sending for {} s", s.seconds);
        match level(&cluster, k, s.seconds) {
            Ok(v) => {
                eprintln!(
                    "[bench-peers]   {} pkt/s, Jain {:.3}, ordering-lock wait {:.1}%, \
                     NOTIFY-lock wait {:.1}%, {} NOTIFYs per commit",
                    num(v["packets_per_s"].as_f64().unwrap_or(0.0)),
                    v["jain_fairness"].as_f64().unwrap_or(0.0),
                    v["ordering_lock_wait_pct"].as_f64().unwrap_or(0.0),
                    v["notify_lock_wait_pct"].as_f64().unwrap_or(0.0),
                    num(v["notifies_per_commit"].as_f64().unwrap_or(0.0)),
                );
                levels.push(v);
            }
            Err(_) if interrupted() => {
                eprintln!("[bench-peers] interrupted; everything was torn down.");
                return 130;
            }
            Err(e) => {
                eprintln!("[bench-peers] {k} peers: FAILED: {e}");
                errors.push(format!("{k} peers: {e}"));
            }
        }
    }
    drop(cluster);

    let table = render(&env, s, &levels, &errors);
    println!("\n{table}");
    let json = json!({
        "started_utc": env.started_utc,
        "host": env.host_json(),
        "postgres_settings": env.settings_json(),
        "settings": {"seconds": s.seconds, "levels": s.levels, "batch": BATCH, "packet_bytes": SIZE},
        "levels": levels,
        "errors": errors,
        "ok": errors.is_empty(),
        "duration_s": t0.elapsed().as_secs_f64(),
        "table": table,
    });
    match report::save("peers", "peers-latest.json", started, &json) {
        Ok(p) => println!("JSON: {} (and peers-latest.json)", p.display()),
        Err(e) => {
            eprintln!("bench-peers: cannot write the JSON report: {e}");
            return 1;
        }
    }
    i32::from(!errors.is_empty())
}

fn render(env: &report::Env, s: &Settings, levels: &[Value], errors: &[String]) -> String {
    let mut o = format!(
        "pgvpn bench-peers — {}, {}, {} cores, PostgreSQL {}\n\
         each peer: batches of {BATCH} × {SIZE} B to random other active peers, {} s per level\n",
        env.started_utc, env.cpu_model, env.cores, env.postgres, s.seconds
    );
    o += &format!(
        "{:<7}{:>10}{:>9}{:>12}{:>11}{:>8}{:>8}{:>8}{:>13}\n",
        "peers", "pkt/s", "Jain", "commits/s", "order lck", "WAL", "CPU", "client", "NOTIFY lk/n"
    );
    for v in levels {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let w = |k: &str| v["backend_wait_pct"][k].as_f64().unwrap_or(f64::NAN);
        o += &format!(
            "{:<7}{:>10}{:>9.3}{:>12}{:>10.1}%{:>7.1}%{:>7.1}%{:>7.1}%{:>7.1}% / {}\n",
            v["peers"].as_u64().unwrap_or(0),
            num(f("packets_per_s")),
            f("jain_fairness"),
            num(f("commits_per_s")),
            f("ordering_lock_wait_pct"),
            w(Wait::Wal.name()),
            w(Wait::Cpu.name()),
            w(Wait::Client.name()),
            f("notify_lock_wait_pct"),
            num(f("notifies_per_commit")),
        );
    }
    o += "wait shares: % of the senders' backend samples (every 50 ms): waiting for a receiver's\n\
          ordering lock, WAL, running, waiting for the client; NOTIFY: waiting for NOTIFY's\n\
          commit lock / NOTIFYs received per commit on the peers' pgvpn_<name> channels\n";
    for e in errors {
        o += &format!("ERROR {e}\n");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness() {
        assert!((jain(&[5.0, 5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[9.0, 0.0, 0.0]) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(jain(&[]), 0.0);
    }

    #[test]
    fn flags_and_addresses() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let s = parse_args(&[]).unwrap();
        assert_eq!((s.seconds, s.levels), (5, vec![2, 8, 32, 64]));
        let s = parse_args(&a("--seconds 2 --peers 2,4")).unwrap();
        assert_eq!((s.seconds, s.levels), (2, vec![2, 4]));
        assert!(parse_args(&a("--peers 1")).is_err());
        assert!(parse_args(&a("--peers 300")).is_err());
        assert!(parse_args(&a("--seconds 0")).is_err());
        assert_eq!(peer(0), ("p1".into(), "198.18.0.1".into()));
        assert_eq!(peer(250), ("p251".into(), "198.18.1.1".into()));
    }
}
