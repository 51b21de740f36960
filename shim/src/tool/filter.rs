//! `pgvpn capture`'s filters, as plain SQL conditions on pgvpn.packets with the values as
//! parameters (never spliced into the text). Different filters combine with AND, repeats of
//! one flag with OR. The conditions are the simple column comparisons that the log's
//! indexes serve: `sent_at` ranges, peer ids, `src_addr`/`dst_addr <<= network`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use postgres::types::ToSql;
use postgres::Client;

use super::error::ToolError;

/// A `--since`/`--until` value: a time before now ("1h", "30m", "2d", "1h30m"; units s, m,
/// h, d, w) or anything PostgreSQL reads as a timestamptz ("2026-12-06 14:00", "today",
/// "now", with the session's TimeZone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeArg {
    Ago(Duration),
    Timestamp(String),
}

/// clap's parser for `--since`/`--until`.
pub fn parse_time(s: &str) -> Result<TimeArg, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty time".into());
    }
    Ok(match relative(s) {
        Some(d) => TimeArg::Ago(d),
        None => TimeArg::Timestamp(s.to_string()),
    })
}

/// `1h30m` → 5400 s; None unless the whole string is number+unit pairs.
fn relative(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
    }
    digits.is_empty().then_some(Duration::from_secs(total))
}

impl TimeArg {
    /// The moment this means, by the server's clock (the log's times are the server's).
    pub fn resolve(&self, client: &mut Client, flag: &str) -> Result<SystemTime, ToolError> {
        let r = match self {
            TimeArg::Ago(d) => client.query_one(
                "SELECT now() - make_interval(secs => $1::float8)",
                &[&d.as_secs_f64()],
            ),
            TimeArg::Timestamp(s) => client.query_one("SELECT $1::text::timestamptz", &[s]),
        };
        match r {
            Ok(row) => Ok(row.try_get(0)?),
            // 22xxx: the value is not a timestamp PostgreSQL reads.
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
                let msg = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                Err(ToolError::Usage(format!("{flag}: {msg}")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The resolved filters of one capture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// `sent_at >= since`
    pub since: Option<SystemTime>,
    /// `sent_at < until`
    pub until: Option<SystemTime>,
    /// Either end is one of these peers (every peer id that ever had one of the names).
    pub peer_ids: Option<Vec<i32>>,
    /// Either address lies in one of these networks.
    pub hosts: Vec<IpNet>,
}

/// A query parameter.
pub type Param = Box<dyn ToSql + Sync + Send>;

impl Filter {
    /// The conditions, numbered from `$first` on, joined with AND ("" for none; each
    /// starts with " AND "), and their parameters in order.
    pub fn conditions(&self, first: usize) -> (String, Vec<Param>) {
        let mut sql = String::new();
        let mut params: Vec<Param> = Vec::new();
        let next = |p: Param, params: &mut Vec<Param>| {
            params.push(p);
            first + params.len() - 1
        };
        if let Some(t) = self.since {
            let n = next(Box::new(t), &mut params);
            sql.push_str(&format!(" AND sent_at >= ${n}"));
        }
        if let Some(t) = self.until {
            let n = next(Box::new(t), &mut params);
            sql.push_str(&format!(" AND sent_at < ${n}"));
        }
        if let Some(ids) = &self.peer_ids {
            let n = next(Box::new(ids.clone()), &mut params);
            sql.push_str(&format!(
                " AND (src_peer = ANY(${n}::int[]) OR dst_peer = ANY(${n}::int[]))"
            ));
        }
        if !self.hosts.is_empty() {
            // One parameter per network: `<<=` with a known network is what an inet index
            // turns into a range scan (an ANY(array) of networks it cannot).
            let mut ors = Vec::new();
            for h in &self.hosts {
                let n = next(Box::new(h.trunc().to_string()), &mut params);
                ors.push(format!(
                    "src_addr <<= ${n}::text::inet OR dst_addr <<= ${n}::text::inet"
                ));
            }
            sql.push_str(&format!(" AND ({})", ors.join(" OR ")));
        }
        (sql, params)
    }
}

/// The peers by id (removed ones too: old rows keep their ids).
pub fn peer_names(client: &mut Client) -> Result<HashMap<i32, String>, ToolError> {
    let rows = client.query("SELECT id, name FROM pgvpn.peers", &[])?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Every peer id that has or had one of `names`; an unknown name is a usage error.
pub fn peer_ids(names: &[String], peers: &HashMap<i32, String>) -> Result<Vec<i32>, ToolError> {
    let mut ids = Vec::new();
    for name in names {
        let mut found: Vec<i32> = peers
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(id, _)| *id)
            .collect();
        if found.is_empty() {
            let mut known: Vec<&str> = peers.values().map(String::as_str).collect();
            known.sort_unstable();
            known.dedup();
            return Err(ToolError::Usage(format!(
                "--peer {name}: no such peer (peers: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        ids.append(&mut found);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvpn_core::cidr;

    #[test]
    fn relative_and_absolute_times() {
        assert_eq!(
            parse_time("1h"),
            Ok(TimeArg::Ago(Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_time("30m"),
            Ok(TimeArg::Ago(Duration::from_secs(1800)))
        );
        assert_eq!(
            parse_time("2d"),
            Ok(TimeArg::Ago(Duration::from_secs(172_800)))
        );
        assert_eq!(
            parse_time("1h30m15s"),
            Ok(TimeArg::Ago(Duration::from_secs(5415)))
        );
        assert_eq!(
            parse_time("1w"),
            Ok(TimeArg::Ago(Duration::from_secs(604_800)))
        );
        for ts in [
            "2026-12-06 14:00",
            "now",
            "today",
            "1h ago",
            "h",
            "10",
            "1x",
        ] {
            assert_eq!(parse_time(ts), Ok(TimeArg::Timestamp(ts.into())), "{ts}");
        }
        assert!(parse_time("  ").is_err());
        // overflow is not a duration (PostgreSQL gets to refuse it)
        assert!(matches!(
            parse_time("99999999999999999999w"),
            Ok(TimeArg::Timestamp(_))
        ));
    }

    #[test]
    fn no_filter_no_conditions() {
        let (sql, params) = Filter::default().conditions(3);
        assert_eq!(sql, "");
        assert!(params.is_empty());
    }

    #[test]
    fn conditions_are_parameters_not_text() {
        let f = Filter {
            since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)),
            until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000)),
            peer_ids: Some(vec![1, 4]),
            hosts: vec![
                cidr::parse("198.18.0.7/15").unwrap(),
                cidr::parse("fd00::1").unwrap(),
            ],
        };
        let (sql, params) = f.conditions(3);
        assert_eq!(
            sql,
            " AND sent_at >= $3 AND sent_at < $4 \
             AND (src_peer = ANY($5::int[]) OR dst_peer = ANY($5::int[])) \
             AND (src_addr <<= $6::text::inet OR dst_addr <<= $6::text::inet \
             OR src_addr <<= $7::text::inet OR dst_addr <<= $7::text::inet)"
        );
        assert_eq!(params.len(), 5);
        for value in ["198.18", "fd00", "1000000", "'"] {
            assert!(!sql.contains(value), "{value} spliced into {sql}");
        }
        // the network, not the host address, is what is compared
        assert_eq!(f.hosts[0].trunc().to_string(), "198.18.0.0/15");
    }

    #[test]
    fn peer_names_to_ids() {
        let peers: HashMap<i32, String> = [(1, "alice"), (2, "bob"), (3, "alice"), (5, "carol")]
            .into_iter()
            .map(|(i, n)| (i, n.to_string()))
            .collect();
        assert_eq!(peer_ids(&["alice".into()], &peers), Ok(vec![1, 3]));
        assert_eq!(
            peer_ids(&["carol".into(), "bob".into(), "carol".into()], &peers),
            Ok(vec![2, 5])
        );
        let e = peer_ids(&["dave".into()], &peers).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "--peer dave: no such peer (peers: alice, bob, carol)"
        );
    }
}
