//! Deliberately naive outboxes: the negative controls. The specs' checks run against
//! them must fail, which shows that the checks can fail. They need no extension.

use super::Api;
use crate::cluster::{db_error, Cluster};
use pgvpn_core::sql::quote_literal;

/// Ids from a bigserial, `recv` = "id > after": the outbox "sequence gap" trap. A sender
/// that commits after a later one leaves a row behind every reader's cursor.
pub const NAIVE: Api = Api {
    send_sql: "SELECT naive.send($1::bytea[])",
    recv_sql: "SELECT id, payload FROM naive.recv($1::bigint, $2::int, $3::int)",
};

/// Like [`NAIVE`], but a send also locks each receiver's row packet by packet, in the
/// batch's order: per-row locking, as pgvpn's send would lock without sorting its
/// receivers, so two batches naming two receivers in opposite orders can deadlock.
pub const NAIVE_LOCKING: Api = Api {
    send_sql: "SELECT naive_locking.send($1::bytea[])",
    recv_sql: "SELECT id, payload FROM naive_locking.recv($1::bigint, $2::int, $3::int)",
};

/// Installs [`NAIVE`] in `db` (one queue for everyone, any role may use it).
pub fn install_naive(cluster: &Cluster, db: &str) {
    let mut su = cluster.superuser(db);
    su.batch_execute(
        "CREATE SCHEMA naive;
         CREATE TABLE naive.q (id bigserial PRIMARY KEY, payload bytea NOT NULL);
         CREATE FUNCTION naive.send(p bytea[]) RETURNS bigint LANGUAGE sql AS
           $$ WITH i AS (INSERT INTO naive.q (payload) SELECT unnest(p) RETURNING 1) SELECT count(*) FROM i $$;
         CREATE FUNCTION naive.recv(after bigint, n int, wait_ms int) RETURNS TABLE (id bigint, payload bytea)
           LANGUAGE sql STABLE AS $$ SELECT id, payload FROM naive.q WHERE id > after ORDER BY id LIMIT n $$;
         GRANT USAGE ON SCHEMA naive TO PUBLIC;
         GRANT SELECT, INSERT ON naive.q TO PUBLIC;
         GRANT USAGE ON SEQUENCE naive.q_id_seq TO PUBLIC;",
    )
    .unwrap_or_else(|e| panic!("naive outbox: {}", db_error(&e)));
}

/// Installs [`NAIVE_LOCKING`] in `db`, with a row for each receiver address (IPv4; a
/// packet's receiver is its destination address). The rows are locked, not updated: an
/// update would make waiters re-find the row's new version after the holder commits, and
/// which of them gets it first is a race; a lock is handed to the first waiter.
pub fn install_naive_locking(cluster: &Cluster, db: &str, receivers: &[&str]) {
    let rows: Vec<String> = receivers
        .iter()
        .map(|a| format!("({}::inet)", quote_literal(a)))
        .collect();
    let mut su = cluster.superuser(db);
    su.batch_execute(&format!(
        "CREATE SCHEMA naive_locking;
         CREATE TABLE naive_locking.q (id bigserial PRIMARY KEY, payload bytea NOT NULL);
         CREATE TABLE naive_locking.receivers (addr inet PRIMARY KEY);
         INSERT INTO naive_locking.receivers VALUES {};
         CREATE FUNCTION naive_locking.send(p bytea[]) RETURNS bigint LANGUAGE plpgsql AS $$
           DECLARE pkt bytea;
           BEGIN
             FOREACH pkt IN ARRAY p LOOP
               PERFORM 1 FROM naive_locking.receivers
                 WHERE addr = format('%s.%s.%s.%s', get_byte(pkt, 16), get_byte(pkt, 17),
                                     get_byte(pkt, 18), get_byte(pkt, 19))::inet
                   FOR UPDATE;
               INSERT INTO naive_locking.q (payload) VALUES (pkt);
             END LOOP;
             RETURN cardinality(p);
           END $$;
         CREATE FUNCTION naive_locking.recv(after bigint, n int, wait_ms int)
           RETURNS TABLE (id bigint, payload bytea) LANGUAGE sql STABLE AS
           $$ SELECT id, payload FROM naive_locking.q WHERE id > after ORDER BY id LIMIT n $$;
         GRANT USAGE ON SCHEMA naive_locking TO PUBLIC;
         GRANT SELECT, INSERT ON naive_locking.q TO PUBLIC;
         GRANT SELECT, UPDATE ON naive_locking.receivers TO PUBLIC;  -- FOR UPDATE needs both
         GRANT USAGE ON SEQUENCE naive_locking.q_id_seq TO PUBLIC;",
        rows.join(", ")
    ))
    .unwrap_or_else(|e| panic!("naive locking outbox: {}", db_error(&e)));
}
