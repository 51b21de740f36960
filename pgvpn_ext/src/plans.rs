//! Prepared SPI plans, kept for the life of the backend: the hot path (send/recv) must
//! not re-parse and re-plan its SQL on every call.
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use std::cell::OnceCell;
use std::thread::LocalKey;

pub type Slot = LocalKey<OnceCell<&'static OwnedPreparedStatement>>;

/// Declares a per-backend plan slot.
macro_rules! plan_slot {
    ($name:ident) => {
        thread_local! {
            static $name: std::cell::OnceCell<&'static pgrx::spi::OwnedPreparedStatement> =
                const { std::cell::OnceCell::new() };
        }
    };
}
pub(crate) use plan_slot;

/// The plan in `slot`, prepared from `sql` on first use. Plans are few and live as
/// long as the backend, so leaking the box is the simplest correct ownership.
pub fn get(
    slot: &'static Slot,
    client: &SpiClient<'_>,
    sql: &str,
    args: &[pg_sys::Oid],
    mutating: bool,
) -> SpiResult<&'static OwnedPreparedStatement> {
    if let Some(p) = slot.with(|s| s.get().copied()) {
        return Ok(p);
    }
    // Converted only here, on first use: the hot path just looks the plan up.
    let args: Vec<PgOid> = args.iter().map(|&t| PgOid::from(t)).collect();
    let prepared = if mutating {
        client.prepare_mut(sql, &args)?
    } else {
        client.prepare(sql, &args)?
    };
    let kept: &'static OwnedPreparedStatement = Box::leak(Box::new(prepared.keep()));
    slot.with(|s| {
        let _ = s.set(kept);
    });
    Ok(kept)
}

/// Runs `f`, one API call's statements, in a fixed environment:
///
/// * `search_path` is just `pg_catalog` (no temp schema). The API functions are SECURITY
///   DEFINER; their statements must never resolve a name to an object a caller planted.
///   The plan cache remembers this path with each saved plan and would re-parse if it
///   differed at execution, so it is pushed around every call. This replaces a
///   per-function `SET search_path`, whose GUC save/restore cost ~7% of a busy
///   backend's CPU. All our SQL names pgvpn objects with their schema.
/// * `plan_cache_mode = force_generic_plan`: our statements touch the partitioned log
///   with parameters; left to itself the plan cache judges the generic plan (all chunks,
///   pruned at executor start) costlier than a custom one and re-plans on every call.
///
/// Both are restored afterwards, also when `f` raises an ERROR.
pub fn isolated<R>(f: impl FnOnce() -> R) -> R {
    use pgrx::pg_sys::{self, PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN};
    // SAFETY: plan_cache_mode is a plain GUC variable of this single-threaded backend;
    // it is restored in `finally` below, whatever `f` does.
    let saved_mode = unsafe { pg_sys::plan_cache_mode };
    // SAFETY: as above for plan_cache_mode. GetOverrideSearchPath returns a fresh
    // palloc'd struct that we own and edit before handing it to PushOverrideSearchPath,
    // which copies it; the matching pop is in `finally`.
    unsafe {
        pg_sys::plan_cache_mode = PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as i32;
        let path = pg_sys::GetOverrideSearchPath(pg_sys::CurrentMemoryContext);
        (*path).schemas = std::ptr::null_mut();
        (*path).addCatalog = true;
        (*path).addTemp = false;
        pg_sys::PushOverrideSearchPath(path);
    }
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        // SAFETY: pops exactly the path pushed above, restores the saved GUC value.
        .finally(|| unsafe {
            pg_sys::PopOverrideSearchPath();
            pg_sys::plan_cache_mode = saved_mode;
        })
        .execute()
}
