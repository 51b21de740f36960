//! A network partition between a shim and PostgreSQL: the server runs in a namespace of
//! its own and listens on the underlay (198.19.0.1, plain TCP with `hostnossl ... trust`
//! for this test; see `pgvpn_tests::underlay`); alice's link to it goes down for 30 s
//! (`ip link set eth0 down` inside her namespace) while numbered UDP streams run both ways.
//!
//! Proves, with the shim's default timeouts (keepalives 5 s + 5 × 1 s, tcp_user_timeout
//! 10 s) and the server's defaults: both of alice's sessions notice within about 10 s (no
//! thread stays stuck in a read); she counts what she cannot send (and that is exactly
//! what bob misses, give or take a send that committed as the link went down); she
//! recovers on her own within seconds of the link returning; and what bob sent meanwhile,
//! logged while she was away, reaches her afterwards, each datagram once.
//!
//! Needs root, the extension installed, the shim built. About a minute.

use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::sql::create_peer;
use pgvpn_tests::stream::{self, compare, now_us, ranges, read_arrivals, Arrival};
use pgvpn_tests::underlay::{self, Underlay, DB_ADDR, HOST_DEV};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{util, Bg, Cluster, Netns, Shim, ShimSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const ALICE: &str = "198.18.0.1";
const BOB: &str = "198.18.0.2";
const ALICE_UNDERLAY: &str = "198.19.0.2";
const BOB_UNDERLAY: &str = "198.19.0.3";
const PPS: u32 = 100;
const DOWN: Duration = Duration::from_secs(30);
/// How soon a dead link must be noticed: the keepalives' 10 s, plus slack for a loaded box.
const NOTICE_WITHIN: Duration = Duration::from_secs(15);

fn netcheck() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-netcheck")
}

fn arrivals_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-arrivals")
}

/// A numbered stream: its receiver, its sender, the arrivals file.
struct Stream {
    rx: Bg,
    tx: Bg,
    file: PathBuf,
}

fn start_stream(
    tmp: &TmpDir,
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    port: u16,
    tag: u32,
    count: u32,
) -> Stream {
    let file = tmp.file(&format!("arrivals-{tag}"));
    let rx = to.spawn(
        &[
            arrivals_bin(),
            &format!("0.0.0.0:{port}"),
            &tag.to_string(),
            "120000",
            file.to_str().unwrap(),
        ],
        None,
        Some(&tmp.file(&format!("arrivals-{tag}.err"))),
    );
    std::thread::sleep(Duration::from_millis(300));
    let tx = from.spawn(
        &[
            netcheck(),
            "udp-send",
            &format!("{to_addr}:{port}"),
            &count.to_string(),
            &PPS.to_string(),
            "200",
            &tag.to_string(),
        ],
        None,
        Some(&tmp.file(&format!("send-{tag}.err"))),
    );
    Stream { rx, tx, file }
}

impl Stream {
    fn arrivals(&self) -> Vec<Arrival> {
        read_arrivals(&self.file)
    }

    fn finish(mut self) -> Vec<Arrival> {
        let st = self.tx.wait_timeout(Duration::from_secs(120));
        assert!(st.is_some_and(|s| s.success()), "udp-send did not finish");
        let mut last = 0;
        let _ = util::wait_for(Duration::from_secs(60), Duration::from_secs(2), || {
            let n = self.arrivals().len();
            let quiet = n == last;
            last = n;
            quiet.then_some(())
        });
        self.rx.kill();
        self.arrivals()
    }
}

fn secs(us: u128) -> f64 {
    us as f64 / 1e6
}

#[test]
fn a_partitioned_shim_notices_counts_and_recovers() {
    assert!(util::is_root(), "needs root");
    assert!(pgvpn_tests::shim_path().exists(), "pgvpn-shim not built");
    let tmp = TmpDir::new("partition");
    let mut underlay = Underlay::new("pgdb");
    let ns_a = Netns::new("alice");
    let ns_b = Netns::new("bob");
    underlay.attach(&ns_a, ALICE_UNDERLAY);
    underlay.attach(&ns_b, BOB_UNDERLAY);
    let subnet = underlay::SUBNET;
    let cluster = Cluster::start_with(ClusterOptions {
        extra_conf: vec![format!("listen_addresses = '{DB_ADDR}'")],
        hba: vec![format!("hostnossl {DB} alice,bob {subnet} trust")],
        netns: Some(underlay.db_ns().name().to_string()),
        ..ClusterOptions::default()
    });
    cluster.create_db(DB);
    cluster.create_extension(DB);
    let alice_id = create_peer(&cluster, DB, "alice", &[&format!("{ALICE}/32")]);
    let bob_id = create_peer(&cluster, DB, "bob", &[&format!("{BOB}/32")]);
    let spec = |role: &str, addr: &str| ShimSpec {
        role: role.into(),
        // The timeouts are the shim's defaults: nothing about them here.
        conninfo: format!(
            "host={DB_ADDR} port={} user={role} dbname={DB} sslmode=disable",
            cluster.port()
        ),
        address: format!("{addr}/24"),
        tun: TUN.into(),
        extra_args: Vec::new(),
        env: Vec::new(),
    };
    let mut shim_a = Shim::start(&ns_a, &cluster, &spec("alice", ALICE));
    let mut shim_b = Shim::start(&ns_b, &cluster, &spec("bob", BOB));

    // 5 s of traffic, 30 s with alice cut off, 15 s after.
    let count = PPS * 50;
    let to_bob = start_stream(&tmp, &ns_a, &ns_b, BOB, 6101, 51, count);
    let to_alice = start_stream(&tmp, &ns_b, &ns_a, ALICE, 6102, 52, count);
    std::thread::sleep(Duration::from_secs(5));
    assert!(!to_bob.arrivals().is_empty() && !to_alice.arrivals().is_empty());

    let down_at = Instant::now();
    ns_a.ip(&["link", "set", HOST_DEV, "down"]);
    // Both of alice's sessions must notice, each on its own: the uplink in its send, the
    // downlink in its long poll.
    let lines = [
        ("uplink", "uplink: database connection lost"),
        ("downlink", "downlink: database connection lost"),
    ];
    let mut noticed: HashMap<&str, Duration> = HashMap::new();
    while down_at.elapsed() < DOWN {
        let log = std::fs::read_to_string(shim_a.log_path()).unwrap_or_default();
        for (what, line) in lines {
            if log.contains(line) {
                noticed.entry(what).or_insert(down_at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t_up = now_us();
    ns_a.ip(&["link", "set", HOST_DEV, "up"]);

    let got_bob = to_bob.finish();
    let got_alice = to_alice.finish();
    let back_bob = stream::first_at_or_after(&got_bob, t_up).expect("alice -> bob came back");
    let back_alice = stream::first_at_or_after(&got_alice, t_up).expect("bob -> alice came back");
    let mut su = cluster.superuser(DB);
    let c_bob = compare(
        &got_bob,
        count,
        &stream::logged_seqs(&mut su, bob_id, 6101, 51),
    );
    let c_alice = compare(
        &got_alice,
        count,
        &stream::logged_seqs(&mut su, alice_id, 6102, 52),
    );
    let sa = shim_a.stop_and_summary();
    let sb = shim_b.stop_and_summary();
    let dropped = sa["dropped_db_down"] + sa["dropped_queue_full"] + sa["dropped_db_error"];
    eprintln!(
        "partition: alice's link down for {} s; noticed: {noticed:?}\n\
         alice -> bob: back {:.3} s after the link (seq {}); {} of {count} lost ({}), alice counted {dropped} dropped, {} duplicates\n\
         bob -> alice: back {:.3} s after the link (seq {}, the backlog first); {} lost ({}), {} duplicates\n\
         alice: {sa:?}\nbob: {sb:?}",
        DOWN.as_secs(),
        secs(back_bob.at_us - t_up),
        back_bob.seq,
        c_bob.missing.len(),
        ranges(&c_bob.missing),
        c_bob.duplicates.len(),
        secs(back_alice.at_us - t_up),
        back_alice.seq,
        c_alice.missing.len(),
        ranges(&c_alice.missing),
        c_alice.duplicates.len(),
    );

    for (what, _) in lines {
        let d = noticed.get(what).copied();
        assert!(
            d.is_some_and(|d| d <= NOTICE_WITHIN),
            "alice's {what} noticed the partition after {d:?} (want <= {NOTICE_WITHIN:?}):\n{}",
            shim_a.log_tail(40)
        );
    }
    assert!(
        back_bob.at_us - t_up < 5_000_000 && back_alice.at_us - t_up < 5_000_000,
        "recovered within seconds of the link returning"
    );
    // Alice counted what she could not send; bob missed exactly that, except a send in
    // flight when the link went down, which may have committed.
    assert!(
        c_bob.missing.len() as i64 <= dropped && dropped <= c_bob.missing.len() as i64 + 64,
        "bob missed {}, alice counted {dropped} dropped",
        c_bob.missing.len()
    );
    assert!(
        c_bob.missing.len() as u32 > PPS * 20,
        "about 30 s of alice's stream was lost: {}",
        c_bob.missing.len()
    );
    assert!(c_bob.delivered_not_logged.is_empty());
    assert!(c_bob.duplicates.is_empty(), "{:?}", c_bob.duplicates);
    // Bob's datagrams were logged while alice was away, and delivered after: all, once.
    assert!(
        c_alice.missing.is_empty(),
        "lost towards alice: {}",
        ranges(&c_alice.missing)
    );
    assert!(c_alice.duplicates.is_empty(), "{:?}", c_alice.duplicates);
    assert!(
        sa["reconnects"] >= 2,
        "both of alice's sessions reconnected"
    );
    assert_eq!(sb["dropped_db_down"], 0, "bob was never cut off");
}
