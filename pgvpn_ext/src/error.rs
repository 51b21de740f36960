//! One error type for the SQL API, each variant with the SQLSTATE a client can act on.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::spi::SpiError;
use pgrx::PgSqlErrorCode as Code;
use pgrx::{function_name, PgLogLevel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("role \"{0}\" is not a pgvpn peer")]
    NotAPeer(String),
    #[error("max_packets must be between 1 and {max}, got {got}")]
    BadMaxPackets { got: i32, max: i32 },
    #[error("max_bytes must be between 1 and {max}, got {got}")]
    BadMaxBytes { got: i32, max: i32 },
    #[error("wait_ms must be between 0 and {max}, got {got}")]
    BadWait { got: i32, max: i32 },
    #[error("after_id must not be negative, got {0}")]
    NegativeAfter(i64),
    #[error("upto_id must not be negative, got {0}")]
    NegativeAck(i64),
    #[error("cannot ack id {upto_id}: peer \"{peer}\" has no packet with an id that high")]
    AckBeyondNewest { upto_id: i64, peer: String },
    #[error("a batch may hold at most {max} packets, got {got}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("a transaction may send at most {max} bytes of packets, this one would send {got}")]
    TooManyBytes { got: usize, max: usize },
    #[error("pgvpn.{0} cannot run in a {1} transaction")]
    WrongIsolation(&'static str, &'static str),
    #[error("pgvpn.send cannot run in a read-only transaction")]
    ReadOnly,
    #[error("cannot PREPARE a transaction that sent packets or changed pgvpn peers")]
    Prepare,
    #[error("pgvpn must be loaded with shared_preload_libraries")]
    NotPreloaded,
    #[error("pgvpn's shared memory is full: all {0} peer slots are taken (raise pgvpn.max_peers and restart)")]
    TooManyPeers(u32),
    #[error("pgvpn internal SPI error: {0}")]
    Spi(#[from] SpiError),
}

impl Error {
    fn code(&self) -> Code {
        match self {
            Error::NotAPeer(_) => Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Error::BadMaxPackets { .. }
            | Error::BadMaxBytes { .. }
            | Error::BadWait { .. }
            | Error::NegativeAfter(_)
            | Error::NegativeAck(_)
            | Error::AckBeyondNewest { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            Error::BatchTooLarge { .. } | Error::TooManyBytes { .. } => {
                Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED
            }
            Error::WrongIsolation(..) => Code::ERRCODE_ACTIVE_SQL_TRANSACTION,
            Error::ReadOnly => Code::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            Error::Prepare => Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            Error::NotPreloaded => Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::TooManyPeers(_) => Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            Error::Spi(_) => Code::ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            Error::NotPreloaded => Some(
                "Add pgvpn to shared_preload_libraries in postgresql.conf and restart the server.",
            ),
            Error::WrongIsolation(..) => Some(
                "Use READ COMMITTED: pgvpn checks who may send what against the current peers.",
            ),
            _ => None,
        }
    }

    /// Raise as a Postgres ERROR (aborts the statement; never returns).
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code(), self.to_string(), function_name!());
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Unwrap an API result, turning an `Error` into a proper SQL error.
pub fn or_raise<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| e.raise())
}
