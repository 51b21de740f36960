//! The tunnel across a database failover: a primary and a standby (private clusters,
//! streaming replication over unix sockets), two hosts in network namespaces whose shims
//! name both servers in one connection string (`host=DIR1,DIR2 ...
//! target_session_attrs=read-write`), a numbered UDP stream from alice to bob, and the
//! primary's postmaster killed with `kill -9` mid-stream.
//!
//! * `a_synchronous_standby_takes_over`: the standby is synchronous and promoted 2 s after
//!   the kill. Every datagram bob received is in the new primary's log (delivered ⇒
//!   logged across the failover); every one logged there reached him (none skipped,
//!   although the ids jumped ahead); none twice; the tunnel came back by itself, within
//!   about a second of the promotion; the first packet of the idle direction (bob → alice)
//!   after the failover is not lost. Prints the outage and the losses.
//! * `a_standby_that_was_behind_takes_over`: the standby is asynchronous and cut off from
//!   the primary's WAL 2 s before the kill, so the new primary lacks what bob received
//!   last and hands out its ids again. Bob's shim must deliver everything logged on the
//!   new primary (nothing skipped though the ids repeat), nothing twice, and count and
//!   report exactly the packets it delivered that the new log lacks.
//!
//! Needs root, the extension installed, the shim built.

use pgvpn_tests::replication::{self, Mode};
use pgvpn_tests::sql::{create_peer, scalar_i64};
use pgvpn_tests::stream::{self, compare, now_us, ranges, read_arrivals, Arrival};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{util, Bg, Cluster, Netns, Shim, ShimSpec};
use std::path::PathBuf;
use std::time::Duration;

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const ALICE: &str = "198.18.0.1";
const BOB: &str = "198.18.0.2";
/// The stream alice → bob.
const PORT: u16 = 6001;
const PPS: u32 = 200;
/// One datagram bob → alice after the failover (the direction idle until then).
const BACK_PORT: u16 = 6002;

fn netcheck() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-netcheck")
}

fn arrivals_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-arrivals")
}

/// Everything one test owns; field order is drop order (shims first, clusters last).
struct Ha {
    shim_a: Shim,
    shim_b: Shim,
    ns_a: Netns,
    ns_b: Netns,
    tmp: TmpDir,
    bob_id: i32,
    standby: Cluster,
    primary: Cluster,
}

fn require_env() {
    assert!(
        util::is_root(),
        "needs root (network namespaces, tun devices)"
    );
    assert!(
        pgvpn_tests::shim_path().exists(),
        "pgvpn-shim not built: {} is missing",
        pgvpn_tests::shim_path().display()
    );
}

impl Ha {
    fn new(mode: Mode) -> Ha {
        require_env();
        let primary = Cluster::with_pgvpn(DB);
        create_peer(&primary, DB, "alice", &[&format!("{ALICE}/32")]);
        let bob_id = create_peer(&primary, DB, "bob", &[&format!("{BOB}/32")]);
        let standby = replication::start_standby(&primary, "standby1", mode);
        let spec = |role: &str, addr: &str| ShimSpec {
            role: role.into(),
            conninfo: replication::conninfo(&[&primary, &standby], role, DB),
            address: format!("{addr}/24"),
            tun: TUN.into(),
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        let ns_a = Netns::new("alice");
        let ns_b = Netns::new("bob");
        let shim_a = Shim::start(&ns_a, &primary, &spec("alice", ALICE));
        let shim_b = Shim::start(&ns_b, &primary, &spec("bob", BOB));
        Ha {
            shim_a,
            shim_b,
            ns_a,
            ns_b,
            tmp: TmpDir::new("failover"),
            bob_id,
            standby,
            primary,
        }
    }

    fn bg(&self, ns: &Netns, name: &str, argv: &[&str]) -> (Bg, PathBuf) {
        let out = self.tmp.file(&format!("{name}.out"));
        let err = self.tmp.file(&format!("{name}.err"));
        (ns.spawn(argv, Some(&out), Some(&err)), out)
    }

    /// Starts a receiver in bob's namespace and a stream of `count` datagrams from alice.
    fn stream(&self, tag: u32, count: u32) -> Stream {
        let file = self.tmp.file(&format!("arrivals-{tag}"));
        let (rx, _) = self.bg(
            &self.ns_b,
            &format!("arrivals-{tag}"),
            &[
                arrivals_bin(),
                &format!("0.0.0.0:{PORT}"),
                &tag.to_string(),
                "60000",
                file.to_str().unwrap(),
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        let (tx, tx_out) = self.bg(
            &self.ns_a,
            &format!("udp-send-{tag}"),
            &[
                netcheck(),
                "udp-send",
                &format!("{BOB}:{PORT}"),
                &count.to_string(),
                &PPS.to_string(),
                "200",
                &tag.to_string(),
            ],
        );
        Stream {
            rx,
            tx,
            tx_out,
            file,
        }
    }

    /// One datagram from bob to alice (the direction that was idle): did it arrive?
    fn one_back(&self, tag: u32) -> bool {
        let file = self.tmp.file(&format!("back-{tag}"));
        let (mut rx, _) = self.bg(
            &self.ns_a,
            &format!("back-{tag}"),
            &[
                arrivals_bin(),
                &format!("0.0.0.0:{BACK_PORT}"),
                &tag.to_string(),
                "60000",
                file.to_str().unwrap(),
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = self.ns_b.exec(&[
            netcheck(),
            "udp-send",
            &format!("{ALICE}:{BACK_PORT}"),
            "1",
            "1",
            "64",
            &tag.to_string(),
        ]);
        assert!(out.status.success(), "udp-send bob -> alice");
        let got = util::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
            (!read_arrivals(&file).is_empty()).then_some(())
        });
        rx.kill();
        got.is_some()
    }
}

struct Stream {
    rx: Bg,
    tx: Bg,
    tx_out: PathBuf,
    file: PathBuf,
}

impl Stream {
    fn arrivals(&self) -> Vec<Arrival> {
        read_arrivals(&self.file)
    }

    /// Waits until `n` datagrams arrived.
    fn wait_arrived(&self, n: usize) {
        let ok = util::wait_for(Duration::from_secs(30), Duration::from_millis(20), || {
            (self.arrivals().len() >= n).then_some(())
        });
        assert!(
            ok.is_some(),
            "only {} datagrams arrived",
            self.arrivals().len()
        );
    }

    /// Waits for the sender to finish and the receiver to go quiet (nothing new for 2 s).
    fn finish(mut self) -> Vec<Arrival> {
        let st = self.tx.wait_timeout(Duration::from_secs(120));
        let err = std::fs::read_to_string(self.tx_out.with_extension("err")).unwrap_or_default();
        assert!(
            st.is_some_and(|s| s.success()),
            "udp-send did not finish: {err}"
        );
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

fn log_text(shim: &Shim) -> String {
    std::fs::read_to_string(shim.log_path()).unwrap_or_default()
}

fn secs(us: u128) -> f64 {
    us as f64 / 1e6
}

/// The `N` of "... ids up to N were written ..." in the shim's divergence report.
fn reported_newest(log: &str) -> Option<i64> {
    let rest = log.split("but ids up to ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn a_synchronous_standby_takes_over() {
    let mut ha = Ha::new(Mode::Sync);
    const COUNT: u32 = PPS * 12;
    let s = ha.stream(41, COUNT);
    s.wait_arrived(2 * PPS as usize); // two seconds of flow
                                      // Bob's uplink has been idle all along.

    let t_kill = now_us();
    ha.primary.kill9();
    // What the standby has: every commit the primary acknowledged (synchronous).
    let last_old_id = scalar_i64(
        &mut ha.standby.superuser(DB),
        "SELECT max(id) FROM pgvpn.packets",
    );
    // Detection takes time in real life; promote 2 s after the kill.
    std::thread::sleep(Duration::from_micros(
        (2_000_000u128.saturating_sub(now_us() - t_kill)) as u64,
    ));
    let t_promote = now_us();
    ha.standby.promote();
    let t_promoted = now_us();
    assert!(!replication::in_recovery(&ha.standby));

    let arrivals = s.finish();
    let first_back = stream::first_at_or_after(&arrivals, t_promote)
        .expect("the tunnel came back after the promotion");
    let back_ok = ha.one_back(77);

    let mut su = ha.standby.superuser(DB);
    let logged = stream::logged_seqs(&mut su, ha.bob_id, PORT, 41);
    let first_new_id = scalar_i64(
        &mut su,
        &format!("SELECT min(id) FROM pgvpn.packets WHERE id > {last_old_id}"),
    );
    let new_ids = scalar_i64(
        &mut su,
        &format!("SELECT count(*) FROM pgvpn.packets WHERE id > {last_old_id}"),
    );
    let c = compare(&arrivals, COUNT, &logged);
    let sa = ha.shim_a.stop_and_summary();
    let sb = ha.shim_b.stop_and_summary();

    let outage_us = first_back.at_us - t_kill;
    let after_promotion_us = first_back.at_us.saturating_sub(t_promoted);
    // The first datagram sent after the outage (the ones before may come from the log).
    let last_lost = c.missing.last().copied().unwrap_or(0);
    let first_new = arrivals
        .iter()
        .find(|a| a.seq > last_lost && a.at_us >= t_promote)
        .copied()
        .expect("datagrams sent after the outage arrived");
    eprintln!(
        "failover (synchronous standby): killed at 0 s, promotion started at {:.3} s, done at {:.3} s, \
         first datagram delivered again at {:.3} s (seq {}): {:.3} s after the promotion; \
         the first one sent after the outage at {:.3} s (seq {})\n\
         datagrams: {} sent, {} received, {} lost ({}), {} duplicates {:?}\n\
         ids: the standby's last at the kill {last_old_id}, the new primary's first {first_new_id} \
         (a jump of {}), {new_ids} new rows\n\
         alice: {sa:?}\nbob: {sb:?}",
        secs(t_promote - t_kill),
        secs(t_promoted - t_kill),
        secs(outage_us),
        first_back.seq,
        secs(after_promotion_us),
        secs(first_new.at_us - t_kill),
        first_new.seq,
        COUNT,
        c.received.len(),
        c.missing.len(),
        ranges(&c.missing),
        c.duplicates.len(),
        c.duplicates,
        first_new_id - last_old_id,
    );

    assert!(
        c.delivered_not_logged.is_empty(),
        "delivered but not in the new primary's log: {}",
        ranges(&c.delivered_not_logged)
    );
    assert!(
        c.logged_not_delivered.is_empty(),
        "logged on the new primary but never delivered (skipped): {}",
        ranges(&c.logged_not_delivered)
    );
    assert!(c.logged_twice.is_empty(), "{:?}", c.logged_twice);
    assert!(
        c.duplicates.is_empty(),
        "delivered twice: {:?}",
        c.duplicates
    );
    assert!(
        first_new_id > last_old_id && new_ids > 0,
        "the new primary logged new packets after the old ones"
    );
    assert!(
        after_promotion_us < 2_500_000,
        "the tunnel came back {:.3} s after the promotion (want about 1 s)",
        secs(after_promotion_us)
    );
    assert!(
        !c.missing.is_empty() && c.missing.len() < (PPS * 5) as usize,
        "the outage lost some datagrams, about 2 s worth: {}",
        c.missing.len()
    );
    // Every datagram lost was counted as dropped by alice's shim (a send in flight at the
    // kill may have committed: then it is counted but was delivered).
    let dropped = sa["dropped_db_down"] + sa["dropped_queue_full"];
    assert!(
        c.missing.len() as i64 <= dropped,
        "{} lost, alice counted {dropped}",
        c.missing.len()
    );
    assert!(
        sa["reconnects"] >= 2 && sb["reconnects"] >= 2,
        "both sessions of both shims reconnected"
    );
    // The idle direction: its first packet after the failover went through.
    assert!(back_ok, "bob's first packet after the failover was lost");
    assert_eq!(sb["dropped_db_down"], 0, "bob's shim dropped nothing");
    assert_eq!(sb["diverged_lost"], 0);
    assert!(
        log_text(&ha.shim_b).contains("closed the connection while idle"),
        "bob's uplink noticed the closed connection before sending:\n{}",
        ha.shim_b.log_tail(30)
    );
}

#[test]
fn a_standby_that_was_behind_takes_over() {
    let mut ha = Ha::new(Mode::Async);
    const COUNT: u32 = PPS * 10;
    let s = ha.stream(42, COUNT);
    s.wait_arrived(PPS as usize);
    replication::wait_caught_up(&ha.primary, &ha.standby);
    // From now on nothing reaches the standby; bob keeps receiving from the primary.
    replication::cut_off(&ha.standby);
    let cut_at = s.arrivals().len();
    s.wait_arrived(cut_at + 2 * PPS as usize);
    ha.primary.kill9();
    let behind = s.arrivals().len() - cut_at;
    let standby_last = scalar_i64(
        &mut ha.standby.superuser(DB),
        "SELECT max(id) FROM pgvpn.packets",
    );
    ha.standby.promote();
    let arrivals = s.finish();

    let mut su = ha.standby.superuser(DB);
    let logged = stream::logged_seqs(&mut su, ha.bob_id, PORT, 42);
    let c = compare(&arrivals, COUNT, &logged);
    let sb = ha.shim_b.stop_and_summary();
    let log_b = log_text(&ha.shim_b);
    let newest = reported_newest(&log_b).unwrap_or_else(|| {
        panic!(
            "bob's shim did not report the divergence:\n{}",
            ha.shim_b.log_tail(40)
        )
    });
    let reused = scalar_i64(
        &mut su,
        &format!(
            "SELECT count(*) FROM pgvpn.packets WHERE dst_peer = {} AND id > {standby_last} AND id <= {newest}",
            ha.bob_id
        ),
    );
    eprintln!(
        "failover (asynchronous standby, cut off {} datagrams before the kill): {} sent, {} received, {} lost in the outage ({}), \
         {} delivered but not in the new log ({}), {} duplicates {:?}\n\
         ids: the standby's last {standby_last}, bob had delivered up to {newest}; \
         the new primary logged {reused} packets for bob under ids bob had already used\n\
         bob: {sb:?}",
        behind,
        COUNT,
        c.received.len(),
        c.missing.len(),
        ranges(&c.missing),
        c.delivered_not_logged.len(),
        ranges(&c.delivered_not_logged),
        c.duplicates.len(),
        c.duplicates,
    );

    assert!(
        reused > 0,
        "the scenario: the new primary handed out ids bob had already delivered"
    );
    assert!(
        c.logged_not_delivered.is_empty(),
        "logged on the new primary but never delivered (skipped): {}",
        ranges(&c.logged_not_delivered)
    );
    assert!(
        c.duplicates.is_empty(),
        "delivered twice: {:?}",
        c.duplicates
    );
    assert!(
        c.delivered_not_logged.len() >= PPS as usize,
        "what bob got after the cut is missing from the new log: {}",
        c.delivered_not_logged.len()
    );
    assert_eq!(
        sb["diverged_lost"],
        c.delivered_not_logged.len() as i64,
        "bob's shim counted exactly the delivered packets the new log lacks"
    );
    assert!(log_b.contains("THE DATABASE LOST PACKETS ALREADY DELIVERED"));
    // After the failover the tunnel works (the new primary's own packets arrived).
    let after = logged.iter().filter(|(id, _)| *id > standby_last).count();
    assert!(
        after > PPS as usize,
        "{after} datagrams logged after the failover"
    );
}
