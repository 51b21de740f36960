//! Comparing two pgvpn databases' schemas as `pg_dump --schema-only --binary-upgrade`
//! prints them. The binary-upgrade mode (pg_upgrade's) is the one that prints the
//! extension's own members as well, each with `ALTER EXTENSION pgvpn ADD`, and the
//! initial privileges recorded for them; a plain schema dump shows only the objects
//! outside the extension (the log's chunks) and `CREATE EXTENSION`.
//!
//! The dump is cut into its entries (`-- Name: …; Type: …` headers) and normalised:
//! comments, blank lines, object ids and relfilenodes (`binary_upgrade_set_next_*`),
//! `\restrict` keys, the sequences' positions (data), the tables' freeze horizons
//! (`relfrozenxid`/`relminmxid`, which depend on the transactions a database has seen)
//! and a column's "missing value" when it is the column's default (what `ADD COLUMN …
//! DEFAULT` leaves for the rows that were there: those rows read the default, as new
//! rows get it) are dropped, and the columns of a `CREATE TABLE` are compared as a set:
//! `ALTER TABLE … ADD COLUMN` appends, so an upgraded table may list in another order
//! the same columns a fresh install creates (names, types, defaults and constraints
//! still have to match; nothing in pgvpn depends on the order, its SQL names columns). The chunks of the
//! log differ by number between two databases, so the entries of one chunk (its tables,
//! indexes, grants, partition bounds) are grouped and their chunk number written as
//! `K`: two chunks in the same state (host-pair index built or not) must then read the
//! same.

use std::collections::{BTreeMap, BTreeSet};

/// One entry of a dump: its header (`Name: …; Type: …; Schema: …; Owner: …`) and body,
/// both normalised.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub header: String,
    pub body: String,
}

/// A dump cut into entries: those of no chunk, and those of each chunk by number.
#[derive(Debug, Default)]
pub struct Schema {
    pub objects: Vec<Entry>,
    pub chunks: BTreeMap<i32, BTreeSet<Entry>>,
}

/// The chunk number in a header's name (`packets_000003_delivery` → 3): six digits
/// after an underscore, as `pgvpn._chunk_name` writes them.
fn chunk_number(header: &str) -> Option<i32> {
    let name = header.strip_prefix("Name: ")?.split(';').next()?;
    let b = name.as_bytes();
    (0..b.len().saturating_sub(6)).find_map(|i| {
        let digits = &b[i + 1..i + 7];
        let end_ok = i + 7 == b.len() || !b[i + 7].is_ascii_digit();
        (b[i] == b'_' && digits.iter().all(u8::is_ascii_digit) && end_ok)
            .then(|| name[i + 1..i + 7].parse().ok())
            .flatten()
    })
}

/// Writes chunk `k`'s number and id range as `K`, `lo(K)`, `hi(K)` (the flow summaries
/// are partitioned by the chunk number itself: `FROM (K) TO (K+1)`).
fn normalise_chunk(s: &str, k: i32) -> String {
    let lo = i64::from(k) << 40;
    let hi = lo + (1i64 << 40);
    s.replace(&format!("_{k:06}"), "_KKKKKK")
        .replace(&format!("'{lo}'"), "'lo(K)'")
        .replace(&format!("'{hi}'"), "'hi(K)'")
        .replace(
            &format!("FOR VALUES FROM ({k}) TO ({})", k + 1),
            "FOR VALUES FROM (K) TO (K+1)",
        )
}

fn keep_line(l: &str) -> bool {
    let t = l.trim();
    !(t.is_empty()
        || t.starts_with("--")
        || t.starts_with("\\restrict")
        || t.starts_with("\\unrestrict")
        || t.starts_with("SELECT pg_catalog.binary_upgrade_set_next_"))
}

/// `binary_upgrade_create_empty_extension(…, '{oid,…}', '{cond,…}', …)`: the config
/// tables by oid, which differ between databases (compared by name elsewhere).
fn normalise_line(l: &str) -> String {
    if let Some(i) = l.find("binary_upgrade_create_empty_extension(") {
        let args = &l[i..];
        let parts: Vec<&str> = args.split(", ").collect();
        if parts.len() >= 7 {
            let mut p = parts.clone();
            p[4] = "'<config table oids>'";
            return format!("{}{}", &l[..i], p.join(", "));
        }
    }
    l.to_string()
}

/// The binary-upgrade statement that sets a relation's freeze horizons, as pg_dump
/// prints it on three lines: `UPDATE pg_catalog.pg_class` / `SET relfrozenxid = …,
/// relminmxid = …` / `WHERE oid = …;`. Returns how many lines it takes at `i`.
fn freeze_xids_at(lines: &[&str], i: usize) -> Option<usize> {
    let l = |k: usize| lines.get(i + k).map(|s| s.trim());
    (l(0)? == "UPDATE pg_catalog.pg_class"
        && l(1)?.starts_with("SET relfrozenxid = ")
        && l(1)?.contains(", relminmxid = ")
        && l(2)?.starts_with("WHERE oid = ")
        && l(2)?.ends_with(';'))
    .then_some(3)
}

/// `CREATE TABLE name (` … `)…`: the column (and inline constraint) lines sorted, each
/// without its separating comma, so that the column order does not matter.
fn sort_table_columns(body: &mut [String]) {
    let mut i = 0;
    while i < body.len() {
        if body[i].starts_with("CREATE TABLE ") && body[i].ends_with(" (") {
            let start = i + 1;
            let end = (start..body.len()).find(|&j| body[j].starts_with(')'));
            if let Some(end) = end {
                let mut cols: Vec<String> = body[start..end]
                    .iter()
                    .map(|c| c.trim_end_matches(',').to_string())
                    .collect();
                cols.sort();
                let n = cols.len();
                for (k, c) in cols.into_iter().enumerate() {
                    body[start + k] = if k + 1 < n { format!("{c},") } else { c };
                }
                i = end;
            }
        }
        i += 1;
    }
}

/// `binary_upgrade_set_missing_value('<table>'::pg_catalog.regclass,'<column>','{<v>}')`
/// where the entry's `CREATE TABLE` gives that column `DEFAULT <v>`: the rows added
/// before the column read its default, which is the schema anyway. Any other missing
/// value stays (and is a difference).
fn drop_default_missing_values(body: &mut Vec<String>) {
    const CALL: &str = "SELECT pg_catalog.binary_upgrade_set_missing_value(";
    let default_of = |body: &[String], col: &str| -> Option<String> {
        body.iter().find_map(|l| {
            let rest = l.trim().strip_prefix(col)?.strip_prefix(' ')?;
            let d = rest.split_once(" DEFAULT ")?.1;
            let d = d.split(" NOT NULL").next()?.trim_end_matches(',');
            Some(d.to_string())
        })
    };
    let redundant = |l: &String| -> bool {
        let Some(args) = l.strip_prefix(CALL).and_then(|a| a.strip_suffix(");")) else {
            return false;
        };
        let parts: Vec<&str> = args.split(',').collect();
        let [_, col, value] = parts[..] else {
            return false;
        };
        let (col, value) = (col.trim_matches('\''), value.trim_matches('\''));
        default_of(body, col).is_some_and(|d| format!("{{{d}}}") == value)
    };
    let keep: Vec<bool> = body.iter().map(|l| !redundant(l)).collect();
    let mut k = keep.iter();
    body.retain(|_| *k.next().unwrap());
}

/// Cuts a `pg_dump --schema-only [--binary-upgrade]` text into normalised entries.
pub fn parse(dump: &str) -> Schema {
    let lines: Vec<&str> = dump.lines().collect();
    let mut raw: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(h) = l.strip_prefix("-- Name: ") {
            raw.push((format!("Name: {h}"), Vec::new()));
        } else if let Some(n) = freeze_xids_at(&lines, i) {
            i += n;
            continue;
        } else if let Some((_, body)) = raw.last_mut() {
            if keep_line(l) {
                body.push(normalise_line(l));
            }
        }
        i += 1;
    }
    for (_, body) in &mut raw {
        drop_default_missing_values(body);
        sort_table_columns(body);
    }
    let mut out = Schema::default();
    for (header, body) in raw {
        if header.contains("; Type: SEQUENCE SET;") {
            continue; // a sequence's position is data
        }
        let body = body.join("\n");
        match chunk_number(&header) {
            Some(k) => {
                out.chunks.entry(k).or_default().insert(Entry {
                    header: normalise_chunk(&header, k),
                    body: normalise_chunk(&body, k),
                });
            }
            None => out.objects.push(Entry { header, body }),
        }
    }
    out.objects.sort();
    out
}

/// Entries of `a` that `b` lacks (multiset difference), for messages.
pub fn missing_from<'a>(a: &'a [Entry], b: &[Entry]) -> Vec<&'a Entry> {
    let mut left: Vec<&Entry> = b.iter().collect();
    let mut out = Vec::new();
    for e in a {
        match left.iter().position(|x| *x == e) {
            Some(p) => {
                left.swap_remove(p);
            }
            None => out.push(e),
        }
    }
    out
}

/// Renders entries for a failure message.
pub fn render(entries: &[&Entry]) -> String {
    entries
        .iter()
        .map(|e| format!("  -- {}\n{}", e.header, indent(&e.body)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_numbers_come_from_the_name() {
        assert_eq!(
            chunk_number("Name: packets_000003; Type: TABLE; Schema: pgvpn"),
            Some(3)
        );
        assert_eq!(
            chunk_number("Name: packets_000012_delivery; Type: INDEX; Schema: pgvpn"),
            Some(12)
        );
        assert_eq!(
            chunk_number("Name: TABLE packets_000001; Type: ACL; Schema: pgvpn"),
            Some(1)
        );
        assert_eq!(
            chunk_number("Name: packets; Type: TABLE; Schema: pgvpn"),
            None
        );
        assert_eq!(chunk_number("Name: x_1234567; Type: TABLE"), None);
    }

    /// A table as pg_dump --binary-upgrade prints it, with its columns in `cols` order
    /// and the given freeze horizon.
    fn table_dump(cols: &[&str], frozen: u32) -> String {
        format!(
            "--\n-- Name: chunks; Type: TABLE; Schema: pgvpn; Owner: postgres\n--\n\n\
             CREATE TABLE pgvpn.chunks (\n{}\n);\n\n\
             -- For binary upgrade, set heap's relfrozenxid and relminmxid\n\
             UPDATE pg_catalog.pg_class\n\
             SET relfrozenxid = '{frozen}', relminmxid = '1'\n\
             WHERE oid = 'pgvpn.chunks'::pg_catalog.regclass;\n",
            cols.iter()
                .map(|c| format!("    {c}"))
                .collect::<Vec<_>>()
                .join(",\n")
        )
    }

    #[test]
    fn column_order_and_freeze_xids_are_noise() {
        let fresh = parse(&table_dump(
            &[
                "chunk integer NOT NULL",
                "flow_relid regclass NOT NULL",
                "relid regclass NOT NULL",
            ],
            735,
        ));
        let upgraded = parse(&table_dump(
            &[
                "chunk integer NOT NULL",
                "relid regclass NOT NULL",
                "flow_relid regclass NOT NULL",
            ],
            1204,
        ));
        assert_eq!(fresh.objects, upgraded.objects);
        assert!(!fresh.objects[0].body.contains("relfrozenxid"));
    }

    #[test]
    fn a_different_column_is_still_a_difference() {
        let fresh = parse(&table_dump(
            &["chunk integer NOT NULL", "flow_relid regclass NOT NULL"],
            735,
        ));
        for other in [
            vec!["chunk integer NOT NULL", "flow_relid regclass"],
            vec!["chunk integer NOT NULL"],
            vec![
                "chunk integer NOT NULL",
                "flow_relid regclass NOT NULL",
                "x int",
            ],
            vec!["chunk bigint NOT NULL", "flow_relid regclass NOT NULL"],
        ] {
            let upgraded = parse(&table_dump(&other, 735));
            assert_eq!(
                missing_from(&upgraded.objects, &fresh.objects).len(),
                1,
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_missing_value_counts_only_when_it_is_not_the_default() {
        let dump = |missing: &str| {
            format!(
                "-- Name: cursors; Type: TABLE; Schema: pgvpn; Owner: postgres\n\
                 CREATE TABLE pgvpn.cursors (\n    peer integer NOT NULL,\n    \
                 expired_packets bigint DEFAULT 0 NOT NULL\n);\n\
                 SELECT pg_catalog.binary_upgrade_set_missing_value('pgvpn.cursors'::pg_catalog.regclass,'expired_packets','{missing}');\n"
            )
        };
        let fresh = parse(
            "-- Name: cursors; Type: TABLE; Schema: pgvpn; Owner: postgres\n\
             CREATE TABLE pgvpn.cursors (\n    peer integer NOT NULL,\n    \
             expired_packets bigint DEFAULT 0 NOT NULL\n);\n",
        );
        assert_eq!(parse(&dump("{0}")).objects, fresh.objects);
        assert_ne!(parse(&dump("{7}")).objects, fresh.objects);
    }

    #[test]
    fn chunks_are_compared_by_shape() {
        let k = 5;
        let lo = 5i64 << 40;
        let s = format!(
            "ALTER TABLE ONLY pgvpn.packets ATTACH PARTITION pgvpn.packets_000005 FOR VALUES FROM ('{lo}') TO ('{}');",
            lo + (1 << 40)
        );
        assert_eq!(
            normalise_chunk(&s, k),
            "ALTER TABLE ONLY pgvpn.packets ATTACH PARTITION pgvpn.packets_KKKKKK FOR VALUES FROM ('lo(K)') TO ('hi(K)');"
        );
        assert_eq!(
            normalise_chunk(
                "ALTER TABLE ONLY pgvpn.flow_sums ATTACH PARTITION pgvpn.sums_000005 FOR VALUES FROM (5) TO (6);",
                k
            ),
            "ALTER TABLE ONLY pgvpn.flow_sums ATTACH PARTITION pgvpn.sums_KKKKKK FOR VALUES FROM (K) TO (K+1);"
        );
        let dump = "--\n-- Name: packets_000005; Type: TABLE; Schema: pgvpn; Owner: postgres\n--\n\n\
                    -- For binary upgrade, must preserve pg_class oids and relfilenodes\n\
                    SELECT pg_catalog.binary_upgrade_set_next_heap_pg_class_oid('16500'::pg_catalog.oid);\n\
                    CREATE TABLE pgvpn.packets_000005 (id bigint);\n\
                    --\n-- Name: x; Type: SEQUENCE SET; Schema: pgvpn; Owner: postgres\n--\n\
                    SELECT pg_catalog.setval('pgvpn.x', 3, true);\n";
        let s = parse(dump);
        assert!(s.objects.is_empty());
        let e = s.chunks[&5].iter().next().unwrap();
        assert_eq!(e.body, "CREATE TABLE pgvpn.packets_KKKKKK (id bigint);");
    }
}
