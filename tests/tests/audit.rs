//! Audits at scale: the flow index (`pgvpn.flow_log`) that `send` maintains as it logs,
//! the id index on every chunk, and the query shapes the README shows. The index is
//! checked against the packets it describes, and the README's queries must be able to
//! use indexes instead of scanning the log (`make bench-audit` times them on millions
//! of packets).
//!
//! Needs root and the extension installed (see `delivery.rs`).

use pgvpn_core::sql::SEND;
use pgvpn_tests::packet::{self, TCP_ACK, TCP_SYN};
use pgvpn_tests::spec::{setup, udp_tagged, A4, B4, C4, DB};
use pgvpn_tests::sql::{create_auditor, recv, scalar_i64, send};
use pgvpn_tests::{db_error, Rng};
use postgres::Client;
use std::time::Duration;

/// The first column of every row, as text.
fn texts(au: &mut Client, args: &[&(dyn postgres::types::ToSql + Sync)], sql: &str) -> Vec<String> {
    au.query(sql, args)
        .unwrap_or_else(|e| panic!("{sql}: {}", db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Per 5-tuple and peers: (packets, bytes), from the flow index and from the packets.
fn flow_sums(au: &mut Client) -> (Vec<String>, Vec<String>) {
    let from_flows = texts(
        au,
        &[],
        "SELECT format('%s %s %s %s %s %s %s %s: %s/%s', src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version, sum(packets), sum(bytes))
           FROM pgvpn.flow_log GROUP BY src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version ORDER BY 1",
    );
    let from_packets = texts(
        au,
        &[],
        "SELECT format('%s %s %s %s %s %s %s %s: %s/%s', src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version, count(*), sum(length))
           FROM pgvpn.packets GROUP BY src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version ORDER BY 1",
    );
    (from_flows, from_packets)
}

/// Per 5-tuple and peer names: (packets, bytes), from the `pgvpn.flows` view (the flow
/// summaries plus the flow rows since the last rollup) and from the packets.
fn view_sums(au: &mut Client) -> (Vec<String>, Vec<String>) {
    let from_view = texts(
        au,
        &[],
        "SELECT format('%s %s %s %s %s %s %s %s: %s/%s %s %s', src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version, packets, bytes, first_id, last_id)
           FROM pgvpn.flows ORDER BY 1",
    );
    let from_packets = texts(
        au,
        &[],
        "SELECT format('%s %s %s %s %s %s %s %s: %s/%s %s %s', s.name, d.name, protocol, src_addr, src_port, dst_addr, dst_port, ip_version, count(*), sum(length), min(p.id), max(p.id))
           FROM pgvpn.packets p JOIN pgvpn.peers s ON s.id = p.src_peer JOIN pgvpn.peers d ON d.id = p.dst_peer
          GROUP BY s.name, d.name, protocol, src_addr, src_port, dst_addr, dst_port, ip_version ORDER BY 1",
    );
    (from_view, from_packets)
}

/// The bytes of the `n` biggest flows: from `pgvpn.top_flows(n)` and from the packets.
fn top_bytes(au: &mut Client, n: i32) -> (Vec<String>, Vec<String>) {
    (
        texts(au, &[&n], "SELECT bytes::text FROM pgvpn.top_flows($1)"),
        texts(
            au,
            &[&n],
            "SELECT sum(length)::text FROM pgvpn.packets
              GROUP BY src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, ip_version
              ORDER BY sum(length) DESC LIMIT $1::int",
        ),
    )
}

/// Sends `batch` in a transaction of its own and rolls one in five back; true if it
/// committed.
fn send_and_maybe_roll_back(c: &mut Client, batch: &[Vec<u8>], rng: &mut Rng) -> bool {
    let mut tx = c.transaction().unwrap();
    tx.query_one(SEND, &[&batch])
        .unwrap_or_else(|e| panic!("send: {}", db_error(&e)));
    if rng.below(5) == 0 {
        tx.rollback().unwrap();
        false
    } else {
        tx.commit().unwrap();
        true
    }
}

/// Random traffic between three peers — TCP streams, UDP, pings, a few spoofed and
/// malformed packets — with one transaction in five rolled back and the log rolling to
/// new chunks and dropping old ones meanwhile. Afterwards the flow index describes
/// exactly the packets that are in the log: same flows, same packets and bytes, each flow
/// row's id range inside the packets it counts.
#[test]
fn the_flow_index_matches_the_packets_after_rollbacks_rejects_and_drops() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4])]);
    create_auditor(&cluster, "judy");
    let mut su = cluster.superuser(DB);
    su.batch_execute("ALTER DATABASE vpn SET pgvpn.chunk_interval = '1s'; ALTER DATABASE vpn SET pgvpn.retention = '2s'")
        .unwrap();
    let mut su = cluster.superuser(DB);
    let mut peers: Vec<(Client, &str)> = [("a", A4), ("b", B4), ("c", C4)]
        .iter()
        .map(|&(n, ip)| (cluster.connect(n, DB), ip))
        .collect();
    let addrs = [A4, B4, C4];
    // A second session of c sends all along, so that prune() rolls the flow rows up while
    // other transactions are committing theirs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let stop = std::sync::Arc::clone(&stop);
        let mut c = cluster.connect("c", DB);
        std::thread::spawn(move || {
            let mut rng = Rng::new(14);
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Vec<u8>> = (0..1 + rng.below(20))
                    .map(|i| {
                        let to = if rng.below(2) == 0 { A4 } else { B4 };
                        packet::tcp(
                            C4,
                            to,
                            2000 + rng.below(3) as u16,
                            443,
                            TCP_ACK,
                            &[i as u8; 300],
                        )
                    })
                    .collect();
                if send_and_maybe_roll_back(&mut c, &batch, &mut rng) {
                    sent += 1;
                }
            }
            sent
        })
    };
    let mut rng = Rng::new(13);
    let mut dropped = 0;
    let start = std::time::Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(7) {
        round += 1;
        let who = rng.below(3) as usize;
        let (c, me) = &mut peers[who];
        let me = *me;
        let mut batch = Vec::new();
        for i in 0..1 + rng.below(40) {
            let to = addrs[(who + 1 + rng.below(2) as usize) % 3];
            let port = 1000 + rng.below(4) as u16;
            batch.push(match rng.below(10) {
                0..=4 => packet::tcp(
                    me,
                    to,
                    port,
                    80,
                    if i == 0 { TCP_SYN } else { TCP_ACK },
                    &[1; 200],
                ),
                5..=7 => packet::udp(me, to, port, 53, b"q"),
                8 => packet::ping(me, to, 1, i as u16, b"p"),
                _ if rng.below(2) == 0 => udp_tagged("198.18.9.9", to, "spoofed"),
                _ => vec![0x45, 0],
            });
        }
        send_and_maybe_roll_back(c, &batch, &mut rng);
        if round % 20 == 0 {
            dropped += su
                .query_one("SELECT pgvpn.prune()", &[])
                .unwrap()
                .get::<_, i32>(0);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let background_commits = background.join().expect("background sender");
    assert!(
        background_commits > 10,
        "the background sender committed ({background_commits})"
    );
    assert!(dropped >= 1, "the run dropped chunks ({dropped})");
    // The last prune rolls up what is there; what follows stays unsummarized, so the
    // view's totals come from both parts.
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap();
    let (c, me) = &mut peers[0];
    for i in 0..3 {
        send(c, &[packet::udp(me, B4, 1000 + i, 53, b"tail")]);
    }
    let mut au = cluster.connect("judy", DB);
    assert!(
        scalar_i64(&mut au, "SELECT count(*) FROM pgvpn.flow_sums") > 0
            && scalar_i64(
                &mut au,
                "SELECT count(*) FROM pgvpn.flow_log WHERE first_id > (SELECT summarized_to FROM pgvpn.flow_rollup)"
            ) > 0,
        "both the summaries and the flow rows since have flows"
    );
    let (view, pkts_named) = view_sums(&mut au);
    assert_eq!(
        view, pkts_named,
        "pgvpn.flows (summaries and the rows since) counts exactly the packets in the log"
    );
    for n in [1, 5, 1000] {
        let (top, want) = top_bytes(&mut au, n);
        assert_eq!(top, want, "top_flows({n}) has the n biggest flows' bytes");
    }
    let (flows, pkts) = flow_sums(&mut au);
    assert!(!pkts.is_empty());
    assert_eq!(
        flows, pkts,
        "the flow index counts exactly the packets in the log"
    );
    let bad_ranges = scalar_i64(
        &mut au,
        "SELECT count(*) FROM pgvpn.flow_log f WHERE f.first_id > f.last_id
            OR NOT EXISTS (SELECT FROM pgvpn.packets p WHERE p.id = f.first_id AND p.src_addr = f.src_addr)
            OR NOT EXISTS (SELECT FROM pgvpn.packets p WHERE p.id = f.last_id AND p.dst_addr = f.dst_addr)",
    );
    assert_eq!(
        bad_ranges, 0,
        "every flow row's ends are packets of that flow"
    );
    let syns = scalar_i64(&mut au, "SELECT sum(syns)::bigint FROM pgvpn.flow_log");
    let syn_packets = scalar_i64(
        &mut au,
        "SELECT count(*) FROM pgvpn.packets WHERE protocol = 6 AND tcp_flags & 18 = 2",
    );
    assert_eq!(syns, syn_packets, "SYN counts");
    // Every flow chunk went with its packets: none is left without its chunk.
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgvpn.flow_log'::regclass"
        ),
        scalar_i64(
            &mut au,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgvpn.packets'::regclass"
        )
    );
}

/// A flow spread over three chunks, smaller in each than the five biggest flows of that
/// chunk, is the biggest flow of all: `top_flows` finds it although no chunk's first
/// summaries hold it (its bound makes it look deeper). Bad arguments get a clear error.
#[test]
fn top_flows_finds_a_flow_that_is_big_only_across_chunks() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    create_auditor(&cluster, "judy");
    let mut su = cluster.superuser(DB);
    su.batch_execute("ALTER DATABASE vpn SET pgvpn.chunk_interval = '1s'")
        .unwrap();
    let mut su = cluster.superuser(DB);
    let mut a = cluster.connect("a", DB);
    for chunk in 0..3u16 {
        // Five flows of 3 × 100 bytes of payload, unique to this chunk; the spread flow
        // (port 5000) gets 2 × 100 here, 6 × 100 in all.
        let mut batch = Vec::new();
        for f in 0..5u16 {
            for _ in 0..3 {
                batch.push(packet::udp(A4, B4, 6000 + chunk * 10 + f, 53, &[0; 100]));
            }
        }
        batch.push(packet::udp(A4, B4, 5000, 53, &[0; 100]));
        batch.push(packet::udp(A4, B4, 5000, 53, &[0; 100]));
        send(&mut a, &batch);
        std::thread::sleep(Duration::from_millis(1100));
        su.query_one("SELECT pgvpn.prune()", &[]).unwrap();
    }
    let mut au = cluster.connect("judy", DB);
    assert!(
        scalar_i64(
            &mut au,
            "SELECT count(DISTINCT chunk) FROM pgvpn.flow_sums WHERE src_port = 5000"
        ) == 3,
        "the spread flow is summarized in three chunks"
    );
    let top = au
        .query_one("SELECT src_port, packets FROM pgvpn.top_flows(1)", &[])
        .unwrap();
    assert_eq!(
        (top.get::<_, Option<i32>>(0), top.get::<_, i64>(1)),
        (Some(5000), 6),
        "the biggest flow overall"
    );
    let (top, want) = top_bytes(&mut au, 3);
    assert_eq!(top, want);
    for bad in ["0", "-1", "NULL", "100001"] {
        let e = au
            .query(&format!("SELECT * FROM pgvpn.top_flows({bad})"), &[])
            .expect_err(bad);
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("22023"),
            "top_flows({bad}): {}",
            db_error(&e)
        );
    }
}

/// The README's audit queries, as an auditor. Each may use an index for the log itself
/// (never a sequential scan of a packets chunk). The planner picks scans for tables this
/// small, so the plans are asked for with sequential scans discouraged; `make
/// bench-audit` shows the real plans and timings on millions of packets.
#[test]
fn the_readme_audit_queries_use_indexes() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    create_auditor(&cluster, "judy");
    let mut a = cluster.connect("a", DB);
    for i in 0..20 {
        let batch: Vec<Vec<u8>> = (0..50)
            .map(|j| {
                packet::tcp(
                    A4,
                    B4,
                    40000 + (i % 3),
                    if j % 7 == 0 { 22 } else { 80 },
                    TCP_ACK,
                    &[0; 100],
                )
            })
            .collect();
        send(&mut a, &batch);
    }
    let mut au = cluster.connect("judy", DB);
    au.batch_execute("SET enable_seqscan = off").unwrap();
    let queries = [
        ("the last 10 packets, decoded",
         "SELECT id, sent_at, pgvpn.decode(payload) FROM pgvpn.packets ORDER BY id DESC LIMIT 10".to_string()),
        ("every packet between two hosts in the last hour",
         format!("SELECT * FROM pgvpn.packets_between('{A4}', '{B4}', now() - interval '1 hour')")),
        ("the last 10 packets of one TCP flow",
         format!("SELECT * FROM pgvpn.flow_packets('{A4}', 40001, '{B4}', 80, 6, 10)")),
        ("the last 100 packets to port 22", "SELECT * FROM pgvpn.port_packets(22, 100)".to_string()),
        ("the last 100 packets from or to one host", format!("SELECT * FROM pgvpn.host_packets('{A4}', 100)")),
        ("top talkers in the last hour",
         "SELECT src_addr, sum(packets) AS packets, sum(bytes) AS bytes FROM pgvpn.flow_log \
          WHERE at > now() - interval '1 hour' GROUP BY src_addr ORDER BY sum(bytes) DESC LIMIT 10".to_string()),
        ("SYN counts per destination port in the last hour",
         "SELECT dst_port, sum(syns) FROM pgvpn.flow_log WHERE protocol = 6 AND syns > 0 \
          AND at > now() - interval '1 hour' GROUP BY dst_port ORDER BY 2 DESC".to_string()),
        ("pgvpn.flows, top 5 by bytes", "SELECT * FROM pgvpn.flows ORDER BY bytes DESC LIMIT 5".to_string()),
        ("the 5 biggest flows", "SELECT * FROM pgvpn.top_flows(5)".to_string()),
    ];
    for (what, sql) in &queries {
        let rows = au
            .query(sql.as_str(), &[])
            .unwrap_or_else(|e| panic!("{what}: {}", db_error(&e)));
        assert!(
            !rows.is_empty() || what.contains("SYN"),
            "{what}: returned nothing"
        );
        let plan = explain(&mut au, sql);
        assert!(!scans_the_log(&plan), "{what} scans the log:\n{plan}");
    }
    // The check can fail: a shape the indexes cannot serve scans the chunks.
    let control = explain(
        &mut au,
        "SELECT count(*) FROM pgvpn.packets WHERE length = 140",
    );
    assert!(
        scans_the_log(&control),
        "the control should scan:\n{control}"
    );
    // The helper functions' own statements, as auto_explain shows them (sent to us as
    // NOTICEs): none of them scans a packets chunk either.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut cfg: postgres::Config = cluster.conninfo("postgres", DB).parse().unwrap();
    cfg.notice_callback(move |n| {
        let _ = tx.send(n.message().to_string());
    });
    let mut su = cfg.connect(postgres::NoTls).unwrap();
    su.batch_execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; \
         SET auto_explain.log_nested_statements = on; SET auto_explain.log_level = notice; \
         SET enable_seqscan = off; SET enable_nestloop = off",
    )
    .unwrap();
    for (what, sql) in queries.iter().filter(|(_, q)| {
        q.contains("pgvpn.") && q.contains("_packets") || q.contains("packets_between")
    }) {
        su.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{what}: {}", db_error(&e)));
        let plans: Vec<String> = rx.try_iter().collect();
        assert!(
            plans.len() >= 2,
            "{what}: auto_explain showed the nested statement: {plans:?}"
        );
        let all = plans.join("\n");
        assert!(
            !scans_the_log(&all),
            "{what}: a statement inside scans the log:\n{all}"
        );
        // The functions pin the nested loop into the id btrees (sql/views.sql): on a big
        // log the planner would otherwise hash-join the flow rows to a scan of the chunks.
        // Here the session forbids nested loops, which only the pin overrides.
        assert!(
            !all.contains("Hash Join") && !all.contains("Merge Join"),
            "{what}: joins the flow rows to the packets other than by a nested loop:\n{all}"
        );
    }
}

fn explain(c: &mut Client, sql: &str) -> String {
    c.query(&format!("EXPLAIN {sql}"), &[])
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {}", db_error(&e)))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sequential scan of a chunk of the packet log (the flow index may be scanned: its
/// rows are few, and aggregates over the last hour read them by time).
fn scans_the_log(plan: &str) -> bool {
    plan.lines().any(|l| l.contains("Seq Scan on packets_"))
}

/// A receiver away longer than the retention: what expired unread is counted in
/// peer_stats, and its next recv says so with a NOTICE (the shim logs and counts it).
#[test]
fn a_receiver_behind_retention_is_told_what_expired_unread() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4])]);
    let mut su = cluster.superuser(DB);
    su.batch_execute("ALTER DATABASE vpn SET pgvpn.chunk_interval = '1s'; ALTER DATABASE vpn SET pgvpn.retention = '1s'")
        .unwrap();
    let mut su = cluster.superuser(DB);
    let mut a = cluster.connect("a", DB);
    let old: Vec<Vec<u8>> = (0..30)
        .map(|i| udp_tagged(A4, B4, &format!("old{i}")))
        .collect();
    assert_eq!(send(&mut a, &old), 30);
    su.query_one("SELECT pgvpn.prune()", &[]).unwrap();
    let mut dropped = 0;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1100));
        dropped += su
            .query_one("SELECT pgvpn.prune()", &[])
            .unwrap()
            .get::<_, i32>(0);
    }
    assert!(dropped >= 1);
    assert_eq!(send(&mut a, &[udp_tagged(A4, B4, "new")]), 1);
    assert_eq!(
        scalar_i64(
            &mut su,
            "SELECT expired_unread FROM pgvpn.peer_stats WHERE peer = 'b'"
        ),
        30
    );
    // b comes back and asks from its cursor (0).
    let (tx, rx) = std::sync::mpsc::channel();
    let conninfo = cluster.conninfo("b", DB);
    let mut cfg: postgres::Config = conninfo.parse().unwrap();
    cfg.notice_callback(move |n| {
        let _ = tx.send((n.message().to_string(), n.detail().map(str::to_string)));
    });
    let mut b = cfg.connect(postgres::NoTls).unwrap();
    let got = recv(&mut b, 0, 100);
    assert_eq!(got.len(), 1, "what is left is delivered");
    let (msg, detail) = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("a NOTICE about the gap");
    assert!(msg.contains("expired unread"), "{msg}");
    assert!(
        detail
            .as_deref()
            .is_some_and(|d| d.starts_with("expired_packets=30 expired_upto=")),
        "{detail:?}"
    );
    // Told once, not at every call.
    recv(&mut b, 0, 100);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "told twice"
    );
}
