//! Security: the calling peer is the session's role. Peers reach only their own packets
//! and nothing else (no tables, no administration, no other peer's identity, no audit
//! settings); roles that are not peers, and removed peers, get 42501 from the data path;
//! auditors read every table and view and change nothing, and what they read is exact.
//!
//! Needs root and the extension installed (see `delivery.rs`).

use pgvpn_core::limits::MAX_RECV_PACKETS;
use pgvpn_core::sql::{ACK, CURSOR, SEND};
use pgvpn_tests::db_error;
use pgvpn_tests::packet::{self, TCP_ACK, TCP_SYN};
use pgvpn_tests::spec::{expect_sqlstate, setup, tag_of, tags, udp_tagged, A4, A6, B4, B6, C4, DB};
use pgvpn_tests::sql::{create_auditor, cursor, recv, remove_peer, scalar_i64, send};

// ---------------------------------------------------------------------------------------
// Privileges of peers, non-peers and auditors
// ---------------------------------------------------------------------------------------

#[test]
fn privileges_peers_nonpeers_auditor() {
    let cluster = setup(&[("a", &[A4]), ("b", &[B4]), ("c", &[C4])]);
    cluster.create_login_role("mallory");
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let mut c = cluster.connect("c", DB);

    // c sends to a and to b.
    let pk = vec![
        udp_tagged(C4, A4, "for-a-1"),
        udp_tagged(C4, B4, "for-b-1"),
        udp_tagged(C4, A4, "for-a-2"),
        udp_tagged(C4, B4, "for-b-2"),
    ];
    assert_eq!(send(&mut c, &pk), 4);
    // Each peer's recv only ever returns its own packets.
    assert_eq!(tags(&recv(&mut a, 0, 1024)), ["for-a-1", "for-a-2"]);
    assert_eq!(tags(&recv(&mut b, 0, 1024)), ["for-b-1", "for-b-2"]);
    let all_ids: Vec<i64> = {
        let mut au = cluster.connect("auditor", DB);
        au.query("SELECT id FROM pgvpn.packets ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Even asking from below b's first id, a does not get b's packets.
    for after in [0, all_ids[0] - 1, all_ids[1] - 1] {
        for (_, p) in recv(&mut a, after, MAX_RECV_PACKETS) {
            assert!(
                tag_of(&p).starts_with("for-a"),
                "a got someone else's packet after {after}"
            );
        }
    }

    // Peers cannot read the tables or views directly.
    for rel in [
        "pgvpn.packets",
        "pgvpn.peers",
        "pgvpn.cursors",
        "pgvpn.packet_log",
        "pgvpn.flows",
        "pgvpn.peer_stats",
        "pgvpn.rejects",
    ] {
        expect_sqlstate(
            a.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[]),
            "42501",
            &format!("peer a SELECT {rel}"),
        );
    }
    // ... nor write them.
    expect_sqlstate(
        a.execute("DELETE FROM pgvpn.packets", &[]),
        "42501",
        "peer a DELETE packets",
    );
    expect_sqlstate(
        a.execute("UPDATE pgvpn.cursors SET acked_id = 0", &[]),
        "42501",
        "peer a UPDATE cursors",
    );
    // Peers cannot administer.
    expect_sqlstate(
        a.query(
            "SELECT pgvpn.add_peer('evil', 'mallory'::regrole, '{198.18.9.0/24}'::cidr[])",
            &[],
        ),
        "42501",
        "peer a add_peer",
    );
    expect_sqlstate(
        a.query(
            "SELECT pgvpn.set_allowed_ips('a', '{198.18.0.0/15}'::cidr[])",
            &[],
        ),
        "42501",
        "peer a set_allowed_ips",
    );
    expect_sqlstate(
        a.query("SELECT pgvpn.remove_peer('b')", &[]),
        "42501",
        "peer a remove_peer",
    );
    expect_sqlstate(
        a.query("SELECT pgvpn.prune()", &[]),
        "42501",
        "peer a prune",
    );
    // A peer cannot become another peer.
    expect_sqlstate(a.batch_execute("SET ROLE b"), "42501", "peer a SET ROLE b");
    // A peer cannot shorten the audit trail (the GUCs are superuser-only).
    cursor(&mut a); // make sure the library is loaded
    expect_sqlstate(
        a.batch_execute("SET pgvpn.retention = '1s'"),
        "42501",
        "peer a SET pgvpn.retention",
    );
    expect_sqlstate(
        a.batch_execute("SET pgvpn.chunk_interval = '1s'"),
        "42501",
        "peer a SET pgvpn.chunk_interval",
    );

    // A login role that is not a peer gets 42501 from the data path.
    let mut m = cluster.connect("mallory", DB);
    let p = udp_tagged(A4, B4, "forged");
    expect_sqlstate(
        m.query(SEND, &[&vec![p.clone()]]),
        "42501",
        "non-peer send(bytea[])",
    );
    expect_sqlstate(
        m.query("SELECT pgvpn.send($1::bytea)", &[&p]),
        "42501",
        "non-peer send(bytea)",
    );
    expect_sqlstate(
        m.query("SELECT * FROM pgvpn.recv(0)", &[]),
        "42501",
        "non-peer recv",
    );
    expect_sqlstate(m.query(ACK, &[&0i64]), "42501", "non-peer ack");
    expect_sqlstate(m.query(CURSOR, &[]), "42501", "non-peer cursor");
    expect_sqlstate(
        m.query("SELECT * FROM pgvpn.packets", &[]),
        "42501",
        "non-peer SELECT packets",
    );

    // The auditor reads everything and changes nothing.
    let mut au = cluster.connect("auditor", DB);
    let n = scalar_i64(
        &mut au,
        "SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'c'",
    );
    assert_eq!(n, 4, "auditor sees c's packets in packet_log");
    for rel in [
        "pgvpn.packets",
        "pgvpn.peers",
        "pgvpn.flows",
        "pgvpn.peer_stats",
        "pgvpn.rejects",
        "pgvpn.cursors",
    ] {
        au.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[])
            .unwrap_or_else(|e| panic!("auditor SELECT {rel}: {}", db_error(&e)));
    }
    // every table and view in the schema
    let rels: Vec<String> = au
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'pgvpn' AND c.relkind IN ('r', 'p', 'v') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for rel in &rels {
        au.query(&format!("SELECT * FROM {rel} LIMIT 1"), &[])
            .unwrap_or_else(|e| panic!("auditor cannot SELECT {rel}: {}", db_error(&e)));
    }
    let decoded: serde_json::Value = au
        .query_one(
            "SELECT pgvpn.decode(payload)::text FROM pgvpn.packets ORDER BY id LIMIT 1",
            &[],
        )
        .map(|r| serde_json::from_str(&r.get::<_, String>(0)).unwrap())
        .unwrap_or_else(|e| panic!("auditor decode: {}", db_error(&e)));
    assert_eq!(decoded["dst_addr"], A4, "{decoded}");
    expect_sqlstate(
        au.execute("DELETE FROM pgvpn.packets", &[]),
        "42501",
        "auditor DELETE packets",
    );
    expect_sqlstate(
        au.execute(
            "INSERT INTO pgvpn.peers (name, role) VALUES ('x', 'auditor')",
            &[],
        ),
        "42501",
        "auditor INSERT peers",
    );
    expect_sqlstate(au.query(SEND, &[&vec![p.clone()]]), "42501", "auditor send");
    expect_sqlstate(
        au.query("SELECT pgvpn.prune()", &[]),
        "42501",
        "auditor prune",
    );

    // A removed peer loses the data path.
    let mut admin = cluster.superuser(DB);
    remove_peer(&mut admin, "c");
    let mut c2 = cluster.connect("c", DB);
    expect_sqlstate(
        c2.query(SEND, &[&vec![udp_tagged(C4, A4, "late")]]),
        "42501",
        "removed peer send",
    );
    expect_sqlstate(
        c2.query("SELECT * FROM pgvpn.recv(0)", &[]),
        "42501",
        "removed peer recv",
    );
    // ... its log rows stay, with its name.
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'c'"
        ),
        4
    );
}

// ---------------------------------------------------------------------------------------
// What auditors see: the log's columns and views
// ---------------------------------------------------------------------------------------

#[test]
fn audit_columns_and_views() {
    let cluster = setup(&[("a", &[A4, A6]), ("b", &[B4, B6])]);
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut b = cluster.connect("b", DB);
    let syn = packet::tcp(A4, B4, 40001, 80, TCP_SYN, b"");
    let synack = packet::tcp(B4, A4, 80, 40001, TCP_SYN | TCP_ACK, b"");
    let data = packet::tcp(A4, B4, 40001, 80, TCP_ACK, &[7u8; 1000]);
    let ping6 = packet::ping(A6, B6, 9, 3, b"hello");
    let udp = packet::udp(A4, B4, 5353, 53, b"q");
    assert_eq!(
        send(
            &mut a,
            &[syn.clone(), data.clone(), ping6.clone(), udp.clone()]
        ),
        4
    );
    assert_eq!(send(&mut b, std::slice::from_ref(&synack)), 1);

    let mut au = cluster.connect("auditor", DB);
    let rows = au
        .query(
            "SELECT src_peer, dst_peer, ip_version::int, host(src_addr), host(dst_addr), protocol::int, src_port, dst_port, \
                    icmp_type::int, tcp_flags::int, length FROM pgvpn.packet_log ORDER BY id",
            &[],
        )
        .unwrap_or_else(|e| panic!("packet_log: {}", db_error(&e)));
    type Row = (
        String,
        String,
        i32,
        String,
        String,
        i32,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        i32,
    );
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
                r.get(10),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    let want: Vec<Row> = vec![
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            6,
            Some(40001),
            Some(80),
            None,
            Some(2),
            syn.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            6,
            Some(40001),
            Some(80),
            None,
            Some(0x10),
            data.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            6,
            s(A6),
            s(B6),
            58,
            None,
            None,
            Some(128),
            None,
            ping6.len() as i32,
        ),
        (
            s("a"),
            s("b"),
            4,
            s(A4),
            s(B4),
            17,
            Some(5353),
            Some(53),
            None,
            None,
            udp.len() as i32,
        ),
        (
            s("b"),
            s("a"),
            4,
            s(B4),
            s(A4),
            6,
            Some(80),
            Some(40001),
            None,
            Some(0x12),
            synack.len() as i32,
        ),
    ];
    assert_eq!(got, want, "packet_log columns");
    // The table itself has peer ids and the exact payload.
    let payloads: Vec<Vec<u8>> = au
        .query("SELECT payload FROM pgvpn.packets ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        payloads,
        vec![
            syn.clone(),
            data.clone(),
            ping6.clone(),
            udp.clone(),
            synack.clone()
        ]
    );

    // flows: the TCP flow a→b has 2 packets and their bytes.
    let f = au
        .query_one(
            "SELECT packets, bytes::bigint FROM pgvpn.flows WHERE src_peer = 'a' AND dst_peer = 'b' AND protocol = 6 \
             AND src_port = 40001 AND dst_port = 80",
            &[],
        )
        .unwrap_or_else(|e| panic!("flows: {}", db_error(&e)));
    assert_eq!(
        (f.get::<_, i64>(0), f.get::<_, i64>(1)),
        (2, (syn.len() + data.len()) as i64)
    );
    assert_eq!(scalar_i64(&mut au, "SELECT count(*) FROM pgvpn.flows"), 4);

    // peer_stats
    let ps = au
        .query_one(
            "SELECT sent_packets, sent_bytes, received_packets, received_bytes, rejected, cursor \
             FROM pgvpn.peer_stats WHERE peer = 'a'",
            &[],
        )
        .unwrap_or_else(|e| panic!("peer_stats: {}", db_error(&e)));
    let sent_bytes = (syn.len() + data.len() + ping6.len() + udp.len()) as i64;
    assert_eq!(
        (
            ps.get::<_, i64>(0),
            ps.get::<_, i64>(1),
            ps.get::<_, i64>(2),
            ps.get::<_, i64>(3),
            ps.get::<_, i64>(4),
            ps.get::<_, i64>(5)
        ),
        (4, sent_bytes, 1, synack.len() as i64, 0, 0)
    );

    // decode()
    let j: String = au
        .query_one("SELECT pgvpn.decode($1)::text", &[&ping6])
        .unwrap_or_else(|e| panic!("decode: {}", db_error(&e)))
        .get(0);
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["ip_version"], 6);
    assert_eq!(j["src_addr"], A6);
    assert_eq!(j["dst_addr"], B6);
    assert_eq!(j["protocol"], 58);
    assert_eq!(j["icmp_type"], 128);
    assert_eq!(j["length"], ping6.len());
    let j: String = au
        .query_one("SELECT pgvpn.decode('\\x00'::bytea)::text", &[])
        .unwrap()
        .get(0);
    assert!(j.contains("error"), "decode of junk reports an error: {j}");
}
