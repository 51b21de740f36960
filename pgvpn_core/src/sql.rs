//! The statements a pgvpn client sends, in one place: the shim runs them, the tests run
//! the very same strings. Every one of them is exercised by the test suite.

/// The calling role, as the server sees it.
pub const WHOAMI: &str = "SELECT current_user::text";
/// `pgvpn.send(bytea[])`: returns how many packets were accepted.
pub const SEND: &str = "SELECT pgvpn.send($1::bytea[])";
/// `pgvpn.recv(after_id, max_packets, wait_ms)`: rows of (id, payload). Called in the
/// select list (a ProjectSet), not in FROM: a function in FROM is first copied whole into
/// a tuplestore, while this way each row streams to the client as recv produces it.
pub const RECV: &str = "SELECT (r).id, (r).payload \
    FROM (SELECT pgvpn.recv($1::bigint, $2::int, $3::int) AS r OFFSET 0) AS page";
/// `pgvpn.ack(upto_id)`: returns the stored cursor.
pub const ACK: &str = "SELECT pgvpn.ack($1::bigint)";
/// `pgvpn.cursor()`: the stored cursor.
pub const CURSOR: &str = "SELECT pgvpn.cursor()";

/// Quotes an SQL identifier: "name", with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal: 'text', with embedded quotes doubled.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("pgvpn_alice"), "\"pgvpn_alice\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
