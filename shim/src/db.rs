//! The real database: the two sessions and the SQL the shim runs (all of it here, from
//! `pgvpn_core::sql`). Connecting is conn.rs's business, and how a postgres error becomes
//! the shim's [`DbError`] classify.rs's.
//!
//! How long a call may hang: a dead or partitioned server over TCP is noticed by the
//! keepalives and tcp_user_timeout that conn.rs sets (about 10 s, whether the connection
//! is idle, waiting for an answer, or has data unacknowledged); a server process that dies
//! closes its end of a unix socket at once. A server that is alive but stuck (a lock
//! queue) is bounded by [`STATEMENT_TIMEOUT`], which the shim's sessions get unless the
//! connection string's options set statement_timeout. Not bounded, on purpose: a send
//! waiting for a synchronous standby to confirm its commit (statement_timeout does not
//! cover a commit's wait; cancelling it would deliver packets the standby does not have).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::config::TargetSessionAttrs;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Statement};

use pgvpn_core::limits::MAX_WAIT_MS;
use pgvpn_core::sql;

use crate::conn::{connect, Settings};
use crate::error::DbError;
use crate::io::{Database, DownlinkSession, Expired, UplinkSession};

/// statement_timeout for the shim's sessions unless the connection string sets one: a
/// send takes milliseconds, the long poll at most 100 ms (downlink.rs).
pub const STATEMENT_TIMEOUT: &str = "10s";

/// How long [`PgUplink::check`] looks for a word from the server: enough for the runtime
/// to read what is already in the socket.
const CHECK_LOOK: Duration = Duration::from_millis(1);

/// The database named by a connection string. Opening a session goes through
/// [`connect`].
pub struct Postgres {
    settings: Settings,
}

impl Postgres {
    /// With several hosts, only a writable one will do (the shim's sessions insert and
    /// update), whatever target_session_attrs says: after a failover the shim then finds
    /// the promoted standby by itself, and never settles on a read-only server.
    pub fn new(settings: Settings) -> Postgres {
        let mut settings = settings.with_default_setting("statement_timeout", STATEMENT_TIMEOUT);
        if settings.targets().len() > 1
            && settings.config().get_target_session_attrs() != TargetSessionAttrs::ReadWrite
        {
            log::info!(
                "{} hosts: connecting to whichever allows writes (target_session_attrs=read-write)",
                settings.targets().len()
            );
            settings = settings.read_write();
        }
        Postgres { settings }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
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

    fn check(&mut self) -> Result<(), DbError> {
        // The client reads the socket only while a call runs: a FATAL message and the end
        // of the stream wait there unread. Waiting a moment for a notification (this
        // session never LISTENs) lets it read them: an error if the server hung up.
        self.client
            .notifications()
            .timeout_iter(CHECK_LOOK)
            .next()?;
        if self.client.is_closed() {
            return Err(DbError::new(
                crate::error::ErrorClass::Transient,
                "the server closed the connection",
            ));
        }
        Ok(())
    }
}

/// The DETAIL of pgvpn.recv()'s NOTICE about packets that expired unread (see
/// pgvpn_ext/src/deliver.rs): `expired_packets=N expired_upto=ID`, in any order, other
/// words ignored. `None` for any other text.
pub fn parse_expired(detail: &str) -> Option<Expired> {
    let (mut packets, mut upto) = (None, None);
    for word in detail.split_whitespace() {
        match word.split_once('=') {
            Some(("expired_packets", v)) => packets = Some(v.parse().ok()?),
            Some(("expired_upto", v)) => upto = Some(v.parse().ok()?),
            _ => {}
        }
    }
    Some(Expired {
        packets: packets?,
        upto: upto?,
    })
}

/// Expiry reports of one session, parsed by its notice callback (which runs inside the
/// client's calls, on the downlink thread), waiting for the downlink loop.
type Reports = Arc<Mutex<Vec<Expired>>>;

/// The notice callback of a downlink session: expiry reports go to `reports`; any other
/// notice is logged as the postgres crate does by default.
fn on_notice(reports: Reports) -> impl Fn(postgres::error::DbError) + Send + Sync + 'static {
    move |n| match n.detail().and_then(parse_expired) {
        Some(e) => reports.lock().unwrap_or_else(|p| p.into_inner()).push(e),
        None => log::info!("{}: {}", n.severity(), n.message()),
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
    expired: Reports,
}

impl PgDownlink {
    /// Connects, prepares and reads the stored cursor.
    pub fn open(pg: &Settings) -> Result<PgDownlink, DbError> {
        let expired = Reports::default();
        let pg = pg.with_notice_callback(on_notice(expired.clone()));
        let mut client = connect(&pg, "pgvpn-shim downlink")?;
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
            expired,
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

    fn take_expired(&mut self) -> Vec<Expired> {
        std::mem::take(&mut *self.expired.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_notice_detail_is_parsed() {
        // As pgvpn_ext/src/deliver.rs writes it.
        assert_eq!(
            parse_expired("expired_packets=254 expired_upto=5072"),
            Some(Expired {
                packets: 254,
                upto: 5072
            })
        );
        // Order and extra words do not matter.
        assert_eq!(
            parse_expired("  expired_upto=9 other=x expired_packets=0\n"),
            Some(Expired {
                packets: 0,
                upto: 9
            })
        );
        // Anything else is not an expiry report.
        for other in [
            "",
            "expired_packets=3",
            "expired_upto=3",
            "expired_packets=x expired_upto=3",
            "expired_packets=3 expired_upto=",
            "Key (id)=(3) already exists.",
        ] {
            assert_eq!(parse_expired(other), None, "{other:?}");
        }
    }
}
