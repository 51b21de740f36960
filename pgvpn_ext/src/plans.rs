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

/// Planner settings pinned around the API's statements, with PostgreSQL 15's defaults.
/// Any role may SET these; the API's plans are cached for the life of the backend and
/// (re)planned under whatever is set at that moment, so a peer that ran `SET
/// enable_indexscan = off` or `SET random_page_cost = 1e9` before its first call would
/// otherwise turn its `recv` into a scan of the whole log.
macro_rules! pinned {
    ($($var:ident: $ty:ty = $val:expr),* $(,)?) => {
        #[derive(Clone, Copy)]
        struct Saved {
            $($var: $ty,)*
        }

        fn pin() -> Saved {
            // SAFETY: plain GUC variables of this single-threaded backend; restored by
            // `unpin` in `isolated`'s `finally`, whatever happens in between.
            unsafe {
                let saved = Saved { $($var: pg_sys::$var,)* };
                $(pg_sys::$var = $val;)*
                saved
            }
        }

        fn unpin(s: Saved) {
            // SAFETY: as in `pin`.
            unsafe {
                $(pg_sys::$var = s.$var;)*
            }
        }
    };
}

pinned! {
    plan_cache_mode: i32 = pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as i32,
    enable_seqscan: bool = true,
    enable_indexscan: bool = true,
    enable_indexonlyscan: bool = true,
    enable_bitmapscan: bool = true,
    enable_tidscan: bool = true,
    enable_sort: bool = true,
    enable_incremental_sort: bool = true,
    enable_hashagg: bool = true,
    enable_material: bool = true,
    enable_memoize: bool = true,
    enable_nestloop: bool = true,
    enable_mergejoin: bool = true,
    enable_hashjoin: bool = true,
    enable_gathermerge: bool = true,
    enable_partitionwise_join: bool = false,
    enable_partitionwise_aggregate: bool = false,
    enable_parallel_append: bool = true,
    enable_parallel_hash: bool = true,
    enable_partition_pruning: bool = true,
    enable_async_append: bool = true,
    seq_page_cost: f64 = 1.0,
    random_page_cost: f64 = 4.0,
    cpu_tuple_cost: f64 = 0.01,
    cpu_index_tuple_cost: f64 = 0.005,
    cpu_operator_cost: f64 = 0.0025,
    parallel_tuple_cost: f64 = 0.1,
    parallel_setup_cost: f64 = 1000.0,
    effective_cache_size: i32 = 524_288,
    constraint_exclusion: i32 = pg_sys::ConstraintExclusionType::CONSTRAINT_EXCLUSION_PARTITION as i32,
    max_parallel_workers_per_gather: i32 = 0,
    jit_enabled: bool = false,
    cursor_tuple_fraction: f64 = 0.1,
    from_collapse_limit: i32 = 8,
    join_collapse_limit: i32 = 8,
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
/// * every other planner setting a caller could use to change our plans (`pinned!`).
///   Parallel query and JIT are off: our statements are short.
///
/// All are restored afterwards, also when `f` raises an ERROR.
pub fn isolated<R>(f: impl FnOnce() -> R) -> R {
    let saved = pin();
    // SAFETY: GetOverrideSearchPath returns a fresh palloc'd struct that we own and edit
    // before handing it to PushOverrideSearchPath, which copies it; the matching pop is
    // in `finally`.
    unsafe {
        let path = pg_sys::GetOverrideSearchPath(pg_sys::CurrentMemoryContext);
        (*path).schemas = std::ptr::null_mut();
        (*path).addCatalog = true;
        (*path).addTemp = false;
        pg_sys::PushOverrideSearchPath(path);
    }
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .finally(move || {
            // SAFETY: pops exactly the path pushed above.
            unsafe { pg_sys::PopOverrideSearchPath() };
            unpin(saved);
        })
        .execute()
}
