//! End-to-end tunnel tests: a private cluster, two hosts in network namespaces, a
//! `pgvpn-shim` in each, real traffic through the kernel.
//!
//! Needs root, the extension installed, and the shim built
//! (`cargo build --release -p pgvpn-shim`, or `PGVPN_SHIM=/path/to/pgvpn-shim`).
//!
//! Network safety: the namespaces are created empty (only `lo`), there is no veth and no
//! default route; the only way out of a namespace is its tun device, i.e. PostgreSQL,
//! reached through its unix socket. Addresses are from 198.18.0.0/15 and a ULA.

use pgvpn_tests::sql::{create_auditor, create_peer, scalar_i64};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{db_error, util, Bg, Cluster, Netns, Shim, ShimSpec};
use postgres::Client;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const ALICE4: &str = "198.18.0.1";
const BOB4: &str = "198.18.0.2";
const ALICE6: &str = "fd00:5067:7670::1";
const BOB6: &str = "fd00:5067:7670::2";

fn netcheck() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-netcheck")
}

/// Everything one test owns. Field order is drop order: shims, then namespaces, then the
/// cluster (so on a panic everything is torn down in a sane order).
struct Vpn {
    shim_a: Option<Shim>,
    shim_b: Option<Shim>,
    ns_a: Netns,
    ns_b: Netns,
    spec_a: ShimSpec,
    spec_b: ShimSpec,
    tmp: TmpDir,
    alice_id: i32,
    bob_id: i32,
    cluster: Cluster,
}

fn require_env() {
    assert!(
        util::is_root(),
        "the tunnel tests need root (network namespaces, tun devices)"
    );
    assert!(
        pgvpn_tests::shim_path().exists(),
        "pgvpn-shim not built: {} is missing (cargo build --release -p pgvpn-shim, or set PGVPN_SHIM)",
        pgvpn_tests::shim_path().display()
    );
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl Vpn {
    /// Cluster, peers alice/bob, two namespaces; shims not started yet.
    fn new(with_v6: bool) -> Vpn {
        require_env();
        let cluster = Cluster::with_pgvpn(DB);
        let (a_ips, b_ips): (Vec<String>, Vec<String>) = if with_v6 {
            (
                vec![format!("{ALICE4}/32"), format!("{ALICE6}/128")],
                vec![format!("{BOB4}/32"), format!("{BOB6}/128")],
            )
        } else {
            (vec![format!("{ALICE4}/32")], vec![format!("{BOB4}/32")])
        };
        let alice_id = create_peer(&cluster, DB, "alice", &refs(&a_ips));
        let bob_id = create_peer(&cluster, DB, "bob", &refs(&b_ips));
        create_auditor(&cluster, "auditor");
        let mut spec_a = ShimSpec::new(&cluster, DB, "alice", &format!("{ALICE4}/24"), TUN);
        let mut spec_b = ShimSpec::new(&cluster, DB, "bob", &format!("{BOB4}/24"), TUN);
        if with_v6 {
            spec_a.extra_args = vec!["--address".into(), format!("{ALICE6}/64")];
            spec_b.extra_args = vec!["--address".into(), format!("{BOB6}/64")];
        }
        Vpn {
            shim_a: None,
            shim_b: None,
            ns_a: Netns::new("alice"),
            ns_b: Netns::new("bob"),
            spec_a,
            spec_b,
            tmp: TmpDir::new("tunnel"),
            alice_id,
            bob_id,
            cluster,
        }
    }

    fn start_a(&mut self) {
        self.shim_a = Some(Shim::start(&self.ns_a, &self.cluster, &self.spec_a));
    }
    fn start_b(&mut self) {
        self.shim_b = Some(Shim::start(&self.ns_b, &self.cluster, &self.spec_b));
    }

    fn auditor(&self) -> Client {
        self.cluster.connect("auditor", DB)
    }

    /// One number from the database (as superuser).
    fn q(&self, sql: &str) -> i64 {
        scalar_i64(&mut self.cluster.superuser(DB), sql)
    }

    fn rows_from(&self, peer: i32) -> i64 {
        self.q(&format!(
            "SELECT count(*) FROM pgvpn.packets WHERE src_peer = {peer}"
        ))
    }
    fn rows_to(&self, peer: i32) -> i64 {
        self.q(&format!(
            "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {peer}"
        ))
    }
    fn rejected(&self, peer: &str) -> i64 {
        self.q(&format!(
            "SELECT rejected FROM pgvpn.peer_stats WHERE peer = '{peer}'"
        ))
    }
    fn cursor(&self, peer: &str) -> i64 {
        self.q(&format!(
            "SELECT cursor FROM pgvpn.peer_stats WHERE peer = '{peer}'"
        ))
    }

    /// Run a netcheck/ping style command in a namespace in the background with stdout to a
    /// file.
    fn bg(&self, ns: &Netns, name: &str, argv: &[&str]) -> (Bg, PathBuf) {
        let out = self.tmp.file(&format!("{name}.out"));
        let err = self.tmp.file(&format!("{name}.err"));
        (ns.spawn(argv, Some(&out), Some(&err)), out)
    }
}

/// Wait for a background process to exit successfully and parse its JSON output.
fn finish(mut bg: Bg, out: &PathBuf, timeout: Duration, what: &str) -> serde_json::Value {
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

fn ping(ns: &Netns, v6: bool, dst: &str) {
    let mut argv = vec!["ping"];
    if v6 {
        argv.push("-6");
    }
    argv.extend(["-c", "3", "-i", "0.2", "-W", "5", "-w", "20", dst]);
    let out = ns.exec(&argv);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("[{}] {}\n{}", ns.name(), argv.join(" "), text);
    assert!(
        out.status.success(),
        "{} from {} failed:\n{}\n{}",
        argv.join(" "),
        ns.name(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 received"), "ping lost packets: {text}");
}

/// Counters of both tun devices and the log, once they agree (or the last attempt).
#[derive(Debug, PartialEq, Clone, Copy)]
struct Tally {
    a_rx: u64,
    a_tx: u64,
    b_rx: u64,
    b_tx: u64,
    from_a: i64,
    to_a: i64,
    rej_a: i64,
    from_b: i64,
    to_b: i64,
    rej_b: i64,
}

impl Tally {
    fn take(v: &Vpn) -> Tally {
        let (a_rx, a_tx) = v.ns_a.dev_packets(TUN);
        let (b_rx, b_tx) = v.ns_b.dev_packets(TUN);
        Tally {
            a_rx,
            a_tx,
            b_rx,
            b_tx,
            from_a: v.rows_from(v.alice_id),
            to_a: v.rows_to(v.alice_id),
            rej_a: v.rejected("alice"),
            from_b: v.rows_from(v.bob_id),
            to_b: v.rows_to(v.bob_id),
            rej_b: v.rejected("bob"),
        }
    }
    fn consistent(&self) -> bool {
        self.a_tx as i64 == self.from_a + self.rej_a
            && self.b_tx as i64 == self.from_b + self.rej_b
            && self.b_rx as i64 == self.to_b
            && self.a_rx as i64 == self.to_a
    }
}

#[test]
fn tunnel_end_to_end() {
    let mut v = Vpn::new(true);
    v.start_a();
    v.start_b();

    // --- ping both ways, IPv4 and IPv6
    ping(&v.ns_a, false, BOB4);
    ping(&v.ns_b, false, ALICE4);
    ping(&v.ns_a, true, BOB6);
    ping(&v.ns_b, true, ALICE6);

    // --- TCP: 4 MiB of pseudo-random bytes, hashed at both ends
    let bytes: u64 = 4 << 20;
    let (rx, rx_out) = v.bg(
        &v.ns_b,
        "tcp-recv",
        &[netcheck(), "tcp-recv", &format!("{BOB4}:5001")],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (tx, tx_out) = v.bg(
        &v.ns_a,
        "tcp-send",
        &[
            netcheck(),
            "tcp-send",
            &format!("{BOB4}:5001"),
            &bytes.to_string(),
            "42",
        ],
    );
    let sent = finish(tx, &tx_out, Duration::from_secs(240), "tcp-send");
    let got = finish(rx, &rx_out, Duration::from_secs(30), "tcp-recv");
    eprintln!("tcp sent {sent}\ntcp received {got}");
    assert_eq!(got["bytes"], bytes, "all bytes arrived");
    assert_eq!(got["sha256"], sent["sha256"], "same SHA-256 at both ends");

    // --- UDP: 2000 datagrams at 500/s
    let (urx, urx_out) = v.bg(
        &v.ns_b,
        "udp-recv",
        &[netcheck(), "udp-recv", "0.0.0.0:5002", "2000", "4000", "77"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (utx, utx_out) = v.bg(
        &v.ns_a,
        "udp-send",
        &[
            netcheck(),
            "udp-send",
            &format!("{BOB4}:5002"),
            "2000",
            "500",
            "200",
            "77",
        ],
    );
    let usent = finish(utx, &utx_out, Duration::from_secs(60), "udp-send");
    let ugot = finish(urx, &urx_out, Duration::from_secs(60), "udp-recv");
    eprintln!("udp sent {usent}\nudp received {ugot}");
    assert_eq!(ugot["distinct"], 2000, "every datagram delivered: {ugot}");
    assert_eq!(ugot["duplicates"], 0, "no datagram delivered twice: {ugot}");

    // --- one log row per packet that crossed each tun device
    let mut last = Tally::take(&v);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let t = Tally::take(&v);
        if t == last && t.consistent() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tun counters and the packet log never agreed: {t:#?}"
        );
        last = t;
    }
    eprintln!("counters and log agree: {last:#?}");
    // Each TCP segment is at most one MTU (the shim's default here): 4 MiB is at least
    // bytes / MTU packets.
    let min_segments = bytes / u64::from(pgvpn_core::limits::DEFAULT_MTU);
    assert!(
        last.a_tx > min_segments,
        "the TCP transfer alone is > {min_segments} packets: {last:?}"
    );

    // --- the flows view shows the TCP flow
    let mut au = v.auditor();
    let row = au
        .query_one(
            "SELECT packets, bytes::bigint FROM pgvpn.flows \
             WHERE src_peer = 'alice' AND dst_peer = 'bob' AND protocol = 6 AND dst_port = 5001",
            &[],
        )
        .unwrap_or_else(|e| panic!("flows: {}", db_error(&e)));
    let (pk, by): (i64, i64) = (row.get(0), row.get(1));
    eprintln!("flows: alice -> bob:5001 {pk} packets, {by} bytes");
    assert!(
        by as u64 > bytes,
        "the flow carried the 4 MiB plus headers: {by}"
    );
    assert!(pk as u64 >= min_segments, "{pk} packets");
    let back = scalar_i64(
        &mut au,
        "SELECT packets FROM pgvpn.flows WHERE src_peer = 'bob' AND dst_peer = 'alice' AND protocol = 6 AND src_port = 5001",
    );
    assert!(back > 0, "the reverse (ACK) flow is logged too");
    let icmp6 = scalar_i64(
        &mut au,
        "SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'alice' AND ip_version = 6 AND protocol = 58 AND icmp_type = 128",
    );
    assert!(
        icmp6 >= 3,
        "alice's IPv6 echo requests are logged ({icmp6})"
    );

    // --- clean shutdown
    for shim in [v.shim_a.as_mut().unwrap(), v.shim_b.as_mut().unwrap()] {
        shim.stop();
        eprintln!(
            "shim {} output tail:\n{}",
            shim.spec().role,
            shim.log_tail(5)
        );
    }
}

#[test]
fn shim_restart_delivers_exactly_once_and_kill9_loses_nothing() {
    let mut v = Vpn::new(false);
    // Bob's tun is created persistent up front, so its rx_packets counter survives shim
    // restarts and counts every packet any of bob's shims wrote.
    v.ns_b.add_persistent_tun(TUN);
    v.start_a();
    v.start_b();
    let bob_rx = |v: &Vpn| v.ns_b.dev_packets(TUN).0;
    let flush = |v: &Vpn| {
        v.ns_b.ip(&["addr", "flush", "dev", TUN]);
    };

    const N: u32 = 6000; // 15 s at 400/s: still running through both restarts
    let (urx, urx_out) = v.bg(
        &v.ns_b,
        "udp-recv",
        &[
            netcheck(),
            "udp-recv",
            "0.0.0.0:5003",
            &N.to_string(),
            "15000",
            "99",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (mut utx, utx_out) = v.bg(
        &v.ns_a,
        "udp-send",
        &[
            netcheck(),
            "udp-send",
            &format!("{BOB4}:5003"),
            &N.to_string(),
            "400",
            "300",
            "99",
        ],
    );

    // Run 1 → SIGTERM mid-stream.
    std::thread::sleep(Duration::from_secs(3));
    assert!(utx.try_wait().is_none(), "the stream is still running");
    v.shim_b.as_mut().unwrap().stop(); // asserts exit status 0
    v.shim_b.as_ref().unwrap().wait_sessions_gone(&v.cluster);
    let rx1 = bob_rx(&v);
    let c1 = v.cursor("bob");
    let upto_c1 = v.q(&format!(
        "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {} AND id <= {c1}",
        v.bob_id
    ));
    eprintln!("after SIGTERM: bob wrote {rx1} packets, cursor {c1} covers {upto_c1} rows");
    assert!(rx1 > 0, "bob received something before the SIGTERM");
    assert_eq!(
        rx1 as i64, upto_c1,
        "graceful stop: the stored cursor covers exactly what was written"
    );

    // Down for a second (alice keeps sending; the log keeps bob's packets), then run 2.
    std::thread::sleep(Duration::from_secs(1));
    flush(&v);
    v.start_b();

    // Run 2 → kill -9 mid-stream.
    std::thread::sleep(Duration::from_secs(3));
    assert!(utx.try_wait().is_none(), "the stream is still running");
    v.shim_b.as_mut().unwrap().kill9();
    // Its backends may still commit a last in-flight ack: read the cursor after they end.
    v.shim_b.as_ref().unwrap().wait_sessions_gone(&v.cluster);
    let rx12 = bob_rx(&v);
    let rx2 = rx12 - rx1;
    let c2 = v.cursor("bob");
    let c1_to_c2 = v.q(&format!(
        "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {} AND id > {c1} AND id <= {c2}",
        v.bob_id
    ));
    let unacked_at_kill = v.q(&format!(
        "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {} AND id > {c2}",
        v.bob_id
    ));
    eprintln!(
        "after kill -9: run 2 wrote {rx2} packets; cursor {c1} -> {c2} acked {c1_to_c2}; {unacked_at_kill} logged for bob beyond the cursor"
    );
    assert!(rx2 > 0, "run 2 delivered something");
    assert!(
        c1_to_c2 <= rx2 as i64,
        "the cursor never runs ahead of what was written (that would lose packets)"
    );
    let dup_tail = rx2 as i64 - c1_to_c2;

    std::thread::sleep(Duration::from_secs(1));
    flush(&v);
    v.start_b(); // run 3

    let usent = finish(utx, &utx_out, Duration::from_secs(120), "udp-send");
    let ugot = finish(urx, &urx_out, Duration::from_secs(120), "udp-recv");
    eprintln!("udp sent {usent}\nudp received {ugot}");

    // Wait until run 3 has caught up with everything logged for bob.
    let total_rows = v.rows_to(v.bob_id);
    let after_c2 = v.q(&format!(
        "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {} AND id > {c2}",
        v.bob_id
    ));
    let rx3 = util::wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        let rx3 = bob_rx(&v) - rx12;
        (rx3 as i64 >= after_c2).then_some(rx3)
    })
    .unwrap_or_else(|| bob_rx(&v) - rx12);
    std::thread::sleep(Duration::from_millis(500));
    let rx3_final = bob_rx(&v) - rx12;
    eprintln!(
        "run 3 wrote {rx3_final} packets; {after_c2} rows beyond the kill-time cursor; total rows for bob {total_rows}; \
         rx across runs {}; duplicated tail after kill -9 = {dup_tail} (unacked at kill: {unacked_at_kill})",
        rx1 + rx2 + rx3_final
    );
    assert_eq!(rx3, rx3_final, "run 3 kept writing after catching up");
    assert_eq!(
        rx3_final as i64, after_c2,
        "run 3 resumes exactly at the stored cursor"
    );
    assert_eq!(
        (rx1 + rx2 + rx3_final) as i64,
        total_rows + dup_tail,
        "every packet logged for bob was written once, plus the unacked tail of the killed run"
    );
    assert!(
        dup_tail >= 0 && dup_tail <= unacked_at_kill,
        "duplicates bounded by what was not acked"
    );
    assert_eq!(
        total_rows, N as i64,
        "each UDP datagram logged exactly once"
    );
    // Application view.
    assert_eq!(
        ugot["distinct"], N,
        "no datagram lost across SIGTERM and kill -9: {ugot}"
    );
    assert_eq!(
        ugot["duplicates"], dup_tail,
        "the application saw exactly the duplicated tail: {ugot}"
    );

    v.shim_a.as_mut().unwrap().stop();
    v.shim_b.as_mut().unwrap().stop();
}
