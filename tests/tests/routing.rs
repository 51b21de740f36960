//! Routing: a packet goes to the peer whose allowed_ips hold its destination, longest
//! prefix first, and is accepted only if its source routes back to its sender
//! (WireGuard's AllowedIPs); prefixes can change and peers go away. Rejected packets
//! never fail the rest of their batch and are counted and sampled for the audit.
//!
//! Needs root and the extension installed (see `delivery.rs`).

use pgvpn_core::sql::SEND;
use pgvpn_tests::db_error;
use pgvpn_tests::packet::{self, bad, TCP_SYN};
use pgvpn_tests::spec::{setup, tags, udp_tagged, A4, A6, B4, B6, C4, DB};
use pgvpn_tests::sql::{self, add_peer, create_auditor, recv, remove_peer, scalar_i64, send};
use postgres::Client;
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------------------
// Longest prefix, updates, removal
// ---------------------------------------------------------------------------------------

#[test]
fn routing_longest_prefix_and_updates() {
    let cluster = setup(&[("a", &[A4])]);
    let mut admin = cluster.superuser(DB);
    cluster.create_login_role("gw");
    cluster.create_login_role("sub");
    add_peer(
        &mut admin,
        "gw",
        "gw",
        &["198.18.2.0/24", "fd00:5067:7670:2::/64"],
    );
    add_peer(&mut admin, "sub", "sub", &["198.18.2.128/25"]);
    let mut a = cluster.connect("a", DB);
    let mut gw = cluster.connect("gw", DB);
    let mut sub = cluster.connect("sub", DB);

    assert_eq!(
        send(
            &mut a,
            &[
                udp_tagged(A4, "198.18.2.5", "r1"),
                udp_tagged(A4, "198.18.2.200", "r2"),
                udp_tagged(A4, "198.18.2.127", "r3"),
                udp_tagged(A4, "198.18.2.128", "r4"),
            ]
        ),
        4
    );
    // a has no IPv6 prefix: its IPv6 source is spoofed.
    assert_eq!(
        send(
            &mut a,
            &[packet::ping(
                "fd00:5067:7670:1::1",
                "fd00:5067:7670:2::9",
                1,
                1,
                b""
            )]
        ),
        0
    );
    assert_eq!(tags(&recv(&mut gw, 0, 100)), ["r1", "r3"]);
    assert_eq!(tags(&recv(&mut sub, 0, 100)), ["r2", "r4"]);
    // gw may send from any address in its /24 except what sub owns more specifically.
    assert_eq!(
        send(&mut gw, &[udp_tagged("198.18.2.77", A4, "from-gw")]),
        1
    );
    assert_eq!(
        send(&mut gw, &[udp_tagged("198.18.2.177", A4, "gw-as-sub")]),
        0,
        "gw cannot use sub's addresses"
    );
    assert_eq!(tags(&recv(&mut a, 0, 100)), ["from-gw"]);

    // Move sub elsewhere: its old range falls back to gw.
    sql::set_allowed_ips(&mut admin, "sub", &["198.18.3.0/24"]);
    let last_gw = recv(&mut gw, 0, 100).last().unwrap().0;
    let last_sub = recv(&mut sub, 0, 100).last().unwrap().0;
    assert_eq!(
        send(
            &mut a,
            &[
                udp_tagged(A4, "198.18.2.200", "r5"),
                udp_tagged(A4, "198.18.3.1", "r6")
            ]
        ),
        2
    );
    assert_eq!(tags(&recv(&mut gw, last_gw, 100)), ["r5"]);
    assert_eq!(tags(&recv(&mut sub, last_sub, 100)), ["r6"]);

    // Remove gw: its range becomes unroutable.
    remove_peer(&mut admin, "gw");
    assert_eq!(send(&mut a, &[udp_tagged(A4, "198.18.2.5", "r7")]), 0);
    let mut su = cluster.superuser(DB);
    let n = scalar_i64(
        &mut su,
        "SELECT packets FROM pgvpn.reject_totals WHERE peer = 'a' AND reason = 'no_route'",
    );
    assert_eq!(n, 1);
}

// ---------------------------------------------------------------------------------------
// Rejects
// ---------------------------------------------------------------------------------------

fn reject_totals(au: &mut Client, peer: &str) -> BTreeMap<String, i64> {
    au.query(
        "SELECT reason, packets FROM pgvpn.reject_totals WHERE peer = $1",
        &[&peer],
    )
    .unwrap_or_else(|e| panic!("reject_totals: {}", db_error(&e)))
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn rejects_do_not_fail_good_packets_and_are_audited() {
    let cluster = setup(&[("a", &[A4, A6]), ("b", &[B4, B6]), ("c", &[C4])]);
    create_auditor(&cluster, "auditor");
    let mut a = cluster.connect("a", DB);
    let mut au = cluster.connect("auditor", DB);

    let good = [
        udp_tagged(A4, B4, "good-udp"),
        packet::tcp(A4, B4, 40001, 80, TCP_SYN, b""),
        packet::ping(A6, B6, 7, 1, b"good-ping6"),
    ];
    let base = udp_tagged(A4, B4, "x");
    let base6 = udp_tagged(A6, B6, "x");

    // Batch 1: one of each kind, interleaved (few enough to all be sampled).
    let batch1 = vec![
        good[0].clone(),
        bad::junk(),                        // malformed
        udp_tagged(B4, B4, "spoofed-as-b"), // spoofed: b's address
        good[1].clone(),
        udp_tagged(A4, "198.19.200.1", "nowhere"), // no_route
        udp_tagged(A4, A4, "to-myself"),           // loop
        good[2].clone(),
    ];
    assert_eq!(send(&mut a, &batch1), 3, "accepted = the good ones");
    let mut reasons: Vec<String> = au
        .query(
            "SELECT reason FROM pgvpn.rejects WHERE peer = 'a' ORDER BY reason",
            &[],
        )
        .unwrap_or_else(|e| panic!("rejects: {}", db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["loop", "malformed", "no_route", "spoofed"],
        "rejects view"
    );
    let details: Vec<(String, String)> = au
        .query(
            "SELECT reason, detail FROM pgvpn.rejects WHERE peer = 'a'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("reject samples: {details:?}");
    assert!(
        details.iter().all(|(_, d)| !d.is_empty()),
        "every reject has a detail"
    );

    // Batch 2: many bad ones, every malformed variant, NULL, spoofed from nobody's address.
    let batch2: Vec<Option<Vec<u8>>> = vec![
        Some(bad::empty()),
        Some(bad::truncated_header(&base)),
        Some(good[0].clone()),
        Some(bad::v4_length_lies(&base)),
        Some(bad::v4_bad_ihl(&base)),
        Some(bad::v6_length_lies(&base6)),
        None,
        Some(udp_tagged("203.0.113.7", B4, "spoofed-nobody")),
        Some(udp_tagged(C4, B4, "spoofed-as-c")),
        Some(udp_tagged(A4, "203.0.113.8", "nowhere-2")),
        Some(packet::ping(A6, A6, 1, 1, b"loop6")),
        Some(good[1].clone()),
    ];
    let accepted: i64 = a
        .query_one(SEND, &[&batch2])
        .unwrap_or_else(|e| panic!("send with NULL element: {}", db_error(&e)))
        .get(0);
    assert_eq!(accepted, 2);
    // single-packet form
    let one: i64 = a
        .query_one("SELECT pgvpn.send($1::bytea)", &[&bad::junk()])
        .unwrap()
        .get(0);
    assert_eq!(
        one, 0,
        "a malformed single packet is rejected, not an error"
    );
    let one: i64 = a
        .query_one("SELECT pgvpn.send($1::bytea)", &[&good[2]])
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    // an all-bad batch, and an empty batch
    assert_eq!(send(&mut a, &[bad::junk(), bad::empty()]), 0);
    assert_eq!(send(&mut a, &[]), 0);

    let expect: BTreeMap<String, i64> = [
        ("malformed", 1 + 6 + 1 + 2),
        ("spoofed", 1 + 2),
        ("no_route", 1 + 1),
        ("loop", 1 + 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(
        reject_totals(&mut au, "a"),
        expect,
        "reject totals per reason"
    );
    let total: i64 = expect.values().sum();
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'a'"
        ),
        total
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT sent_packets FROM pgvpn.peer_stats WHERE peer = 'a'"
        ),
        6
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT received_packets FROM pgvpn.peer_stats WHERE peer = 'b'"
        ),
        6
    );
    assert_eq!(
        scalar_i64(
            &mut au,
            "SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'b'"
        ),
        0
    );

    // Only the good packets were logged and delivered, byte for byte.
    assert_eq!(scalar_i64(&mut au, "SELECT count(*) FROM pgvpn.packets"), 6);
    let mut b = cluster.connect("b", DB);
    let got: Vec<Vec<u8>> = recv(&mut b, 0, 1024).into_iter().map(|r| r.1).collect();
    let want = vec![
        good[0].clone(),
        good[1].clone(),
        good[2].clone(),
        good[0].clone(),
        good[1].clone(),
        good[2].clone(),
    ];
    assert_eq!(got, want);
}
