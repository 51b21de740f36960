//! The upgrade from 0.1.0: a database filled by version 0.1.0 (built from its tagged
//! commit) is upgraded in place to the current version (`ALTER EXTENSION pgvpn UPDATE`
//! after a restart with the new library) and must keep every packet with its id, every
//! cursor and counter, deliver on, rotate and drop its chunks (the old ones that 0.1.0
//! made extension members too), survive pg_dump, and end up with the schema of a fresh
//! install of the current version.
//!
//! Both versions are installed into a private copy of PostgreSQL (`pgvpn_tests::pgcopy`),
//! never into the system's. 0.1.0 is built from its tag on the first run with a target
//! directory (a few minutes, then cached under `<target>/pgvpn-upgrade/`); the current
//! version's files are taken from the system's PostgreSQL, where `make install` put them
//! (`make test-e2e` installs first): both versions share the name `pgvpn.so`, so they
//! are installed into the private copy one after the other, with a restart between.
//!
//! One test in this file on purpose: it points the harness at the private copy with
//! `PGVPN_PG_BINDIR`, for this whole test process.
//!
//! `PGVPN_UPGRADE_SCRIPT=/path/pgvpn--0.1.0--0.2.0.sql` tries a draft upgrade script
//! that is not installed yet (it replaces the installed one of its name).
//!
//! Needs root.

use pgvpn_tests::dbstate::{self, Snapshot};
use pgvpn_tests::fill::{self, backlogs, fill, packet};
use pgvpn_tests::pgcopy::{self, Builder, PrivatePg};
use pgvpn_tests::pgtools::{self, Format, Scratch};
use pgvpn_tests::schemadiff::{self, Entry};
use pgvpn_tests::sql::{ack, add_peer, cursor, recv, scalar_i64, send};
use pgvpn_tests::{db_error, util, Cluster};
use postgres::Client;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DB: &str = "vpn";
const FRESH: &str = "fresh";
const TAG: &str = "v0.1.0";
const TAG_COMMIT: &str = "dc4d43a6d952df304fd4dd5d24968927beea9bb6";
const RECEIVERS: [&str; 2] = ["alpha", "bravo"];

/// Differences between the upgraded schema and a fresh install that are expected, each
/// with why: (substring of the entry's header, reason). Anything else fails the test.
const ALLOWED: &[(&str, &str)] = &[];

fn extversion(su: &mut Client) -> String {
    su.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'pgvpn'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// The chunk relations that are members of the extension.
fn member_chunks(su: &mut Client) -> Vec<String> {
    su.query(
        "SELECT c.relname::text FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass \
            AND d.objid = c.oid AND d.deptype = 'e' \
          JOIN pg_inherits i ON i.inhrelid = c.oid ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The extension's configuration tables by name, with their dump conditions.
fn config_tables(su: &mut Client) -> Vec<String> {
    su.query(
        "SELECT format('%s %L', c::regclass, cond) FROM pg_extension e, \
                unnest(e.extconfig, e.extcondition) AS u(c, cond) \
          WHERE e.extname = 'pgvpn' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn send_new(cluster: &Cluster, db: &str, tag: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for (from, to) in [("alpha", "bravo"), ("bravo", "alpha")] {
        let mut c = cluster.connect(from, db);
        let batch: Vec<Vec<u8>> = (0..5)
            .map(|k| packet(from, to, &format!("{tag}-{from}-{to}-{k}")))
            .collect();
        assert_eq!(send(&mut c, &batch), 5, "{from} sends after the upgrade");
        out.push((to.to_string(), batch));
    }
    out
}

fn prune(su: &mut Client, times: usize) -> i32 {
    let mut dropped = 0;
    for _ in 0..times {
        std::thread::sleep(Duration::from_millis(1100));
        dropped += su
            .query_one("SELECT pgvpn.prune()", &[])
            .unwrap_or_else(|e| panic!("pgvpn.prune(): {}", db_error(&e)))
            .get::<_, i32>(0);
    }
    dropped
}

/// The schema differences between `upgraded` and `fresh` (binary-upgrade schema
/// dumps, normalised), minus [`ALLOWED`]; one message per difference. The raw dumps
/// are written to `tmp` (kept with `PGVPN_KEEP_LOGS=1`).
fn schema_differences(
    cluster: &Cluster,
    tmp: &Scratch,
    upgraded: &str,
    fresh: &str,
) -> Vec<String> {
    let dump = |db: &str| {
        let text = pgtools::schema_dump(cluster, db, true);
        std::fs::write(tmp.file(&format!("{db}.schema.sql")), &text).expect("write dump");
        schemadiff::parse(&text)
    };
    let (a, b) = (dump(upgraded), dump(fresh));
    let allowed = |e: &&Entry| ALLOWED.iter().any(|(h, _)| e.header.contains(h));
    let mut out = Vec::new();
    let only_a: Vec<&Entry> = schemadiff::missing_from(&a.objects, &b.objects)
        .into_iter()
        .filter(|e| !allowed(e))
        .collect();
    let only_b: Vec<&Entry> = schemadiff::missing_from(&b.objects, &a.objects)
        .into_iter()
        .filter(|e| !allowed(e))
        .collect();
    if !only_a.is_empty() {
        out.push(format!(
            "in the upgraded schema, not in a fresh install:\n{}",
            schemadiff::render(&only_a)
        ));
    }
    if !only_b.is_empty() {
        out.push(format!(
            "in a fresh install, not in the upgraded schema:\n{}",
            schemadiff::render(&only_b)
        ));
    }
    // Chunks: each upgraded chunk must look like a fresh chunk in the same state.
    let mut su_a = cluster.superuser(upgraded);
    let mut su_b = cluster.superuser(fresh);
    let state = |c: &mut Client| -> std::collections::BTreeMap<i32, bool> {
        dbstate::chunks(c)
            .into_iter()
            .map(|k| (k.chunk, k.indexed))
            .collect()
    };
    let (state_a, state_b) = (state(&mut su_a), state(&mut su_b));
    let shape = |indexed: bool| -> Option<&BTreeSet<Entry>> {
        state_b
            .iter()
            .find(|(_, &i)| i == indexed)
            .and_then(|(k, _)| b.chunks.get(k))
    };
    for (k, entries) in &a.chunks {
        let indexed = state_a.get(k).copied().unwrap_or(false);
        let Some(want) = shape(indexed) else {
            out.push(format!(
                "the fresh install has no chunk with indexed = {indexed} to compare chunk {k} with"
            ));
            continue;
        };
        if entries != want {
            let got: Vec<Entry> = entries.iter().cloned().collect();
            let want: Vec<Entry> = want.iter().cloned().collect();
            let extra = schemadiff::missing_from(&got, &want);
            let lacking = schemadiff::missing_from(&want, &got);
            out.push(format!(
                "chunk {k} (indexed: {indexed}) differs from a fresh chunk:\n only in the upgraded chunk:\n{}\n only in a fresh chunk:\n{}",
                schemadiff::render(&extra),
                schemadiff::render(&lacking)
            ));
        }
    }
    let (ca, cb) = (config_tables(&mut su_a), config_tables(&mut su_b));
    if ca != cb {
        out.push(format!(
            "tables marked with pg_extension_config_dump: upgraded {ca:?}, fresh {cb:?}"
        ));
    }
    out
}

/// The comparison still sees a real difference: a copy of the fresh database that
/// lacks one grant and one chunk index must differ from the fresh one in exactly
/// those, and an untouched copy in nothing.
fn negative_control(cluster: &Cluster, tmp: &Scratch) {
    let mut su = cluster.superuser("postgres");
    for db in ["fresh_copy", "fresh_broken"] {
        su.batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {FRESH}"))
            .unwrap_or_else(|e| panic!("copy {FRESH}: {}", db_error(&e)));
    }
    let same = schema_differences(cluster, tmp, "fresh_copy", FRESH);
    assert!(
        same.is_empty(),
        "a copy of a database differs from it in the schema comparison:\n{}",
        same.join("\n")
    );
    let mut b = cluster.superuser("fresh_broken");
    let index: String = b
        .query_one(
            "SELECT i.indexrelid::regclass::text FROM pgvpn.chunks c \
               JOIN pg_index i ON i.indrelid = c.relid \
              WHERE c.indexed_at IS NOT NULL ORDER BY 1 LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    b.batch_execute(&format!(
        "REVOKE EXECUTE ON FUNCTION pgvpn.metrics() FROM pgvpn_auditor; DROP INDEX {index}"
    ))
    .unwrap();
    drop(b);
    let found = schema_differences(cluster, tmp, "fresh_broken", FRESH).join("\n");
    assert!(
        found.contains("FUNCTION metrics()") && found.contains("Type: ACL"),
        "the schema comparison misses a revoked grant; it reported:\n{found}"
    );
    let index_name = index.trim_start_matches("pgvpn.");
    let k = index_name[8..14].to_string();
    let pattern = index_name.replace(&k, "KKKKKK");
    assert!(
        found.contains(&format!("chunk {}", k.parse::<i32>().unwrap())) && found.contains(&pattern),
        "the schema comparison misses a dropped chunk index ({index}); it reported:\n{found}"
    );
    eprintln!("negative control: a revoked grant and a dropped index are reported:\n{found}");
}

#[test]
fn upgrade_from_0_1_0_keeps_the_log_and_matches_a_fresh_install() {
    assert!(
        util::is_root(),
        "the upgrade test needs root (runs clusters as postgres)"
    );
    let t0 = Instant::now();
    let tmp = Scratch::new("upgrade");
    let draft = std::env::var_os("PGVPN_UPGRADE_SCRIPT").map(std::path::PathBuf::from);
    if let Some(d) = &draft {
        eprintln!("using the draft upgrade script {}", d.display());
    }
    let new = pgcopy::installed(&tmp.file("current"), draft.as_deref());
    let builder = Builder::open();
    let old = builder.tagged(TAG, TAG_COMMIT);
    drop(builder);
    eprintln!(
        "{TAG}'s build: {:.0?} (cached after the first run); current scripts {:?}",
        t0.elapsed(),
        new.scripts()
    );
    assert_eq!(old.default_version(), "0.1.0");
    let pg = PrivatePg::new("upgrade");
    pg.install(&old);
    // This process's clusters and tools now come from the private copy.
    std::env::set_var("PGVPN_PG_BINDIR", pg.bindir());

    // --- 0.1.0: a database with history
    let mut cluster = Cluster::with_pgvpn(DB);
    let mut su = cluster.superuser(DB);
    assert_eq!(extversion(&mut su), "0.1.0");
    let filled = fill(&cluster, DB);
    let members = member_chunks(&mut su);
    eprintln!(
        "0.1.0: {filled:?}; chunks {:?}; chunks that are extension members: {members:?}",
        dbstate::chunks(&mut su)
            .iter()
            .map(|c| c.chunk)
            .collect::<Vec<_>>()
    );
    let cols = dbstate::columns(&mut su, "pgvpn");
    let before = dbstate::snapshot_columns(&mut su, &cols);
    let seqs_before: Snapshot = dbstate::snapshot(&mut su, "pgvpn")
        .into_iter()
        .filter(|(k, _)| k.starts_with("sequence "))
        .collect();
    let packets_before = dbstate::packets(&mut su);
    let backlog_before = backlogs(&cluster, DB, &RECEIVERS);
    let chunks_before = dbstate::chunks(&mut su);
    drop(su);

    // --- the new library (a restart: it lives in shared memory), then the update
    cluster.stop_fast();
    pg.install(&new);
    cluster.start_again();
    let mut su = cluster.superuser(DB);
    let target = pg.default_version();
    if let Err(e) = su.batch_execute("ALTER EXTENSION pgvpn UPDATE") {
        panic!(
            "ALTER EXTENSION pgvpn UPDATE (0.1.0 -> {target}) failed: {}\nthe current build's scripts: {:?}\n--- server log ---\n{}",
            db_error(&e),
            new.scripts(),
            cluster.log_tail(30)
        );
    }
    assert_eq!(extversion(&mut su), target);

    let mut problems: Vec<String> = Vec::new();
    // Every packet with its id, every old row with its old columns' values (views too),
    // the sequences where they were.
    if dbstate::packets(&mut su) != packets_before {
        problems.push("the log's packets (ids or contents) changed in the upgrade".into());
    }
    let after = dbstate::snapshot_columns(&mut su, &cols);
    problems.extend(dbstate::diff(&before, &after, "0.1.0", "upgraded"));
    let seqs_after: Snapshot = dbstate::snapshot(&mut su, "pgvpn")
        .into_iter()
        .filter(|(k, _)| k.starts_with("sequence "))
        .collect();
    for (k, v) in &seqs_before {
        if seqs_after.get(k) != Some(v) {
            problems.push(format!("{k}: 0.1.0 {v}, upgraded {:?}", seqs_after.get(k)));
        }
    }
    problems.extend(
        dbstate::chunk_catalog_problems(&mut su)
            .into_iter()
            .map(|p| format!("after the upgrade: {p}")),
    );
    if fill::has_function(&mut su, "metrics") {
        if let Err(e) = su.query("SELECT * FROM pgvpn.metrics()", &[]) {
            problems.push(format!("pgvpn.metrics(): {}", db_error(&e)));
        }
    }

    // Delivery: new ids above everything; each receiver's backlog, then the new ones.
    let (max_id, _) = dbstate::highest_id_and_cursor(&mut su);
    let new_packets = send_new(&cluster, DB, "upgraded");
    let first_new = scalar_i64(
        &mut su,
        &format!("SELECT min(id) FROM pgvpn.packets WHERE id > {max_id}"),
    );
    if scalar_i64(
        &mut su,
        &format!("SELECT count(*) FROM pgvpn.packets WHERE id > {max_id}"),
    ) != 10
    {
        problems.push(format!(
            "the packets sent after the upgrade do not all have ids above the old log ({max_id})"
        ));
    }
    for (peer, old_backlog) in &backlog_before {
        let mut c = cluster.connect(peer, DB);
        let cur = cursor(&mut c);
        let rows = recv(&mut c, cur, 65_536);
        let want: Vec<Vec<u8>> = old_backlog
            .iter()
            .map(|(_, p)| p.clone())
            .chain(
                new_packets
                    .iter()
                    .filter(|(to, _)| to == peer)
                    .flat_map(|(_, b)| b.clone()),
            )
            .collect();
        if rows.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>() != want {
            problems.push(format!(
                "{peer}: recv(cursor()) after the upgrade returned {} packets, expected its backlog of {} and {} new",
                rows.len(),
                old_backlog.len(),
                want.len() - old_backlog.len()
            ));
        }
        if let Some((id, _)) = rows.last() {
            ack(&mut c, *id);
        }
    }
    eprintln!(
        "first id after the upgrade: {first_new} (chunk {})",
        first_new >> 40
    );

    // A dump of the upgraded database keeps the whole log (0.1.0's first chunks were
    // extension members, which pg_dump skips).
    let file = tmp.file("upgraded.sql");
    pgtools::dump(&cluster, DB, Format::Plain, &file);
    cluster.create_db("dumped");
    let out = pgtools::psql_file(&cluster, "dumped", &file);
    if !out.status.success() {
        problems.push(format!(
            "the upgraded database's plain dump does not restore: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    } else {
        let mut d = cluster.superuser("dumped");
        let (n_src, n_dump) = (
            scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"),
            scalar_i64(&mut d, "SELECT count(*) FROM pgvpn.packets"),
        );
        if dbstate::packets(&mut d) != dbstate::packets(&mut su) {
            problems.push(format!(
                "a dump of the upgraded database does not keep the log: {n_dump} of {n_src} packets"
            ));
        }
    }

    // The schema: as a fresh install of the same version.
    cluster.create_db(FRESH);
    cluster.create_extension(FRESH);
    {
        let mut f = cluster.superuser(FRESH);
        add_peer(
            &mut f,
            "alpha",
            "alpha",
            &[&format!("{}/32", fill::addr("alpha"))],
        );
        add_peer(
            &mut f,
            "bravo",
            "bravo",
            &[&format!("{}/32", fill::addr("bravo"))],
        );
        let mut a = cluster.connect("alpha", FRESH);
        send(&mut a, &[packet("alpha", "bravo", "fresh")]);
        f.batch_execute("SET pgvpn.chunk_interval = '1s'; SET pgvpn.retention = '1d'")
            .unwrap();
        prune(&mut f, 1); // closes chunk 0
        prune(&mut f, 1); // builds its host-pair index
    }
    problems.extend(schema_differences(&cluster, &tmp, DB, FRESH));
    negative_control(&cluster, &tmp);

    // Retention: every chunk from before the upgrade is rotated out and dropped, the
    // old member chunks too; the catalog and the partitions stay in step.
    su.batch_execute("SET pgvpn.retention = '1s'; SET pgvpn.chunk_interval = '1s'")
        .unwrap();
    let mut dropped = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100));
        match su.query_one("SELECT pgvpn.prune()", &[]) {
            Ok(r) => dropped += r.get::<_, i32>(0),
            Err(e) => {
                problems.push(format!("prune() after the upgrade: {}", db_error(&e)));
                break;
            }
        }
    }
    let left: Vec<i32> = dbstate::chunks(&mut su).iter().map(|c| c.chunk).collect();
    for c in chunks_before.iter().filter(|c| c.opened) {
        if left.contains(&c.chunk) {
            problems.push(format!(
                "chunk {} ({}) was not dropped by prune()",
                c.chunk, c.relid
            ));
        }
    }
    let n = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets");
    if n != 0 {
        problems.push(format!("{n} packets left after every chunk expired"));
    }
    problems.extend(
        dbstate::chunk_catalog_problems(&mut su)
            .into_iter()
            .map(|p| format!("after pruning: {p}")),
    );
    let more = send_new(&cluster, DB, "after-prune");
    let mut bravo = cluster.connect("bravo", DB);
    let cur = cursor(&mut bravo);
    let got: Vec<Vec<u8>> = recv(&mut bravo, cur, 100)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if got != more[0].1 {
        problems.push("delivery after pruning the upgraded log".into());
    }
    eprintln!(
        "prune() dropped {dropped} chunks; left {left:?}; the whole test took {:.0?}",
        t0.elapsed()
    );
    assert!(
        problems.is_empty(),
        "the upgrade from 0.1.0 did not hold:\n{}",
        problems.join("\n")
    );
    drop(bravo);
    drop(su);
    drop(cluster);
    drop(pg);
}
