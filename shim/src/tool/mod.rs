//! The `pgvpn` command line: flags, dispatch, exit codes.
//!
//! Layers, each using only those below it:
//! * `capture` (the capture command), `show` (the show command)
//! * `log` (reading the packet log: the settled head, pages by id, waits for commits),
//!   `filter` (capture's filters as SQL), `pcap` (the capture file formats), `progress`
//!   (the progress line), `human` (sizes and times as wg prints them)
//! * `session` (connecting as the shim does, the auditor check), `error` (exit codes)

mod capture;
mod error;
mod filter;
mod human;
mod log;
mod pcap;
mod progress;
mod session;
mod show;

use clap::{Parser, Subcommand};

/// The administrator's and auditor's tool for pgvpn.
///
/// It reads the packet log and the statistics that the pgvpn extension keeps, as a role
/// that is a member of pgvpn_auditor (read-only; a peer's role may not read the log).
///
/// Exit codes: 0 success (also after SIGINT/SIGTERM ends a capture), 1 other error,
/// 2 bad flags or connection string (or a certificate or key file it names is missing or
/// unusable), 3 authentication failed / server certificate not accepted / the role may
/// not read the log (not a member of pgvpn_auditor).
#[derive(Debug, Parser)]
#[command(name = "pgvpn", version, about, long_about)]
pub struct Cli {
    /// Connection string, as for pgvpn-shim: libpq key=value ("host=db.example
    /// user=auditor dbname=vpn") or URL, with libpq's keywords and PG* variables (PGHOST,
    /// PGUSER, PGSSLROOTCERT, ...; the string wins) and ~/.pgpass. Empty: everything from
    /// the environment (host defaults to the unix socket directory /var/run/postgresql,
    /// user to the OS user). Over TCP the default is sslmode=verify-full with
    /// ~/.postgresql/root.crt.
    #[arg(
        long,
        global = true,
        env = "PGVPN_DB",
        value_name = "CONNINFO",
        hide_env_values = true,
        default_value = ""
    )]
    pub db: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Capture(capture::CaptureArgs),
    Show(show::ShowArgs),
}

/// Parses the command line, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit()); // usage errors exit 2
    let result = match cli.command {
        Command::Capture(args) => capture::run(&cli.db, args),
        Command::Show(args) => show::run(&cli.db, args),
    };
    match result {
        Ok(()) => error::EXIT_OK,
        Err(e) => {
            eprintln!("pgvpn: error: {e}");
            e.exit_code()
        }
    }
}
