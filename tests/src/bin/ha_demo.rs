//! `make ha-demo`: pgvpn on pg_auto_failover, on one box.
//!
//! A monitor and two nodes (`pg_autoctl`, see `pgvpn_tests::autoctl`), each on a host of
//! its own: network namespaces on one bridge (the underlay, 198.19.0.0/24, with no link
//! to the root namespace and no default route). The extension and two peers on the
//! primary; two shims in two more host namespaces reach the pair with the URI the monitor
//! gives (`pg_autoctl show uri --formation default`). Then, step by step: ping and iperf3
//! through the tunnel, `pg_autoctl perform failover`, the tunnel coming back, a kill -9 of
//! the new primary's pg_autoctl process tree, and the outage each caused, measured with a
//! ping every 100 ms.
//!
//! Demo-grade security: `--auth trust --no-ssl` for pg_autoctl and `trust` lines for the
//! peers, on namespaced addresses nothing outside can reach.
//!
//! Run as root: `cargo run --release -p pgvpn-tests --bin ha-demo`. Ctrl-C tears
//! everything down (processes by PID, namespaces deleted).

use pgvpn_tests::autoctl::{self, Autoctl, QUICK_MONITOR};
use pgvpn_tests::netns::Bg;
use pgvpn_tests::sql::add_peer;
use pgvpn_tests::underlay::{Underlay, DB_ADDR};
use pgvpn_tests::{Netns, Shim, ShimSpec};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const MONITOR_PORT: u16 = 5500;
/// The monitor lives on the underlay's first host (its bridge address); the nodes and the
/// peers' hosts are attached to it.
const NODE1: (&str, &str, u16) = ("node1", "198.19.0.2", 5501);
const NODE2: (&str, &str, u16) = ("node2", "198.19.0.3", 5502);
const ALICE_UNDERLAY: &str = "198.19.0.11";
const BOB_UNDERLAY: &str = "198.19.0.12";
const ALICE_TUN: &str = "198.18.0.1";
const BOB_TUN: &str = "198.18.0.2";
/// Not tuned unless asked for (`--primary-demote-timeout MS`): see the kill -9 step.
const DEMOTE_TIMEOUT: &str = "pgautofailover.primary_demote_timeout";
/// A gap this long between ping replies (sent every 100 ms) counts as an outage.
const OUTAGE_GAP: f64 = 1.0;

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Why the tour stopped early: Ctrl-C, or something that did not happen in time.
type Tour<T> = Result<T, String>;

fn check() -> Tour<()> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Polls `f` every 100 ms until it gives a value, `timeout` passes (an error naming
/// `what`) or Ctrl-C.
fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Tour<T> {
    let got = pgvpn_tests::wait_for(timeout, Duration::from_millis(100), || {
        if interrupted() {
            return Some(None);
        }
        f().map(Some)
    });
    check()?;
    got.flatten()
        .ok_or_else(|| format!("{what}: not within {timeout:?}"))
}

fn step(title: &str) {
    println!("\n\x1b[1m==> {title}\x1b[0m");
}

fn say(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn show(prompt: &str, command: &str, output: &str) {
    println!("\n    \x1b[2m{prompt}$\x1b[0m {command}");
    for line in output.lines() {
        println!("      {line}");
    }
}

fn show_cmd(ns: &Netns, host: &str, argv: &[&str]) -> bool {
    let out = ns.exec(argv);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    show(host, &argv.join(" "), &text);
    out.status.success()
}

fn show_state(monitor: &Autoctl<'_>) {
    let out = monitor.pg_autoctl(&["show", "state"]);
    show(
        "monitor",
        "pg_autoctl show state",
        &String::from_utf8_lossy(&out.stdout),
    );
}

/// iperf3 from alice to bob for `secs` seconds; prints its summary.
fn iperf(ns_a: &Netns, ns_b: &Netns, secs: u32) {
    let server = ns_b.spawn(&["iperf3", "-s", "-1", "-B", BOB_TUN], None, None);
    std::thread::sleep(Duration::from_millis(500));
    let t = secs.to_string();
    let out = ns_a.exec(&["iperf3", "-c", BOB_TUN, "-t", &t, "-f", "m"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("- - -"))
        .collect();
    let mut shown = if summary.is_empty() {
        text.into_owned()
    } else {
        summary.join("\n")
    };
    if !out.status.success() {
        shown.push_str(&format!(
            "\n(iperf3 failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    show("alice", &format!("iperf3 -c {BOB_TUN} -t {secs}"), &shown);
    drop(server);
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// `ping -D -i 0.1` from alice to bob in the background: every reply with its arrival
/// time, to see when the tunnel went down and came back.
struct Pinger {
    _bg: Bg,
    log: PathBuf,
}

/// A ping reply: arrival time (unix seconds) and icmp_seq.
type Reply = (f64, u32);

/// An outage seen by the pinger, in seconds after the event that caused it.
#[derive(Clone, Copy, Debug)]
struct Outage {
    /// The last reply before the gap.
    last_reply: f64,
    /// The first reply after it: the tunnel passes pings again.
    back: f64,
    /// Pings that got no reply in between.
    lost: u32,
}

impl Pinger {
    fn start(ns: &Netns, log: &Path) -> Pinger {
        let bg = ns.spawn(
            &["ping", "-D", "-n", "-i", "0.1", BOB_TUN],
            Some(log),
            Some(log),
        );
        Pinger {
            _bg: bg,
            log: log.to_path_buf(),
        }
    }

    /// (arrival time, icmp_seq) of every reply so far, e.g. from
    /// `[1765094400.123456] 64 bytes from 198.18.0.2: icmp_seq=5 ttl=64 time=2.31 ms`.
    fn replies(&self) -> Vec<Reply> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(" bytes from "))
            .filter_map(|l| {
                let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
                let seq = l
                    .split("icmp_seq=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()?;
                Some((ts, seq))
            })
            .collect()
    }

    /// The longest gap between replies since `t0` (unix time), if one is at least
    /// [`OUTAGE_GAP`] long and pings pass again after it (at least 10 replies, a second's
    /// worth, so a single late reply does not count as back).
    fn outage_since(&self, t0: f64) -> Option<Outage> {
        let replies = self.replies();
        let mut prev = replies
            .iter()
            .rev()
            .find(|(ts, _)| *ts < t0)
            .copied()
            .unwrap_or((t0, 0));
        let mut worst: Option<(usize, Reply, Reply)> = None;
        let after: Vec<Reply> = replies.into_iter().filter(|(ts, _)| *ts >= t0).collect();
        for (i, r) in after.iter().enumerate() {
            if worst.is_none_or(|(_, a, b)| r.0 - prev.0 > b.0 - a.0) {
                worst = Some((i, prev, *r));
            }
            prev = *r;
        }
        let (i, a, b) = worst?;
        (b.0 - a.0 >= OUTAGE_GAP && after.len() - i >= 10).then(|| Outage {
            last_reply: a.0 - t0,
            back: b.0 - t0,
            lost: b.1.saturating_sub(a.1).saturating_sub(1),
        })
    }
}

/// What the monitor reported while something happened: each node's state changes (and
/// other events noted), in seconds after the start.
struct Timeline {
    t0: Instant,
    /// The same moment as unix time, for the pinger's timestamps.
    t0_unix: f64,
    seen: Vec<(String, String)>,
    events: Vec<(f64, String)>,
}

impl Timeline {
    fn new(monitor: &Autoctl<'_>) -> Timeline {
        let mut t = Timeline {
            t0: Instant::now(),
            t0_unix: unix_now(),
            seen: Vec::new(),
            events: Vec::new(),
        };
        t.observe(monitor);
        t.events.clear();
        t
    }

    fn note(&mut self, what: String) {
        self.note_at(self.t0.elapsed().as_secs_f64(), what);
    }

    fn note_at(&mut self, t: f64, what: String) {
        self.events.push((t, what));
        self.events.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// When something was first noted, e.g. "node1 reports wait_primary".
    fn when(&self, what: &str) -> Option<f64> {
        self.events.iter().find(|(_, e)| e == what).map(|(t, _)| *t)
    }

    /// Notes every node whose reported state changed since the last look.
    fn observe(&mut self, monitor: &Autoctl<'_>) {
        for n in monitor.node_states().unwrap_or_default() {
            match self.seen.iter_mut().find(|(name, _)| *name == n.name) {
                Some((_, state)) if *state == n.reported => continue,
                Some((_, state)) => *state = n.reported.clone(),
                None => self.seen.push((n.name.clone(), n.reported.clone())),
            }
            self.note(format!("{} reports {}", n.name, n.reported));
        }
    }

    fn print(&self) {
        for (t, what) in &self.events {
            say(&format!("  {t:6.1} s  {what}"));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let demote_timeout = match args.as_slice() {
        [] => None,
        [flag, ms] if flag == "--primary-demote-timeout" && ms.parse::<u32>().is_ok() => {
            Some(ms.clone())
        }
        _ => {
            eprintln!("usage: ha-demo [--primary-demote-timeout MS]");
            std::process::exit(2);
        }
    };
    if let Err(e) = pgvpn_tests::check_prerequisites(
        "the HA demo",
        &["ip", "ping", "iperf3", "setpriv", "pg_autoctl"],
    ) {
        eprintln!("ha-demo: {e}");
        std::process::exit(1);
    }
    if !autoctl::available() {
        eprintln!("ha-demo: pg_autoctl does not run (apt-get install postgresql-15-auto-failover)");
        std::process::exit(1);
    }
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&INTERRUPTED))
        .expect("install the SIGINT handler");
    // Everything the tour started is dropped (stopped, deleted) by the time it returns.
    let result = tour(demote_timeout.as_deref());
    match result {
        Ok(()) => {}
        Err(_) if interrupted() => {
            println!("\nInterrupted; everything was torn down.");
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("\nha-demo: {e}\n(everything was torn down)");
            std::process::exit(1);
        }
    }
}

fn tour(demote_timeout_ms: Option<&str>) -> Tour<()> {
    println!("\x1b[1mpgvpn on pg_auto_failover: the tunnel across a failover and a crash.\x1b[0m");
    let scratch = pgvpn_tests::util::TmpDir::new("ha-demo");

    step("The underlay: five hosts in network namespaces on one bridge");
    let mut underlay = Underlay::new("hamon");
    let ns1 = Netns::new("hadb1");
    let ns2 = Netns::new("hadb2");
    let ns_a = Netns::new("alice");
    let ns_b = Netns::new("bob");
    underlay.attach(&ns1, NODE1.1);
    underlay.attach(&ns2, NODE2.1);
    underlay.attach(&ns_a, ALICE_UNDERLAY);
    underlay.attach(&ns_b, BOB_UNDERLAY);
    say(&format!(
        "monitor {DB_ADDR} ({}), {} {} ({}), {} {} ({}),\n\
         alice {ALICE_UNDERLAY} ({}), bob {BOB_UNDERLAY} ({}).\n\
         No veth to the root namespace, no default route anywhere.",
        underlay.db_ns().name(),
        NODE1.0,
        NODE1.1,
        ns1.name(),
        NODE2.0,
        NODE2.1,
        ns2.name(),
        ns_a.name(),
        ns_b.name()
    ));
    check()?;

    step("The monitor: pg_autoctl create monitor, tuned for quick decisions");
    let mut monitor = Autoctl::create_monitor(underlay.db_ns(), DB_ADDR, MONITOR_PORT);
    // pg_autoctl sizes shared_buffers to a quarter of the RAM; three of those on a shared
    // box are too many.
    monitor.append_conf(&["shared_buffers = '64MB'"]);
    monitor.start();
    let mut tuning: Vec<(&str, &str)> = QUICK_MONITOR.to_vec();
    if let Some(ms) = demote_timeout_ms {
        tuning.push((DEMOTE_TIMEOUT, ms));
    }
    monitor.tune(&tuning);
    say(&format!(
        "pg_autoctl create monitor --pgport {MONITOR_PORT} --hostname {DB_ADDR} --auth trust --no-ssl\n\
         (trust and no TLS: a demo on namespaced addresses only)\n\
         monitor URI: {}\n\
         ALTER SYSTEM SET on the monitor (defaults: checks every 5 s, unhealthy after 20 s):",
        monitor.monitor_uri()
    ));
    // primary_demote_timeout is shown too: it bounds how long a crashed primary keeps
    // the promoted standby from accepting writes (--primary-demote-timeout MS sets it).
    let shown_settings: Vec<&str> = QUICK_MONITOR
        .iter()
        .map(|(n, _)| *n)
        .chain([DEMOTE_TIMEOUT])
        .collect();
    for (name, value) in monitor.settings(&shown_settings) {
        say(&format!("  {name} = {value}"));
    }
    check()?;

    step("node1: pg_autoctl create postgres, pgvpn preloaded, the peers let in");
    let mut node1 = Autoctl::create_node(&ns1, NODE1.0, NODE1.1, NODE1.2, &monitor, DB);
    // After pg_autoctl's include (the file's first line), so these win; pg_basebackup
    // copies both files to node2.
    node1.append_conf(&[
        "shared_preload_libraries = 'pg_stat_statements,pgvpn'",
        "shared_buffers = '128MB'",
    ]);
    let hba_alice = format!("host {DB} alice {ALICE_UNDERLAY}/32 trust");
    let hba_bob = format!("host {DB} bob {BOB_UNDERLAY}/32 trust");
    node1.append_hba(&[&hba_alice, &hba_bob]);
    node1.start();
    wait("node1 writable", Duration::from_secs(60), || {
        node1.writable().then_some(())
    })?;
    let mut admin = node1
        .connect(DB)
        .map_err(|e| format!("connect to node1: {e}"))?;
    admin
        .batch_execute("CREATE EXTENSION pgvpn; CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN")
        .map_err(|e| format!("CREATE EXTENSION pgvpn: {}", pgvpn_tests::db_error(&e)))?;
    let a = add_peer(&mut admin, "alice", "alice", &[&format!("{ALICE_TUN}/32")]);
    let b = add_peer(&mut admin, "bob", "bob", &[&format!("{BOB_TUN}/32")]);
    drop(admin);
    say(&format!(
        "pg_autoctl create postgres --name {} --hostname {} --listen {} --pgport {} --dbname {DB} \\\n  \
           --monitor … --auth trust --no-ssl\n\
         postgresql.conf += shared_preload_libraries = 'pg_stat_statements,pgvpn'\n\
         pg_hba.conf     += {hba_alice}\n\
         pg_hba.conf     += {hba_bob}\n\
         pg_autoctl run; CREATE EXTENSION pgvpn; peers alice ({ALICE_TUN}, id {a}) and bob ({BOB_TUN}, id {b})",
        NODE1.0, NODE1.1, NODE1.1, NODE1.2
    ));
    check()?;

    step("node2: pg_autoctl create postgres (a pg_basebackup of node1), then run");
    let mut node2 = Autoctl::create_node(&ns2, NODE2.0, NODE2.1, NODE2.2, &monitor, DB);
    node2.start();
    wait(
        "node1 primary and node2 secondary",
        Duration::from_secs(120),
        || {
            monitor
                .settled(&[(NODE1.0, "primary"), (NODE2.0, "secondary")])
                .then_some(())
        },
    )?;
    let sync: String = node1
        .connect("postgres")
        .and_then(|mut c| {
            c.query_one("SHOW synchronous_standby_names", &[])
                .map(|r| r.get(0))
                .map_err(Into::into)
        })
        .unwrap_or_else(|e| format!("({e})"));
    show_state(&monitor);
    say(&format!("node1: synchronous_standby_names = '{sync}'"));
    check()?;

    step("Two shims, with the URI the monitor gives");
    let uri = monitor.formation_uri();
    let spec = |role: &str, addr: &str| ShimSpec {
        role: role.into(),
        conninfo: uri.clone(),
        address: format!("{addr}/24"),
        tun: TUN.into(),
        extra_args: Vec::new(),
        // The URI names no user; libpq's variable gives it.
        env: vec![("PGUSER".into(), role.into())],
    };
    let mut shim_a = Shim::start_logged_ready(&ns_a, &spec("alice", ALICE_TUN));
    let mut shim_b = Shim::start_logged_ready(&ns_b, &spec("bob", BOB_TUN));
    say(&format!(
        "pg_autoctl show uri --formation default\n  {uri}\n\
         alice$ PGUSER=alice pgvpn-shim --db '{uri}' --address {ALICE_TUN}/24 --tun {TUN}\n\
         bob$   PGUSER=bob   pgvpn-shim --db '{uri}' --address {BOB_TUN}/24 --tun {TUN}"
    ));
    check()?;

    step("1. Ping and iperf3 through the tunnel (on node1)");
    show_cmd(&ns_a, "alice", &["ping", "-c", "4", "-i", "0.3", BOB_TUN]);
    iperf(&ns_a, &ns_b, 5);
    check()?;

    step("2. pg_autoctl perform failover");
    let pinger = Pinger::start(&ns_a, &scratch.file("ping.log"));
    wait("pings before the failover", Duration::from_secs(10), || {
        (pinger.replies().len() >= 10).then_some(())
    })?;
    say("A ping every 100 ms from alice to bob runs from now on, to time the outages.");
    let mut timeline = Timeline::new(&monitor);
    let fo_log = scratch.file("failover.log");
    let mut cmd = monitor.command(&["perform", "failover"]);
    let f = std::fs::File::create(&fo_log).map_err(|e| format!("failover log: {e}"))?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().map_err(|e| e.to_string())?)
        .stderr(f);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("pg_autoctl perform failover: {e}"))?;
    let mut promoted = None;
    let status = wait(
        "pg_autoctl perform failover",
        Duration::from_secs(120),
        || {
            timeline.observe(&monitor);
            if promoted.is_none() && node2.writable() {
                promoted = Some(timeline.t0.elapsed().as_secs_f64());
                timeline.note(format!("{} out of recovery", NODE2.0));
            }
            child.try_wait().ok().flatten()
        },
    );
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status?;
    let failover_took = timeline.t0.elapsed().as_secs_f64();
    timeline.note("pg_autoctl perform failover returned".into());
    let text = std::fs::read_to_string(&fo_log).unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "pg_autoctl perform failover failed ({status}):\n{text}"
        ));
    }
    let last: Vec<&str> = text.lines().rev().take(4).collect();
    show(
        "monitor",
        "pg_autoctl perform failover",
        &last.into_iter().rev().collect::<Vec<_>>().join("\n"),
    );
    say(&format!(
        "perform failover returned after {failover_took:.1} s"
    ));
    check()?;

    step("3. The tunnel comes back (on node2)");
    let fo_outage = wait("pings after the failover", Duration::from_secs(90), || {
        timeline.observe(&monitor);
        pinger.outage_since(timeline.t0_unix)
    });
    let fo_outage = match fo_outage {
        Ok(o) => Some(o),
        Err(_) if interrupted() => return Err("interrupted".into()),
        Err(_)
            if pinger
                .replies()
                .iter()
                .any(|(ts, _)| *ts > unix_now() - 1.0) =>
        {
            say("pings never stopped for a second or more");
            None
        }
        Err(e) => return Err(e),
    };
    wait(
        "node2 primary and node1 secondary again",
        Duration::from_secs(180),
        || {
            timeline.observe(&monitor);
            monitor
                .settled(&[(NODE2.0, "primary"), (NODE1.0, "secondary")])
                .then_some(())
        },
    )?;
    if let Some(o) = fo_outage {
        timeline.note_at(o.last_reply, "last ping reply before the outage".into());
        timeline.note_at(o.back, format!("pings pass again ({} lost)", o.lost));
    }
    say("Seconds after `perform failover` started:");
    timeline.print();
    show_state(&monitor);
    show_cmd(&ns_a, "alice", &["ping", "-c", "3", "-i", "0.3", BOB_TUN]);
    iperf(&ns_a, &ns_b, 3);
    check()?;

    step("4. kill -9 of node2's pg_autoctl process tree (the new primary)");
    let pid = node2.pid().unwrap_or(0);
    let mut timeline = Timeline::new(&monitor);
    let n = node2.kill9();
    timeline.note(format!("kill -9 of {n} processes"));
    say(&format!(
        "kill -9 of pg_autoctl run (pid {pid}) and its {} descendants: supervisor, services, \
         postmaster, backends",
        n.saturating_sub(1)
    ));
    let mut promoted_kill = None;
    let kill_outage = wait("pings after the kill", Duration::from_secs(120), || {
        timeline.observe(&monitor);
        if promoted_kill.is_none() && node1.writable() {
            promoted_kill = Some(timeline.t0.elapsed().as_secs_f64());
            timeline.note(format!("{} out of recovery", NODE1.0));
        }
        pinger.outage_since(timeline.t0_unix)
    })?;
    timeline.note_at(
        kill_outage.last_reply,
        "last ping reply before the outage".into(),
    );
    timeline.note_at(
        kill_outage.back,
        format!("pings pass again ({} lost)", kill_outage.lost),
    );
    say("Seconds after the kill:");
    timeline.print();
    let wait_primary = timeline.when(&format!("{} reports wait_primary", NODE1.0));
    show_state(&monitor);
    show_cmd(&ns_a, "alice", &["ping", "-c", "3", "-i", "0.3", BOB_TUN]);
    check()?;

    step("5. The outages, measured");
    let secs = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1} s"));
    let fo_back = fo_outage.map_or("no outage of 1 s or more".into(), |o| {
        format!("{:.1} s ({} pings lost)", o.back, o.lost)
    });
    say(&format!(
        "pg_autoctl perform failover:  the command took {failover_took:.1} s; node2 out of recovery \
         after {}; pings pass again after {fo_back}\n\
         kill -9 of the primary's tree: node1 out of recovery after {}, reports wait_primary \
         after {}; pings pass again after {:.1} s ({} pings lost)",
        secs(promoted),
        secs(promoted_kill),
        secs(wait_primary),
        kill_outage.back,
        kill_outage.lost,
    ));
    say("monitor settings:");
    for (name, value) in monitor.settings(&shown_settings) {
        say(&format!("  {name} = {value}"));
    }

    step("Tearing everything down");
    drop(pinger);
    for (name, shim) in [("alice", &mut shim_a), ("bob", &mut shim_b)] {
        let (st, summary) = shim.terminate_with_summary();
        say(&format!("stopped {name}'s shim ({st})"));
        if let Some(line) = summary {
            say(&format!("  {line}"));
        }
    }
    drop((shim_a, shim_b));
    drop((node2, node1, monitor));
    drop((ns_a, ns_b, ns2, ns1, underlay));
    say("pg_autoctl and postgres stopped, data removed, namespaces deleted. Bye!");
    Ok(())
}
