//! Settings. Only superusers may change them (PGC_SUSET, or at server start): a peer
//! must not be able to shorten the audit trail, relax its durability or lift its limits.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// How long packets are kept, in seconds (`pgvpn.retention`, e.g. '7d').
pub static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);
/// How long one chunk of the log stays open, in seconds (`pgvpn.chunk_interval`).
pub static CHUNK_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3_600);
/// Peers the shared state has room for (`pgvpn.max_peers`, at server start).
pub static MAX_PEERS: GucSetting<i32> = GucSetting::<i32>::new(4_096);
/// Most packets a receiver may have waiting unacknowledged before new ones to it are
/// rejected with reason `backlog` (`pgvpn.max_backlog`; 0 = no limit).
pub static MAX_BACKLOG: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
/// How long `prune()` waits for a lock before it gives up until its next run, in ms.
pub static PRUNE_LOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(50);
/// The durability of a transaction that sent packets (`pgvpn.synchronous_commit`).
pub static SYNCHRONOUS_COMMIT: GucSetting<SyncCommit> =
    GucSetting::<SyncCommit>::new(SyncCommit::On);

/// `synchronous_commit` levels pgvpn may force on a sending transaction, or `session`:
/// leave the session's own setting alone (what wave 1 did, and the speed-over-the-log
/// choice a superuser may make).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum SyncCommit {
    #[name = c"session"]
    Session,
    #[name = c"off"]
    Off,
    #[name = c"local"]
    Local,
    #[name = c"remote_write"]
    RemoteWrite,
    #[name = c"on"]
    On,
    #[name = c"remote_apply"]
    RemoteApply,
}

impl SyncCommit {
    /// The `synchronous_commit` value to force, if any.
    pub fn forced(self) -> Option<&'static std::ffi::CStr> {
        match self {
            SyncCommit::Session => None,
            SyncCommit::Off => Some(c"off"),
            SyncCommit::Local => Some(c"local"),
            SyncCommit::RemoteWrite => Some(c"remote_write"),
            SyncCommit::On => Some(c"on"),
            SyncCommit::RemoteApply => Some(c"remote_apply"),
        }
    }
}

pub fn max_peers() -> usize {
    MAX_PEERS.get().max(1) as usize
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"pgvpn.retention",
        c"How long the packet log keeps packets.",
        c"pgvpn.prune() drops chunks whose packets are all older than this.",
        &RETENTION,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgvpn.chunk_interval",
        c"How long one chunk of the packet log is written to before pgvpn.prune() starts a new one.",
        c"Smaller chunks let retention be more precise; each chunk is one partition.",
        &CHUNK_INTERVAL,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgvpn.max_peers",
        c"Peers (live or removed since the server started) pgvpn's shared memory has room for.",
        c"Each takes a few hundred bytes of shared memory. Needs a restart.",
        &MAX_PEERS,
        16,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgvpn.max_backlog",
        c"Most unacknowledged packets a receiver may have before packets to it are rejected (0: no limit).",
        c"Rejected packets get reason 'backlog'. Keeps a receiver that stopped reading from growing the log without bound.",
        &MAX_BACKLOG,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgvpn.prune_lock_timeout",
        c"How long pgvpn.prune() waits for a lock on the log before it retries on its next run.",
        c"Traffic that queues behind a waiting prune() is delayed at most this long.",
        &PRUNE_LOCK_TIMEOUT,
        1,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"pgvpn.synchronous_commit",
        c"synchronous_commit forced on every transaction that sent packets ('session': the session's own).",
        c"A packet is delivered only after its log row commits; with 'on' that commit is durable whatever a peer set.",
        &SYNCHRONOUS_COMMIT,
        GucContext::Suset,
        GucFlags::default(),
    );
}
