//! What a pgvpn database holds, in a form two databases can be compared by: every
//! table's rows (count and digest), every sequence's position, the chunk catalog, and
//! the partitions of the log. Used by the backup and upgrade specs ("the restored copy
//! holds exactly what the source held").

use crate::cluster::db_error;
use postgres::Client;
use std::collections::BTreeMap;

/// One line per table and sequence of a schema: `table pgvpn.x` → `rows=N md5=…`,
/// `sequence pgvpn.y` → `last_value=N is_called=b`.
pub type Snapshot = BTreeMap<String, String>;

/// Snapshot of every table (ordinary tables and partitions: rows in a chunk are
/// compared per chunk) and sequence in `schema`. Rows are digested as their text form,
/// sorted, so the digest does not depend on physical order.
pub fn snapshot(c: &mut Client, schema: &str) -> Snapshot {
    let mut out = Snapshot::new();
    let rels = c
        .query(
            "SELECT format('%I.%I', n.nspname, r.relname), r.relkind::text \
               FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace \
              WHERE n.nspname = $1 AND r.relkind IN ('r', 'S') ORDER BY 1",
            &[&schema],
        )
        .unwrap_or_else(|e| panic!("list relations of {schema}: {}", db_error(&e)));
    for row in rels {
        let name: String = row.get(0);
        let kind: String = row.get(1);
        if kind == "S" {
            let r = c
                .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
                .unwrap_or_else(|e| panic!("read sequence {name}: {}", db_error(&e)));
            let (v, called): (i64, bool) = (r.get(0), r.get(1));
            out.insert(
                format!("sequence {name}"),
                format!("last_value={v} is_called={called}"),
            );
        } else {
            out.insert(format!("table {name}"), table_digest(c, &name));
        }
    }
    out
}

/// Snapshot of every view in `schema`: what the auditors see (`view pgvpn.x` →
/// `rows=N md5=…`).
pub fn views(c: &mut Client, schema: &str) -> Snapshot {
    let names: Vec<String> = c
        .query(
            "SELECT format('%I.%I', n.nspname, r.relname) FROM pg_class r \
               JOIN pg_namespace n ON n.oid = r.relnamespace \
              WHERE n.nspname = $1 AND r.relkind = 'v' ORDER BY 1",
            &[&schema],
        )
        .unwrap_or_else(|e| panic!("list views of {schema}: {}", db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect();
    names
        .into_iter()
        .map(|v| {
            let d = digest_of(c, &v);
            (format!("view {v}"), d)
        })
        .collect()
}

/// The columns of every table and view of `schema` (for [`snapshot_columns`]).
pub fn columns(c: &mut Client, schema: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let rows = c
        .query(
            "SELECT CASE r.relkind WHEN 'v' THEN 'view ' ELSE 'table ' END || \
                    format('%I.%I', n.nspname, r.relname), quote_ident(a.attname) \
               FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace \
               JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped \
              WHERE n.nspname = $1 AND r.relkind IN ('r', 'v') ORDER BY 1, a.attnum",
            &[&schema],
        )
        .unwrap_or_else(|e| panic!("columns of {schema}: {}", db_error(&e)));
    for r in rows {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    out
}

/// Digests of the given tables and views, each over the given columns only (what an
/// older version had: an upgrade may add columns, but the old ones keep their values).
/// A relation or column that is gone is reported as such.
pub fn snapshot_columns(c: &mut Client, cols: &BTreeMap<String, Vec<String>>) -> Snapshot {
    cols.iter()
        .map(|(key, cs)| {
            let from = match key.split_once(' ') {
                Some(("table", rel)) => format!("ONLY {rel}"),
                Some((_, rel)) => rel.to_string(),
                None => key.clone(),
            };
            let sql = format!(
                "SELECT count(*), coalesce(md5(string_agg(t.x, E'\\n' ORDER BY t.x)), '-') \
                   FROM (SELECT ({})::text AS x FROM {from} r) t",
                cs.iter()
                    .map(|c| format!("r.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if cs.len() == 1 { ", NULL" } else { "" }
            );
            let v = match c.query_one(&sql, &[]) {
                Ok(r) => format!("rows={} md5={}", r.get::<_, i64>(0), r.get::<_, String>(1)),
                Err(e) => format!("unreadable: {}", db_error(&e)),
            };
            (format!("{key} ({} columns)", cs.len()), v)
        })
        .collect()
}

/// `rows=N md5=…` of one table (ONLY that table: a partitioned parent's rows are in its
/// partitions).
pub fn table_digest(c: &mut Client, table: &str) -> String {
    digest_of(c, &format!("ONLY {table}"))
}

fn digest_of(c: &mut Client, from: &str) -> String {
    let r = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t.x, E'\\n' ORDER BY t.x)), '-') \
                   FROM (SELECT r::text AS x FROM {from} r) t"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("digest of {from}: {}", db_error(&e)));
    let (n, md5): (i64, String) = (r.get(0), r.get(1));
    format!("rows={n} md5={md5}")
}

/// The entries on which two snapshots differ, one line each (empty if equal).
pub fn diff(a: &Snapshot, b: &Snapshot, a_name: &str, b_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => out.push(format!("{k}: {a_name} {va}, missing in {b_name}")),
            Some(vb) if vb != va => out.push(format!("{k}: {a_name} {va}, {b_name} {vb}")),
            Some(_) => {}
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            out.push(format!("{k}: missing in {a_name}, {b_name} {vb}"));
        }
    }
    out
}

/// Every packet: (id, digest of the whole row), in id order.
pub fn packets(c: &mut Client) -> Vec<(i64, String)> {
    c.query(
        "SELECT id, md5(p::text) FROM pgvpn.packets p ORDER BY id, md5(p::text)",
        &[],
    )
    .unwrap_or_else(|e| panic!("read pgvpn.packets: {}", db_error(&e)))
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// One chunk as the catalog has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub chunk: i32,
    pub relid: String,
    pub opened: bool,
    pub closed: bool,
    pub indexed: bool,
}

pub fn chunks(c: &mut Client) -> Vec<Chunk> {
    c.query(
        "SELECT chunk, relid::text, opened_at IS NOT NULL, closed_at IS NOT NULL, \
                indexed_at IS NOT NULL FROM pgvpn.chunks ORDER BY chunk",
        &[],
    )
    .unwrap_or_else(|e| panic!("read pgvpn.chunks: {}", db_error(&e)))
    .iter()
    .map(|r| Chunk {
        chunk: r.get(0),
        relid: r.get(1),
        opened: r.get(2),
        closed: r.get(3),
        indexed: r.get(4),
    })
    .collect()
}

/// Problems with the chunk catalog, one line each (empty if it holds): every partition
/// of a partitioned table in schema pgvpn (the log, and any other table partitioned
/// with it) is named by a `regclass` column of `pgvpn.chunks` and vice versa, each
/// chunk's partition covers exactly its id range (the flow summaries': its chunk
/// number), no partition belongs to the extension
/// (pg_dump would skip it), and each chunk of the log has its delivery index (and its
/// host-pair index once the catalog says it was built).
pub fn chunk_catalog_problems(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    let cols: Vec<String> = c
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute \
              WHERE attrelid = 'pgvpn.chunks'::regclass AND attnum > 0 AND NOT attisdropped \
                AND atttypid = 'regclass'::regtype ORDER BY attnum",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let listed_sql = cols
        .iter()
        .map(|col| {
            format!("SELECT chunk, {col}::oid AS rel FROM pgvpn.chunks WHERE {col} IS NOT NULL")
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows = c
        .query(
            &format!(
                "WITH listed AS ({listed_sql}), \
                 parts AS (SELECT i.inhrelid AS rel, i.inhparent AS parent, \
                                  pg_get_expr(k.relpartbound, k.oid) AS bound \
                             FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                             JOIN pg_class k ON k.oid = i.inhrelid \
                            WHERE p.relnamespace = 'pgvpn'::regnamespace AND p.relkind = 'p') \
                 SELECT coalesce(l.chunk, -1), coalesce(l.rel, p.rel)::regclass::text, \
                        p.rel IS NOT NULL, l.rel IS NOT NULL, p.bound, \
                        EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                                   AND d.objid = coalesce(l.rel, p.rel) AND d.deptype = 'e'), \
                        p.parent = 'pgvpn.flow_sums'::regclass \
                   FROM listed l FULL JOIN parts p ON p.rel = l.rel ORDER BY 1, 2"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("chunk catalog check: {}", db_error(&e)));
    for r in rows {
        let (chunk, rel, attached, listed): (i32, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let bound: Option<String> = r.get(4);
        let member: bool = r.get(5);
        let by_chunk: Option<bool> = r.get(6);
        if !attached {
            out.push(format!(
                "chunk {chunk}: {rel} is in pgvpn.chunks but not attached"
            ));
        }
        if !listed {
            out.push(format!(
                "{rel} is a partition that pgvpn.chunks does not know"
            ));
        }
        if member {
            out.push(format!(
                "chunk {chunk}: {rel} is a member of the extension (pg_dump skips it)"
            ));
        }
        if let (true, Some(b)) = (listed, bound) {
            // The log and the flow index by id; the flow summaries by chunk number.
            let want = if by_chunk == Some(true) {
                format!("FOR VALUES FROM ({chunk}) TO ({})", chunk + 1)
            } else {
                let lo = i64::from(chunk) << 40;
                format!("FOR VALUES FROM ('{lo}') TO ('{}')", lo + (1i64 << 40))
            };
            if b != want {
                out.push(format!(
                    "chunk {chunk}: {rel} has bound {b}, expected {want}"
                ));
            }
        }
    }
    // Indexes of the log's chunks: by what they index, whatever their names.
    let idx = c
        .query(
            "SELECT c.chunk, c.relid::text, c.indexed_at IS NOT NULL, \
                    coalesce(array_agg(regexp_replace(pg_get_indexdef(i.indexrelid), \
                                       '^.* USING ', '')) FILTER (WHERE i.indexrelid IS NOT NULL), '{}') \
               FROM pgvpn.chunks c LEFT JOIN pg_index i ON i.indrelid = c.relid \
              GROUP BY 1, 2, 3 ORDER BY 1",
            &[],
        )
        .unwrap_or_else(|e| panic!("chunk index check: {}", db_error(&e)));
    for r in idx {
        let (chunk, rel, indexed): (i32, String, bool) = (r.get(0), r.get(1), r.get(2));
        let defs: Vec<String> = r.get(3);
        if !defs.iter().any(|d| d == "btree (dst_peer, id)") {
            out.push(format!(
                "chunk {chunk}: {rel} has no (dst_peer, id) index: {defs:?}"
            ));
        }
        if indexed && !defs.iter().any(|d| d == "btree (src_addr, dst_addr)") {
            out.push(format!(
                "chunk {chunk}: {rel} is marked indexed but has no host-pair index: {defs:?}"
            ));
        }
    }
    out
}

/// The sequence's next id would be above `id`: `last_value` (if called) or
/// `last_value - 1`.
pub fn sequence_last(c: &mut Client) -> i64 {
    let r = c
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM pgvpn.packet_id",
            &[],
        )
        .unwrap_or_else(|e| panic!("read pgvpn.packet_id: {}", db_error(&e)));
    r.get(0)
}

/// `max(id)` of the log (0 if empty) and the highest stored cursor.
pub fn highest_id_and_cursor(c: &mut Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT coalesce((SELECT max(id) FROM pgvpn.packets), 0), \
                    coalesce((SELECT max(acked_id) FROM pgvpn.cursors), 0)",
            &[],
        )
        .unwrap_or_else(|e| panic!("highest id: {}", db_error(&e)));
    (r.get(0), r.get(1))
}
