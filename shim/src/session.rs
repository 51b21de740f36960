//! Database sessions: connecting, the SQL the shim runs (all of it is here), error
//! classification and reconnect backoff.

use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Row, Statement};

use pgvpn_core::limits::MAX_WAIT_MS;
use pgvpn_core::sql::{self, quote_ident};

/// Rows asked of one pgvpn.recv() call. A full page means "more may be waiting".
pub const RECV_PAGE: i32 = 1024;

/// What to do about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server is unreachable, restarting, overloaded, or the connection broke:
    /// reconnect with backoff, never exit.
    Transient,
    /// Authentication failed, the role is not a pgvpn peer, or lacks a privilege
    /// (SQLSTATE class 28 or 42501): exit code 3.
    Denied,
    /// Anything else (the extension is missing, the database does not exist, an unexpected
    /// error inside a function): fatal at startup (exit 1); at run time logged and survived.
    Other,
}

impl ErrorClass {
    /// Exit code when this error ends the process.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Denied => crate::EXIT_DENIED,
            ErrorClass::Transient | ErrorClass::Other => crate::EXIT_FATAL,
        }
    }
}

pub fn classify(e: &postgres::Error) -> ErrorClass {
    classify_parts(e.code(), &e.to_string())
}

/// `display` is the error's Display text, used only for errors without a SQLSTATE.
pub fn classify_parts(code: Option<&SqlState>, display: &str) -> ErrorClass {
    let Some(code) = code else {
        // Client-side errors. The postgres crate reports "server wants a password but none
        // was given" as a configuration error and unsupported / failed SASL exchanges as
        // authentication errors; everything else without a SQLSTATE is I/O, a closed
        // connection, a refused connect or a timeout.
        return if display.starts_with("authentication error")
            || display.starts_with("invalid configuration")
        {
            ErrorClass::Denied
        } else {
            ErrorClass::Transient
        };
    };
    let code = code.code();
    match code {
        _ if code.starts_with("28") || code == "42501" => ErrorClass::Denied,
        // 08 connection exception, 53 insufficient resources (too many connections, disk
        // full, out of memory), 58 system error (I/O), 57P01..57P05 admin/crash shutdown,
        // cannot connect now (starting up, recovery), idle timeouts; 57014 query canceled;
        // 40001/40P01 serialization failure / deadlock; 25006 read-only transaction (a
        // standby after failover: a new connection may reach the new primary); 55P03 lock
        // not available.
        _ if code.starts_with("08") || code.starts_with("53") || code.starts_with("58") => {
            ErrorClass::Transient
        }
        "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "57014" | "40001" | "40P01" | "25006"
        | "55P03" => ErrorClass::Transient,
        _ => ErrorClass::Other,
    }
}

/// The error on one line (the Display of a database error has DETAIL/HINT lines).
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split('\n')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// An error and its causes ("error connecting to server: Connection refused"), one line.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    one_line(&s)
}

/// A database error, described for a log line: message plus SQLSTATE when there is one.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", one_line(db), db.code().code()),
        None => with_causes(e),
    }
}

/// Exponential backoff: 100 ms, 200 ms, ... capped at 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// How a reconnect loop ended without a session.
#[derive(Debug)]
pub enum GaveUp {
    /// Shutdown was requested while waiting.
    Stopped,
    /// A fatal error (class Denied, or Other at startup).
    Fatal(ErrorClass, String),
}

/// Calls `open` until it succeeds. Between attempts calls `wait(delay)`, which sleeps (or
/// does useful work) for about `delay` and returns false if the shim is shutting down.
/// Transient errors are retried forever; `Denied` always gives up; `Other` gives up only if
/// `other_is_fatal` (at startup), else is retried with a warning.
pub fn retry_open<T>(
    what: &str,
    other_is_fatal: bool,
    mut open: impl FnMut() -> Result<T, postgres::Error>,
    mut wait: impl FnMut(Duration) -> bool,
) -> Result<T, GaveUp> {
    let mut backoff = Backoff::new();
    let mut attempt = 0u64;
    loop {
        match open() {
            Ok(s) => return Ok(s),
            Err(e) => {
                attempt += 1;
                let class = classify(&e);
                let msg = describe(&e);
                match class {
                    ErrorClass::Denied => return Err(GaveUp::Fatal(class, msg)),
                    ErrorClass::Other if other_is_fatal => return Err(GaveUp::Fatal(class, msg)),
                    ErrorClass::Other => log::warn!("{what}: {msg}; retrying"),
                    ErrorClass::Transient if attempt == 1 && other_is_fatal => {
                        // At startup say once why nothing happens (a wrong socket path looks
                        // exactly like a database that is still starting).
                        log::warn!("{what}: database not reachable yet ({msg}); retrying")
                    }
                    ErrorClass::Transient => log::debug!("{what}: attempt {attempt}: {msg}"),
                }
            }
        }
        if !wait(backoff.next_delay()) {
            return Err(GaveUp::Stopped);
        }
    }
}

fn connect(pg: &postgres::Config, purpose: &str) -> Result<(Client, String), postgres::Error> {
    let mut pg = pg.clone();
    if pg.get_application_name().is_none() {
        pg.application_name(&format!("pgvpn-shim {purpose}"));
    }
    let mut client = pg.connect(NoTls)?;
    let role: String = client.query_one(sql::WHOAMI, &[])?.get(0);
    Ok((client, role))
}

/// The uplink connection: only pgvpn.send().
pub struct Uplink {
    client: Client,
    send: Statement,
}

impl Uplink {
    pub fn open(pg: &postgres::Config) -> Result<Uplink, postgres::Error> {
        let (mut client, _role) = connect(pg, "uplink")?;
        let send = client.prepare(sql::SEND)?;
        Ok(Uplink { client, send })
    }

    /// Sends a batch; returns how many packets the database accepted.
    pub fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, postgres::Error> {
        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        let accepted: Option<i64> = self.client.query_one(&self.send, &[&refs])?.get(0);
        Ok(accepted.unwrap_or(0).max(0) as u64)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// The downlink connection: LISTEN, pgvpn.recv(), pgvpn.ack().
pub struct Downlink {
    client: Client,
    recv: Statement,
    ack: Statement,
    pub role: String,
    pub channel: String,
    /// The cursor stored in the database when this connection was opened.
    pub stored_cursor: i64,
}

impl Downlink {
    /// Connects, prepares, LISTENs on the peer's channel and reads the stored cursor, in
    /// that order: LISTEN before the first recv, so no wake-up can be missed.
    pub fn open(pg: &postgres::Config) -> Result<Downlink, postgres::Error> {
        let (mut client, role) = connect(pg, "downlink")?;
        let recv = client.prepare(sql::RECV)?;
        let ack = client.prepare(sql::ACK)?;
        let channel: String = client.query_one(sql::CHANNEL, &[])?.get(0);
        client.batch_execute(&format!("LISTEN {}", quote_ident(&channel)))?;
        let stored_cursor: Option<i64> = client.query_one(sql::CURSOR, &[])?.get(0);
        Ok(Downlink {
            client,
            recv,
            ack,
            role,
            channel,
            stored_cursor: stored_cursor.unwrap_or(0),
        })
    }

    /// The caller's packets with id > `after`, in id order, at most [`RECV_PAGE`]; if
    /// there are none, the database waits up to `wait` for some (a long poll that our
    /// LISTEN wakes). Columns: 0 = id (i64), 1 = payload (&[u8]).
    pub fn recv(&mut self, after: i64, wait: Duration) -> Result<Vec<Row>, postgres::Error> {
        let wait_ms = wait.as_millis().min(MAX_WAIT_MS as u128) as i32;
        let rows = self
            .client
            .query(&self.recv, &[&after, &RECV_PAGE, &wait_ms])?;
        // The wake-ups did their work inside recv; drop the copies queued for us.
        self.client.notifications().iter().count()?;
        Ok(rows)
    }

    /// Stores the delivery cursor; returns the stored value.
    pub fn ack(&mut self, upto: i64) -> Result<i64, postgres::Error> {
        let v: Option<i64> = self.client.query_one(&self.ack, &[&upto])?.get(0);
        Ok(v.unwrap_or(upto))
    }
}

/// Sleeps `d` in short slices, returning false early if `stop` is set.
pub fn sleep_unless_stopped(d: Duration, stop: &std::sync::atomic::AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: &str) -> ErrorClass {
        classify_parts(Some(&SqlState::from_code(code)), "db error")
    }

    #[test]
    fn sqlstate_classes() {
        // authentication / not a peer / no privilege → exit 3
        for c in ["28000", "28P01", "42501"] {
            assert_eq!(class(c), ErrorClass::Denied, "{c}");
            assert_eq!(class(c).exit_code(), 3);
        }
        for c in [
            "08006", "08001", "57P01", "57P02", "57P03", "53300", "58030", "40001", "40P01",
            "25006", "57014",
        ] {
            assert_eq!(class(c), ErrorClass::Transient, "{c}");
        }
        // extension missing, database missing, an error raised inside a function
        for c in ["42883", "3F000", "3D000", "P0001", "XX000", "22023"] {
            assert_eq!(class(c), ErrorClass::Other, "{c}");
            assert_eq!(class(c).exit_code(), 1);
        }
    }

    #[test]
    fn client_side_errors() {
        let c = |s| classify_parts(None, s);
        assert_eq!(
            c("error connecting to server: Connection refused (os error 111)"),
            ErrorClass::Transient
        );
        assert_eq!(c("connection closed"), ErrorClass::Transient);
        assert_eq!(
            c("error communicating with the server: Broken pipe"),
            ErrorClass::Transient
        );
        assert_eq!(c("timeout waiting for server"), ErrorClass::Transient);
        assert_eq!(
            c("invalid configuration: password missing"),
            ErrorClass::Denied
        );
        assert_eq!(
            c("authentication error: unsupported SASL mechanism"),
            ErrorClass::Denied
        );
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn retry_open_behaviour() {
        // transient errors are retried with growing delays until success
        let mut n = 0;
        let mut waits = vec![];
        let r = retry_open(
            "t",
            true,
            || {
                n += 1;
                if n < 4 {
                    Err(postgres::Error::__private_api_timeout())
                } else {
                    Ok(n)
                }
            },
            |d| {
                waits.push(d.as_millis());
                true
            },
        );
        assert_eq!(r.unwrap(), 4);
        assert_eq!(waits, [100, 200, 400]);
        // stop requested while waiting
        let r: Result<(), _> = retry_open(
            "t",
            true,
            || Err(postgres::Error::__private_api_timeout()),
            |_| false,
        );
        assert!(matches!(r, Err(GaveUp::Stopped)));
    }

    #[test]
    fn one_line_joins_detail_and_hint() {
        assert_eq!(
            one_line(&"ERROR: x\nDETAIL: y\nHINT: z"),
            "ERROR: x; DETAIL: y; HINT: z"
        );
    }
}
