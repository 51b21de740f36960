//! "Every packet is a row": after a tunnel session, the kernel's tun counters must match
//! the log.
//!
//! * A's tun `tx_packets` (packets the kernel handed to A's shim) = rows logged with
//!   src_peer A + A's rejects + what A's shim dropped before reaching the database
//!   (`dropped_*` in its `pgvpn-shim summary:` line).
//! * B's tun `rx_packets` (packets B's shim wrote) = rows logged for B (B has caught up).
//!
//! And the same the other way round. The tun devices are persistent, so their counters
//! are read after the shims have stopped, when nothing can move any more.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Counters at one moment (start or end of a session).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Tun counters in A's and B's namespace.
    pub a_rx: u64,
    pub a_tx: u64,
    pub b_rx: u64,
    pub b_tx: u64,
    /// `pgvpn.reject_counts` totals of A and B.
    pub a_rejected: i64,
    pub b_rejected: i64,
}

/// Rows the session logged (id above the mark), by sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rows {
    pub from_a: i64,
    pub from_b: i64,
}

/// Parse the `pgvpn-shim summary: key=value …` line from a shim's output.
pub fn parse_summary(output: &str) -> Option<BTreeMap<String, i64>> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("pgvpn-shim summary:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// Packets a shim read from its tun but never handed to the database.
pub fn shim_drops(summary: &BTreeMap<String, i64>) -> i64 {
    ["dropped_queue_full", "dropped_db_down", "dropped_db_error"]
        .iter()
        .map(|k| summary.get(*k).copied().unwrap_or(0))
        .sum()
}

#[derive(Clone, Debug)]
pub struct Verdict {
    pub ok: bool,
    /// One line for the console: `OK (N rows = N packets)` or what disagrees.
    pub text: String,
    pub json: Value,
}

/// Compare a session's counter deltas with the rows it logged and the shims' summaries.
pub fn verify(
    before: &Counters,
    after: &Counters,
    rows: Rows,
    summary_a: &BTreeMap<String, i64>,
    summary_b: &BTreeMap<String, i64>,
) -> Verdict {
    let d = |x: u64, y: u64| x as i64 - y as i64;
    let (a_tx, a_rx) = (d(after.a_tx, before.a_tx), d(after.a_rx, before.a_rx));
    let (b_tx, b_rx) = (d(after.b_tx, before.b_tx), d(after.b_rx, before.b_rx));
    let (a_rej, b_rej) = (
        after.a_rejected - before.a_rejected,
        after.b_rejected - before.b_rejected,
    );
    let (a_drop, b_drop) = (shim_drops(summary_a), shim_drops(summary_b));
    let read = |s: &BTreeMap<String, i64>| s.get("tun_read_packets").copied().unwrap_or(-1);

    let checks = [
        (
            "A tun tx = rows from A + rejects + shim drops",
            a_tx,
            rows.from_a + a_rej + a_drop,
        ),
        (
            "B tun tx = rows from B + rejects + shim drops",
            b_tx,
            rows.from_b + b_rej + b_drop,
        ),
        ("B tun rx = rows to B", b_rx, rows.from_a),
        ("A tun rx = rows to A", a_rx, rows.from_b),
        ("A tun tx = packets shim A read", a_tx, read(summary_a)),
        ("B tun tx = packets shim B read", b_tx, read(summary_b)),
    ];
    let failed: Vec<String> = checks
        .iter()
        .filter(|(_, l, r)| l != r)
        .map(|(what, l, r)| format!("{what}: {l} != {r}"))
        .collect();
    let total_rows = rows.from_a + rows.from_b;
    let drops = a_drop + b_drop;
    let text = if failed.is_empty() {
        let mut t = format!("OK ({total_rows} rows = {} packets", a_rx + b_rx);
        if a_rej + b_rej > 0 {
            t += &format!("; {} rejected", a_rej + b_rej);
        }
        if drops > 0 {
            t += &format!("; {drops} dropped by the shims before the database, queue full");
        }
        t + ")"
    } else {
        format!("MISMATCH: {}", failed.join("; "))
    };
    Verdict {
        ok: failed.is_empty(),
        text,
        json: json!({
            "ok": failed.is_empty(),
            "rows_from_a": rows.from_a, "rows_from_b": rows.from_b,
            "tun_a": {"tx": a_tx, "rx": a_rx}, "tun_b": {"tx": b_tx, "rx": b_rx},
            "rejected": {"a": a_rej, "b": b_rej},
            "shim_drops": {"a": a_drop, "b": b_drop},
            "shim_summary_a": summary_a, "shim_summary_b": summary_b,
            "failed": failed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "[2026-11-28T21:30:00Z INFO pgvpn_shim] shutting down\n\
        pgvpn-shim summary: tun_read_packets=105 tun_read_bytes=9000 sent=100 accepted=98 rejected_by_db=2 \
        dropped_queue_full=5 dropped_db_down=0 dropped_db_error=0 received=50 written=50 written_bytes=4000 \
        write_errors=0 reconnects=0 last_acked_id=77\n";

    #[test]
    fn summary_line() {
        let s = parse_summary(SUMMARY).unwrap();
        assert_eq!(s["tun_read_packets"], 105);
        assert_eq!(s["last_acked_id"], 77);
        assert_eq!(shim_drops(&s), 5);
        assert!(parse_summary("no summary here").is_none());
    }

    fn summary(read: i64, queue_full: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([
            ("tun_read_packets".into(), read),
            ("dropped_queue_full".into(), queue_full),
        ])
    }

    #[test]
    fn agreeing_counters_pass() {
        let before = Counters {
            a_rx: 10,
            a_tx: 20,
            b_rx: 30,
            b_tx: 40,
            a_rejected: 1,
            b_rejected: 0,
        };
        // A sent 105: 98 logged, 2 rejected, 5 dropped; B sent 50, all logged.
        let after = Counters {
            a_rx: 60,
            a_tx: 125,
            b_rx: 128,
            b_tx: 90,
            a_rejected: 3,
            b_rejected: 0,
        };
        let v = verify(
            &before,
            &after,
            Rows {
                from_a: 98,
                from_b: 50,
            },
            &summary(105, 5),
            &summary(50, 0),
        );
        assert!(v.ok, "{}", v.text);
        assert!(
            v.text
                .starts_with("OK (148 rows = 148 packets; 2 rejected; 5 dropped"),
            "{}",
            v.text
        );
    }

    #[test]
    fn a_missing_row_is_reported() {
        let before = Counters::default();
        let after = Counters {
            a_rx: 5,
            a_tx: 10,
            b_rx: 10,
            b_tx: 5,
            ..Default::default()
        };
        let v = verify(
            &before,
            &after,
            Rows {
                from_a: 9,
                from_b: 5,
            },
            &summary(10, 0),
            &summary(5, 0),
        );
        assert!(!v.ok);
        assert!(
            v.text
                .contains("A tun tx = rows from A + rejects + shim drops: 10 != 9"),
            "{}",
            v.text
        );
        assert!(
            v.text.contains("B tun rx = rows to B: 10 != 9"),
            "{}",
            v.text
        );
    }
}
