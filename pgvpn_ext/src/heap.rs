//! The log's insert path: a transaction's rows go straight into their chunk with
//! `heap_multi_insert`, as COPY does, instead of through SPI and an `INSERT ... SELECT
//! unnest(...)`: no executor work per row, one WAL record per heap page instead of one
//! per row, and the index entries through the executor's own `ExecInsertIndexTuples`.
//!
//! Safe to do by hand because pgvpn owns these tables: chunks have no triggers, no
//! constraints beyond NOT NULL (every column is filled or allowed NULL here), no
//! generated columns, and the id decides the chunk, so the partition bound holds.
use crate::error::Result;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

unsafe extern "C-unwind" {
    // commands/sequence.h; not in pgrx's bindings.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// One row of a table of the log, as datums in the table's column order. By-reference
/// datums must live in the current memory context until `insert` returns.
pub struct Row {
    pub values: Vec<pg_sys::Datum>,
    pub nulls: Vec<bool>,
}

thread_local! {
    /// (table, chunk) -> relation oid. Chunk numbers are never reused for another table
    /// (they only grow), so an entry stays right until the chunk is dropped.
    static CHUNKS: RefCell<HashMap<(&'static str, i32), pg_sys::Oid>> = RefCell::new(HashMap::new());
}

/// The next `n` ids from `pgvpn.packet_id`, in order. They may straddle a chunk boundary
/// if prune() moved the sequence meanwhile; `insert` splits by chunk.
pub fn next_ids(seq: pg_sys::Oid, n: usize) -> Vec<i64> {
    // SAFETY: `seq` is pgvpn.packet_id (looked up by name); permissions are ours (we run
    // as the extension owner), so the check is skipped like nextval() on a sequence we own.
    (0..n)
        .map(|_| unsafe { nextval_internal(seq, false) })
        .collect()
}

/// The oid of the relation named `pgvpn.<name>`.
pub fn relid(name: &std::ffi::CStr) -> pg_sys::Oid {
    // SAFETY: catalog lookups by name inside a transaction; raise if missing.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"pgvpn".as_ptr(), false);
        let oid = pg_sys::get_relname_relid(name.as_ptr(), ns);
        if oid == pg_sys::InvalidOid {
            pgrx::error!(
                "pgvpn: relation pgvpn.{} is missing",
                name.to_string_lossy()
            );
        }
        oid
    }
}

fn chunk_relid(table: &'static str, catalog: &str, chunk: i32) -> Result<pg_sys::Oid> {
    if let Some(oid) = CHUNKS.with(|c| c.borrow().get(&(table, chunk)).copied()) {
        return Ok(oid);
    }
    let oid = Spi::get_one_with_args::<pg_sys::Oid>(
        &format!("SELECT {catalog}::oid FROM pgvpn.chunks WHERE chunk = $1"),
        &[chunk.into()],
    )?
    .unwrap_or_else(|| pgrx::error!("pgvpn: chunk {chunk} of the log does not exist"));
    CHUNKS.with(|c| c.borrow_mut().insert((table, chunk), oid));
    Ok(oid)
}

/// Inserts `rows` (each tagged with its chunk) into the chunks of `table` (the partitioned
/// parent `parent`), `catalog` naming the column of `pgvpn.chunks` that holds the chunk
/// tables' oids.
pub fn insert(
    parent: pg_sys::Oid,
    table: &'static str,
    catalog: &str,
    rows: Vec<(i32, Row)>,
) -> Result<()> {
    // SAFETY: the parent exists (our own table); RowExclusiveLock is what INSERT takes,
    // held to the end of the transaction so prune() cannot drop a chunk under us.
    unsafe { pg_sys::LockRelationOid(parent, pg_sys::RowExclusiveLock as _) };
    let mut start = 0;
    while start < rows.len() {
        let chunk = rows[start].0;
        let end = start + rows[start..].iter().take_while(|r| r.0 == chunk).count();
        let oid = chunk_relid(table, catalog, chunk)?;
        // SAFETY: see `insert_into`.
        unsafe { insert_into(oid, &rows[start..end]) };
        start = end;
    }
    // SAFETY: makes the rows visible to the rest of this transaction (tests read back).
    unsafe { pg_sys::CommandCounterIncrement() };
    Ok(())
}

/// SAFETY: `oid` is a chunk of a pgvpn log table and every row's datums match its
/// columns (count, types, by-reference datums valid for the duration of the call).
unsafe fn insert_into(oid: pg_sys::Oid, rows: &[(i32, Row)]) {
    // SAFETY: the caller's contract; each call below is the documented protocol COPY
    // follows (copyfrom.c): open with RowExclusiveLock, a ResultRelInfo with its indexes,
    // virtual slots filled and stored, one heap_multi_insert, then the index entries of
    // each inserted slot (whose tts_tid heap_multi_insert set), then teardown.
    unsafe {
        let rel = pg_sys::table_open(oid, pg_sys::RowExclusiveLock as _);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);

        let mut slots: Vec<*mut pg_sys::TupleTableSlot> = Vec::with_capacity(rows.len());
        for (_, row) in rows {
            assert_eq!(
                row.values.len(),
                natts,
                "pgvpn: row shape does not match its table"
            );
            let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsVirtual);
            pg_sys::ExecClearTuple(slot);
            for i in 0..natts {
                *(*slot).tts_values.add(i) = row.values[i];
                *(*slot).tts_isnull.add(i) = row.nulls[i];
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            slots.push(slot);
        }
        let bistate = pg_sys::GetBulkInsertState();
        pg_sys::heap_multi_insert(
            rel,
            slots.as_mut_ptr(),
            slots.len() as i32,
            pg_sys::GetCurrentCommandId(true),
            0,
            bistate,
        );
        pg_sys::FreeBulkInsertState(bistate);
        if (*rri).ri_NumIndices > 0 {
            for &slot in &slots {
                pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    false,
                    false,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
                // The per-tuple context holds the index datums of this one row.
                let econtext = (*estate).es_per_tuple_exprcontext;
                if !econtext.is_null() {
                    pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
                }
            }
        }
        for slot in slots {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as _);
    }
}

/// A by-reference `bytea` datum copied from `bytes`, in the current memory context.
pub fn bytea(bytes: &[u8]) -> pg_sys::Datum {
    let size = pg_sys::VARHDRSZ + bytes.len();
    // SAFETY: palloc returns `size` writable bytes (or raises); the header and the copy
    // fill them exactly.
    unsafe {
        let p = pg_sys::palloc(size).cast::<u8>();
        pgrx::set_varsize_4b(p.cast::<pg_sys::varlena>(), size as i32);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(pg_sys::VARHDRSZ), bytes.len());
        pg_sys::Datum::from(p)
    }
}
