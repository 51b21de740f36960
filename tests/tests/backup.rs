//! Backups: the packet log is data, and a backup must give it back whole.
//!
//! * `pg_dump` (plain, restored with `psql -v ON_ERROR_STOP=1`; custom, restored with
//!   `pg_restore --exit-on-error`) of a live database with history (see `fill`) into an
//!   empty database of the same cluster or of another one: every packet with its id,
//!   the chunk catalog, the id sequence, cursors, counters, rejects and samples; then
//!   delivery carries on (new ids above everything, `recv(cursor())` returns the
//!   backlog and the new packets), new peers can be added, and `prune()` rotates and
//!   drops every restored chunk.
//! * A restore that lost the sequence's position (tables without it, or a setval back):
//!   the next send repairs it, says so in the server log, and delivery carries on.
//! * `pg_basebackup` taken while a sender keeps sending, started as a cluster of its own.
//!
//! Needs root and the extension installed (see `delivery.rs`).

use pgvpn_tests::dbstate::{self, Snapshot};
use pgvpn_tests::fill::{self, backlogs, fill, packet, Filled};
use pgvpn_tests::pgtools::{self, Format, Scratch};
use pgvpn_tests::sql::{ack, cursor, recv, scalar_i64, send};
use pgvpn_tests::{db_error, Cluster};
use postgres::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DB: &str = "vpn";
/// Receivers whose backlog the specs follow (charlie is removed by the fill).
const RECEIVERS: [&str; 2] = ["alpha", "bravo"];
/// The server log's WARNING when `_ensure_chunks` moves the id sequence.
const REPAIR_WARNING: &str = "was behind the log";

/// The source: a cluster with a filled pgvpn database, and what it holds.
struct Source {
    cluster: Cluster,
    filled: Filled,
    tables: Snapshot,
    views: Snapshot,
    packets: Vec<(i64, String)>,
    backlogs: Vec<pgvpn_tests::fill::Backlog>,
}

impl Source {
    fn new() -> Source {
        let cluster = Cluster::with_pgvpn(DB);
        let filled = fill(&cluster, DB);
        let mut su = cluster.superuser(DB);
        let problems = dbstate::chunk_catalog_problems(&mut su);
        assert!(
            problems.is_empty(),
            "the source's chunk catalog: {problems:#?}"
        );
        let src = Source {
            tables: dbstate::snapshot(&mut su, "pgvpn"),
            views: dbstate::views(&mut su, "pgvpn"),
            packets: dbstate::packets(&mut su),
            backlogs: backlogs(&cluster, DB, &RECEIVERS),
            filled,
            cluster,
        };
        eprintln!(
            "source: {:?}; {} chunks; backlogs {:?}",
            src.filled,
            dbstate::chunks(&mut su).len(),
            src.backlogs
                .iter()
                .map(|(p, b)| (p.clone(), b.len()))
                .collect::<Vec<_>>()
        );
        assert!(
            src.backlogs.iter().all(|(_, b)| !b.is_empty()),
            "every receiver has a backlog beyond its cursor"
        );
        src
    }
}

fn log_lines_with(cluster: &Cluster, db: &str, needle: &str) -> Vec<String> {
    std::fs::read_to_string(cluster.log_file())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle) && l.contains(&format!("@{db} ")))
        .map(str::to_string)
        .collect()
}

/// The sending sessions of alpha and bravo (a shim keeps its sessions open).
fn senders(cluster: &Cluster, db: &str) -> [(&'static str, &'static str, Client); 2] {
    [
        ("alpha", "bravo", cluster.connect("alpha", db)),
        ("bravo", "alpha", cluster.connect("bravo", db)),
    ]
}

/// New packets alpha → bravo and bravo → alpha on `sessions`; returns their payloads
/// per receiver.
fn send_on(
    sessions: &mut [(&'static str, &'static str, Client)],
    tag: &str,
) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for (from, to, c) in sessions.iter_mut() {
        let batch: Vec<Vec<u8>> = (0..5)
            .map(|k| packet(from, to, &format!("{tag}-{from}-{to}-{k}")))
            .collect();
        assert_eq!(send(c, &batch), 5, "{from} sends after the restore");
        out.push((to.to_string(), batch));
    }
    out
}

/// [`send_on`] fresh sessions.
fn send_new(cluster: &Cluster, db: &str, tag: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    send_on(&mut senders(cluster, db), tag)
}

/// Everything a restored copy must hold and do. `copy`/`db` is the restored database.
fn check_restored(src: &Source, copy: &Cluster, db: &str) {
    let mut su = copy.superuser(db);

    // Exactly what the source held: every table (each chunk on its own), every
    // sequence (the id sequence's position too), every view.
    // Differences are collected and reported together at the end, after the checks
    // that depend on them have shown what they break.
    let mut problems = Vec::new();
    let tables = dbstate::snapshot(&mut su, "pgvpn");
    problems.extend(dbstate::diff(&src.tables, &tables, "source", "restored"));
    let views = dbstate::views(&mut su, "pgvpn");
    problems.extend(dbstate::diff(&src.views, &views, "source", "restored"));
    assert_eq!(
        dbstate::packets(&mut su),
        src.packets,
        "every packet, with its id and contents"
    );
    assert_eq!(
        scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"),
        src.filled.logged
    );
    let catalog = dbstate::chunk_catalog_problems(&mut su);
    assert!(
        catalog.is_empty(),
        "the restored chunk catalog: {catalog:#?}"
    );
    let (max_id, max_cursor) = dbstate::highest_id_and_cursor(&mut su);
    let seq = dbstate::sequence_last(&mut su);
    assert!(
        seq >= max_id && seq >= max_cursor,
        "the restored sequence ({seq}) is behind the log ({max_id}) or a cursor ({max_cursor})"
    );
    // The exporters' function works on the restored log (if this build has it).
    if fill::has_function(&mut su, "metrics") {
        let metrics = scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.metrics()");
        assert!(metrics > 0, "pgvpn.metrics() returns rows");
    }

    // Delivery carries on: new ids above everything, and each receiver's
    // recv(cursor()) returns its old backlog, then the new packets, once each.
    let new = send_new(copy, db, "after");
    let first_new = scalar_i64(
        &mut su,
        &format!("SELECT min(id) FROM pgvpn.packets WHERE id > {max_id}"),
    );
    assert!(first_new > max_id && first_new > max_cursor);
    assert_eq!(
        scalar_i64(
            &mut su,
            &format!("SELECT count(*) FROM pgvpn.packets WHERE id > {max_id}")
        ),
        10,
        "the new packets have ids above every restored one"
    );
    for (peer, old) in &src.backlogs {
        let mut c = copy.connect(peer, db);
        let cur = cursor(&mut c);
        let got = recv(&mut c, cur, 65_536);
        let want: Vec<Vec<u8>> = old
            .iter()
            .map(|(_, p)| p.clone())
            .chain(
                new.iter()
                    .filter(|(to, _)| to == peer)
                    .flat_map(|(_, b)| b.clone()),
            )
            .collect();
        let got_payloads: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(
            got_payloads, want,
            "{peer}: recv(cursor()) after the restore"
        );
        assert_eq!(
            got[..old.len()]
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>(),
            old.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            "{peer}: the backlog keeps its ids"
        );
        let last = got.last().unwrap().0;
        assert_eq!(ack(&mut c, last), last);
    }
    // No repair was needed: the sequence came with the dump.
    let repaired = log_lines_with(copy, db, REPAIR_WARNING);
    assert!(
        repaired.is_empty(),
        "unexpected sequence repair: {repaired:#?}"
    );

    // A new peer can be added (its id must not collide with a restored one) and talks.
    let delta_ip = "198.18.3.4";
    copy.create_login_role("delta");
    let added = su.query_one(
        "SELECT pgvpn.add_peer('delta', 'delta'::regrole, $1::text[]::cidr[])",
        &[&vec![format!("{delta_ip}/32")]],
    );
    match added {
        Err(e) => problems.push(format!("add_peer after the restore: {}", db_error(&e))),
        Ok(_) => {
            let mut delta = copy.connect("delta", db);
            let p = pgvpn_tests::packet::udp(delta_ip, fill::addr("alpha"), 1, 2, b"from delta");
            assert_eq!(send(&mut delta, std::slice::from_ref(&p)), 1);
            let mut alpha = copy.connect("alpha", db);
            let cur = cursor(&mut alpha);
            let got = recv(&mut alpha, cur, 100);
            assert_eq!(
                got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
                vec![p]
            );
        }
    }

    // prune() knows every restored chunk: with a short retention it rotates the open
    // one and drops all of them; the catalog and the partitions stay in step.
    let restored_chunks = dbstate::chunks(&mut su);
    su.batch_execute("SET pgvpn.retention = '1s'; SET pgvpn.chunk_interval = '1s'")
        .unwrap_or_else(|e| panic!("SET GUCs: {}", db_error(&e)));
    let mut dropped = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100));
        dropped += su
            .query_one("SELECT pgvpn.prune()", &[])
            .unwrap_or_else(|e| panic!("prune() on the restored database: {}", db_error(&e)))
            .get::<_, i32>(0);
    }
    let left = dbstate::chunks(&mut su);
    let with_rows = restored_chunks.iter().filter(|c| c.opened).count();
    assert!(
        dropped as usize >= with_rows,
        "prune() dropped {dropped} chunks, the restore had {with_rows} that held packets"
    );
    for c in restored_chunks.iter().filter(|c| c.opened) {
        assert!(
            !left.iter().any(|l| l.chunk == c.chunk),
            "restored chunk {} is still there after pruning: {left:?}",
            c.chunk
        );
    }
    assert_eq!(scalar_i64(&mut su, "SELECT count(*) FROM pgvpn.packets"), 0);
    let catalog = dbstate::chunk_catalog_problems(&mut su);
    assert!(
        catalog.is_empty(),
        "the chunk catalog after pruning: {catalog:#?}"
    );
    // And the VPN still runs on the new chunks.
    let new = send_new(copy, db, "pruned");
    let mut bravo = copy.connect("bravo", db);
    let cur = cursor(&mut bravo);
    let got: Vec<Vec<u8>> = recv(&mut bravo, cur, 100)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, new[0].1);
    assert!(
        problems.is_empty(),
        "the restored database ({db}) is not what the source was:\n{}",
        problems.join("\n")
    );
}

#[test]
fn plain_dump_restores_into_an_empty_database_of_the_same_cluster() {
    let src = Source::new();
    let tmp = Scratch::new("dump");
    let file = tmp.file("vpn.sql");
    pgtools::dump(&src.cluster, DB, Format::Plain, &file);
    src.cluster.create_db("restored");
    let messages = pgtools::restore(&src.cluster, "restored", Format::Plain, &file);
    eprintln!("psql said: {messages}");
    check_restored(&src, &src.cluster, "restored");
    // The source is untouched by all that.
    let mut su = src.cluster.superuser(DB);
    let d = dbstate::diff(
        &src.tables,
        &dbstate::snapshot(&mut su, "pgvpn"),
        "before",
        "after",
    );
    assert!(d.is_empty(), "the source changed: {d:#?}");
}

/// Roles are the cluster's, not the database's: a restore into another cluster needs
/// them first (`pg_dumpall --roles-only`), as for any PostgreSQL database.
fn copy_roles(from: &Cluster, to: &Cluster, tmp: &Scratch) {
    let file = tmp.file("roles.sql");
    std::fs::write(&file, pgtools::roles(from)).unwrap();
    let out = pgtools::psql_text(to, "postgres", &file);
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("ERROR"))
        .filter(|l| !l.contains("role \"postgres\" already exists"))
        .map(str::to_string)
        .collect();
    assert!(errors.is_empty(), "restoring the roles: {errors:#?}");
}

#[test]
fn custom_dump_restores_into_another_cluster() {
    let src = Source::new();
    let tmp = Scratch::new("dump");
    let file = tmp.file("vpn.dump");
    pgtools::dump(&src.cluster, DB, Format::Custom, &file);
    let toc = pgtools::toc(&src.cluster, &file);
    assert!(
        toc.contains("SEQUENCE SET pgvpn packet_id"),
        "the dump carries the id sequence:\n{toc}"
    );
    let other = Cluster::start();
    copy_roles(&src.cluster, &other, &tmp);
    other.create_db(DB);
    let messages = pgtools::restore(&other, DB, Format::Custom, &file);
    eprintln!("pg_restore said: {messages}");
    check_restored(&src, &other, DB);
}

/// A restore whose sequence is behind the stored cursors: the tables of a dump without
/// the sequence's value, or a sequence set back by hand. The next send must move it
/// past everything (every cursor, every restored id), say so in the server log, and
/// delivery must carry on without skipping or repeating a packet.
#[test]
fn a_sequence_behind_the_cursors_is_repaired_at_the_next_send() {
    let src = Source::new();
    let tmp = Scratch::new("dump");
    let file = tmp.file("vpn.dump");
    pgtools::dump(&src.cluster, DB, Format::Custom, &file);

    // 1. Everything but the sequence's value (pg_restore -L with that entry left out).
    let toc = pgtools::toc(&src.cluster, &file);
    let without: String = toc
        .lines()
        .filter(|l| !l.contains("SEQUENCE SET pgvpn packet_id"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without.len(), toc.len(), "the TOC has the sequence entry");
    let list = tmp.file("without-sequence.list");
    std::fs::write(&list, without).unwrap();
    src.cluster.create_db("noseq");
    let out = pgtools::pg_restore(
        &src.cluster,
        "noseq",
        &file,
        &["-L", list.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "pg_restore -L: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. A full restore, then the sequence set back below the cursors.
    src.cluster.create_db("setback");
    pgtools::restore(&src.cluster, "setback", Format::Custom, &file);
    src.cluster
        .superuser("setback")
        .batch_execute("SELECT setval('pgvpn.packet_id', 1, false)")
        .unwrap();

    for db in ["noseq", "setback"] {
        let mut su = src.cluster.superuser(db);
        let (max_id, max_cursor) = dbstate::highest_id_and_cursor(&mut su);
        let seq = dbstate::sequence_last(&mut su);
        assert!(
            seq < max_cursor,
            "{db}: the sequence ({seq}) is behind the cursors ({max_cursor})"
        );
        assert!(log_lines_with(&src.cluster, db, REPAIR_WARNING).is_empty());

        // The senders keep their sessions across both rounds below, as shims do.
        let mut sessions = senders(&src.cluster, db);
        let new = send_on(&mut sessions, "repaired");
        let warned = log_lines_with(&src.cluster, db, REPAIR_WARNING);
        eprintln!("{db}: {warned:#?}");
        assert!(
            !warned.is_empty(),
            "{db}: the repair is not silent: a WARNING in the server log"
        );
        assert!(
            warned.iter().any(|l| l.contains("WARNING")),
            "{db}: logged as a WARNING: {warned:#?}"
        );
        // What follows is checked as a whole, so that a failure says everything that
        // went wrong at once.
        let mut problems = Vec::new();
        let dup = scalar_i64(
            &mut su,
            "SELECT count(*) - count(DISTINCT id) FROM pgvpn.packets",
        );
        let first_new = scalar_i64(
            &mut su,
            "SELECT min(id) FROM pgvpn.packets WHERE position('repaired' in encode(payload, 'escape')) > 0",
        );
        if first_new <= max_cursor {
            problems.push(format!(
                "new ids ({first_new}...) are not above every cursor ({max_cursor})"
            ));
        }
        if first_new <= max_id || dup > 0 {
            problems.push(format!(
                "the repaired sequence hands out ids below restored packets: first new id \
                 {first_new} (chunk {}), highest restored id {max_id} (chunk {}), {dup} duplicate ids",
                first_new >> 40,
                max_id >> 40
            ));
        }

        // Delivery: the backlog, then the new packets; after an ack, more new packets
        // still arrive (nothing lands below a cursor).
        for (peer, old) in &src.backlogs {
            let mut c = src.cluster.connect(peer, db);
            let cur = cursor(&mut c);
            let rows = recv(&mut c, cur, 65_536);
            let got: Vec<Vec<u8>> = rows.iter().map(|(_, p)| p.clone()).collect();
            let want: Vec<Vec<u8>> = old
                .iter()
                .map(|(_, p)| p.clone())
                .chain(
                    new.iter()
                        .filter(|(to, _)| to == peer)
                        .flat_map(|(_, b)| b.clone()),
                )
                .collect();
            if got != want {
                problems.push(format!(
                    "{peer}'s recv(cursor()) after the repair: {} packets, expected {} (its \
                     backlog of {}, then {} new); {}",
                    got.len(),
                    want.len(),
                    old.len(),
                    want.len() - old.len(),
                    if sorted(&got) == sorted(&want) {
                        "the same packets, but new ones come before restored ones".to_string()
                    } else {
                        "not the same packets".to_string()
                    }
                ));
            }
            ack(&mut c, rows.last().unwrap().0);
        }
        let more = send_on(&mut sessions, "later");
        for (peer, _) in &src.backlogs {
            let mut c = src.cluster.connect(peer, db);
            let cur = cursor(&mut c);
            let got: Vec<Vec<u8>> = recv(&mut c, cur, 65_536)
                .into_iter()
                .map(|(_, p)| p)
                .collect();
            let want: Vec<Vec<u8>> = more
                .iter()
                .filter(|(to, _)| to == peer)
                .flat_map(|(_, b)| b.clone())
                .collect();
            if got != want {
                problems.push(format!(
                    "{peer} acked what it got, then {} new packets were sent to it: recv(cursor()) \
                     returns {} of them (the others have ids below its cursor {cur}: never delivered)",
                    want.len(),
                    got.len()
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "{db}: after the repair ({}):\n{}",
            warned[0],
            problems.join("\n")
        );
    }
}

fn sorted(v: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// `pg_basebackup` while alpha keeps sending to bravo (who keeps acknowledging) and the
/// log rotates; the copy, started as a cluster of its own, carries on.
#[test]
fn basebackup_under_traffic_starts_as_a_new_cluster_and_delivery_resumes() {
    let src = Source::new();
    let stop = Arc::new(AtomicBool::new(false));
    let conn = |role: &str| src.cluster.conninfo(role, DB);
    let connect = |info: String| {
        move || -> Client { Client::connect(&info, postgres::NoTls).expect("connect") }
    };
    let sender = {
        let (stop, c) = (Arc::clone(&stop), connect(conn("alpha")));
        std::thread::spawn(move || {
            let mut c = c();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let batch: Vec<Vec<u8>> = (0..20)
                    .map(|k| packet("alpha", "bravo", &format!("live-{n}-{k}")))
                    .collect();
                assert_eq!(send(&mut c, &batch), 20);
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            n * 20
        })
    };
    let receiver = {
        let (stop, c) = (Arc::clone(&stop), connect(conn("bravo")));
        std::thread::spawn(move || {
            let mut c = c();
            let mut cur = cursor(&mut c);
            while !stop.load(Ordering::SeqCst) {
                if let Some((id, _)) = recv(&mut c, cur, 500).last() {
                    cur = ack(&mut c, *id);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let pruner = {
        let (stop, c) = (Arc::clone(&stop), connect(conn("postgres")));
        std::thread::spawn(move || {
            let mut c = c();
            while !stop.load(Ordering::SeqCst) {
                fill::prune_rotating(&mut c);
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let copy = Cluster::start_from(|data| pgtools::basebackup(&src.cluster, data), &[]);
    // The source goes on a little longer, then everything stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("sender");
    receiver.join().expect("receiver");
    pruner.join().expect("pruner");
    eprintln!("sent {sent} packets during the test");

    let mut su = copy.superuser(DB);
    let mut src_su = src.cluster.superuser(DB);
    // The copy holds a consistent past of the source: every packet it has, the source
    // has too, identical, and the catalog is whole.
    let in_copy = dbstate::packets(&mut su);
    let in_src: std::collections::BTreeSet<(i64, String)> =
        dbstate::packets(&mut src_su).into_iter().collect();
    let foreign: Vec<_> = in_copy.iter().filter(|p| !in_src.contains(p)).collect();
    assert!(
        foreign.is_empty(),
        "packets in the copy the source does not have: {foreign:?}"
    );
    assert!(
        in_copy.len() as i64 > src.filled.logged,
        "the copy has traffic from during the backup ({} rows)",
        in_copy.len()
    );
    let problems = dbstate::chunk_catalog_problems(&mut su);
    assert!(
        problems.is_empty(),
        "the copy's chunk catalog: {problems:#?}"
    );

    // Delivery resumes: new ids above everything, recv from the stored cursor returns
    // the copy's backlog and then the new packets.
    let (max_id, max_cursor) = dbstate::highest_id_and_cursor(&mut su);
    let mut bravo = copy.connect("bravo", DB);
    let cur = cursor(&mut bravo);
    let backlog: Vec<(i64, Vec<u8>)> = su
        .query(
            "SELECT id, payload FROM pgvpn.packets WHERE dst_peer = \
               (SELECT id FROM pgvpn.peers WHERE name = 'bravo') AND id > $1 ORDER BY id",
            &[&cur],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let new = send_new(&copy, DB, "after-basebackup");
    let first_new = scalar_i64(
        &mut su,
        "SELECT min(id) FROM pgvpn.packets WHERE position('after-basebackup' in encode(payload, 'escape')) > 0",
    );
    assert!(
        first_new > max_id && first_new > max_cursor,
        "new id {first_new} above the copy's log ({max_id}) and cursors ({max_cursor})"
    );
    let got = recv(&mut bravo, cur, 65_536);
    let want: Vec<Vec<u8>> = backlog
        .iter()
        .map(|(_, p)| p.clone())
        .chain(new[0].1.clone())
        .collect();
    assert_eq!(
        got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        want,
        "bravo's recv(cursor()) in the copy: its backlog, then the new packets"
    );
    assert_eq!(
        got[..backlog.len()]
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        backlog.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    let last = got.last().unwrap().0;
    assert_eq!(ack(&mut bravo, last), last);
    let repaired = log_lines_with(&copy, DB, REPAIR_WARNING);
    assert!(
        repaired.is_empty(),
        "unexpected sequence repair: {repaired:#?}"
    );
    // Retention works in the copy too.
    su.batch_execute("SET pgvpn.retention = '1s'; SET pgvpn.chunk_interval = '1s'")
        .unwrap();
    let mut dropped = 0;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1100));
        dropped += su
            .query_one("SELECT pgvpn.prune()", &[])
            .unwrap()
            .get::<_, i32>(0);
    }
    assert!(dropped >= 1, "prune() drops chunks in the copy");
    let problems = dbstate::chunk_catalog_problems(&mut su);
    assert!(
        problems.is_empty(),
        "the copy's chunk catalog after pruning: {problems:#?}"
    );
}
