//! Comparing two pgvpn databases' schemas as `pg_dump --schema-only --binary-upgrade`
//! prints them. The binary-upgrade mode (pg_upgrade's) is the one that prints the
//! extension's own members as well, each with `ALTER EXTENSION pgvpn ADD`, and the
//! initial privileges recorded for them; a plain schema dump shows only the objects
//! outside the extension (the log's chunks) and `CREATE EXTENSION`.
//!
//! The dump is cut into its entries (`-- Name: …; Type: …` headers) and normalised:
//! comments, blank lines, object ids and relfilenodes (`binary_upgrade_set_next_*`),
//! `\restrict` keys and the sequences' positions (data) are dropped. The chunks of the
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

/// Writes chunk `k`'s number and id range as `K`, `lo(K)`, `hi(K)`.
fn normalise_chunk(s: &str, k: i32) -> String {
    let lo = i64::from(k) << 40;
    let hi = lo + (1i64 << 40);
    s.replace(&format!("_{k:06}"), "_KKKKKK")
        .replace(&format!("'{lo}'"), "'lo(K)'")
        .replace(&format!("'{hi}'"), "'hi(K)'")
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

/// Cuts a `pg_dump --schema-only [--binary-upgrade]` text into normalised entries.
pub fn parse(dump: &str) -> Schema {
    let lines: Vec<&str> = dump.lines().collect();
    let mut raw: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(h) = l.strip_prefix("-- Name: ") {
            raw.push((format!("Name: {h}"), Vec::new()));
        } else if let Some((_, body)) = raw.last_mut() {
            if keep_line(l) {
                body.push(normalise_line(l));
            }
        }
        i += 1;
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
