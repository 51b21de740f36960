//! Settings. Only superusers may change them (PGC_SUSET): a peer must not be able to
//! shorten the audit trail.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// How long packets are kept, in seconds (`pgvpn.retention`, e.g. '7d').
pub static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);
/// How long one chunk of the log stays open, in seconds (`pgvpn.chunk_interval`).
pub static CHUNK_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3_600);

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
}
