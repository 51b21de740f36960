//! How a postgres error becomes the shim's [`DbError`]: classified by SQLSTATE, or by its
//! structure when there is none, and described on one line.

use std::error::Error as StdError;

use postgres::error::SqlState;
use postgres::tls::NoTlsError;
use postgres::types::{WasNull, WrongType};

use crate::error::{one_line, with_causes, DbError, ErrorClass};

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> DbError {
        DbError::new(classify(&e), describe(&e))
    }
}

pub fn classify(e: &postgres::Error) -> ErrorClass {
    match e.code() {
        Some(code) => classify_sqlstate(code),
        None => classify_client(e.is_closed(), e.source()),
    }
}

/// SQLSTATEs after which a new connection may well succeed.
const TRANSIENT_STATES: &[SqlState] = &[
    SqlState::ADMIN_SHUTDOWN,            // 57P01
    SqlState::CRASH_SHUTDOWN,            // 57P02
    SqlState::CANNOT_CONNECT_NOW,        // 57P03 starting up, in recovery
    SqlState::DATABASE_DROPPED,          // 57P04
    SqlState::IDLE_SESSION_TIMEOUT,      // 57P05
    SqlState::QUERY_CANCELED,            // 57014
    SqlState::T_R_SERIALIZATION_FAILURE, // 40001
    SqlState::T_R_DEADLOCK_DETECTED,     // 40P01
    // A standby after failover: a new connection may reach the new primary.
    SqlState::READ_ONLY_SQL_TRANSACTION, // 25006
    SqlState::LOCK_NOT_AVAILABLE,        // 55P03
];

pub fn classify_sqlstate(code: &SqlState) -> ErrorClass {
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return ErrorClass::Denied;
    }
    if TRANSIENT_STATES.contains(code) {
        return ErrorClass::Transient;
    }
    // By class: 28 invalid authorization (bad password, no pg_hba entry, not a peer);
    // 08 connection exception, 53 insufficient resources (too many connections, disk
    // full, out of memory), 58 system error (I/O).
    match code.code().get(..2) {
        Some("28") => ErrorClass::Denied,
        Some("08" | "53" | "58") => ErrorClass::Transient,
        _ => ErrorClass::Other,
    }
}

/// An error raised by the client library itself (no SQLSTATE), by its structure:
/// * the connection is closed, the cause is an `io::Error` (refused, reset, no such
///   socket, connect timeout, an unparsable reply), or there is no cause at all (timeout
///   waiting for the server, an unexpected message): transient. So is `NoTls` meeting
///   sslmode=require, as it always was;
/// * the cause is a type conversion (`WrongType`, `WasNull`: the SQL and the extension
///   disagree): other;
/// * any other cause is one of the library's own messages for authentication and
///   configuration errors ("password missing" when the server wants a password and none
///   was given, "unsupported SASL mechanism", channel binding required; also "server does
///   not support TLS" under sslmode=require): denied.
///
/// A SCRAM exchange that fails on the client side (the server's proof is wrong) has an
/// `io::Error` cause and so counts as transient: structure alone cannot tell it from a
/// garbled reply.
pub fn classify_client(closed: bool, source: Option<&(dyn StdError + 'static)>) -> ErrorClass {
    let Some(cause) = source else {
        return ErrorClass::Transient;
    };
    if closed || cause.is::<std::io::Error>() || cause.is::<NoTlsError>() {
        ErrorClass::Transient
    } else if cause.is::<WrongType>() || cause.is::<WasNull>() {
        ErrorClass::Other
    } else {
        ErrorClass::Denied
    }
}

/// A database error, described for a log line: message plus SQLSTATE when there is one.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", one_line(db), db.code().code()),
        None => with_causes(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::time::Duration;

    fn class(code: &str) -> ErrorClass {
        classify_sqlstate(&SqlState::from_code(code))
    }

    #[test]
    fn sqlstate_classes() {
        // authentication / not a peer / no privilege → exit 3
        for c in ["28000", "28P01", "42501"] {
            assert_eq!(class(c), ErrorClass::Denied, "{c}");
            assert_eq!(class(c).exit_code(), 3);
        }
        for c in [
            "08006", "08001", "57P01", "57P02", "57P03", "57P04", "57P05", "53300", "53100",
            "58030", "40001", "40P01", "25006", "57014", "55P03",
        ] {
            assert_eq!(class(c), ErrorClass::Transient, "{c}");
        }
        // extension missing, database missing, an error raised inside a function
        for c in [
            "42883", "3F000", "3D000", "P0001", "XX000", "22023", "42P01",
        ] {
            assert_eq!(class(c), ErrorClass::Other, "{c}");
            assert_eq!(class(c).exit_code(), 1);
        }
    }

    #[test]
    fn client_side_errors_by_structure() {
        let io = |k| std::io::Error::new(k, "x");
        let c = |closed, e: &(dyn StdError + 'static)| classify_client(closed, Some(e));
        use std::io::ErrorKind::*;
        for k in [
            ConnectionRefused,
            NotFound,
            BrokenPipe,
            TimedOut,
            InvalidInput,
        ] {
            assert_eq!(c(false, &io(k)), ErrorClass::Transient, "{k:?}");
        }
        assert_eq!(
            classify_client(false, None),
            ErrorClass::Transient,
            "timeout"
        );
        assert_eq!(classify_client(true, None), ErrorClass::Transient, "closed");
        let msg: Box<dyn StdError + Send + Sync> = "password missing".into();
        assert_eq!(c(false, &*msg), ErrorClass::Denied);
        assert_eq!(c(true, &*msg), ErrorClass::Transient, "closed wins");
        assert_eq!(c(false, &WasNull), ErrorClass::Other);
    }

    /// A directory of its own under the temp dir, removed on drop.
    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new() -> SocketDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("pgvpn-shim-db-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            SocketDir(p)
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Connects to a one-shot stand-in server on a unix socket that reads the startup
    /// message, answers `reply` and hangs up; returns the client's error. With `reply`
    /// `None` there is no server at all.
    fn connect_error(reply: Option<Vec<u8>>) -> postgres::Error {
        let dir = SocketDir::new();
        let server = reply.map(|reply| {
            let listener = UnixListener::bind(dir.0.join(".s.PGSQL.5432")).unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                s.read_exact(&mut rest).unwrap();
                s.write_all(&reply).unwrap();
            })
        });
        let mut pg = postgres::Config::new();
        pg.host_path(&dir.0).port(5432).user("alice").dbname("vpn");
        pg.connect_timeout(Duration::from_secs(5));
        // The postgres crate directly, as conn.rs connects over a unix socket: the
        // classification of its errors is what is tested here.
        let err = match pg.connect(postgres::NoTls) {
            Ok(_) => panic!("connected to a stand-in server"),
            Err(e) => e,
        };
        if let Some(t) = server {
            t.join().unwrap();
        }
        err
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn auth_request(code: u32) -> Vec<u8> {
        message(b'R', &code.to_be_bytes())
    }

    fn error_response(code: &str, msg: &str) -> Vec<u8> {
        let mut body = vec![];
        for (f, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', msg)] {
            body.push(f);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        message(b'E', &body)
    }

    #[test]
    fn real_client_errors_are_classified() {
        // The server wants a cleartext password (3) and none was given: the postgres
        // crate's "invalid configuration: password missing", no SQLSTATE.
        let e = connect_error(Some(auth_request(3)));
        assert!(e.code().is_none(), "{e}");
        assert_eq!(classify(&e), ErrorClass::Denied, "{}", describe(&e));
        // Kerberos (2): "authentication error: unsupported authentication method".
        let e = connect_error(Some(auth_request(2)));
        assert_eq!(classify(&e), ErrorClass::Denied, "{}", describe(&e));

        // Errors from the server carry a SQLSTATE.
        let e = connect_error(Some(error_response(
            "28P01",
            "password authentication failed",
        )));
        assert_eq!(classify(&e), ErrorClass::Denied);
        assert_eq!(
            describe(&e),
            "FATAL: password authentication failed (SQLSTATE 28P01)"
        );
        let starting = error_response("57P03", "the database system is starting up");
        assert_eq!(
            classify(&connect_error(Some(starting))),
            ErrorClass::Transient
        );
        let no_db = error_response("3D000", "database \"vpn\" does not exist");
        let e = connect_error(Some(no_db));
        assert_eq!(classify(&e), ErrorClass::Other);
        let d = DbError::from(e);
        assert_eq!(d.class, ErrorClass::Other);
        assert!(d.message.ends_with("(SQLSTATE 3D000)"), "{}", d.message);

        // Hung up without a word, not a PostgreSQL server, no server at all: transient.
        let e = connect_error(Some(vec![]));
        assert_eq!(classify(&e), ErrorClass::Transient, "{}", describe(&e));
        let e = connect_error(Some(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()));
        assert_eq!(classify(&e), ErrorClass::Transient, "{}", describe(&e));
        let e = connect_error(None);
        assert_eq!(classify(&e), ErrorClass::Transient, "{}", describe(&e));
        assert!(
            describe(&e).starts_with("error connecting to server: "),
            "{}",
            describe(&e)
        );
    }
}
