//! Reading the packet log in id order, for the history and for following it live.
//!
//! Pages: keyset pagination on id (`id > $after AND id <= $upto ORDER BY id LIMIT n`),
//! never OFFSET; each page is its own short statement whose rows are streamed from the
//! socket as they are written out, so memory stays flat whatever the range. No
//! transaction spans pages: a long capture holds no snapshot and no lock between them.
//!
//! The settled head. Ids are taken at commit under the receivers' ordering locks
//! (pgvpn_ext/src/send.rs), which orders each receiver's packets, but two senders to
//! *different* receivers can still commit out of id order: a reader of the whole log that
//! saw id N may later meet a smaller id. So the reader never goes past the *settled*
//! head: the largest visible id M such that no transaction can still commit an id at or
//! below M. A transaction that took ids holds its receivers' ordering locks from before it
//! took them until its commit is visible; M's transaction committed before the statement
//! that read M, so any transaction still holding an id below M took it before then and
//! holds its locks; those the same statement sees in pg_locks. Once all of them are gone
//! (they are in their commit, which takes milliseconds), everything up to M is visible.
//! Newer lock holders took their ids later, above M, and do not matter.
//!
//! Following: [`Log::wait`] (`pgvpn.log_wait`) sleeps until a transaction that logged
//! packets commits, never on a timer: the token it waits on is read before the rows, and
//! changes only after a commit is visible.

use std::time::{Duration, SystemTime};

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Statement};

use pgvpn_core::limits::MAX_WAIT_MS;

use super::error::ToolError;
use super::filter::{Filter, Param};

/// Rows per page: a statement of a few MB at the default MTU, streamed.
pub const PAGE_ROWS: i64 = 2000;

/// The first wait for the lock holders below the head to finish: they are committing,
/// and their commit wakes us (the bound covers one that rolls back, which wakes nobody).
/// It doubles while they are still there (a commit waiting for a synchronous standby),
/// up to [`SETTLE_WAIT_MAX_MS`].
const SETTLE_WAIT_MS: u64 = 20;
const SETTLE_WAIT_MAX_MS: u64 = 1000;

/// The largest visible id and, read after it, the transactions that hold a receiver's
/// ordering lock (pgvpn_ext/src/log.rs: object locks of class pgvpn.peers, object = the
/// receiver's id; object 0 is the routing lock, which senders only share).
const HEAD: &str = "SELECT coalesce((SELECT max(id) FROM pgvpn.packets), 0), \
    ARRAY(SELECT l.virtualtransaction FROM pg_catalog.pg_locks l \
           WHERE l.locktype = 'object' AND l.classid = 'pgvpn.peers'::regclass \
             AND l.objid <> 0 AND l.mode = 'ExclusiveLock' AND l.granted \
             AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                WHERE datname = current_database()))";

/// The token, and the lock holders now (the token first: a commit after it wakes a wait).
const HOLDERS: &str = "SELECT pgvpn.log_generation(), \
    ARRAY(SELECT l.virtualtransaction FROM pg_catalog.pg_locks l \
           WHERE l.locktype = 'object' AND l.classid = 'pgvpn.peers'::regclass \
             AND l.objid <> 0 AND l.mode = 'ExclusiveLock' AND l.granted \
             AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                WHERE datname = current_database()))";

const GENERATION: &str = "SELECT pgvpn.log_generation()";
const WAIT: &str = "SELECT pgvpn.log_wait($1::bigint, $2::int)";

/// One logged packet.
pub struct Row<'a> {
    pub id: i64,
    pub sent_at: SystemTime,
    pub src_peer: i32,
    pub dst_peer: i32,
    pub payload: &'a [u8],
}

/// The log, read with one filter.
pub struct Log {
    page: Statement,
    filter_params: Vec<Param>,
}

impl Log {
    pub fn new(client: &mut Client, filter: &Filter) -> Result<Log, ToolError> {
        let (conditions, filter_params) = filter.conditions(4);
        let sql = format!(
            "SELECT id, sent_at, src_peer, dst_peer, payload FROM pgvpn.packets \
             WHERE id > $1 AND id <= $2{conditions} ORDER BY id LIMIT $3"
        );
        let page = client.prepare(&sql)?;
        Ok(Log {
            page,
            filter_params,
        })
    }

    /// The current token of the log (see `pgvpn.log_generation`).
    pub fn generation(&self, client: &mut Client) -> Result<i64, ToolError> {
        Ok(client.query_one(GENERATION, &[])?.try_get(0)?)
    }

    /// Waits until the token differs from `token` or `wait` passes; returns the token.
    pub fn wait(&self, client: &mut Client, token: i64, wait: Duration) -> Result<i64, ToolError> {
        let ms = wait.as_millis().min(MAX_WAIT_MS as u128) as i32;
        Ok(client.query_one(WAIT, &[&token, &ms])?.try_get(0)?)
    }

    /// The largest id visible now: the end of a capture of the log as it is (a
    /// transaction still committing below it is not in it).
    pub fn head(&self, client: &mut Client) -> Result<i64, ToolError> {
        Ok(client.query_one(HEAD, &[])?.try_get(0)?)
    }

    /// The settled head (see the module comment): every id at or below it that will ever
    /// be visible is visible now. `stopping` ends the wait early (returns None).
    pub fn settled_head(
        &self,
        client: &mut Client,
        stopping: &dyn Fn() -> bool,
    ) -> Result<Option<i64>, ToolError> {
        let row = client.query_one(HEAD, &[])?;
        let head: i64 = row.try_get(0)?;
        let mut holders: Vec<String> = row.try_get(1)?;
        let mut wait = Duration::from_millis(SETTLE_WAIT_MS);
        while !holders.is_empty() {
            if stopping() {
                return Ok(None);
            }
            let row = client.query_one(HOLDERS, &[])?;
            let token: i64 = row.try_get(0)?;
            let now: Vec<String> = row.try_get(1)?;
            holders.retain(|h| now.contains(h));
            if !holders.is_empty() {
                self.wait(client, token, wait)?;
                wait = (wait * 2).min(Duration::from_millis(SETTLE_WAIT_MAX_MS));
            }
        }
        Ok(Some(head))
    }

    /// Calls `each` for the matching rows with `after < id <= upto`, in id order, at most
    /// [`PAGE_ROWS`] of them; returns how many there were and the last id.
    pub fn page(
        &self,
        client: &mut Client,
        after: i64,
        upto: i64,
        each: &mut dyn FnMut(&Row<'_>) -> Result<(), ToolError>,
    ) -> Result<(i64, i64), ToolError> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &upto, &PAGE_ROWS];
        params.extend(
            self.filter_params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync)),
        );
        let mut rows = client.query_raw(&self.page, params)?;
        let (mut n, mut last) = (0, after);
        while let Some(r) = rows.next()? {
            let row = Row {
                id: r.try_get(0)?,
                sent_at: r.try_get(1)?,
                src_peer: r.try_get(2)?,
                dst_peer: r.try_get(3)?,
                payload: r.try_get(4)?,
            };
            last = row.id;
            n += 1;
            each(&row)?;
        }
        Ok((n, last))
    }
}
