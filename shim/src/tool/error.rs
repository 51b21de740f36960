//! The tool's errors and their exit codes (the shim's codes, where they mean the same).

use std::fmt;

use pgvpn_shim::error::{DbError, ErrorClass, SettingsError};
pub use pgvpn_shim::runtime::{EXIT_DENIED, EXIT_FATAL, EXIT_OK, EXIT_USAGE};

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolError {
    /// Bad flags, connection string or argument found after connecting (exit 2).
    Usage(String),
    /// Authentication failed, certificate refused, or the role may not read the log
    /// (exit 3).
    Denied(String),
    /// Anything else (exit 1).
    Failed(String),
}

impl ToolError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ToolError::Usage(_) => EXIT_USAGE,
            ToolError::Denied(_) => EXIT_DENIED,
            ToolError::Failed(_) => EXIT_FATAL,
        }
    }

    /// The same error, with what was being done in front.
    pub fn context(self, what: &str) -> ToolError {
        match self {
            ToolError::Usage(m) => ToolError::Usage(format!("{what}: {m}")),
            ToolError::Denied(m) => ToolError::Denied(format!("{what}: {m}")),
            ToolError::Failed(m) => ToolError::Failed(format!("{what}: {m}")),
        }
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::Usage(m) | ToolError::Denied(m) | ToolError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ToolError {}

impl From<DbError> for ToolError {
    fn from(e: DbError) -> ToolError {
        match e.class {
            ErrorClass::Denied => ToolError::Denied(e.message),
            ErrorClass::Transient | ErrorClass::Other => ToolError::Failed(e.message),
        }
    }
}

impl From<postgres::Error> for ToolError {
    fn from(e: postgres::Error) -> ToolError {
        DbError::from(e).into()
    }
}

impl From<SettingsError> for ToolError {
    fn from(e: SettingsError) -> ToolError {
        ToolError::Usage(format!("--db: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_shim() {
        assert_eq!(ToolError::Usage("x".into()).exit_code(), 2);
        assert_eq!(ToolError::Denied("x".into()).exit_code(), 3);
        assert_eq!(ToolError::Failed("x".into()).exit_code(), 1);
        let d: ToolError = DbError::new(ErrorClass::Denied, "no").into();
        assert_eq!(d, ToolError::Denied("no".into()));
        let t: ToolError = DbError::new(ErrorClass::Transient, "down").into();
        assert_eq!(t.exit_code(), 1);
        assert_eq!(
            ToolError::Denied("refused".into())
                .context("connect")
                .to_string(),
            "connect: refused"
        );
    }
}
