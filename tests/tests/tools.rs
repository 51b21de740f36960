//! The tools for auditors and operators: `pgvpn capture` (files read back with tshark),
//! `pgvpn show` (exact figures for known traffic), `pgvpn.metrics()`, and the shim's
//! `--metrics` endpoint scraped inside a test namespace.
//!
//! Traffic is made at the SQL level (`pgvpn.send` as a peer) and, for the shim's metrics,
//! through real shims in network namespaces (as in tunnel.rs: no veth, no default route;
//! the only way out of a namespace is its tun device).
//!
//! Needs root, the extension installed, `pgvpn` and `pgvpn-shim` built (`cargo build
//! --release -p pgvpn-shim`), tshark, curl and script (bsdutils).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::packet::{self, TCP_SYN};
use pgvpn_tests::spec::{A4, A6, B4, B6, C4, DB};
use pgvpn_tests::sql::{ack, create_auditor, create_peer, recv, scalar_i64, send};
use pgvpn_tests::tools::{self, prom, tshark};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{db_error, util, Cluster, Netns, Shim, ShimSpec};
use postgres::Client;

fn cidr(a: &str) -> String {
    if a.contains(':') {
        format!("{a}/128")
    } else {
        format!("{a}/32")
    }
}

/// A cluster with peers alice (v4 and v6), bob (v4 and v6), carol (v4), and an auditor.
fn lab_with(opts: ClusterOptions) -> Cluster {
    tshark::require();
    let cluster = Cluster::start_with(opts);
    cluster.create_db(DB);
    cluster.create_extension(DB);
    create_peer(&cluster, DB, "alice", &[&cidr(A4), &cidr(A6)]);
    create_peer(&cluster, DB, "bob", &[&cidr(B4), &cidr(B6)]);
    create_peer(&cluster, DB, "carol", &[&cidr(C4)]);
    create_auditor(&cluster, "auditor");
    cluster
}

fn lab() -> Cluster {
    lab_with(ClusterOptions::default())
}

/// v4 and v6, UDP, TCP and ICMP, single packets and batches, three senders; and packets
/// the database rejects (not logged). Returns how many were logged.
fn traffic(c: &Cluster) -> i64 {
    let mut alice = c.connect("alice", DB);
    let mut bob = c.connect("bob", DB);
    let mut carol = c.connect("carol", DB);
    let mut logged = 0;
    logged += send(
        &mut alice,
        &[
            packet::udp(A4, B4, 40000, 5000, b"one"),
            packet::tcp(A6, B6, 40001, 80, TCP_SYN, b""),
            packet::ping(A4, C4, 7, 1, b"abc"),
        ],
    );
    logged += send(&mut bob, &[packet::udp(B4, A4, 5000, 40000, b"reply")]);
    logged += send(&mut carol, &[packet::udp(C4, A4, 1234, 53, b"query")]);
    logged += send(&mut alice, &[packet::ping(A6, B6, 8, 1, b"six")]);
    logged += send(&mut bob, &[packet::tcp(B6, A6, 80, 40001, 0x12, b"")]);
    // rejected: spoofed source, no route
    assert_eq!(
        send(
            &mut alice,
            &[
                packet::udp(C4, B4, 1, 2, b"spoofed"),
                packet::udp(A4, "198.18.9.9", 1, 2, b"nowhere")
            ]
        ),
        0
    );
    assert_eq!(logged, 7);
    logged
}

/// One row of pgvpn.packet_log.
#[derive(Debug, Clone)]
struct LogRow {
    id: i64,
    sent_at: SystemTime,
    src_peer: String,
    dst_peer: String,
    src: IpAddr,
    dst: IpAddr,
    protocol: i16,
    src_port: Option<i32>,
    dst_port: Option<i32>,
    length: i32,
}

fn log_rows(c: &Cluster) -> Vec<LogRow> {
    let mut su = c.superuser(DB);
    su.query(
        "SELECT id, sent_at, src_peer, dst_peer, host(src_addr), host(dst_addr), protocol, \
                src_port, dst_port, length FROM pgvpn.packet_log ORDER BY id",
        &[],
    )
    .unwrap_or_else(|e| panic!("packet_log: {}", db_error(&e)))
    .iter()
    .map(|r| LogRow {
        id: r.get(0),
        sent_at: r.get(1),
        src_peer: r.get(2),
        dst_peer: r.get(3),
        src: r.get::<_, String>(4).parse().unwrap(),
        dst: r.get::<_, String>(5).parse().unwrap(),
        protocol: r.get(6),
        src_port: r.get(7),
        dst_port: r.get(8),
        length: r.get(9),
    })
    .collect()
}

/// A time as tshark prints frame.time_epoch: seconds and nine digits.
fn epoch(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

const FIELDS: &[&str] = &[
    "frame.time_epoch",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "udp.srcport",
    "udp.dstport",
    "tcp.srcport",
    "tcp.dstport",
    "frame.len",
];

/// Every frame of `file` is the log row at the same position: time, addresses, ports,
/// length.
fn assert_frames_match(file: &Path, rows: &[LogRow]) {
    let frames = tshark::fields(file, FIELDS, None);
    assert_eq!(
        frames.len(),
        rows.len(),
        "one frame per log row: {frames:?}"
    );
    for (f, r) in frames.iter().zip(rows) {
        let what = format!("row {r:?}, frame {f:?}");
        assert_eq!(f[0], epoch(r.sent_at), "timestamp: {what}");
        let (src, dst) = if r.src.is_ipv4() {
            assert!(f[3].is_empty() && f[4].is_empty(), "{what}");
            (&f[1], &f[2])
        } else {
            assert!(f[1].is_empty() && f[2].is_empty(), "{what}");
            (&f[3], &f[4])
        };
        assert_eq!(src.parse::<IpAddr>().unwrap(), r.src, "{what}");
        assert_eq!(dst.parse::<IpAddr>().unwrap(), r.dst, "{what}");
        let ports = match r.protocol {
            17 => Some((&f[5], &f[6])),
            6 => Some((&f[7], &f[8])),
            _ => None,
        };
        match ports {
            Some((sp, dp)) => {
                assert_eq!(sp.parse::<i32>().ok(), r.src_port, "{what}");
                assert_eq!(dp.parse::<i32>().ok(), r.dst_port, "{what}");
            }
            None => {
                assert!(f[5..9].iter().all(String::is_empty), "{what}");
                assert!(r.src_port.is_none() && r.dst_port.is_none(), "{what}");
            }
        }
        assert_eq!(f[9].parse::<i32>().unwrap(), r.length, "length: {what}");
    }
}

/// The log ids of a pcapng capture, from the packets' comments, with their peers.
fn comments(file: &Path) -> Vec<String> {
    tshark::fields(file, &["frame.comment"], None)
        .into_iter()
        .map(|f| f[0].clone())
        .collect()
}

fn comment_of(r: &LogRow) -> String {
    format!("pgvpn id {}: {} -> {}", r.id, r.src_peer, r.dst_peer)
}

/// The ids a pcapng capture holds, in file order.
fn ids(file: &Path) -> Vec<i64> {
    comments(file)
        .iter()
        .map(|c| {
            c.strip_prefix("pgvpn id ")
                .and_then(|r| r.split(':').next())
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("not a pgvpn comment: {c:?}"))
        })
        .collect()
}

#[test]
fn capture_writes_the_log_as_pcap_and_pcapng() {
    let cluster = lab();
    let logged = traffic(&cluster);
    let rows = log_rows(&cluster);
    assert_eq!(rows.len() as i64, logged);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
    assert!(rows.iter().any(|r| r.src.is_ipv6()) && rows.iter().any(|r| r.src.is_ipv4()));
    let tmp = TmpDir::new("tools");

    // classic pcap: LINKTYPE_RAW, nanosecond timestamps, one frame per row in id order
    let pcap = tmp.file("all.pcap");
    let out = tools::run(
        &cluster,
        DB,
        "auditor",
        &["capture", "-w", pcap.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "no progress line when stderr is not a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&pcap).unwrap();
    assert_eq!(
        u32::from_ne_bytes(bytes[..4].try_into().unwrap()),
        0xA1B2_3C4D,
        "nanosecond pcap"
    );
    assert_eq!(
        u32::from_ne_bytes(bytes[20..24].try_into().unwrap()),
        101,
        "LINKTYPE_RAW"
    );
    assert_frames_match(&pcap, &rows);

    // to stdout ("-" and no -w): the same bytes
    let stdout = tools::run(&cluster, DB, "auditor", &["capture"]);
    assert!(stdout.status.success(), "{stdout:?}");
    assert_eq!(
        stdout.stdout, bytes,
        "stdout and -w FILE write the same file"
    );
    let dash = tools::run(&cluster, DB, "auditor", &["capture", "-w", "-"]);
    assert_eq!(dash.stdout, bytes);

    // pcapng: the same frames, each with its log id and peers
    let ng = tmp.file("all.pcapng");
    tools::run_ok(
        &cluster,
        DB,
        "auditor",
        &["capture", "--format", "pcapng", "-w", ng.to_str().unwrap()],
    );
    let head = std::fs::read(&ng).unwrap();
    assert_eq!(
        &head[..4],
        &[0x0a, 0x0d, 0x0d, 0x0a],
        "a pcapng section header"
    );
    assert_frames_match(&ng, &rows);
    let want: Vec<String> = rows.iter().map(comment_of).collect();
    assert_eq!(comments(&ng), want);
}

#[test]
fn capture_filters_by_peer_host_and_time() {
    let cluster = lab();
    traffic(&cluster);
    // Known times (sent_at is the server's clock at commit): rows 1-3 three hours ago,
    // rows 4-5 forty minutes ago, the rest now. Only the superuser may change the log.
    let mut su = cluster.superuser(DB);
    let ids0: Vec<i64> = log_rows(&cluster).iter().map(|r| r.id).collect();
    su.execute(
        "UPDATE pgvpn.packets SET sent_at = now() - interval '3 hours' WHERE id = ANY($1)",
        &[&ids0[..3].to_vec()],
    )
    .unwrap();
    su.execute(
        "UPDATE pgvpn.packets SET sent_at = now() - interval '40 minutes' WHERE id = ANY($1)",
        &[&ids0[3..5].to_vec()],
    )
    .unwrap();
    let rows = log_rows(&cluster);
    let tmp = TmpDir::new("tools");
    let ago = |d: u64| SystemTime::now() - Duration::from_secs(d);
    let in_net = |a: &IpAddr, net: &str| {
        let n = pgvpn_core::cidr::parse(net).unwrap().trunc();
        n.contains(a)
    };

    type Case<'a> = (Vec<&'a str>, Box<dyn Fn(&LogRow) -> bool>);
    let cases: Vec<Case> = vec![
        (
            vec!["--peer", "carol"],
            Box::new(|r| r.src_peer == "carol" || r.dst_peer == "carol"),
        ),
        (
            // Every row has bob or carol at one end: the time filter is what leaves
            // rows out, and the expected set is the union of both peers' rows.
            vec!["--peer", "carol", "--peer", "bob", "--since", "1h"],
            Box::new(move |r| {
                r.sent_at >= ago(3600)
                    && [&r.src_peer, &r.dst_peer]
                        .iter()
                        .any(|p| *p == "carol" || *p == "bob")
            }),
        ),
        (
            vec!["--host", C4],
            Box::new(|r| r.src.to_string() == C4 || r.dst.to_string() == C4),
        ),
        (
            vec!["--host", "fd00:5067:7670::/64"],
            Box::new(move |r| {
                in_net(&r.src, "fd00:5067:7670::/64") || in_net(&r.dst, "fd00:5067:7670::/64")
            }),
        ),
        (
            vec!["--host", "198.18.1.0/30"], // .0-.3: alice, bob, carol; not .9
            Box::new(move |r| {
                r.src.is_ipv4()
                    && (in_net(&r.src, "198.18.1.0/30") || in_net(&r.dst, "198.18.1.0/30"))
            }),
        ),
        (
            // AND across flags: alice's packets to or from carol's address
            vec!["--peer", "alice", "--host", C4],
            Box::new(|r| {
                (r.src_peer == "alice" || r.dst_peer == "alice")
                    && (r.src.to_string() == C4 || r.dst.to_string() == C4)
            }),
        ),
        (
            vec!["--since", "1h"],
            Box::new(move |r| r.sent_at >= ago(3600)),
        ),
        (
            vec!["--since", "2h", "--until", "30m"],
            Box::new(move |r| r.sent_at >= ago(7200) && r.sent_at < ago(1800)),
        ),
        (
            vec!["--until", "1h30m"],
            Box::new(move |r| r.sent_at < ago(5400)),
        ),
        (
            vec!["--since", "2h", "--peer", "bob"],
            Box::new(move |r| {
                r.sent_at >= ago(7200) && (r.src_peer == "bob" || r.dst_peer == "bob")
            }),
        ),
    ];
    for (args, want) in &cases {
        let file = tmp.file("f.pcapng");
        let mut argv = vec![
            "capture",
            "--format",
            "pcapng",
            "-w",
            file.to_str().unwrap(),
        ];
        argv.extend(args.iter());
        tools::run_ok(&cluster, DB, "auditor", &argv);
        let expected: Vec<String> = rows.iter().filter(|r| want(r)).map(comment_of).collect();
        assert!(!expected.is_empty(), "{args:?} should match something");
        assert!(
            expected.len() < rows.len(),
            "{args:?} should leave something out"
        );
        assert_eq!(
            comments(&file),
            expected,
            "pgvpn capture {}",
            args.join(" ")
        );
    }

    // an absolute time, as PostgreSQL writes it
    let since: String = su
        .query_one("SELECT (now() - interval '1 hour')::text", &[])
        .unwrap()
        .get(0);
    let file = tmp.file("abs.pcapng");
    tools::run_ok(
        &cluster,
        DB,
        "auditor",
        &[
            "capture",
            "--format",
            "pcapng",
            "--since",
            &since,
            "-w",
            file.to_str().unwrap(),
        ],
    );
    // All but the three rows from three hours ago.
    assert_eq!(comments(&file).len(), rows.len() - 3, "--since {since}");

    // mistakes are exit code 2, with the reason
    for (args, says) in [
        (vec!["capture", "--peer", "dave"], "no such peer"),
        (vec!["capture", "--since", "the day before"], "--since"),
        (vec!["capture", "--host", "198.18.1.1/33"], "prefix length"),
        (vec!["capture", "--format", "erf"], "erf"),
    ] {
        let out = tools::run(&cluster, DB, "auditor", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Waits until the pcapng capture at `file` holds `n` frames (it may be growing).
/// `pgvpn capture --follow FILTERS --format pcapng -w <tmp>/NAME` as the auditor, returned
/// once it has started (its file has its header).
fn follow(
    cluster: &Cluster,
    tmp: &TmpDir,
    name: &str,
    filters: &[&str],
) -> (PathBuf, tools::Running) {
    let file = tmp.file(name);
    let mut args = vec!["capture", "--follow"];
    args.extend_from_slice(filters);
    args.extend(["--format", "pcapng", "-w", file.to_str().unwrap()]);
    let cap = tools::spawn(cluster, DB, "auditor", &args, &file.with_extension("err"));
    util::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        std::fs::metadata(&file).ok().filter(|m| m.len() > 0)
    })
    .expect("the capture starts (its file has its header)");
    (file, cap)
}

fn wait_frames(file: &Path, n: usize, what: &str) -> Vec<i64> {
    let got = util::wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let ids = if file.exists() { ids(file) } else { vec![] };
        (ids.len() >= n).then_some(ids)
    });
    got.unwrap_or_else(|| {
        panic!(
            "{what}: expected {n} frames, the capture has {:?}",
            if file.exists() { ids(file) } else { vec![] }
        )
    })
}

#[test]
fn follow_streams_new_packets_and_stops_cleanly_on_sigint() {
    let cluster = lab();
    let mut alice = cluster.connect("alice", DB);
    let mut carol = cluster.connect("carol", DB);
    send(&mut alice, &[packet::udp(A4, B4, 1, 2, b"history")]);
    let tmp = TmpDir::new("tools");
    let (file, mut cap) = follow(&cluster, &tmp, "live.pcapng", &[]);
    wait_frames(&file, 1, "the history");

    // single packets from two senders to two receivers, then a batch of 50
    for i in 0..5u16 {
        send(&mut alice, &[packet::udp(A4, B4, 1000 + i, 2, b"live")]);
        send(&mut carol, &[packet::udp(C4, A4, 2000 + i, 3, b"live")]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let batch: Vec<Vec<u8>> = (0..50u16)
        .map(|i| packet::udp(A6, B6, 3000 + i, 4, b"batch"))
        .collect();
    send(&mut alice, &batch);
    let t = Instant::now();
    let all: Vec<i64> = log_rows(&cluster).iter().map(|r| r.id).collect();
    assert_eq!(all.len(), 61);
    let seen = wait_frames(&file, all.len(), "the live packets");
    eprintln!("the last batch appeared {:?} after its commit", t.elapsed());
    assert_eq!(seen, all, "every packet once, in id order");

    // Idle now: it waits in pgvpn.log_wait (up to a minute); SIGINT must end it at once.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let code = cap.signal_and_wait("INT", Duration::from_secs(10));
    assert_eq!(code, Some(0), "stderr: {}", cap.stderr());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        t.elapsed()
    );
    assert_eq!(
        tshark::frames(&file),
        Ok(all.len()),
        "a complete, clean file"
    );
    assert_eq!(
        comments(&file),
        log_rows(&cluster)
            .iter()
            .map(comment_of)
            .collect::<Vec<_>>()
    );

    // SIGTERM as well; and a follow capture with a filter sees only its packets
    let (file2, mut cap2) = follow(
        &cluster,
        &tmp,
        "carol.pcapng",
        &["--peer", "carol", "--since", "now"],
    );
    std::thread::sleep(Duration::from_millis(300));
    send(&mut alice, &[packet::udp(A4, B4, 9, 9, b"not carol")]);
    send(&mut carol, &[packet::udp(C4, A4, 9, 9, b"carol")]);
    let rows = log_rows(&cluster);
    let last = rows.last().unwrap();
    assert_eq!(wait_frames(&file2, 1, "carol's packet"), vec![last.id]);
    assert_eq!(
        cap2.signal_and_wait("TERM", Duration::from_secs(10)),
        Some(0)
    );
    assert_eq!(comments(&file2), vec![comment_of(last)]);
}

/// Two senders to different receivers can commit out of id order. A follower that went
/// past the later id would never see the earlier one; pgvpn capture waits for it.
#[test]
fn follow_waits_for_an_earlier_id_that_commits_later() {
    // A synchronous standby that never comes: a commit that asks for it waits (locks
    // held, ids taken, not yet visible) until its wait is cancelled. Everything else
    // commits locally ('session': pgvpn would otherwise make every send wait).
    let cluster = lab_with(ClusterOptions {
        extra_conf: vec![
            "synchronous_standby_names = 'pgvpn_nobody'".into(),
            "synchronous_commit = local".into(),
            "pgvpn.synchronous_commit = 'session'".into(),
        ],
        ..ClusterOptions::default()
    });
    // A first packet, committed: the first send into a fresh log also sets up its chunks,
    // and that must not happen inside the commit this test holds back.
    let mut carol = cluster.connect("carol", DB);
    send(&mut carol, &[packet::udp(C4, A4, 3, 3, b"warm-up")]);
    let warm = log_rows(&cluster)[0].id;
    let tmp = TmpDir::new("tools");
    let (file, mut cap) = follow(&cluster, &tmp, "order.pcapng", &[]);

    // alice -> bob: takes its id, then waits for the standby
    let conninfo = cluster.conninfo("alice", DB);
    let slow = std::thread::spawn(move || {
        let settings =
            pgvpn_shim::conn::parse_with(&conninfo, &pgvpn_shim::conn::Env::empty()).unwrap();
        let mut c: Client = pgvpn_shim::conn::connect(&settings, "slow sender").unwrap();
        c.batch_execute("SET synchronous_commit = on").unwrap();
        let r = c.query_one(
            pgvpn_core::sql::SEND,
            &[&vec![packet::udp(A4, B4, 1, 1, b"early id")]],
        );
        r.map(|_| ()).map_err(|e| db_error(&e))
    });
    let mut su = cluster.superuser(DB);
    let waiting = util::wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        su.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE usename = 'alice' AND wait_event = 'SyncRep'",
            &[],
        )
        .unwrap()
        .map(|r| r.get::<_, i32>(0))
    })
    .expect("alice's commit waits for the standby");

    // carol -> alice: a later id, committed at once
    send(&mut carol, &[packet::udp(C4, A4, 2, 2, b"late id")]);
    let visible = log_rows(&cluster);
    assert_eq!(visible.len(), 2, "only carol's packets are visible yet");
    let late = visible[1].clone();

    // A reader that took "everything up to the newest id" now would be past alice's.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        tshark::frames(&file),
        Ok(1),
        "carol's second packet is held back while a smaller id may still commit"
    );
    assert!(
        cap.exited().is_none(),
        "still following; stderr: {}",
        cap.stderr()
    );

    // Release alice's commit: it becomes visible with the smaller id.
    su.execute("SELECT pg_cancel_backend($1)", &[&waiting])
        .unwrap();
    util::wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
        slow.is_finished().then_some(())
    })
    .expect("alice's send returns once its wait is cancelled");
    slow.join()
        .unwrap()
        .expect("alice's send committed (locally)");
    let rows = log_rows(&cluster);
    assert_eq!(rows.len(), 3);
    assert!(rows[1].id < late.id, "alice's id is the smaller: {rows:?}");
    assert_eq!(rows[1].src_peer, "alice");

    let seen = wait_frames(&file, 3, "all three packets");
    assert_eq!(
        seen,
        vec![warm, rows[1].id, late.id],
        "in id order, none skipped"
    );
    assert_eq!(cap.signal_and_wait("INT", Duration::from_secs(10)), Some(0));
}

#[test]
fn follow_pipes_into_tshark() {
    let cluster = lab();
    let mut alice = cluster.connect("alice", DB);
    send(&mut alice, &[packet::udp(A4, B4, 1, 2, b"before")]);
    // pgvpn capture --follow --since now --format pcapng | tshark -r - -l ...
    let mut cap = tools::command(
        &cluster,
        DB,
        "auditor",
        &[
            "capture", "--follow", "--since", "now", "--format", "pcapng",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pipe = cap.stdout.take().unwrap();
    let mut shark = Command::new("tshark")
        .args([
            "-n",
            "-l",
            "-r",
            "-",
            "-T",
            "fields",
            "-e",
            "frame.comment",
            "-e",
            "udp.srcport",
        ])
        .stdin(pipe)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let out = shark.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    for port in [7001u16, 7002, 7003] {
        send(&mut alice, &[packet::udp(A4, B4, port, 2, b"live")]);
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("tshark showed nothing for port {port}"));
        let row = log_rows(&cluster).pop().unwrap();
        assert_eq!(line, format!("{}\t{port}", comment_of(&row)));
    }
    util::signal(cap.id(), "INT");
    let st = cap.wait().unwrap();
    assert!(st.success(), "pgvpn: {st}");
    // tshark reads to the end of the stream and exits.
    let st = shark.wait().unwrap();
    assert!(st.success(), "tshark: {st}");
    reader.join().unwrap();
    assert!(
        lines.try_recv().is_err(),
        "nothing more (the packet from before `now` is not in it)"
    );
}

#[test]
fn capture_shows_progress_only_on_a_terminal() {
    let cluster = lab();
    traffic(&cluster);
    let tmp = TmpDir::new("tools");
    let file = tmp.file("tty.pcap");
    let argv: Vec<String> = [
        tools::tool_path().to_str().unwrap(),
        "--db",
        &cluster.conninfo("auditor", DB),
        "capture",
        "-w",
        file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (screen, code) = tools::on_terminal(&argv);
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("7 packets"),
        "the progress line: {screen:?}"
    );
    assert!(
        screen.contains(" B"),
        "bytes in the progress line: {screen:?}"
    );
    assert_eq!(tshark::frames(&file), Ok(7));
    // (without a terminal stderr stays empty: capture_writes_the_log_as_pcap_and_pcapng)

    // a capture file is never written to a terminal
    let mut to_tty = argv.clone();
    to_tty.truncate(4);
    let (screen, code) = tools::on_terminal(&to_tty);
    assert_eq!(code, Some(2), "{screen}");
    assert!(
        screen.contains("refusing to write a capture file to a terminal"),
        "{screen}"
    );
}

/// Known traffic for `show` and `metrics()`: alice sends three UDP packets to bob (128,
/// 228 and 328 bytes) and has three rejected (2 spoofed, 1 no route); bob sends one (38
/// bytes) to alice and acknowledges two of his three; carol does nothing.
fn known_traffic(c: &Cluster) -> (i64, i64) {
    let mut alice = c.connect("alice", DB);
    let mut bob = c.connect("bob", DB);
    let sent = send(
        &mut alice,
        &[
            packet::udp(A4, B4, 1, 2, &[0; 100]),
            packet::udp(A4, B4, 1, 2, &[0; 200]),
            packet::udp(A4, B4, 1, 2, &[0; 300]),
            packet::udp(C4, B4, 1, 2, b"spoofed"),
            packet::udp(C4, B4, 1, 2, b"spoofed"),
            packet::udp(A4, "198.18.9.9", 1, 2, b"nowhere"),
        ],
    );
    assert_eq!(sent, 3);
    assert_eq!(send(&mut bob, &[packet::udp(B4, A4, 2, 1, &[0; 10])]), 1);
    let got = recv(&mut bob, 0, 2);
    assert_eq!(got.len(), 2);
    let cursor = ack(&mut bob, got[1].0);
    let newest = scalar_i64(&mut c.superuser(DB), "SELECT max(id) FROM pgvpn.packets");
    (cursor, newest)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn show_reports_known_traffic() {
    let cluster = lab();
    let before = unix_now();
    let (bob_cursor, _) = known_traffic(&cluster);
    let after = unix_now() + 1;

    // dump: exact figures, tab-separated, most recent traffic first (alice and bob both
    // last moved at bob's send; the tie goes by name), idle carol last
    let dump = tools::run_ok(&cluster, DB, "auditor", &["show", "dump"]);
    let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{dump}");
    let time = |s: &str| s.parse::<i64>().unwrap();
    let (a, b, c) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(
        a.iter()
            .enumerate()
            .filter(|(i, _)| ![3, 12].contains(i))
            .map(|(_, v)| *v)
            .collect::<Vec<_>>(),
        [
            "alice",
            "alice",
            "198.18.1.1/32,fd00:5067:7670::1:1/128",
            "38",
            "684",
            "1",
            "3",
            "1",
            "0",
            "3",
            "spoofed=2,no_route=1"
        ],
        "{dump}"
    );
    assert!(
        (before..=after).contains(&time(a[3])),
        "alice's latest traffic {}",
        a[3]
    );
    assert_eq!(a[12], "0", "alice never acked");
    let bob_line: Vec<String> = b.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        bob_line[..3]
            .iter()
            .chain(&bob_line[4..12])
            .cloned()
            .collect::<Vec<_>>(),
        [
            "bob",
            "bob",
            "198.18.1.2/32,fd00:5067:7670::1:2/128",
            "684",
            "38",
            "3",
            "1",
            "1",
            &bob_cursor.to_string(),
            "0",
            "(none)"
        ],
        "{dump}"
    );
    assert!(
        (before..=after).contains(&time(b[12])),
        "bob's last ack {}",
        b[12]
    );
    assert_eq!(
        c.to_vec(),
        [
            "carol",
            "carol",
            "198.18.1.3/32",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "(none)",
            "0"
        ]
    );

    // the wg-style text, piped: no colour
    let text = tools::run_ok(&cluster, DB, "auditor", &["show"]);
    assert!(!text.contains('\x1b'), "{text}");
    let blocks: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(blocks.len(), 3, "{text}");
    let alice: Vec<&str> = blocks[0].lines().collect();
    assert_eq!(alice[0], "peer: alice");
    assert_eq!(alice[1], "  role: alice");
    assert_eq!(
        alice[2],
        "  allowed ips: 198.18.1.1/32, fd00:5067:7670::1:1/128"
    );
    assert!(
        alice[3] == "  latest traffic: Now"
            || (alice[3].starts_with("  latest traffic: ") && alice[3].ends_with(" seconds ago")
                || alice[3].ends_with(" second ago")),
        "{}",
        alice[3]
    );
    assert_eq!(
        alice[4..].to_vec(),
        [
            "  transfer: 38 B received, 684 B sent",
            "  backlog: 1 packet (cursor 0)",
            "  rejected: 3 (spoofed 2, no_route 1)"
        ]
    );
    let bob: Vec<&str> = blocks[1].lines().collect();
    assert_eq!(bob[0], "peer: bob");
    assert_eq!(
        bob[4..].to_vec(),
        [
            "  transfer: 684 B received, 38 B sent".to_string(),
            format!("  backlog: 1 packet (cursor {bob_cursor})"),
            "  rejected: 0".to_string()
        ]
    );
    assert_eq!(
        blocks[2].trim_end(),
        "peer: carol\n  role: carol\n  allowed ips: 198.18.1.3/32\n  transfer: 0 B received, 0 B sent\n  backlog: 0 packets (cursor 0)\n  rejected: 0"
    );

    // one peer; and the JSON
    let one = tools::run_ok(&cluster, DB, "auditor", &["show", "bob"]);
    assert_eq!(one, format!("{}\n", blocks[1].trim_end()));
    let json: serde_json::Value =
        serde_json::from_str(&tools::run_ok(&cluster, DB, "auditor", &["show", "--json"])).unwrap();
    let alice = &json[0];
    assert_eq!(alice["peer"], "alice");
    assert_eq!(alice["sent_bytes"], 684);
    assert_eq!(alice["sent_packets"], 3);
    assert_eq!(alice["received_bytes"], 38);
    assert_eq!(alice["rejected"], 3);
    assert_eq!(
        alice["rejects"],
        serde_json::json!({"spoofed": 2, "no_route": 1})
    );
    assert_eq!(alice["backlog"], 1);
    assert_eq!(alice["last_ack_at"], serde_json::Value::Null);
    let t = alice["latest_traffic"].as_f64().unwrap();
    assert!((before as f64..=after as f64).contains(&t), "{t}");
    assert_eq!(json[1]["cursor"], bob_cursor);
    assert_eq!(json[2]["latest_traffic"], serde_json::Value::Null);
    let dump_bob = tools::run_ok(&cluster, DB, "auditor", &["show", "dump", "bob"]);
    assert_eq!(dump_bob, format!("{}\n", dump.lines().nth(1).unwrap()));

    // on a terminal: wg's colours
    let argv: Vec<String> = [
        tools::tool_path().to_str().unwrap(),
        "--db",
        &cluster.conninfo("auditor", DB),
        "show",
        "carol",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (screen, code) = tools::on_terminal(&argv);
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("\x1b[33mcarol\x1b[0m"),
        "peer name in yellow: {screen:?}"
    );
    assert!(
        screen.contains("\x1b[36m/\x1b[0m32"),
        "cyan prefix slash: {screen:?}"
    );

    for args in [
        vec!["show", "dave"],
        vec!["show", "dump", "--json"],
        vec!["show", "a", "b"],
    ] {
        let out = tools::run(&cluster, DB, "auditor", &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

#[test]
fn metrics_function_matches_peer_stats() {
    let cluster = lab();
    known_traffic(&cluster);
    let mut au = cluster.connect("auditor", DB);
    let metrics: Vec<(String, Option<String>, Option<String>, f64)> = au
        .query(
            "SELECT metric, peer, reason, value FROM pgvpn.metrics()",
            &[],
        )
        .unwrap_or_else(|e| panic!("pgvpn.metrics(): {}", db_error(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let get = |metric: &str, peer: &str, reason: Option<&str>| {
        let v: Vec<f64> = metrics
            .iter()
            .filter(|m| m.0 == metric && m.1.as_deref() == Some(peer) && m.2.as_deref() == reason)
            .map(|m| m.3)
            .collect();
        assert_eq!(v.len(), 1, "{metric} {peer} {reason:?}: {metrics:?}");
        v[0]
    };
    let stats = au
        .query(
            "SELECT peer, sent_packets, sent_bytes, received_packets, received_bytes, cursor, backlog \
               FROM pgvpn.peer_stats ORDER BY peer",
            &[],
        )
        .unwrap();
    assert_eq!(stats.len(), 3);
    for s in &stats {
        let peer: String = s.get(0);
        for (i, metric) in [
            (1, "pgvpn_sent_packets_total"),
            (2, "pgvpn_sent_bytes_total"),
            (3, "pgvpn_received_packets_total"),
            (4, "pgvpn_received_bytes_total"),
            (5, "pgvpn_cursor"),
            (6, "pgvpn_backlog_packets"),
        ] {
            assert_eq!(
                get(metric, &peer, None),
                s.get::<_, i64>(i) as f64,
                "{metric} of {peer}"
            );
        }
    }
    for r in au
        .query("SELECT peer, reason, packets FROM pgvpn.reject_totals", &[])
        .unwrap()
    {
        let (peer, reason): (String, String) = (r.get(0), r.get(1));
        assert_eq!(
            get("pgvpn_rejected_packets_total", &peer, Some(&reason)),
            r.get::<_, i64>(2) as f64
        );
    }
    assert_eq!(
        get("pgvpn_rejected_packets_total", "alice", Some("spoofed")),
        2.0
    );
    // the figures themselves (not only agreement)
    assert_eq!(get("pgvpn_sent_bytes_total", "alice", None), 684.0);
    assert_eq!(get("pgvpn_backlog_packets", "bob", None), 1.0);
    let chunks = metrics
        .iter()
        .find(|m| m.0 == "pgvpn_log_chunks")
        .unwrap()
        .3;
    assert!(chunks >= 1.0, "{metrics:?}");
}

#[test]
fn a_peer_role_may_not_capture_or_show() {
    let cluster = lab();
    traffic(&cluster);
    cluster.create_login_role("nobody");
    let tmp = TmpDir::new("tools");
    for role in ["alice", "nobody"] {
        let file = tmp.file(&format!("{role}.pcap"));
        let out = tools::run(
            &cluster,
            DB,
            role,
            &["capture", "-w", file.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{role}: {err}");
        assert!(
            err.contains(&format!("role \"{role}\" may not read pgvpn.packets"))
                && err.contains("member of pgvpn_auditor"),
            "{role}: {err}"
        );
        assert!(!file.exists(), "no file is created");
        let out = tools::run(&cluster, DB, role, &["show"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{role}: {err}");
        assert!(err.contains("pgvpn_auditor"), "{err}");
    }
    // and no database at all: exit 1 with the reason; a bad connection string: 2
    let out = tools::run(&cluster, "nosuchdb", "auditor", &["show"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = Command::new(tools::tool_path())
        .args(["--db", "host=/tmp port=notaport", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

// ---- the shim's --metrics, scraped inside the namespaces

const TUN: &str = "pgvpn0";
const ALICE: &str = "198.18.0.1";
const BOB: &str = "198.18.0.2";
const METRICS: &str = "127.0.0.1:9187";

fn scrape(ns: &Netns) -> prom::Metrics {
    let out = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{METRICS}/metrics"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    prom::parse(&text).unwrap_or_else(|e| panic!("not the text format: {e}\n{text}"))
}

/// Exactly `n` echo requests (no `-w`: with a deadline, ping keeps sending until it has
/// `n` replies, so an unanswered ping would send one every 0.2 s until the deadline).
fn ping_unanswered(ns: &Netns, dst: &str, n: u32) -> bool {
    let out = ns.exec(&["ping", "-c", &n.to_string(), "-i", "0.2", "-W", "1", dst]);
    out.status.success()
}

fn ping(ns: &Netns, dst: &str, n: u32) -> bool {
    let out = ns.exec(&[
        "ping",
        "-c",
        &n.to_string(),
        "-i",
        "0.2",
        "-W",
        "2",
        "-w",
        "15",
        dst,
    ]);
    out.status.success()
}

#[test]
fn shim_metrics_count_real_traffic() {
    tshark::require();
    assert!(util::is_root(), "needs root (namespaces, tun devices)");
    let cluster = Cluster::with_pgvpn(DB);
    create_peer(&cluster, DB, "alice", &[&cidr(ALICE)]);
    create_peer(&cluster, DB, "bob", &[&cidr(BOB)]);
    create_auditor(&cluster, "auditor");
    let (ns_a, ns_b) = (Netns::new("metra"), Netns::new("metrb"));
    let mut specs = Vec::new();
    for (role, addr) in [("alice", ALICE), ("bob", BOB)] {
        let mut s = ShimSpec::new(&cluster, DB, role, &format!("{addr}/24"), TUN);
        s.extra_args = vec!["--metrics".into(), METRICS.into()];
        specs.push(s);
    }
    let mut shim_a = Shim::start(&ns_a, &cluster, &specs[0]);
    let mut shim_b = Shim::start(&ns_b, &cluster, &specs[1]);

    let a0 = scrape(&ns_a);
    let b0 = scrape(&ns_b);
    let total = |m: &prom::Metrics, n: &str| m.value(n, &[]);
    assert_eq!(total(&a0, "pgvpn_shim_sent_packets_total"), 0.0);
    assert_eq!(total(&a0, "pgvpn_shim_send_in_flight_packets"), 0.0);

    assert!(ping(&ns_a, BOB, 5), "ping through the tunnel");
    // 198.18.0.99 is on the tun's /24 but no peer's: the database rejects (no route)
    assert!(
        !ping_unanswered(&ns_a, "198.18.0.99", 2),
        "nobody answers for .99"
    );

    let q = |sql: &str| scalar_i64(&mut cluster.superuser(DB), sql);
    let settled = util::wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        let (a, b) = (scrape(&ns_a), scrape(&ns_b));
        let from_a = q("SELECT count(*) FROM pgvpn.packet_log WHERE src_peer = 'alice'");
        let to_b = q("SELECT count(*) FROM pgvpn.packet_log WHERE dst_peer = 'bob'");
        let last_to_b = q("SELECT max(id) FROM pgvpn.packet_log WHERE dst_peer = 'bob'");
        let ok = total(&a, "pgvpn_shim_accepted_packets_total") == from_a as f64
            && total(&a, "pgvpn_shim_rejected_packets_total") == 2.0
            && total(&b, "pgvpn_shim_written_packets_total") == to_b as f64
            && total(&b, "pgvpn_shim_last_acked_id") == last_to_b as f64
            && total(&a, "pgvpn_shim_queue_packets") == 0.0;
        ok.then_some((a, b, from_a, to_b))
    });
    let (a1, b1, from_a, to_b) = settled.unwrap_or_else(|| {
        panic!(
            "the shims' counters never matched the log:\nalice {:#?}\nbob {:#?}",
            scrape(&ns_a).families,
            scrape(&ns_b).families
        )
    });
    eprintln!("alice logged {from_a} packets, bob was sent {to_b}");
    assert!(from_a >= 5 && to_b >= 5, "the echo requests");
    let moved = |m0: &prom::Metrics, m1: &prom::Metrics, n: &str| total(m1, n) - total(m0, n);
    assert_eq!(
        moved(&a0, &a1, "pgvpn_shim_sent_packets_total"),
        from_a as f64 + 2.0
    );
    assert!(moved(&a0, &a1, "pgvpn_shim_tun_read_packets_total") >= from_a as f64 + 2.0);
    assert!(moved(&a0, &a1, "pgvpn_shim_tun_read_bytes_total") >= 84.0 * 5.0);
    assert!(moved(&b0, &b1, "pgvpn_shim_received_packets_total") >= 5.0);
    assert!(moved(&b0, &b1, "pgvpn_shim_written_bytes_total") >= 84.0 * 5.0);
    assert!(moved(&a0, &a1, "pgvpn_shim_send_duration_seconds_count") >= 1.0);
    assert!(moved(&a0, &a1, "pgvpn_shim_send_duration_seconds_sum") > 0.0);
    assert_eq!(
        total(&a1, "pgvpn_shim_send_duration_seconds_count"),
        a1.value("pgvpn_shim_send_duration_seconds_bucket", &[("le", "+Inf")])
    );
    for reason in ["queue_full", "db_down", "db_error"] {
        assert_eq!(
            a1.value("pgvpn_shim_dropped_packets_total", &[("reason", reason)]),
            0.0
        );
    }

    // the database's view agrees: show dump and pgvpn.metrics()
    let dump = tools::run_ok(&cluster, DB, "auditor", &["show", "dump", "alice"]);
    let cols: Vec<&str> = dump.trim_end().split('\t').collect();
    assert_eq!(cols[7], from_a.to_string(), "sent-packets: {dump}");
    assert_eq!(cols[10], "2", "rejected: {dump}");
    assert_eq!(cols[11], "no_route=2", "{dump}");

    // and the capture of the pair holds the pings, as tshark sees them
    let tmp = TmpDir::new("tools");
    let file = tmp.file("pair.pcap");
    tools::run_ok(
        &cluster,
        DB,
        "auditor",
        &[
            "capture",
            "--host",
            ALICE,
            "--host",
            BOB,
            "--since",
            "1h",
            "-w",
            file.to_str().unwrap(),
        ],
    );
    let pair = q("SELECT count(*) FROM pgvpn.packet_log");
    assert_eq!(tshark::frames(&file), Ok(pair as usize));
    let requests = tshark::fields(&file, &["ip.src"], Some("icmp.type == 8"));
    let replies = tshark::fields(&file, &["ip.src"], Some("icmp.type == 0"));
    assert!(
        requests.len() >= 5 && requests.iter().all(|f| f[0] == ALICE),
        "{requests:?}"
    );
    assert_eq!(replies.len(), requests.len(), "every echo answered");

    // not found and not a GET
    let out = ns_a.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{METRICS}/"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    shim_a.stop();
    shim_b.stop();
    // the port is closed with the shim
    let out = ns_a.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        &format!("http://{METRICS}/metrics"),
    ]);
    assert!(!out.status.success());
}
