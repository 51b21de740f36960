//! The SQL API as a specification, run inside Postgres by `cargo pgrx test`.
//! (Concurrency, wake-ups across sessions and multiple connections: see the tests/
//! crate.) Each test runs in one transaction that is rolled back, so what `send`
//! buffers is never logged here unless a test says otherwise: packets are logged at
//! commit. The helpers below therefore commit-free "log" through the same path the
//! pre-commit callback takes.
use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// A minimal IPv4/UDP packet (checksums zero: pgvpn does not check them).
    fn udp4(src: [u8; 4], dst: [u8; 4], data: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + data.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0x13, 0x88, 0x13, 0x89]); // ports 5000 -> 5001
        p.extend_from_slice(&[((8 + data.len()) >> 8) as u8, (8 + data.len()) as u8, 0, 0]);
        p.extend_from_slice(data);
        p
    }

    const ALICE: [u8; 4] = [198, 18, 0, 1];
    const BOB: [u8; 4] = [198, 18, 0, 2];
    const CAROL: [u8; 4] = [198, 18, 0, 3];

    fn hex(p: &[u8]) -> String {
        let h: String = p.iter().map(|b| format!("{b:02x}")).collect();
        format!("'\\x{h}'::bytea")
    }

    fn sql(s: &str) {
        Spi::run(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    }

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(s: &str) -> T {
        Spi::get_one::<T>(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .expect("NULL")
    }

    fn as_role(role: &str) {
        sql(&format!("SET ROLE {role}"));
    }

    /// alice (198.18.0.1), bob (198.18.0.2), carol (198.18.0.3), plus eve: a login role
    /// that is not a peer.
    fn three_peers() {
        sql(
            "CREATE ROLE alice; CREATE ROLE bob; CREATE ROLE carol; CREATE ROLE eve;
             SELECT pgvpn.add_peer('alice', 'alice', '{198.18.0.1/32, fd00::1/128}');
             SELECT pgvpn.add_peer('bob', 'bob', '{198.18.0.2/32, fd00::2/128}');
             SELECT pgvpn.add_peer('carol', 'carol', '{198.18.0.3/32}');",
        );
    }

    /// `pgvpn.send`, then log what it buffered as the commit would (see the top).
    fn send(packets: &[Vec<u8>]) -> i64 {
        let n = buffer(packets);
        crate::txn::log_now();
        n
    }

    /// `pgvpn.send` only: the packets wait for the commit.
    fn buffer(packets: &[Vec<u8>]) -> i64 {
        let arr: Vec<String> = packets.iter().map(|p| hex(p)).collect();
        one(&format!("SELECT pgvpn.send(ARRAY[{}])", arr.join(",")))
    }

    fn recv_payloads(after: i64) -> Vec<(i64, Vec<u8>)> {
        Spi::connect(|c| {
            c.select(
                &format!("SELECT id, payload FROM pgvpn.recv({after})"),
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<i64>(1).unwrap().unwrap(),
                    r.get::<Vec<u8>>(2).unwrap().unwrap(),
                )
            })
            .collect()
        })
    }

    #[pg_test]
    fn send_recv_ack_round_trip_between_two_roles() {
        three_peers();
        as_role("alice");
        let a = udp4(ALICE, BOB, b"one");
        let b = udp4(ALICE, BOB, b"two");
        assert_eq!(send(&[a.clone(), b.clone()]), 2);
        assert_eq!(
            one::<i64>(&format!("SELECT pgvpn.send({})", hex(&a))),
            1,
            "single overload"
        );
        crate::txn::log_now();

        as_role("bob");
        assert_eq!(one::<i64>("SELECT pgvpn.cursor()"), 0);
        let got = recv_payloads(0);
        assert_eq!(
            got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
            vec![a.clone(), b, a]
        );
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids ascend");
        // After a page, only what follows it; max_packets limits the page.
        assert_eq!(recv_payloads(got[1].0).len(), 1);
        assert_eq!(
            one::<i64>(&format!("SELECT count(*) FROM pgvpn.recv({}, 1)", 0)),
            1
        );

        let last = got[2].0;
        assert_eq!(one::<i64>(&format!("SELECT pgvpn.ack({last})")), last);
        // The cursor only moves forward.
        assert_eq!(one::<i64>("SELECT pgvpn.ack(1)"), last);
        assert_eq!(one::<i64>("SELECT pgvpn.cursor()"), last);

        // alice got nothing: bob's packets are bob's alone.
        as_role("alice");
        assert!(recv_payloads(0).is_empty());
        assert_eq!(one::<i64>("SELECT pgvpn.cursor()"), 0);
    }

    #[pg_test]
    fn recv_can_wait_for_packets_but_not_forever() {
        three_peers();
        as_role("bob");
        let t = std::time::Instant::now();
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.recv(0, 10, 300)"), 0);
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(300),
            "waited the full time"
        );
        as_role("alice");
        send(&[udp4(ALICE, BOB, b"x")]);
        as_role("bob");
        let t = std::time::Instant::now();
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgvpn.recv(0, 10, 5000)"),
            1
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "no wait when packets are there"
        );
    }

    #[pg_test]
    fn a_callers_search_path_cannot_hijack_the_api() {
        three_peers();
        sql("CREATE SCHEMA evil; GRANT USAGE ON SCHEMA evil TO PUBLIC;
             CREATE FUNCTION evil.nextval(text) RETURNS bigint LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'hijacked nextval'; END $$;
             CREATE FUNCTION evil.statement_timestamp() RETURNS timestamptz LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'hijacked statement_timestamp'; END $$;
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA evil TO PUBLIC;");
        as_role("alice");
        sql("SET search_path = evil, pg_catalog");
        assert_eq!(send(&[udp4(ALICE, BOB, b"x")]), 1);
        as_role("bob");
        sql("SET search_path = evil, pg_catalog");
        assert_eq!(recv_payloads(0).len(), 1);
        assert_eq!(
            one::<String>("SHOW search_path"),
            "evil, pg_catalog",
            "restored"
        );
    }

    #[pg_test]
    fn the_callers_plan_cache_mode_is_left_alone() {
        three_peers();
        sql("SET plan_cache_mode = force_custom_plan");
        as_role("alice");
        send(&[udp4(ALICE, BOB, b"x")]);
        as_role("bob");
        recv_payloads(0);
        assert_eq!(one::<String>("SHOW plan_cache_mode"), "force_custom_plan");
    }

    #[pg_test(error = "wait_ms must be between 0 and 60000, got -1")]
    fn recv_rejects_a_negative_wait() {
        three_peers();
        as_role("bob");
        one::<i64>("SELECT count(*) FROM pgvpn.recv(0, 10, -1)");
    }

    #[pg_test]
    fn routing_follows_the_longest_prefix() {
        three_peers();
        // carol becomes a gateway for the rest of the /16; bob keeps his /32.
        sql("SELECT pgvpn.set_allowed_ips('carol', '{198.18.0.0/16}')");
        as_role("alice");
        assert_eq!(
            send(&[udp4(ALICE, BOB, b"b"), udp4(ALICE, [198, 18, 9, 9], b"c")]),
            2
        );
        sql("RESET ROLE");
        let dst: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT dst_peer FROM pgvpn.packet_log ORDER BY id",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert_eq!(dst, ["bob", "carol"]);
    }

    #[pg_test]
    fn bad_packets_are_rejected_counted_and_never_fail_the_good_ones() {
        three_peers();
        as_role("alice");
        let good = udp4(ALICE, BOB, b"ok");
        let mut truncated = good.clone();
        truncated.truncate(10);
        let mut wrong_length = good.clone();
        wrong_length.push(0);
        let batch = [
            good.clone(),
            truncated,                          // malformed
            wrong_length,                       // malformed: length field != size
            vec![0x60],                         // malformed: truncated IPv6
            udp4(BOB, CAROL, b"spoof"),         // spoofed: bob's address from alice
            udp4([203, 0, 113, 1], BOB, b"x"),  // spoofed: nobody's address
            udp4(ALICE, [198, 19, 0, 1], b"?"), // no_route
            udp4(ALICE, ALICE, b"me"),          // loop
            good,
        ];
        assert_eq!(send(&batch), 2);
        sql("RESET ROLE");
        let totals: Vec<(String, i64)> = Spi::connect(|c| {
            c.select(
                "SELECT reason, packets FROM pgvpn.reject_totals ORDER BY reason",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<String>(1).unwrap().unwrap(),
                    r.get::<i64>(2).unwrap().unwrap(),
                )
            })
            .collect()
        });
        let expect = [
            ("loop", 1),
            ("malformed", 3),
            ("no_route", 1),
            ("spoofed", 2),
        ];
        assert_eq!(totals, expect.map(|(r, n)| (r.to_string(), n)));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgvpn.rejects WHERE peer = 'alice'"),
            7
        );
        assert_eq!(
            one::<i64>("SELECT rejected FROM pgvpn.peer_stats WHERE peer = 'alice'"),
            7
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.packets"), 2);
    }

    #[pg_test]
    fn ipv6_packets_are_logged_and_decoded() {
        three_peers();
        // ICMPv6 echo request fd00::1 -> fd00::2
        let mut p = vec![0x60, 0, 0, 0, 0, 8, 58, 64];
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
        as_role("alice");
        assert_eq!(send(&[p]), 1);
        sql("RESET ROLE");
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s>%s %s %s', ip_version, src_addr, dst_addr, protocol, icmp_type)
                 FROM pgvpn.packet_log"
            ),
            "6 fd00::1>fd00::2 58 128"
        );
        assert_eq!(
            one::<String>("SELECT pgvpn.decode(payload)->>'protocol_name' FROM pgvpn.packets"),
            "icmpv6"
        );
    }

    #[pg_test(error = "role \"eve\" is not a pgvpn peer")]
    fn a_role_that_is_no_peer_cannot_send() {
        three_peers();
        sql("GRANT pgvpn_peer TO eve"); // even with EXECUTE, eve is nobody's peer
        as_role("eve");
        send(&[udp4(ALICE, BOB, b"x")]);
    }

    #[pg_test(error = "permission denied for table packets")]
    fn a_peer_cannot_read_the_log() {
        three_peers();
        as_role("alice");
        one::<i64>("SELECT count(*) FROM pgvpn.packets");
    }

    #[pg_test(error = "permission denied for function add_peer")]
    fn a_peer_cannot_add_peers() {
        three_peers();
        as_role("alice");
        sql("SELECT pgvpn.add_peer('mallory', 'eve', '{198.18.0.66/32}')");
    }

    #[pg_test(error = "permission denied for schema pgvpn")]
    fn an_unregistered_role_has_no_access() {
        three_peers();
        as_role("eve");
        send(&[udp4(ALICE, BOB, b"x")]);
    }

    #[pg_test]
    fn the_auditor_reads_the_views() {
        three_peers();
        sql("CREATE ROLE judy; GRANT pgvpn_auditor TO judy");
        as_role("alice");
        send(&[
            udp4(ALICE, BOB, b"1"),
            udp4(ALICE, BOB, b"2"),
            udp4(ALICE, CAROL, b"3"),
        ]);
        as_role("judy");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.packet_log"), 3);
        assert_eq!(
            one::<String>(
                "SELECT string_agg(format('%s>%s:%s/%s', src_peer, dst_peer, packets, bytes), ' '
                                   ORDER BY dst_peer) FROM pgvpn.flows"
            ),
            "alice>bob:2/58 alice>carol:1/29"
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(format('%s %s/%s %s/%s c%s b%s', peer, sent_packets, sent_bytes,
                                          received_packets, received_bytes, cursor, backlog),
                                   ', ' ORDER BY peer) FROM pgvpn.peer_stats"
            ),
            "alice 3/87 0/0 c0 b0, bob 0/0 2/58 c0 b2, carol 0/0 1/29 c0 b1"
        );
    }

    #[pg_test(error = "permission denied for function send")]
    fn the_auditor_cannot_send() {
        three_peers();
        sql("CREATE ROLE judy; GRANT pgvpn_auditor TO judy");
        as_role("judy");
        send(&[udp4(ALICE, BOB, b"x")]);
    }

    /// Packets wait for the commit: three sends buffer 9 packets for two receivers, and
    /// nothing is in the log (or wakes anybody) before the transaction commits.
    #[pg_test]
    fn sends_are_logged_at_commit() {
        three_peers();
        let bob = one::<i32>("SELECT id FROM pgvpn.peers WHERE name = 'bob'");
        let carol = one::<i32>("SELECT id FROM pgvpn.peers WHERE name = 'carol'");
        as_role("alice");
        for _ in 0..3 {
            buffer(&[
                udp4(ALICE, BOB, b"1"),
                udp4(ALICE, BOB, b"2"),
                udp4(ALICE, CAROL, b"3"),
            ]);
        }
        assert_eq!(crate::txn::pending_packets(), 9);
        assert_eq!(crate::txn::pending_receivers(), [bob, carol]);
        sql("RESET ROLE");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.packets"), 0);
        crate::txn::log_now();
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.packets"), 9);
        assert_eq!(crate::txn::pending_packets(), 0);
    }

    #[pg_test]
    fn peers_are_managed_by_name() {
        three_peers();
        sql("SELECT pgvpn.remove_peer('carol')");
        assert!(!one::<bool>(
            "SELECT pg_has_role('carol', 'pgvpn_peer', 'member')"
        ));
        // The name and role are free again; the old row stays for the log.
        sql("SELECT pgvpn.add_peer('carol', 'carol', '{198.18.0.3/32}')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pgvpn.peers WHERE name = 'carol'"),
            2
        );
    }

    #[pg_test(error = "prefix 198.18.0.2/32 is already routed to peer \"bob\"")]
    fn the_same_prefix_cannot_route_to_two_peers() {
        three_peers();
        sql("SELECT pgvpn.set_allowed_ips('carol', '{198.18.0.2/32}')");
    }

    #[pg_test(error = "invalid peer name 'Bad Name'")]
    fn peer_names_are_checked() {
        sql("CREATE ROLE x; SELECT pgvpn.add_peer('Bad Name', 'x', '{}')");
    }

    /// The error names the caller's own limit, never the global id counter. (No setval
    /// here: sequences are not transactional, a change would leak into later tests.)
    #[pg_test(
        error = "cannot ack id 4611686018427387904: peer \"bob\" has no packet with an id that high"
    )]
    fn ack_cannot_run_ahead_of_the_log() {
        three_peers();
        as_role("alice");
        send(&[udp4(ALICE, BOB, b"1")]);
        as_role("bob");
        let newest = one::<i64>("SELECT max(id) FROM pgvpn.recv(0)");
        assert_eq!(one::<i64>(&format!("SELECT pgvpn.ack({newest})")), newest);
        sql("SELECT pgvpn.ack(4611686018427387904)");
    }

    /// setval() is not transactional: the sequence may only move into a spare chunk an
    /// earlier, committed transaction made. Here every chunk is this transaction's own
    /// (a fresh install makes its first chunks lazily), so prune() keeps writing into
    /// the current one however old it is, and keeps adding spares ahead. (Rotation and
    /// drops across real commits: tests/tests/retention.rs.)
    #[pg_test]
    fn prune_never_moves_ids_into_an_uncommitted_chunk() {
        three_peers();
        let chunks = || {
            one::<i64>(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgvpn.packets'::regclass",
            )
        };
        sql("SET pgvpn.chunk_interval = '1s'; SET pgvpn.retention = '1s'");
        as_role("alice");
        send(&[udp4(ALICE, BOB, b"old")]);
        sql("RESET ROLE");
        assert_eq!(
            chunks(),
            2,
            "the first send made the current chunk and a spare"
        );
        sql("SELECT pg_sleep(1.1)");
        assert_eq!(one::<i32>("SELECT pgvpn.prune()"), 0, "nothing expired yet");
        assert_eq!(chunks(), 3, "a second spare ahead");
        assert_eq!(
            one::<i64>("SELECT pgvpn._chunk_of(last_value) FROM pgvpn.packet_id"),
            0,
            "still writing chunk 0: the spares are not committed"
        );
        as_role("alice");
        send(&[udp4(ALICE, BOB, b"new")]);
        sql("RESET ROLE");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.packets"), 2);
        // Counters are kept in shared memory and the tables; both count.
        assert_eq!(
            one::<i64>("SELECT received_packets FROM pgvpn.peer_stats WHERE peer = 'bob'"),
            2
        );
    }

    #[pg_test]
    fn an_idle_chunk_is_not_rotated() {
        sql("SET pgvpn.chunk_interval = '1s'");
        one::<i32>("SELECT pgvpn.prune()"); // a fresh install makes its first chunks
        let n = one::<i64>("SELECT count(*) FROM pgvpn.chunks");
        sql("SELECT pg_sleep(1.1)");
        one::<i32>("SELECT pgvpn.prune()");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgvpn.chunks"), n);
    }

    #[pg_test]
    fn payload_is_stored_without_compression() {
        assert_eq!(
            one::<String>(
                "SELECT attstorage::text FROM pg_attribute
                 WHERE attrelid = 'pgvpn.packets'::regclass AND attname = 'payload'"
            ),
            "e"
        );
    }
}
