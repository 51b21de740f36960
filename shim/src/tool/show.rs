//! `pgvpn show`: the peers as `wg show` shows a WireGuard interface's peers, from
//! pgvpn.peer_stats and the reject totals, in one statement (one snapshot).

use std::io::{IsTerminal, Write};

use clap::Args;
use postgres::Row;
use serde_json::{json, Value};

use super::error::ToolError;
use super::human::{self, Styles};
use super::session::Session;

const AFTER_HELP: &str = "\
`pgvpn show dump` prints one tab-separated line per peer, for scripts; times are Unix \
seconds (0: never), sizes bytes. The columns, in order:

  peer  role  allowed-ips  latest-traffic  received-bytes  sent-bytes  received-packets
  sent-packets  backlog  cursor  rejected  rejects  last-ack

allowed-ips is comma-separated ((none) if empty), rejects is reason=count,... ((none) if \
none). `pgvpn show dump NAME` prints one peer's line (so a peer named dump is `show dump \
dump`).";

/// Show the peers: allowed IPs, latest traffic, transfer, backlog, rejects.
///
/// One block per peer, the most recently active first, modelled on `wg show`; colour on a
/// terminal (not with NO_COLOR set). Removed peers are left out. Reads pgvpn.peer_stats
/// (a member of pgvpn_auditor may).
#[derive(Debug, Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct ShowArgs {
    /// Only this peer; or `dump` (tab-separated lines, see --help), optionally followed by
    /// a peer's name.
    #[arg(value_name = "PEER|dump", num_args = 0..=2)]
    pub what: Vec<String>,

    /// The same data as JSON (an array of objects; times as Unix seconds, null: never).
    #[arg(long)]
    pub json: bool,
}

/// One peer's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub name: String,
    pub role: String,
    pub allowed_ips: Vec<String>,
    pub sent_packets: i64,
    pub sent_bytes: i64,
    pub received_packets: i64,
    pub received_bytes: i64,
    pub rejected: i64,
    /// (reason, packets), most first.
    pub rejects: Vec<(String, i64)>,
    pub cursor: i64,
    pub backlog: i64,
    /// Unix seconds.
    pub latest_traffic: Option<f64>,
    pub last_sent_at: Option<f64>,
    pub last_received_at: Option<f64>,
    pub last_ack_at: Option<f64>,
}

const PEERS: &str = "\
SELECT s.peer, s.role::text, s.allowed_ips::text[], \
       s.sent_packets, s.sent_bytes, s.received_packets, s.received_bytes, \
       s.rejected, s.cursor, s.backlog, \
       extract(epoch FROM greatest(s.last_sent_at, s.last_received_at))::float8, \
       extract(epoch FROM s.last_sent_at)::float8, \
       extract(epoch FROM s.last_received_at)::float8, \
       extract(epoch FROM s.last_ack_at)::float8, \
       (SELECT json_agg(json_build_array(x.reason, x.packets) ORDER BY x.packets DESC, x.reason) \
          FROM pgvpn.reject_totals_by_id x JOIN pgvpn.peers p ON p.id = x.peer \
         WHERE p.name = s.peer AND p.removed_at IS NULL AND x.packets > 0)::text, \
       extract(epoch FROM now())::float8 \
  FROM pgvpn.peer_stats s \
 WHERE s.removed_at IS NULL AND ($1::text IS NULL OR s.peer = $1) \
 ORDER BY greatest(s.last_sent_at, s.last_received_at) DESC NULLS LAST, s.peer";

fn peer(row: &Row) -> Result<Peer, ToolError> {
    let rejects: Option<String> = row.try_get(14)?;
    let rejects = match rejects {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<(String, i64)>>(&text)
            .map_err(|e| ToolError::Failed(format!("reject totals: {e}")))?,
    };
    Ok(Peer {
        name: row.try_get(0)?,
        role: row.try_get(1)?,
        allowed_ips: row.try_get(2)?,
        sent_packets: row.try_get(3)?,
        sent_bytes: row.try_get(4)?,
        received_packets: row.try_get(5)?,
        received_bytes: row.try_get(6)?,
        rejected: row.try_get(7)?,
        cursor: row.try_get(8)?,
        backlog: row.try_get(9)?,
        latest_traffic: row.try_get(10)?,
        last_sent_at: row.try_get(11)?,
        last_received_at: row.try_get(12)?,
        last_ack_at: row.try_get(13)?,
        rejects,
    })
}

enum Mode {
    Text,
    Json,
    Dump,
}

pub fn run(db: &str, args: ShowArgs) -> Result<(), ToolError> {
    let (mode, name) = match args.what.as_slice() {
        [] => (Mode::Text, None),
        [d] if d == "dump" => (Mode::Dump, None),
        [d, n] if d == "dump" => (Mode::Dump, Some(n.clone())),
        [n] => (Mode::Text, Some(n.clone())),
        _ => {
            return Err(ToolError::Usage(
                "show takes a peer's name, or `dump` and optionally a name".into(),
            ))
        }
    };
    let mode = match (mode, args.json) {
        (Mode::Dump, true) => {
            return Err(ToolError::Usage(
                "--json and dump are two formats: choose one".into(),
            ))
        }
        (_, true) => Mode::Json,
        (m, false) => m,
    };

    let mut session = Session::open(db, "show")?;
    session.require_reader("show", "pgvpn.peer_stats")?;
    let rows = session.client.query(PEERS, &[&name])?;
    let now: f64 = match rows.first() {
        Some(r) => r.try_get(15)?,
        None => 0.0,
    };
    let peers = rows.iter().map(peer).collect::<Result<Vec<_>, _>>()?;
    if let (Some(n), true) = (&name, peers.is_empty()) {
        return Err(ToolError::Usage(format!("no peer named {n}")));
    }

    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let text = match mode {
        Mode::Text => text(&peers, now, &Styles::new(colour)),
        Mode::Json => format!("{:#}\n", json_value(&peers)),
        Mode::Dump => dump(&peers),
    };
    let mut out = stdout.lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ToolError::Failed(format!("writing the output: {e}")))
        }
        _ => Ok(()),
    }
}

/// What wg prints for allowed IPs: the prefixes with a cyan "/", or "(none)".
fn allowed_ips(p: &Peer, s: &Styles) -> String {
    if p.allowed_ips.is_empty() {
        return "(none)".into();
    }
    let slash = Styles::paint(s.unit, "/");
    p.allowed_ips
        .iter()
        .map(|ip| ip.replacen('/', &slash, 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The wg-style blocks.
pub fn text(peers: &[Peer], now: f64, s: &Styles) -> String {
    let mut out = String::new();
    for (i, p) in peers.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let key = |k: &str| format!("  {}: ", Styles::paint(s.key, k));
        let peer_label = Styles::paint(s.label, "peer");
        out.push_str(&format!(
            "{peer_label}: {}\n",
            Styles::paint(s.peer, &p.name)
        ));
        out.push_str(&format!("{}{}\n", key("role"), p.role));
        out.push_str(&format!("{}{}\n", key("allowed ips"), allowed_ips(p, s)));
        if let Some(t) = p.latest_traffic {
            out.push_str(&format!(
                "{}{}\n",
                key("latest traffic"),
                human::ago(t, now, s)
            ));
        }
        out.push_str(&format!(
            "{}{} received, {} sent\n",
            key("transfer"),
            human::bytes(p.received_bytes.max(0) as u64, s),
            human::bytes(p.sent_bytes.max(0) as u64, s)
        ));
        out.push_str(&format!(
            "{}{} (cursor {})\n",
            key("backlog"),
            human::count(p.backlog, "packet"),
            p.cursor
        ));
        let reasons: Vec<String> = p.rejects.iter().map(|(r, n)| format!("{r} {n}")).collect();
        if reasons.is_empty() {
            out.push_str(&format!("{}{}\n", key("rejected"), p.rejected));
        } else {
            out.push_str(&format!(
                "{}{} ({})\n",
                key("rejected"),
                p.rejected,
                reasons.join(", ")
            ));
        }
    }
    out
}

pub fn json_value(peers: &[Peer]) -> Value {
    Value::Array(
        peers
            .iter()
            .map(|p| {
                let rejects: serde_json::Map<String, Value> = p
                    .rejects
                    .iter()
                    .map(|(r, n)| (r.clone(), json!(n)))
                    .collect();
                json!({
                    "peer": p.name,
                    "role": p.role,
                    "allowed_ips": p.allowed_ips,
                    "latest_traffic": p.latest_traffic,
                    "received_bytes": p.received_bytes,
                    "sent_bytes": p.sent_bytes,
                    "received_packets": p.received_packets,
                    "sent_packets": p.sent_packets,
                    "backlog": p.backlog,
                    "cursor": p.cursor,
                    "rejected": p.rejected,
                    "rejects": rejects,
                    "last_sent_at": p.last_sent_at,
                    "last_received_at": p.last_received_at,
                    "last_ack_at": p.last_ack_at,
                })
            })
            .collect(),
    )
}

/// Unix seconds, 0 for never.
fn secs(t: Option<f64>) -> i64 {
    t.map_or(0, |t| t.floor() as i64)
}

/// One tab-separated line per peer, columns as in AFTER_HELP.
pub fn dump(peers: &[Peer]) -> String {
    let mut out = String::new();
    for p in peers {
        let none = |v: String| if v.is_empty() { "(none)".into() } else { v };
        let rejects: Vec<String> = p.rejects.iter().map(|(r, n)| format!("{r}={n}")).collect();
        let fields = [
            p.name.clone(),
            p.role.clone(),
            none(p.allowed_ips.join(",")),
            secs(p.latest_traffic).to_string(),
            p.received_bytes.to_string(),
            p.sent_bytes.to_string(),
            p.received_packets.to_string(),
            p.sent_packets.to_string(),
            p.backlog.to_string(),
            p.cursor.to_string(),
            p.rejected.to_string(),
            none(rejects.join(",")),
            secs(p.last_ack_at).to_string(),
        ];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bob() -> Peer {
        Peer {
            name: "bob".into(),
            role: "bob".into(),
            allowed_ips: vec!["198.18.0.2/32".into(), "198.19.0.0/16".into()],
            sent_packets: 10,
            sent_bytes: 47_815_065,
            received_packets: 900,
            received_bytes: 1_320_702_444,
            rejected: 4,
            rejects: vec![("no_route".into(), 2), ("spoofed".into(), 2)],
            cursor: 123_456,
            backlog: 0,
            latest_traffic: Some(1000.5),
            last_sent_at: Some(990.0),
            last_received_at: Some(1000.5),
            last_ack_at: Some(1000.9),
        }
    }

    fn idle() -> Peer {
        Peer {
            name: "carol".into(),
            role: "carol".into(),
            allowed_ips: vec![],
            sent_packets: 0,
            sent_bytes: 0,
            received_packets: 0,
            received_bytes: 0,
            rejected: 0,
            rejects: vec![],
            cursor: 0,
            backlog: 1,
            latest_traffic: None,
            last_sent_at: None,
            last_received_at: None,
            last_ack_at: None,
        }
    }

    #[test]
    fn text_as_wg_show() {
        let got = text(&[bob(), idle()], 1063.7, &Styles::new(false));
        assert_eq!(
            got,
            "peer: bob\n\
             \x20 role: bob\n\
             \x20 allowed ips: 198.18.0.2/32, 198.19.0.0/16\n\
             \x20 latest traffic: 1 minute, 3 seconds ago\n\
             \x20 transfer: 1.23 GiB received, 45.60 MiB sent\n\
             \x20 backlog: 0 packets (cursor 123456)\n\
             \x20 rejected: 4 (no_route 2, spoofed 2)\n\
             \n\
             peer: carol\n\
             \x20 role: carol\n\
             \x20 allowed ips: (none)\n\
             \x20 transfer: 0 B received, 0 B sent\n\
             \x20 backlog: 1 packet (cursor 0)\n\
             \x20 rejected: 0\n"
        );
        let coloured = text(&[bob()], 1063.7, &Styles::new(true));
        assert!(coloured.starts_with("\x1b[1m\x1b[33mpeer\x1b[0m: \x1b[33mbob\x1b[0m\n"));
        assert!(coloured.contains("198.18.0.2\x1b[36m/\x1b[0m32"));
    }

    #[test]
    fn dump_columns() {
        assert_eq!(
            dump(&[bob(), idle()]),
            "bob\tbob\t198.18.0.2/32,198.19.0.0/16\t1000\t1320702444\t47815065\t900\t10\t0\t123456\t4\tno_route=2,spoofed=2\t1000\n\
             carol\tcarol\t(none)\t0\t0\t0\t0\t0\t1\t0\t0\t(none)\t0\n"
        );
    }

    #[test]
    fn json_fields() {
        let v = json_value(&[bob(), idle()]);
        assert_eq!(v[0]["peer"], "bob");
        assert_eq!(v[0]["received_bytes"], 1_320_702_444i64);
        assert_eq!(v[0]["rejects"]["spoofed"], 2);
        assert_eq!(v[0]["latest_traffic"], 1000.5);
        assert_eq!(v[1]["latest_traffic"], Value::Null);
        assert_eq!(v[1]["allowed_ips"], json!([]));
    }
}
