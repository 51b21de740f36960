//! The shim's own errors. [`DbError`]: a failed database call, what to do about it
//! ([`ErrorClass`]) and what to say (a one-line message); the loops work on this type only,
//! classify.rs converts postgres errors into it, and the test fakes build it directly.
//! [`SettingsError`]: the connection string, the environment or a file it names is wrong
//! (exit code 2, found before connecting).

use std::path::PathBuf;

use crate::runtime::{EXIT_DENIED, EXIT_FATAL};

/// What to do about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server is unreachable, restarting, overloaded, or the connection broke:
    /// reconnect with backoff, never exit.
    Transient,
    /// Authentication failed, the role is not a pgvpn peer, or lacks a privilege:
    /// exit code 3.
    Denied,
    /// Anything else (the extension is missing, the database does not exist, an unexpected
    /// error inside a function): fatal at startup (exit 1); at run time logged and survived.
    Other,
}

impl ErrorClass {
    /// Exit code when this error ends the process.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Denied => EXIT_DENIED,
            ErrorClass::Transient | ErrorClass::Other => EXIT_FATAL,
        }
    }
}

/// A failed database call: its class and a one-line description for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DbError {
    pub class: ErrorClass,
    pub message: String,
}

impl DbError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> DbError {
        DbError {
            class,
            message: message.into(),
        }
    }
}

/// Why a connection string (with the PG* environment and the files it names) cannot be
/// used. Always found at startup, before connecting; the shim exits 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Not a key=value list or a postgresql:// URL.
    #[error("invalid connection string: {0}")]
    Syntax(String),
    #[error("invalid connection option \"{0}\"")]
    UnknownKeyword(String),
    /// A libpq keyword this client does not implement.
    #[error("connection option \"{keyword}\" is not supported: {why}")]
    Unsupported { keyword: String, why: &'static str },
    #[error("invalid {keyword} value: \"{value}\" ({expected})")]
    InvalidValue {
        keyword: &'static str,
        value: String,
        expected: &'static str,
    },
    /// Values that contradict each other (host and hostaddr counts, sslmode and sslrootcert).
    #[error("{0}")]
    Conflict(String),
    /// A certificate, key or CA file is missing, unreadable or unusable.
    #[error("{what} \"{}\": {problem}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ErrorClass::Denied.exit_code(), 3);
        assert_eq!(ErrorClass::Other.exit_code(), 1);
        assert_eq!(ErrorClass::Transient.exit_code(), 1);
    }

    #[test]
    fn settings_errors_name_the_file() {
        let e = SettingsError::File {
            what: "client certificate file",
            path: "/etc/x.crt".into(),
            problem: "does not exist".into(),
        };
        assert_eq!(
            e.to_string(),
            "client certificate file \"/etc/x.crt\": does not exist"
        );
        let e = SettingsError::InvalidValue {
            keyword: "port",
            value: "x".into(),
            expected: "a number from 1 to 65535",
        };
        assert_eq!(
            e.to_string(),
            "invalid port value: \"x\" (a number from 1 to 65535)"
        );
    }

    #[test]
    fn one_line_joins_detail_and_hint() {
        assert_eq!(
            one_line(&"ERROR: x\nDETAIL: y\nHINT: z"),
            "ERROR: x; DETAIL: y; HINT: z"
        );
    }

    #[test]
    fn with_causes_follows_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused\n(second line)",
        ));
        assert_eq!(
            with_causes(&e),
            "error connecting to server: Connection refused; (second line)"
        );
    }
}
