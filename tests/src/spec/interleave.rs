//! Interleavings: sessions that each run on their own thread and connection, driven
//! through a schedule one step at a time, as PostgreSQL's isolationtester drives its
//! specs. A step that has not finished is asked about with
//! `pg_isolation_test_session_is_blocked(pid, other sessions' pids)` until it either
//! finishes or is blocked by another session of the schedule; so the schedule that
//! really ran is known exactly, without sleeping and hoping.
//!
//! A step whose session is still blocked in an earlier step waits its turn, and the
//! steps of other sessions after it go first (isolationtester would give up instead).
//! So one schedule serves a design in which a sender waits for another and one in which
//! it does not: the outcome says which happened.
//!
//! After every step that finishes, each receiver is polled twice: from its cursor, as a
//! shim reads, and over everything it can see; [`Outcome`] compares what the receivers
//! saw with what was committed, and when.

use super::{tag_of, udp_tagged, Api};
use crate::cluster::{db_error, sqlstate, Cluster};
use crate::util::next_id;
use pgvpn_core::limits::MAX_RECV_PACKETS;
use postgres::Client;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

/// What a session does in one step.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Begin,
    /// One `send` call: a packet to each receiver named, in that order.
    Send(&'static [&'static str]),
    Commit,
    Rollback,
}

/// One step of a schedule: the session (named for the peer it logs in as) and its op.
pub type Step = (&'static str, Op);

/// Longest a schedule may go without a step finishing or settling as blocked. Generous:
/// a deadlock is only detected after `deadlock_timeout` (1 s), and the box is shared.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// How often an unfinished step is looked at.
const POLL: Duration = Duration::from_millis(2);

/// The page a receiver reads from its cursor.
const PAGE: i32 = 1024;

/// A finished step.
#[derive(Debug)]
struct Done {
    session: &'static str,
    op: Op,
    /// Logical times: every issue and every finish ticks one clock, so `a.finished <
    /// b.issued` means step a was over before step b began.
    issued: u64,
    finished: u64,
    /// Seen blocked by another session of the schedule before it finished.
    waited: bool,
    /// Packets the outbox accepted (sends only).
    accepted: Option<i64>,
    /// (SQLSTATE, message) if it failed.
    error: Option<(Option<String>, String)>,
}

impl Done {
    fn describe(&self) -> String {
        let op = match self.op {
            Op::Begin => "BEGIN".to_string(),
            Op::Send(to) => format!("send(→ {})", to.join(", ")),
            Op::Commit => "COMMIT".to_string(),
            Op::Rollback => "ROLLBACK".to_string(),
        };
        let waited = if self.waited { " (waited)" } else { "" };
        let result = match &self.error {
            Some((code, msg)) => format!(" failed [{}]: {msg}", code.as_deref().unwrap_or("?")),
            None => String::new(),
        };
        format!(
            "[{}..{}] {}: {op}{waited}{result}",
            self.issued, self.finished, self.session
        )
    }
}

/// A packet sent in one of the schedule's transactions.
#[derive(Debug)]
struct Sent {
    tag: String,
    session: &'static str,
    receiver: &'static str,
    /// The COMMIT that made it visible: (issued, finished); None if never committed.
    commit: Option<(u64, u64)>,
}

type Job = Box<dyn FnOnce(&mut Client) -> Result<Option<i64>, postgres::Error> + Send>;

/// A step in flight.
struct Running {
    op: Op,
    issued: u64,
    waited: bool,
    /// The tags of a send, with their receivers.
    packets: Vec<(String, &'static str)>,
}

/// One session: a connection owned by its own thread, which runs jobs in order.
struct Session {
    name: &'static str,
    pid: i32,
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Result<Option<i64>, postgres::Error>>,
    running: Option<Running>,
    /// Packets sent in the open transaction.
    open: Vec<(String, &'static str)>,
    /// A step of the open transaction failed: its COMMIT is a rollback.
    failed: bool,
}

impl Session {
    fn start(cluster: &Cluster, db: &str, name: &'static str) -> Session {
        let mut client = cluster.connect(name, db);
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .expect("pg_backend_pid")
            .get(0);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (result_tx, results) = mpsc::channel();
        // Dropping `jobs` ends the thread once it is idle; its connection closes and its
        // open transaction, if any, rolls back.
        std::thread::spawn(move || {
            for job in job_rx {
                if result_tx.send(job(&mut client)).is_err() {
                    break;
                }
            }
        });
        Session {
            name,
            pid,
            jobs,
            results,
            running: None,
            open: Vec::new(),
            failed: false,
        }
    }
}

/// What a receiver saw, polled after every step.
struct Watch {
    client: Client,
    api: &'static Api,
    /// Its cursor, kept as a shim keeps it: the highest id delivered.
    last: i64,
    /// (id, tag) in delivery order, since the schedule began.
    delivered: Vec<(i64, String)>,
    /// Every id its whole view (`recv(0)`) has shown, and the tag of its packet.
    visible: BTreeMap<i64, String>,
    /// Ids that showed up below one it had already seen.
    late: Vec<String>,
}

impl Watch {
    fn start(cluster: &Cluster, db: &str, api: &'static Api, receiver: &str) -> Watch {
        let mut w = Watch {
            client: cluster.connect(receiver, db),
            api,
            last: 0,
            delivered: Vec::new(),
            visible: BTreeMap::new(),
            late: Vec::new(),
        };
        // Whatever earlier schedules left is the baseline, not part of this one.
        w.poll();
        w.delivered.clear();
        w.late.clear();
        w
    }

    fn recv(&mut self, after: i64, max: i32) -> Vec<(i64, Vec<u8>)> {
        self.client
            .query(self.api.recv_sql, &[&after, &max, &0i32])
            .unwrap_or_else(|e| panic!("recv: {}", db_error(&e)))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    fn poll(&mut self) {
        loop {
            let page = self.recv(self.last, PAGE);
            if page.is_empty() {
                break;
            }
            for (id, payload) in page {
                if id <= self.last {
                    self.late
                        .push(format!("recv({}) returned id {id}", self.last));
                }
                self.last = self.last.max(id);
                self.delivered.push((id, tag_of(&payload)));
            }
        }
        let top = self.visible.last_key_value().map(|(id, _)| *id);
        for (id, payload) in self.recv(0, MAX_RECV_PACKETS) {
            if self.visible.contains_key(&id) {
                continue;
            }
            if let Some(top) = top.filter(|&top| id < top) {
                self.late
                    .push(format!("id {id} became visible after id {top}"));
            }
            self.visible.insert(id, tag_of(&payload));
        }
    }
}

/// A cluster's peers, ready to run schedules against one outbox.
pub struct Interleaving<'c> {
    cluster: &'c Cluster,
    db: &'c str,
    api: &'static Api,
    /// Peer name → its address (the source of its packets, the destination of others').
    addrs: HashMap<&'static str, &'static str>,
}

impl<'c> Interleaving<'c> {
    /// `peers`: (name, address) of every session and receiver a schedule names; each
    /// must be a login role (a pgvpn peer, or anyone for a naive control).
    pub fn new(
        cluster: &'c Cluster,
        db: &'c str,
        api: &'static Api,
        peers: &[(&'static str, &'static str)],
    ) -> Interleaving<'c> {
        Interleaving {
            cluster,
            db,
            api,
            addrs: peers.iter().copied().collect(),
        }
    }

    fn addr(&self, peer: &str) -> &'static str {
        self.addrs
            .get(peer)
            .unwrap_or_else(|| panic!("no address for peer {peer}"))
    }

    /// Runs `schedule` with fresh sessions and receivers' watches.
    pub fn run(&self, schedule: &[Step]) -> Outcome {
        let mut names: Vec<&'static str> = Vec::new();
        let mut receivers: Vec<&'static str> = Vec::new();
        for (session, op) in schedule {
            if !names.contains(session) {
                names.push(session);
            }
            if let Op::Send(to) = op {
                for r in *to {
                    if !receivers.contains(r) {
                        receivers.push(r);
                    }
                }
            }
        }
        let mut run = Run {
            tags: format!("{}", next_id()),
            sessions: names
                .iter()
                .map(|n| Session::start(self.cluster, self.db, n))
                .collect(),
            watches: receivers
                .iter()
                .map(|r| (*r, Watch::start(self.cluster, self.db, self.api, r)))
                .collect(),
            monitor: self.cluster.superuser(self.db),
            clock: 0,
            steps: Vec::new(),
            sent: Vec::new(),
            queue: schedule.iter().copied().collect(),
        };
        loop {
            match run.next() {
                Next::Run((session, op)) => {
                    run.issue(self, session, op);
                    run.settle(false);
                }
                // Every step left belongs to a blocked session: wait for one to finish
                // (for a deadlock, that is the detector aborting one of them).
                Next::Wait => run.settle(true),
                Next::Done => break,
            }
        }
        Outcome {
            steps: run.steps,
            sent: run.sent,
            watches: run.watches,
        }
    }
}

/// What a schedule does next.
enum Next {
    Run(Step),
    Wait,
    Done,
}

/// The state of one schedule as it runs.
struct Run {
    /// Prefix of this run's packet tags.
    tags: String,
    sessions: Vec<Session>,
    watches: BTreeMap<&'static str, Watch>,
    /// Superuser connection that asks whether a session is blocked.
    monitor: Client,
    clock: u64,
    steps: Vec<Done>,
    sent: Vec<Sent>,
    queue: VecDeque<Step>,
}

impl Run {
    fn session(&mut self, name: &str) -> &mut Session {
        self.sessions
            .iter_mut()
            .find(|s| s.name == name)
            .expect("a session of the schedule")
    }

    /// The first queued step whose session is idle and has no earlier step queued; else
    /// wait while steps are running; else the schedule is done.
    fn next(&mut self) -> Next {
        let mut passed: Vec<&str> = Vec::new();
        let mut found = None;
        for (k, (name, _)) in self.queue.iter().enumerate() {
            let idle = self
                .sessions
                .iter()
                .any(|s| s.name == *name && s.running.is_none());
            if idle && !passed.contains(name) {
                found = Some(k);
                break;
            }
            passed.push(name);
        }
        if let Some(step) = found.and_then(|k| self.queue.remove(k)) {
            return Next::Run(step);
        }
        if self.sessions.iter().any(|s| s.running.is_some()) {
            return Next::Wait;
        }
        assert!(
            self.queue.is_empty(),
            "steps left but no session to run them"
        );
        Next::Done
    }

    fn issue(&mut self, il: &Interleaving<'_>, name: &'static str, op: Op) {
        self.clock += 1;
        let issued = self.clock;
        let (job, packets): (Job, Vec<(String, &'static str)>) = match op {
            Op::Begin => (Box::new(|c| c.batch_execute("BEGIN").map(|_| None)), vec![]),
            Op::Commit => (
                Box::new(|c| c.batch_execute("COMMIT").map(|_| None)),
                vec![],
            ),
            Op::Rollback => (
                Box::new(|c| c.batch_execute("ROLLBACK").map(|_| None)),
                vec![],
            ),
            Op::Send(to) => {
                let packets: Vec<(String, &'static str)> = to
                    .iter()
                    .enumerate()
                    .map(|(k, r)| (format!("{}/{name}:{issued}.{k}", self.tags), *r))
                    .collect();
                let src = il.addr(name);
                let bytes: Vec<Vec<u8>> = packets
                    .iter()
                    .map(|(tag, r)| udp_tagged(src, il.addr(r), tag))
                    .collect();
                let sql = il.api.send_sql;
                let job: Job = Box::new(move |c| {
                    c.query_one(sql, &[&bytes])
                        .map(|r| Some(r.get::<_, i64>(0)))
                });
                (job, packets)
            }
        };
        let s = self.session(name);
        s.jobs.send(job).expect("session thread gone");
        s.running = Some(Running {
            op,
            issued,
            waited: false,
            packets,
        });
    }

    /// Polls the running steps until each has finished or is blocked by another session
    /// (and, with `one`, until at least one has finished). After each finish the
    /// receivers are polled and everything is looked at again: a finish may have
    /// released a blocked step.
    fn settle(&mut self, one: bool) {
        let blocked_sql = "SELECT pg_catalog.pg_isolation_test_session_is_blocked($1, $2)";
        let mut last_change = Instant::now();
        let mut finished_any = false;
        loop {
            let mut unsettled = false;
            for i in 0..self.sessions.len() {
                if self.sessions[i].running.is_none() {
                    continue;
                }
                match self.sessions[i].results.try_recv() {
                    Ok(result) => {
                        self.finish(i, result);
                        finished_any = true;
                        unsettled = true;
                        last_change = Instant::now();
                    }
                    Err(TryRecvError::Empty) => {
                        let pid = self.sessions[i].pid;
                        let others: Vec<i32> = self
                            .sessions
                            .iter()
                            .filter(|s| s.pid != pid)
                            .map(|s| s.pid)
                            .collect();
                        let blocked: bool = self
                            .monitor
                            .query_one(blocked_sql, &[&pid, &others])
                            .unwrap_or_else(|e| panic!("is_blocked: {}", db_error(&e)))
                            .get(0);
                        let r = self.sessions[i].running.as_mut().expect("running");
                        if blocked {
                            r.waited = true;
                        } else {
                            unsettled = true;
                        }
                    }
                    Err(TryRecvError::Disconnected) => {
                        panic!("session {} died", self.sessions[i].name)
                    }
                }
            }
            if !unsettled && (finished_any || !one) {
                return;
            }
            if last_change.elapsed() > STUCK_AFTER {
                let blocked: Vec<String> = self
                    .sessions
                    .iter()
                    .filter_map(|s| {
                        s.running
                            .as_ref()
                            .map(|r| format!("{}: {:?}", s.name, r.op))
                    })
                    .collect();
                panic!(
                    "schedule stuck for {STUCK_AFTER:?}: running {blocked:?}; so far:\n{}",
                    trace(&self.steps)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn finish(&mut self, i: usize, result: Result<Option<i64>, postgres::Error>) {
        self.clock += 1;
        let finished = self.clock;
        let s = &mut self.sessions[i];
        let r = s.running.take().expect("running");
        let (accepted, error) = match result {
            Ok(v) => (v, None),
            Err(e) => (None, Some((sqlstate(&e), db_error(&e)))),
        };
        let ok = error.is_none();
        let mut ended: Option<Option<(u64, u64)>> = None;
        match r.op {
            Op::Begin => {
                s.open.clear();
                s.failed = !ok;
            }
            Op::Send(_) if ok => s.open.extend(r.packets),
            Op::Send(_) => s.failed = true,
            // COMMIT of a failed transaction is a rollback.
            Op::Commit => ended = Some((ok && !s.failed).then_some((r.issued, finished))),
            Op::Rollback => ended = Some(None),
        }
        if let Some(commit) = ended {
            for (tag, receiver) in s.open.drain(..) {
                self.sent.push(Sent {
                    tag,
                    session: s.name,
                    receiver,
                    commit,
                });
            }
            s.failed = false;
        }
        self.steps.push(Done {
            session: s.name,
            op: r.op,
            issued: r.issued,
            finished,
            waited: r.waited,
            accepted,
            error,
        });
        for w in self.watches.values_mut() {
            w.poll();
        }
    }
}

fn trace(steps: &[Done]) -> String {
    steps
        .iter()
        .map(|d| format!("  {}", d.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a schedule did, and what its receivers saw.
pub struct Outcome {
    steps: Vec<Done>,
    sent: Vec<Sent>,
    watches: BTreeMap<&'static str, Watch>,
}

impl Outcome {
    /// The steps as they ran, one a line, in the order they finished.
    pub fn trace(&self) -> String {
        trace(&self.steps)
    }

    /// Steps that failed, and sends that accepted fewer packets than they carried.
    pub fn failures(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|d| {
                d.error.is_some()
                    || matches!((d.op, d.accepted), (Op::Send(to), Some(n)) if n != to.len() as i64)
            })
            .map(|d| format!("{} (accepted {:?})", d.describe(), d.accepted))
            .collect()
    }

    /// How many steps were aborted as deadlocked (SQLSTATE 40P01).
    pub fn deadlocks(&self) -> usize {
        self.steps
            .iter()
            .filter(|d| matches!(&d.error, Some((Some(code), _)) if code == "40P01"))
            .count()
    }

    /// Steps that waited although no other session ended a transaction (committed,
    /// rolled back or failed) while they waited: a wait nothing released. (The step that
    /// released a wait may be seen to finish just after the step it released.)
    pub fn unexplained_waits(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|w| w.waited)
            .filter(|w| {
                !self.steps.iter().any(|o| {
                    o.session != w.session
                        && (matches!(o.op, Op::Commit | Op::Rollback) || o.error.is_some())
                        && o.issued < w.finished
                        && o.finished > w.issued
                })
            })
            .map(Done::describe)
            .collect()
    }

    /// Per receiver: committed packets it did not get or got more than once, and
    /// packets it got that were never committed.
    pub fn not_exactly_once(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (receiver, w) in &self.watches {
            let mut count: HashMap<&str, usize> = HashMap::new();
            for (_, tag) in &w.delivered {
                *count.entry(tag.as_str()).or_default() += 1;
            }
            for p in self.sent.iter().filter(|p| p.receiver == *receiver) {
                match (
                    p.commit.is_some(),
                    count.remove(p.tag.as_str()).unwrap_or(0),
                ) {
                    (true, 1) | (false, 0) => {}
                    (true, 0) => out.push(format!("{receiver} never got committed {}", p.tag)),
                    (false, n) => out.push(format!(
                        "{receiver} got {} {n}× though it was rolled back",
                        p.tag
                    )),
                    (true, n) => out.push(format!("{receiver} got {} {n} times", p.tag)),
                }
            }
            for tag in count.keys() {
                out.push(format!("{receiver} got {tag}, which was not sent to it"));
            }
        }
        out
    }

    /// Ids that became visible to a receiver below one it had already seen.
    pub fn seen_out_of_order(&self) -> Vec<String> {
        self.watches
            .iter()
            .flat_map(|(r, w)| w.late.iter().map(move |l| format!("{r}: {l}")))
            .collect()
    }

    /// Transactions that committed one after the other (the first COMMIT over before the
    /// second began) whose packets for one receiver got ids in the other order.
    pub fn ids_against_commit_order(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (receiver, w) in &self.watches {
            // ids from the whole view: a packet the cursor skipped has one too
            let id_of: HashMap<&str, i64> =
                w.visible.iter().map(|(id, t)| (t.as_str(), *id)).collect();
            // (session, commit) -> the ids of its packets for this receiver
            let mut txns: BTreeMap<(u64, u64, &str), Vec<i64>> = BTreeMap::new();
            for p in self.sent.iter().filter(|p| p.receiver == *receiver) {
                if let (Some((issued, finished)), Some(id)) = (p.commit, id_of.get(p.tag.as_str()))
                {
                    txns.entry((issued, finished, p.session))
                        .or_default()
                        .push(*id);
                }
            }
            for ((_, f1, s1), ids1) in &txns {
                for ((i2, _, s2), ids2) in &txns {
                    let (max1, min2) = (ids1.iter().max(), ids2.iter().min());
                    if f1 < i2 && max1 > min2 {
                        out.push(format!(
                            "{receiver}: {s1} committed before {s2} began to, but got ids {ids1:?} vs {ids2:?}"
                        ));
                    }
                }
            }
        }
        out
    }
}
