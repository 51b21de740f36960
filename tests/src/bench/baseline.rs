//! Before and after in one run (issue #14: what the send redesign costs): the database
//! ceiling measured against two private PostgreSQL installations, one holding an older
//! pgvpn and one the current one, in alternating child processes (before, after,
//! before, after) so that the machine's noise hits both sides alike.
//!
//! * Before: `--baseline TAG` (`make bench` passes v0.1.0) builds that tag with
//!   `pgvpn_tests::pgcopy` into a private copy of PostgreSQL; `--baseline-bindir DIR` or
//!   `PGVPN_BENCH_BASELINE_BINDIR` names an installation made some other way (then its
//!   build flags are the caller's to match).
//! * After: the current version built the same way, by pgcopy (no LTO), not the
//!   system's install (thin LTO, `make install`): a comparison across build flags would
//!   measure the flags. pgcopy builds commits only, so this is HEAD's extension; when
//!   the tree's extension sources differ from HEAD, the report says so.
//!
//! The harness takes its PostgreSQL from `PGVPN_PG_BINDIR`, read anywhere in the
//! process, so each side runs in a child process of this binary with that variable
//! set (`bench --ceiling-child SIZES SECONDS OUT`): its own cluster, peers alice and bob,
//! the same [`ceiling::measure`], the figures as JSON in OUT. Only the API that 0.1.0
//! already had is used (add_peer, send, recv, ack, the packet_id sequence).

use super::ceiling::{self, Ceiling};
use super::topology::{ALICE, BENCH_CONF, BOB, DB};
use super::{check_interrupt, Result, Scratch};
use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::pgcopy::{Builder, PrivatePg};
use pgvpn_tests::sql::create_peer;
use pgvpn_tests::Cluster;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const CHILD_FLAG: &str = "--ceiling-child";
pub const ENV_BINDIR: &str = "PGVPN_BENCH_BASELINE_BINDIR";
/// The ceiling sizes compared before/after.
pub const SIZES: [usize; 3] = ceiling::COMPARED_SIZES;
/// Before/after pairs of child runs in a full bench (`--baseline-only` takes `--runs`).
pub const ROUNDS: usize = 2;

/// `bench --ceiling-child 64,1400,8000 SECONDS OUT` (in a process whose
/// `PGVPN_PG_BINDIR` names the baseline installation). Returns the exit code.
pub fn child_main(args: &[String]) -> i32 {
    let parsed = (|| -> Option<(Vec<usize>, f64, PathBuf)> {
        let sizes = args
            .first()?
            .split(',')
            .map(|s| s.parse().ok())
            .collect::<Option<Vec<usize>>>()?;
        Some((
            sizes,
            args.get(1)?.parse().ok()?,
            PathBuf::from(args.get(2)?),
        ))
    })();
    let Some((sizes, secs, out)) = parsed else {
        eprintln!("usage: bench {CHILD_FLAG} SIZE,SIZE,... SECONDS OUT [DROP,DROP,...]");
        return 2;
    };
    let drop: Vec<&str> = args
        .get(3)
        .map(|d| d.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    let cluster = Cluster::start_with(ClusterOptions {
        extra_conf: BENCH_CONF.iter().map(|s| s.to_string()).collect(),
        ..ClusterOptions::default()
    });
    cluster.create_db(DB);
    cluster.create_extension(DB);
    create_peer(&cluster, DB, "alice", &[&format!("{ALICE}/32")]);
    create_peer(&cluster, DB, "bob", &[&format!("{BOB}/32")]);
    if let Err(e) = drop_indexes(&cluster, &drop) {
        eprintln!("[bench baseline] {e}");
        return 1;
    }
    let version: String = cluster
        .superuser(DB)
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgvpn'",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or_default();
    let mut figures = serde_json::Map::new();
    for size in sizes {
        match ceiling::measure(&cluster, size, secs) {
            Ok(c) => {
                figures.insert(size.to_string(), to_json(&c));
            }
            Err(e) => {
                eprintln!("[bench baseline] ceiling {size} B: {e}");
                return 1;
            }
        }
    }
    let v = json!({"extversion": version, "ceilings": figures});
    match std::fs::write(&out, v.to_string()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("[bench baseline] write {}: {e}", out.display());
            1
        }
    }
}

/// Drops the chunks' indexes of the kinds in `kinds` (`packets_id` is every
/// `pgvpn.packets_NNNNNN_id`), for [`index_costs`]. A kind that matches nothing is an error,
/// so that a misspelt one cannot pass for a free index.
fn drop_indexes(cluster: &Cluster, kinds: &[&str]) -> Result<()> {
    let mut su = cluster.superuser(DB);
    if !kinds.is_empty() {
        // The chunks are made on the first send otherwise (the current and the next).
        su.batch_execute("SELECT pgvpn._ensure_chunks()")
            .map_err(|e| format!("make the chunks: {e}"))?;
    }
    for kind in kinds {
        let (table, suffix) = kind
            .split_once('_')
            .ok_or_else(|| format!("index kind {kind:?} is not TABLE_SUFFIX"))?;
        let pattern = format!("^{table}_[0-9]{{6}}_{suffix}$");
        let names: Vec<String> = su
            .query(
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'pgvpn' \
                 AND indexname ~ $1",
                &[&pattern],
            )
            .map_err(|e| format!("list the {kind} indexes: {e}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if names.is_empty() {
            return Err(format!("no chunk index of kind {kind:?}"));
        }
        for n in names {
            su.batch_execute(&format!("DROP INDEX pgvpn.\"{n}\""))
                .map_err(|e| format!("drop {n}: {e}"))?;
        }
    }
    Ok(())
}

fn to_json(c: &Ceiling) -> Value {
    json!({"size": c.size, "sent": c.sent, "send_secs": c.send_secs,
           "received": c.received, "recv_secs": c.recv_secs, "send_db_cpu_s": c.send_db_cpu_s})
}

fn from_json(v: &Value) -> Option<Ceiling> {
    Some(Ceiling {
        size: v["size"].as_u64()? as usize,
        sent: v["sent"].as_u64()?,
        send_secs: v["send_secs"].as_f64()?,
        received: v["received"].as_u64()?,
        recv_secs: v["recv_secs"].as_f64()?,
        send_db_cpu_s: v["send_db_cpu_s"].as_f64(),
    })
}

/// What one child measured.
#[derive(Clone, Debug)]
pub struct SideRun {
    pub extversion: String,
    pub ceilings: BTreeMap<usize, Ceiling>,
}

/// Runs the child against `bindir` and reads its figures.
pub fn measure(bindir: &Path, secs: f64, scratch: &Scratch) -> Result<SideRun> {
    measure_without(bindir, secs, &[], scratch)
}

/// [`measure`] with the chunks' indexes of the kinds in `drop` dropped first.
fn measure_without(bindir: &Path, secs: f64, drop: &[&str], scratch: &Scratch) -> Result<SideRun> {
    if !bindir.join("postgres").exists() {
        return Err(format!("no PostgreSQL in {}", bindir.display()));
    }
    let out = scratch.file("baseline.json");
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let sizes: Vec<String> = SIZES.iter().map(|s| s.to_string()).collect();
    let mut child = Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(sizes.join(","))
        .arg(secs.to_string())
        .arg(&out)
        .arg(drop.join(","))
        .env("PGVPN_PG_BINDIR", bindir)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the baseline child: {e}"))?;
    // Setup plus send and read-back per size, with room to spare.
    let deadline =
        Instant::now() + Duration::from_secs_f64(120.0 + 3.0 * secs * SIZES.len() as f64);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if check_interrupt().is_err() || Instant::now() > deadline {
            // SIGTERM lets the child's guards stop its cluster.
            pgvpn_tests::util::signal(child.id(), "TERM");
            let _ = child.wait();
            check_interrupt()?;
            return Err("the baseline child did not finish in time".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        return Err(format!("the baseline child failed ({status})"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("read {}: {e}", out.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("baseline JSON: {e}"))?;
    let ceilings = v["ceilings"]
        .as_object()
        .ok_or("baseline JSON without ceilings")?
        .iter()
        .filter_map(|(k, c)| Some((k.parse().ok()?, from_json(c)?)))
        .collect();
    Ok(SideRun {
        extversion: v["extversion"].as_str().unwrap_or("?").to_string(),
        ceilings,
    })
}

/// Where the older version comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A git tag (or commit), built with pgcopy.
    Tag(String),
    /// An installation's `bin/` directory.
    Bindir(PathBuf),
}

/// The two installations, kept while this lives.
pub struct Sides {
    pub before: (String, PathBuf),
    pub after: (String, PathBuf),
    /// Set when the after side (HEAD) is not the tree's extension.
    pub note: Option<String>,
    /// Seconds spent building (or taking from the cache) and copying both.
    pub build_s: f64,
    _copies: Vec<PrivatePg>,
}

/// pgcopy panics on a failed build; the bench reports it as an error and goes on.
fn catching<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        format!("{what}: {msg}")
    })
}

/// A private copy of PostgreSQL holding the extension of `rev`, built by pgcopy (once
/// per commit, then cached under `<target>/pgvpn-upgrade/`).
fn private_build(rev: &str) -> Result<PrivatePg> {
    catching(&format!("build pgvpn {rev} with pgcopy"), || {
        let ext = Builder::open().release().tagged(rev, rev);
        let pg = PrivatePg::new("bench-baseline");
        pg.install(&ext);
        pg
    })
}

/// The extension's sources that differ from HEAD in the work tree (`git status`).
fn uncommitted_extension_changes() -> Vec<String> {
    let out = pgvpn_tests::util::output(
        Command::new("git")
            .arg("-C")
            .arg(pgvpn_tests::util::workspace_dir())
            .args([
                "status",
                "--porcelain",
                "--",
                "pgvpn_ext",
                "pgvpn_core",
                "sql",
            ])
            .args(["Cargo.toml", "Cargo.lock"]),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.get(3..))
        .map(str::to_string)
        .collect()
}

/// Both installations (builds them on first use); the after side is `after` (a commit
/// or tag), HEAD when None.
pub fn prepare(before: &Source, after: Option<&str>) -> Result<Sides> {
    let t = Instant::now();
    let mut copies = Vec::new();
    let before = match before {
        Source::Bindir(dir) => (dir.display().to_string(), dir.clone()),
        Source::Tag(tag) => {
            eprintln!("[bench] baseline: pgvpn {tag} in a private PostgreSQL (built once)");
            let pg = private_build(tag)?;
            let dir = pg.bindir();
            copies.push(pg);
            (tag.clone(), dir)
        }
    };
    let rev = after.unwrap_or("HEAD");
    eprintln!("[bench] baseline: pgvpn {rev} built the same way");
    let commit = pgvpn_tests::pgcopy::resolve_commit(rev, rev);
    let pg = private_build(&commit)?;
    let after = (
        format!("{rev} {}", &commit[..commit.len().min(10)]),
        pg.bindir(),
    );
    copies.push(pg);
    let changed = uncommitted_extension_changes();
    let note = (rev == "HEAD" && !changed.is_empty()).then(|| {
        format!(
            "the after side is HEAD: the tree's uncommitted changes to {} are not in it",
            changed.join(", ")
        )
    });
    let build_s = t.elapsed().as_secs_f64();
    eprintln!("[bench] baseline: both installations ready after {build_s:.0} s");
    Ok(Sides {
        before,
        after,
        note,
        build_s,
        _copies: copies,
    })
}

/// Before/after figures as flat metrics (`baseline.before.64B.send_pps`, …, medians of
/// `rounds` child runs per side, alternating, and `baseline.64B.send_ratio_pct`), with
/// the versions the children saw.
pub fn compare(
    sides: &Sides,
    secs: f64,
    rounds: usize,
    scratch: &Scratch,
) -> Result<(BTreeMap<String, f64>, Value)> {
    let mut runs: BTreeMap<&str, Vec<SideRun>> = BTreeMap::new();
    let t = Instant::now();
    for round in 1..=rounds {
        for (side, (label, dir)) in [("before", &sides.before), ("after", &sides.after)] {
            eprintln!(
                "[bench] baseline round {round}/{rounds}: {side} ({label}), {secs} s per size"
            );
            let run = measure(dir, secs, scratch)?;
            for c in run.ceilings.values() {
                eprintln!(
                    "[bench]   {} B: send {:.0} pkt/s, DB CPU {} s/GB",
                    c.size,
                    c.send_pps(),
                    c.send_cpu_s_per_gb()
                        .map_or("?".into(), |g| format!("{g:.1}"))
                );
            }
            runs.entry(side).or_default().push(run);
        }
    }
    let took = t.elapsed().as_secs_f64();
    eprintln!("[bench] baseline: {took:.0} s for {rounds} × 2 child runs");
    let mut m = BTreeMap::new();
    let median_of = |side: &str, size: usize, f: &dyn Fn(&Ceiling) -> Option<f64>| {
        let v: Vec<f64> = runs[side]
            .iter()
            .filter_map(|r| f(r.ceilings.get(&size)?))
            .collect();
        super::measure::median(&v)
    };
    for size in SIZES {
        for side in ["before", "after"] {
            if let Some(v) = median_of(side, size, &|c| Some(c.send_pps())) {
                m.insert(format!("baseline.{side}.{size}B.send_pps"), v);
            }
            if let Some(v) = median_of(side, size, &|c| c.send_cpu_s_per_gb()) {
                m.insert(format!("baseline.{side}.{size}B.send_cpu_db_s_per_gb"), v);
            }
        }
        let get = |k: String| m.get(&k).copied();
        let pps = (
            get(format!("baseline.before.{size}B.send_pps")),
            get(format!("baseline.after.{size}B.send_pps")),
        );
        let cpu = (
            get(format!("baseline.before.{size}B.send_cpu_db_s_per_gb")),
            get(format!("baseline.after.{size}B.send_cpu_db_s_per_gb")),
        );
        if let (Some(b), Some(a)) = pps {
            m.insert(format!("baseline.{size}B.send_ratio_pct"), 100.0 * a / b);
        }
        if let (Some(b), Some(a)) = cpu {
            m.insert(format!("baseline.{size}B.cpu_ratio_pct"), 100.0 * a / b);
        }
    }
    let version = |side: &str| runs[side].first().map(|r| r.extversion.clone());
    let raw: BTreeMap<&str, Vec<Value>> = runs
        .iter()
        .map(|(side, v)| {
            let list = v
                .iter()
                .map(|r| {
                    json!({"extversion": r.extversion,
                    "ceilings": r.ceilings.values().map(to_json).collect::<Vec<_>>()})
                })
                .collect();
            (*side, list)
        })
        .collect();
    let info = json!({
        "before": {"source": sides.before.0, "extversion": version("before")},
        "after": {"source": sides.after.0, "extversion": version("after")},
        "note": sides.note, "seconds_per_size": secs, "rounds": rounds, "runs": raw,
        "measuring_s": took, "build_s": sides.build_s,
    });
    Ok((m, info))
}

/// What [`index_costs`] measures: the current version with every index, then without
/// the indexes that issue #13 added to the log's chunks, one kind or group at a time.
pub const INDEX_VARIANTS: [(&str, &[&str]); 4] = [
    ("every index", &[]),
    ("without the id btree", &["packets_id"]),
    ("without the conversation index", &["flows_pair"]),
    (
        "without any flow-row index",
        &[
            "flows_src",
            "flows_dst",
            "flows_port",
            "flows_pair",
            "flows_time",
        ],
    ),
];

/// `bench --index-costs`: HEAD's send ceiling in a private PostgreSQL, with each of
/// [`INDEX_VARIANTS`] in turn, `rounds` times round, as flat metrics
/// (`indexcost.<variant>.<size>B.send_pps`, medians; variant = its position).
pub fn index_costs(secs: f64, rounds: usize, scratch: &Scratch) -> Result<BTreeMap<String, f64>> {
    let head = pgvpn_tests::pgcopy::resolve_commit("HEAD", "HEAD");
    let pg = private_build(&head)?;
    let mut pps: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for round in 1..=rounds {
        for (i, (label, drop)) in INDEX_VARIANTS.iter().enumerate() {
            eprintln!("[bench] index costs round {round}/{rounds}: {label}");
            let run = measure_without(&pg.bindir(), secs, drop, scratch)?;
            for c in run.ceilings.values() {
                eprintln!("[bench]   {} B: send {:.0} pkt/s", c.size, c.send_pps());
                pps.entry((i, c.size)).or_default().push(c.send_pps());
            }
        }
    }
    Ok(pps
        .into_iter()
        .filter_map(|((i, size), v)| {
            Some((
                format!("indexcost.{i}.{size}B.send_pps"),
                super::measure::median(&v)?,
            ))
        })
        .collect())
}
