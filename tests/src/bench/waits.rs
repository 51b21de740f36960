//! What the backends of a run are waiting for: `pg_stat_activity` sampled every
//! [`EVERY`] from a session of its own, each sample of a watched backend sorted into a
//! [`Wait`] category by its `wait_event_type` / `wait_event`.
//!
//! pgvpn's ordering locks (log.rs: one per receiver, taken at commit in receiver-id
//! order) are heavyweight locks on objects of class `pgvpn.peers`: a backend waiting for
//! one shows `Lock` / `object`. So does one waiting for NOTIFY's commit lock, which
//! PostgreSQL takes on the shared object (`pg_database`, 0) in every commit that
//! notifies (async.c, PreCommit_Notify); pg_locks tells the two apart. A `recv` long
//! poll sleeps on its peer's condition variable in shared memory (no LISTEN/NOTIFY
//! since 0.2.0) and shows `Extension`.

use pgvpn_tests::{db_error, Cluster};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wait {
    /// Lock / object: pgvpn's ordering (or routing) locks, or NOTIFY's commit lock
    /// ([`Waits::waiting_locks`] tells them apart).
    OrderingLock,
    /// Any other heavyweight lock (relation, extend, transactionid, …).
    OtherLock,
    /// Flushing or writing WAL: IO WALSync/WALWrite, LWLock WALWrite/WALInsert.
    Wal,
    /// Waiting for a synchronous standby.
    SyncRep,
    /// A `recv` long poll asleep on its condition variable (Extension).
    LongPoll,
    /// Other LWLocks, IO, IPC, timeouts.
    Other,
    /// Running (active, no wait event): on a CPU or in its run queue.
    Cpu,
    /// Idle: waiting for its client to send the next statement.
    Client,
}

impl Wait {
    pub const ALL: [Wait; 8] = [
        Wait::OrderingLock,
        Wait::OtherLock,
        Wait::Wal,
        Wait::SyncRep,
        Wait::LongPoll,
        Wait::Other,
        Wait::Cpu,
        Wait::Client,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Wait::OrderingLock => "ordering_lock",
            Wait::OtherLock => "other_lock",
            Wait::Wal => "wal",
            Wait::SyncRep => "syncrep",
            Wait::LongPoll => "long_poll",
            Wait::Other => "other_wait",
            Wait::Cpu => "cpu",
            Wait::Client => "client",
        }
    }

    /// From one row of pg_stat_activity.
    pub fn classify(state: Option<&str>, kind: Option<&str>, event: Option<&str>) -> Wait {
        match (kind, event) {
            (Some("Lock"), Some("object")) => Wait::OrderingLock,
            (Some("Lock"), _) => Wait::OtherLock,
            (Some("IO"), Some(e)) if e.starts_with("WAL") => Wait::Wal,
            (Some("LWLock"), Some("WALWrite" | "WALInsert" | "WALBufMapping")) => Wait::Wal,
            (Some("IPC"), Some("SyncRep")) => Wait::SyncRep,
            (Some("Extension"), _) => Wait::LongPoll,
            (Some("Client"), _) => Wait::Client,
            (Some(_), _) => Wait::Other,
            (None, _) if state == Some("active") => Wait::Cpu,
            (None, _) => Wait::Client,
        }
    }
}

/// Samples per group (the part of application_name before the first '-' digit, e.g.
/// `crowd-send`) and category.
#[derive(Clone, Debug, Default)]
pub struct Waits {
    pub samples: usize,
    pub by_group: BTreeMap<String, BTreeMap<Wait, u64>>,
    /// Waiting object-lock requests seen in pg_locks, by lock: `routing` (pgvpn.peers,
    /// 0: the routing table), `receiver` (a receiver's ordering lock), `notify` (NOTIFY's
    /// commit lock), `other`.
    pub waiting_locks: BTreeMap<String, u64>,
}

impl Waits {
    /// Share of a group's samples in a category, in percent.
    pub fn share(&self, group: &str, w: Wait) -> f64 {
        let Some(g) = self.by_group.get(group) else {
            return 0.0;
        };
        let total: u64 = g.values().sum();
        if total == 0 {
            return 0.0;
        }
        100.0 * *g.get(&w).unwrap_or(&0) as f64 / total as f64
    }

    /// Samples of a group's backends, all categories.
    pub fn group_samples(&self, group: &str) -> u64 {
        self.by_group.get(group).map_or(0, |g| g.values().sum())
    }

    /// Share of a group's backend samples spent waiting for the lock `what` of
    /// [`Waits::waiting_locks`], in percent (the lock waits of every backend of the
    /// database are counted; in the bench only the group's send).
    pub fn lock_share(&self, group: &str, what: &str) -> f64 {
        let total = self.group_samples(group);
        if total == 0 {
            return 0.0;
        }
        100.0 * *self.waiting_locks.get(what).unwrap_or(&0) as f64 / total as f64
    }

    pub fn to_json(&self) -> Value {
        let groups: BTreeMap<&String, BTreeMap<&str, f64>> = self
            .by_group
            .keys()
            .map(|g| {
                (
                    g,
                    Wait::ALL
                        .iter()
                        .map(|w| (w.name(), self.share(g, *w)))
                        .collect(),
                )
            })
            .collect();
        json!({"sample_every_ms": EVERY.as_millis(), "samples": self.samples,
               "percent_of_backend_samples": groups, "waiting_ordering_locks": self.waiting_locks})
    }
}

/// Samples backends whose application_name starts with `prefix` until `stop` is set.
pub fn sample(
    cluster: &Cluster,
    db: &str,
    prefix: &str,
    stop: &AtomicBool,
) -> Result<Waits, String> {
    let mut su = cluster.superuser(db);
    let activity = su
        .prepare(
            "SELECT application_name, state, wait_event_type, wait_event FROM pg_stat_activity \
             WHERE application_name LIKE $1 || '%'",
        )
        .map_err(|e| db_error(&e))?;
    let locks = su
        .prepare(
            "SELECT CASE WHEN classid = 'pg_database'::regclass AND objid = 0 THEN 'notify' \
                    WHEN classid = to_regclass('pgvpn.peers') AND objid = 0 THEN 'routing' \
                    WHEN classid = to_regclass('pgvpn.peers') THEN 'receiver' \
                    ELSE 'other' END, count(*) \
               FROM pg_locks WHERE NOT granted AND locktype = 'object' GROUP BY 1",
        )
        .map_err(|e| db_error(&e))?;
    let mut w = Waits::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        next += EVERY;
        for r in su.query(&activity, &[&prefix]).map_err(|e| db_error(&e))? {
            let app: String = r.get(0);
            let group = app
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('-');
            let cat = Wait::classify(r.get(1), r.get(2), r.get(3));
            *w.by_group
                .entry(group.to_string())
                .or_default()
                .entry(cat)
                .or_default() += 1;
        }
        for r in su.query(&locks, &[]).map_err(|e| db_error(&e))? {
            let (what, n): (String, i64) = (r.get(0), r.get(1));
            *w.waiting_locks.entry(what).or_default() += n as u64;
        }
        w.samples += 1;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories() {
        let c = |s, k, e| Wait::classify(Some(s), k, e);
        assert_eq!(
            c("active", Some("Lock"), Some("object")),
            Wait::OrderingLock
        );
        assert_eq!(c("active", Some("Lock"), Some("extend")), Wait::OtherLock);
        assert_eq!(c("active", Some("IO"), Some("WALSync")), Wait::Wal);
        assert_eq!(c("active", Some("LWLock"), Some("WALWrite")), Wait::Wal);
        assert_eq!(
            c("active", Some("LWLock"), Some("BufferContent")),
            Wait::Other
        );
        assert_eq!(c("active", Some("IPC"), Some("SyncRep")), Wait::SyncRep);
        assert_eq!(
            c("active", Some("Extension"), Some("Extension")),
            Wait::LongPoll
        );
        assert_eq!(c("idle", Some("Client"), Some("ClientRead")), Wait::Client);
        assert_eq!(c("active", None, None), Wait::Cpu);
        let mut w = Waits::default();
        w.by_group
            .insert("x".into(), BTreeMap::from([(Wait::Cpu, 3), (Wait::Wal, 1)]));
        assert_eq!(w.share("x", Wait::Cpu), 75.0);
        assert_eq!(w.share("y", Wait::Cpu), 0.0);
    }
}
