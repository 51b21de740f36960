//! One error type for the SQL API, each variant with the SQLSTATE a client can act on.
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use pgrx::PgSqlErrorCode as Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("role \"{0}\" is not a pgvpn peer")]
    NotAPeer(String),
    #[error("max_packets must be between 1 and {max}, got {got}")]
    BadMaxPackets { got: i32, max: i32 },
    #[error("wait_ms must be between 0 and {max}, got {got}")]
    BadWait { got: i32, max: i32 },
    #[error("upto_id must not be negative, got {0}")]
    NegativeAck(i64),
    #[error("cannot ack id {upto_id}: peer \"{peer}\" has no packet with an id that high")]
    AckBeyondNewest { upto_id: i64, peer: String },
    #[error("a batch may hold at most {max} packets, got {got}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("pgvpn internal SPI error: {0}")]
    Spi(#[from] SpiError),
}

impl Error {
    fn code(&self) -> Code {
        match self {
            Error::NotAPeer(_) => Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Error::BadMaxPackets { .. }
            | Error::BadWait { .. }
            | Error::NegativeAck(_)
            | Error::AckBeyondNewest { .. } => Code::ERRCODE_INVALID_PARAMETER_VALUE,
            Error::BatchTooLarge { .. } => Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            Error::Spi(_) => Code::ERRCODE_INTERNAL_ERROR,
        }
    }

    /// Raise as a Postgres ERROR (aborts the statement; never returns).
    pub fn raise(self) -> ! {
        let code = self.code();
        ereport!(ERROR, code, self.to_string());
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Unwrap an API result, turning an `Error` into a proper SQL error.
pub fn or_raise<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| e.raise())
}
