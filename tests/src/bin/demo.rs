//! `make demo`: a guided tour of a live two-host pgvpn.
//!
//! Starts a throwaway PostgreSQL 15 cluster with the extension, two hosts in network
//! namespaces with a `pgvpn-shim` each, sends real traffic (ping, iperf3) through the
//! database, shows the audit views, and tears everything down again.
//!
//! Run as root: `cargo run --release -p pgvpn-tests --bin demo`. Nothing touches the host's
//! network: the namespaces have no link to it; the database is reached through its unix
//! socket only.

use pgvpn_tests::sql::{add_peer, create_auditor};
use pgvpn_tests::util::{self, TmpDir};
use pgvpn_tests::{tools, Cluster, Netns, Shim, ShimSpec};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";

/// Set by SIGINT; the tour checks it between steps and unwinds, so Drop tears down.
static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn step(title: &str) {
    println!("\n\x1b[1m==> {title}\x1b[0m");
}

fn say(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn show_cmd(ns: &Netns, host: &str, argv: &[&str]) -> bool {
    println!("\n    \x1b[2m{host}$\x1b[0m {}", argv.join(" "));
    let out = ns.exec(argv);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("      {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("      {line}");
    }
    out.status.success()
}

/// `pgvpn ARGS` as the auditor, printed as a shell line and its output.
fn show_tool(cluster: &Cluster, args: &[&str]) {
    println!("\n    \x1b[2mauditor$\x1b[0m pgvpn {}", args.join(" "));
    let out = tools::run(cluster, DB, "auditor", args);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("      {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("      {line}");
    }
}

/// The `pgvpn` tool: `show` like `wg show`, a capture opened in tshark, a live follow.
fn investigate(cluster: &Cluster, ns_a: &Netns) {
    step("Investigating traffic with the pgvpn tool (as the auditor)");
    show_tool(cluster, &["show"]);
    // In a scratch directory, so that the lines printed are the commands as run.
    let tmp = TmpDir::new("demo");
    let dir = tmp.file("");
    let capture = [
        "capture",
        "--host",
        "198.18.0.1",
        "--since",
        "1h",
        "-w",
        "alice.pcap",
    ];
    println!("\n    \x1b[2mauditor$\x1b[0m pgvpn {}", capture.join(" "));
    let out = util::output(tools::command(cluster, DB, "auditor", &capture).current_dir(&dir));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    let filter = "ip.addr == 198.18.0.2 && icmp";
    println!("\n    \x1b[2mauditor$\x1b[0m tshark -r alice.pcap -Y '{filter}' | head -8");
    // HOME: tshark wants a writable profile directory; keep it out of root's.
    let out = util::output(
        Command::new("tshark")
            .args(["-r", "alice.pcap", "-Y", filter])
            .current_dir(&dir)
            .env("HOME", &dir),
    );
    for line in String::from_utf8_lossy(&out.stdout).lines().take(8) {
        println!("      {line}");
    }

    say("\nFollowing the live VPN: a capture on stdout, read by tshark as it grows.");
    println!(
        "\n    \x1b[2mauditor$\x1b[0m pgvpn capture --follow --since now | tshark -l -r - -c 6"
    );
    let mut cap = tools::command(
        cluster,
        DB,
        "auditor",
        &["capture", "--follow", "--since", "now"],
    );
    let mut cap = cap
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgvpn capture");
    let mut tshark = Command::new("tshark")
        .args(["-l", "-r", "-", "-c", "6"])
        .env("HOME", &dir)
        .stdin(cap.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tshark");
    std::thread::sleep(Duration::from_millis(500));
    ns_a.exec(&["ping", "-c", "3", "-i", "0.3", "198.18.0.2"]);
    let waited = util::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        tshark.try_wait().ok().flatten()
    });
    // SIGINT ends a capture cleanly (exit 0), as Ctrl-C would.
    util::signal(cap.id(), "INT");
    let _ = cap.wait();
    let out = tshark.wait_with_output().expect("tshark's output");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("      {line}");
    }
    if waited.is_none() {
        println!("      (fewer than 6 packets arrived within 10 s)");
    }
}

/// Run a query through psql (as the auditor) and print its table.
fn psql(cluster: &Cluster, title: &str, sql: &str) {
    println!("\n    \x1b[2m-- {title}\x1b[0m");
    println!(
        "    \x1b[2mvpn=> {}\x1b[0m",
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let out = Command::new("psql")
        .arg("-h")
        .arg(cluster.socket_dir())
        .args(["-p", &cluster.port().to_string(), "-U", "auditor", "-d", DB])
        .args([
            "-X",
            "-P",
            "pager=off",
            "-P",
            "footer=on",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGTZ", "UTC")
        .output()
        .expect("run psql");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("      {line}");
    }
    if !out.status.success() {
        println!(
            "      (psql failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

fn main() {
    if let Err(e) =
        pgvpn_tests::check_prerequisites("the demo", &["ip", "ping", "iperf3", "psql", "runuser"])
    {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&INTERRUPTED))
        .expect("install the SIGINT handler");
    tour();
    if interrupted() {
        println!("\nInterrupted; everything was torn down.");
        std::process::exit(130);
    }
}

fn tour() {
    println!("\x1b[1mpgvpn: a VPN whose transport and audit log is PostgreSQL.\x1b[0m");
    say("Every IP packet that crosses the tunnel is a row. Let's build one and look.");

    step("Starting a throwaway PostgreSQL 15 cluster…");
    let cluster = Cluster::with_pgvpn(DB);
    say(&format!(
        "initdb'd in {} (no TCP listener: unix socket only, port {} just names the socket).\n\
         CREATE EXTENSION pgvpn;  -- in database \"{DB}\"",
        cluster.dir().display(),
        cluster.port()
    ));

    step("Registering two peers: each is a PostgreSQL login role with its addresses");
    cluster.create_login_role("alice");
    cluster.create_login_role("bob");
    let mut admin = cluster.superuser(DB);
    let a = add_peer(
        &mut admin,
        "alice",
        "alice",
        &["198.18.0.1/32", "fd00:5067:7670::1/128"],
    );
    let b = add_peer(
        &mut admin,
        "bob",
        "bob",
        &["198.18.0.2/32", "fd00:5067:7670::2/128"],
    );
    say(&format!(
        "SELECT pgvpn.add_peer('alice', 'alice', '{{198.18.0.1/32,fd00:5067:7670::1/128}}');  -- peer {a}\n\
         SELECT pgvpn.add_peer('bob',   'bob',   '{{198.18.0.2/32,fd00:5067:7670::2/128}}');  -- peer {b}\n\
         Like WireGuard's AllowedIPs: a packet goes to the peer owning its destination,\n\
         and is only accepted from the peer owning its source."
    ));
    create_auditor(&cluster, "auditor");
    say("An 'auditor' login role (member of pgvpn_auditor) will read the log later.");
    if interrupted() {
        return;
    }

    step("Two hosts in network namespaces, each with a shim…");
    let ns_a = Netns::new("alice");
    let ns_b = Netns::new("bob");
    let mut spec_a = ShimSpec::new(&cluster, DB, "alice", "198.18.0.1/24", TUN);
    spec_a.extra_args = vec!["--address".into(), "fd00:5067:7670::1/64".into()];
    let mut spec_b = ShimSpec::new(&cluster, DB, "bob", "198.18.0.2/24", TUN);
    spec_b.extra_args = vec!["--address".into(), "fd00:5067:7670::2/64".into()];
    let mut shim_a = Shim::start(&ns_a, &cluster, &spec_a);
    let mut shim_b = Shim::start(&ns_b, &cluster, &spec_b);
    say(&format!(
        "{} (alice) and {} (bob): no cable between them, no route out.\n\
         In each: pgvpn-shim --db 'host=… user=<peer> dbname={DB}' --address … --tun {TUN}\n\
         The shim moves packets between the tun device and pgvpn.send() / pgvpn.recv().",
        ns_a.name(),
        ns_b.name()
    ));
    show_cmd(
        &ns_a,
        "alice",
        &["ip", "-brief", "address", "show", "dev", TUN],
    );
    if interrupted() {
        return;
    }

    step("Ping across the database");
    show_cmd(
        &ns_a,
        "alice",
        &["ping", "-c", "4", "-i", "0.3", "198.18.0.2"],
    );
    show_cmd(
        &ns_b,
        "bob",
        &["ping", "-6", "-c", "3", "-i", "0.3", "fd00:5067:7670::1"],
    );
    if interrupted() {
        return;
    }

    step("iperf3 for 5 seconds through the tunnel (server on bob, client on alice)");
    let server = ns_b.spawn(&["iperf3", "-s", "-1", "-B", "198.18.0.2"], None, None);
    std::thread::sleep(Duration::from_millis(500));
    println!("\n    \x1b[2malice$\x1b[0m iperf3 -c 198.18.0.2 -t 5");
    let out = ns_a.exec(&["iperf3", "-c", "198.18.0.2", "-t", "5", "-f", "m"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The summary: the lines after the last separator.
    let summary: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("- - -"))
        .collect();
    let shown = if summary.is_empty() {
        text.lines().collect()
    } else {
        summary
    };
    for line in shown {
        println!("      {line}");
    }
    if !out.status.success() {
        println!(
            "      (iperf3 failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    drop(server);
    if interrupted() {
        return;
    }

    step("Packets the database refuses");
    say(
        "Alice pings 198.18.0.99, inside her /24 but owned by no peer (no_route),\n\
         then pings bob from a forged source address 198.18.0.50 (spoofed).",
    );
    show_cmd(
        &ns_a,
        "alice",
        &["ping", "-c", "2", "-W", "1", "198.18.0.99"],
    );
    ns_a.ip(&["addr", "add", "198.18.0.50/32", "dev", TUN]);
    show_cmd(
        &ns_a,
        "alice",
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "198.18.0.50",
            "198.18.0.2",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    if interrupted() {
        return;
    }

    step("The audit log: plain SQL, as the auditor");
    psql(
        &cluster,
        "top flows",
        "SELECT src_peer, dst_peer, protocol, src_addr, src_port, dst_addr, dst_port, packets, \
         pg_size_pretty(bytes) AS bytes, last_seen::time(0) AS last_seen \
         FROM pgvpn.flows ORDER BY flows.bytes DESC LIMIT 6",
    );
    psql(
        &cluster,
        "per peer, like `wg show`",
        "SELECT peer, sent_packets, pg_size_pretty(sent_bytes) AS sent, received_packets, \
         pg_size_pretty(received_bytes) AS received, rejected, cursor, backlog \
         FROM pgvpn.peer_stats ORDER BY peer",
    );
    psql(
        &cluster,
        "the last 10 packets, decoded",
        "SELECT p.id, p.sent_at::time(3) AS sent_at, s.name AS src, d.name AS dst, pgvpn.decode(p.payload) AS decoded \
         FROM pgvpn.packets p JOIN pgvpn.peers s ON s.id = p.src_peer JOIN pgvpn.peers d ON d.id = p.dst_peer \
         ORDER BY p.id DESC LIMIT 10",
    );
    psql(
        &cluster,
        "rejected packets (a sample with details; reject_totals counts them all)",
        "SELECT at::time(0) AS at, peer, reason, detail FROM pgvpn.rejects ORDER BY rejects.at DESC LIMIT 10",
    );
    psql(
        &cluster,
        "rejects per reason",
        "SELECT * FROM pgvpn.reject_totals ORDER BY peer, reason",
    );

    investigate(&cluster, &ns_a);
    if interrupted() {
        return;
    }

    step("Tearing everything down");
    for (name, shim) in [("alice", &mut shim_a), ("bob", &mut shim_b)] {
        let (st, summary) = shim.terminate_with_summary();
        say(&format!("stopped {name}'s shim ({st})"));
        if let Some(line) = summary {
            say(&format!("  {line}"));
        }
    }
    drop(shim_a);
    drop(shim_b);
    drop(ns_a);
    drop(ns_b);
    drop(cluster);
    say("namespaces deleted, cluster stopped and removed. Bye!");
}
