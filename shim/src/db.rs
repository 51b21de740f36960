//! The real database: the two sessions and the SQL the shim runs (all of it here, from
//! `pgvpn_core::sql`). Connecting is conn.rs's business, and how a postgres error becomes
//! the shim's [`DbError`] classify.rs's.

use std::time::Duration;

use postgres::{Client, Statement};

use pgvpn_core::limits::MAX_WAIT_MS;
use pgvpn_core::sql;

use crate::conn::{connect, Settings};
use crate::error::DbError;
use crate::io::{Database, DownlinkSession, UplinkSession};

/// The database named by a connection string. Opening a session goes through
/// [`connect`].
pub struct Postgres {
    settings: Settings,
}

impl Postgres {
    pub fn new(settings: Settings) -> Postgres {
        Postgres { settings }
    }
}

impl Database for Postgres {
    type Uplink = PgUplink;
    type Downlink = PgDownlink;

    fn open_uplink(&self) -> Result<PgUplink, DbError> {
        PgUplink::open(&self.settings)
    }

    fn open_downlink(&self) -> Result<PgDownlink, DbError> {
        PgDownlink::open(&self.settings)
    }
}

fn whoami(client: &mut Client) -> Result<String, postgres::Error> {
    client.query_one(sql::WHOAMI, &[])?.try_get(0)
}

/// The uplink connection: only pgvpn.send().
pub struct PgUplink {
    client: Client,
    send: Statement,
}

impl PgUplink {
    pub fn open(pg: &Settings) -> Result<PgUplink, DbError> {
        let mut client = connect(pg, "pgvpn-shim uplink")?;
        whoami(&mut client)?;
        let send = client.prepare(sql::SEND)?;
        Ok(PgUplink { client, send })
    }
}

impl UplinkSession for PgUplink {
    fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, DbError> {
        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        let accepted: Option<i64> = self.client.query_one(&self.send, &[&refs])?.try_get(0)?;
        Ok(accepted.unwrap_or(0).max(0) as u64)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// The downlink connection: pgvpn.recv() (a long poll the database ends when a send to
/// us commits), pgvpn.ack().
pub struct PgDownlink {
    client: Client,
    recv: Statement,
    ack: Statement,
    pub role: String,
    stored_cursor: i64,
}

impl PgDownlink {
    /// Connects, prepares and reads the stored cursor.
    pub fn open(pg: &Settings) -> Result<PgDownlink, DbError> {
        let mut client = connect(pg, "pgvpn-shim downlink")?;
        let role = whoami(&mut client)?;
        let recv = client.prepare(sql::RECV)?;
        let ack = client.prepare(sql::ACK)?;
        let stored_cursor: Option<i64> = client.query_one(sql::CURSOR, &[])?.try_get(0)?;
        Ok(PgDownlink {
            client,
            recv,
            ack,
            role,
            stored_cursor: stored_cursor.unwrap_or(0),
        })
    }
}

impl DownlinkSession for PgDownlink {
    fn stored_cursor(&self) -> i64 {
        self.stored_cursor
    }

    fn recv(
        &mut self,
        after: i64,
        limit: usize,
        wait: Duration,
        each: &mut dyn FnMut(i64, Option<&[u8]>),
    ) -> Result<usize, DbError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let wait_ms = wait.as_millis().min(MAX_WAIT_MS as u128) as i32;
        let rows = self.client.query(&self.recv, &[&after, &limit, &wait_ms])?;
        for row in &rows {
            each(row.try_get(0)?, row.try_get(1)?);
        }
        Ok(rows.len())
    }

    fn ack(&mut self, upto: i64) -> Result<i64, DbError> {
        let v: Option<i64> = self.client.query_one(&self.ack, &[&upto])?.try_get(0)?;
        Ok(v.unwrap_or(upto))
    }
}
