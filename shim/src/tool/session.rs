//! One database session for a command: connected exactly as the shim connects (the
//! library's `conn`: libpq keywords, PG* variables, ~/.pgpass, verified TLS), read-only,
//! and checked for the right to read what the command reads.

use postgres::{CancelToken, Client, NoTls};
use postgres_openssl::MakeTlsConnector;

use pgvpn_core::sql::WHOAMI;
use pgvpn_shim::conn::{self, Settings};

use super::error::ToolError;

/// Every statement is planned for its parameters: the capture's host and time filters
/// only reach an index when the planner sees their values, and a page is worth a plan.
/// Nothing the tool runs writes.
const SESSION_SETUP: &str =
    "SET plan_cache_mode = force_custom_plan; SET default_transaction_read_only = on";

/// What a role needs to read the log: `relation` must exist and be readable.
const CAN_READ: &str = "SELECT to_regclass($1) IS NOT NULL, \
     CASE WHEN to_regclass($1) IS NOT NULL THEN has_table_privilege($1, 'SELECT') END, \
     current_database()::text";

pub struct Session {
    pub client: Client,
    settings: Settings,
    /// The role the server sees (`current_user`).
    pub role: String,
}

impl Session {
    /// Connects for `command` (which names the session: application_name "pgvpn show").
    pub fn open(db: &str, command: &str) -> Result<Session, ToolError> {
        let settings = conn::parse(db)?;
        for w in settings.warnings() {
            eprintln!("pgvpn: warning: {w}");
        }
        let mut client = conn::connect(&settings, &format!("pgvpn {command}"))
            .map_err(|e| ToolError::from(e).context("connecting to the database"))?;
        client.batch_execute(SESSION_SETUP)?;
        let role: String = client.query_one(WHOAMI, &[])?.try_get(0)?;
        Ok(Session {
            client,
            settings,
            role,
        })
    }

    /// Fails with exit code 3 and a message that says what to do unless this role may
    /// read `relation` (pgvpn_auditor's right); with exit code 1 if pgvpn is not there.
    pub fn require_reader(&mut self, command: &str, relation: &str) -> Result<(), ToolError> {
        let denied = |why: &str| {
            ToolError::Denied(format!(
                "role \"{}\" may not read {relation}{why}: pgvpn {command} needs a role that is \
                 a member of pgvpn_auditor (GRANT pgvpn_auditor TO {})",
                self.role,
                pgvpn_core::sql::quote_ident(&self.role)
            ))
        };
        let row = match self.client.query_one(CAN_READ, &[&relation]) {
            Ok(r) => r,
            // No USAGE on the schema: the name cannot even be looked up.
            Err(e) if e.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                let db = e.as_db_error().map(|d| d.message().to_string());
                return Err(denied(&format!(" ({})", db.unwrap_or_default())));
            }
            Err(e) => return Err(e.into()),
        };
        let (exists, readable, dbname): (bool, Option<bool>, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if !exists {
            return Err(ToolError::Failed(format!(
                "{relation} does not exist: is the pgvpn extension installed in database \"{dbname}\"?"
            )));
        }
        if readable != Some(true) {
            return Err(denied(""));
        }
        Ok(())
    }

    /// Something another thread can use to cancel the statement this session runs.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            token: self.client.cancel_token(),
            tls: self.settings.tls().map(|t| t.connector().0),
        }
    }
}

/// Cancels the running statement (a cancel request on a connection of its own, over TLS
/// if the session uses TLS).
pub struct Canceller {
    token: CancelToken,
    tls: Option<MakeTlsConnector>,
}

impl Canceller {
    /// Best effort: if the server cannot be reached, the statement ends on its own.
    pub fn cancel(&self) {
        let r = match &self.tls {
            Some(tls) => self.token.cancel_query(tls.clone()),
            None => self.token.cancel_query(NoTls),
        };
        if let Err(e) = r {
            eprintln!("pgvpn: could not cancel the running statement: {e}");
        }
    }
}
