//! pgvpn's core: everything about packets and routing that needs no PostgreSQL and does
//! no I/O, shared by the extension (`pgvpn_ext`), the shim and the tests.
//!
//! * [`decode`] — one raw IP packet into the header fields the log keeps;
//! * [`route`] — WireGuard-style AllowedIPs: longest-prefix routing (a trie) and the
//!   source check, and the reasons a packet is rejected;
//! * [`cidr`] — the one CIDR parser (`198.18.0.1/15`, `fd00::/64`, a bare address);
//! * [`limits`] — the bounds of the SQL API and the shim's defaults, each in one place;
//! * [`sql`] — the statements a client sends, and identifier quoting;
//! * [`rng`] — a small deterministic generator for jitter and test data.
//!
//! `cargo test -p pgvpn_core` runs as a plain user: no root, no database, no pgrx.

pub mod cidr;
pub mod decode;
pub mod limits;
pub mod rng;
pub mod route;
pub mod sql;

pub use decode::{decode, DecodeError, Header};
pub use route::{PeerId, Reject, Table};
