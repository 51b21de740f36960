//! What the SQL-level specs (`tests/tests/{delivery,routing,security,retention,notify}.rs`)
//! share: the address plan, a cluster with peers, tagged packets, SQLSTATE checks, and
//! the implementation under test ([`Api`]) with its drivers:
//!
//! * [`exactly_once`] — concurrent senders with random commit delays against one reader;
//! * [`interleave`] — schedules of steps over several sessions, blocking detected the way
//!   isolationtester does it;
//! * [`naive`] — deliberately naive outboxes, the negative controls of both drivers.

pub mod exactly_once;
pub mod interleave;
pub mod naive;

use crate::cluster::{db_error, sqlstate, Cluster};
use crate::packet;
use crate::sql::create_peer;

pub const DB: &str = "vpn";

// Address plan (all inside 198.18.0.0/15; IPv6 from a ULA).
pub const A4: &str = "198.18.1.1";
pub const B4: &str = "198.18.1.2";
pub const C4: &str = "198.18.1.3";
/// The receivers of the delivery specs.
pub const R4: &str = "198.18.1.9";
pub const S4: &str = "198.18.1.10";
pub const A6: &str = "fd00:5067:7670::1:1";
pub const B6: &str = "fd00:5067:7670::1:2";

/// How the specs talk to an outbox: pgvpn ([`PGVPN`]) or a control ([`naive`]).
pub struct Api {
    /// `$1 bytea[]` → the number of packets accepted.
    pub send_sql: &'static str,
    /// `($1 after_id bigint, $2 max_packets int, $3 wait_ms int)` → rows of (id, payload).
    pub recv_sql: &'static str,
}

/// pgvpn itself, through the very statements the shim sends.
pub const PGVPN: Api = Api {
    send_sql: pgvpn_core::sql::SEND,
    recv_sql: pgvpn_core::sql::RECV,
};

fn cidr(a: &str) -> String {
    if a.contains(':') {
        format!("{a}/128")
    } else {
        format!("{a}/32")
    }
}

/// A cluster with the extension in database [`DB`] and the given peers (name, addresses).
pub fn setup(peers: &[(&str, &[&str])]) -> Cluster {
    let cluster = Cluster::with_pgvpn(DB);
    for (name, addrs) in peers {
        let cidrs: Vec<String> = addrs.iter().map(|a| cidr(a)).collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        create_peer(&cluster, DB, name, &refs);
    }
    cluster
}

/// Assert that `r` failed with SQLSTATE `code`.
#[track_caller]
pub fn expect_sqlstate<T: std::fmt::Debug>(r: Result<T, postgres::Error>, code: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected SQLSTATE {code}, but it succeeded: {v:?}"),
        Err(e) => assert_eq!(
            sqlstate(&e).as_deref(),
            Some(code),
            "{what}: expected SQLSTATE {code}, got: {}",
            db_error(&e)
        ),
    }
}

/// A UDP packet whose payload is `tag`, so a receiver can tell packets apart.
pub fn udp_tagged(src: &str, dst: &str, tag: &str) -> Vec<u8> {
    packet::udp(src, dst, 40000, 5000, tag.as_bytes())
}

/// The tag of a packet made by [`udp_tagged`].
pub fn tag_of(p: &[u8]) -> String {
    let s = packet::parse(p).unwrap_or_else(|| panic!("recv returned an unparsable packet: {p:?}"));
    String::from_utf8_lossy(&s.payload).into_owned()
}

/// The tags of `recv` rows, in order.
pub fn tags(rows: &[(i64, Vec<u8>)]) -> Vec<String> {
    rows.iter().map(|(_, p)| tag_of(p)).collect()
}
