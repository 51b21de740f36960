//! pgvpn-shim as a library: everything but `main`. The `pgvpn-shim` binary (main.rs) only
//! parses flags and wires the threads; the admin tool and the test harness use the same
//! connection code ([`conn`]) and errors ([`error`]).
//!
//! Layers, each using only those below it:
//! * `config` (the shim's flags), `device` (the real tun), `db` (the real PostgreSQL
//!   sessions) | `uplink`, `downlink` (the loops, which know the two only through the
//!   traits in `io`)
//! * `conn` (connection string → settings → a connected client) over `conninfo` (the
//!   connection string's syntax), `pgpass` (~/.pgpass), `tls` (OpenSSL, certificate
//!   errors), `classify` (a postgres error → [`error::DbError`]); `io` (the traits),
//!   `backoff` (reconnecting), `error` (the shim's errors)
//! * `runtime` (stop flag, fatal errors, exit codes, threads), `stats` (counters)

pub mod backoff;
pub mod classify;
pub mod config;
pub mod conn;
pub mod conninfo;
pub mod db;
pub mod device;
pub mod downlink;
pub mod error;
#[cfg(test)]
mod fakes;
pub mod fq;
pub mod io;
pub mod pgpass;
pub mod runtime;
pub mod stats;
pub mod tls;
pub mod uplink;
