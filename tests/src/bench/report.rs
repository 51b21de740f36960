//! Medians over runs, the console table, and the JSON file.

use super::logcheck::Verdict;
use super::measure::median;
use super::plan::{Metrics, RunResult, Settings, CEILING_SIZE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Per metric, the median over the runs that produced it.
pub fn medians(runs: &[RunResult]) -> Metrics {
    let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.metrics.get(k).copied())
                .collect();
            Some((k.clone(), median(&v)?))
        })
        .collect()
}

/// About the machine and the database, for the header and the JSON.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub started_utc: String,
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub postgres: String,
    /// Settings as the server reports them (`SHOW`).
    pub pg_settings: Vec<(String, String)>,
}

/// The machine and the database's settings. `db` is any database of `cluster`.
pub fn environment(cluster: &pgvpn_tests::Cluster, db: &str, started: u64) -> Env {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mut su = cluster.superuser(db);
    let mut show = |name: &str| -> Option<String> {
        su.query_one(&format!("SHOW {name}"), &[])
            .ok()
            .map(|r| r.get::<_, String>(0))
    };
    let postgres = show("server_version").unwrap_or_default();
    let mut names = vec![
        "synchronous_commit",
        "pgvpn.synchronous_commit",
        "fsync",
        "pgvpn.max_backlog",
    ];
    names.extend(
        super::topology::BENCH_CONF
            .iter()
            .filter_map(|l| l.split(" = ").next()),
    );
    let pg_settings = names
        .iter()
        .filter_map(|n| Some((n.to_string(), show(n)?)))
        .collect();
    Env {
        started_utc: timestamps(started).0,
        cpu_model,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        postgres,
        pg_settings,
    }
}

/// Numbers the way people read them: 3 significant digits, no exponent.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn pct(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}%")
    } else {
        format!("{x:.1}%")
    }
}

pub struct Table<'a> {
    pub m: &'a Metrics,
    pub settings: &'a Settings,
    pub default_mtu: u32,
}

impl Table<'_> {
    fn get(&self, k: &str) -> Option<f64> {
        self.m.get(k).copied()
    }

    /// A row with tunnel, direct and their ratio (as a percentage, or as a factor for
    /// times where lower is better).
    fn row(
        &self,
        out: &mut String,
        label: &str,
        test: &str,
        field: &str,
        extra: Option<&str>,
        times: bool,
    ) {
        let cell = |link: &str| -> String {
            let Some(v) = self.get(&format!("{link}.{test}.{field}")) else {
                return "—".into();
            };
            match extra.and_then(|f| self.get(&format!("{link}.{test}.{f}"))) {
                Some(e) if times => format!("{} / {}", num(v), num(e)),
                Some(e) => format!("{} / {}", num(v), pct(e)),
                None => num(v),
            }
        };
        let ratio = match (
            self.get(&format!("tunnel.{test}.{field}")),
            self.get(&format!("direct.{test}.{field}")),
        ) {
            (Some(t), Some(d)) if d > 0.0 && times => format!("×{}", num(t / d)),
            (Some(t), Some(d)) if d > 0.0 => pct(100.0 * t / d),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "{label:<32}{:<22}{:<22}{ratio}",
            cell("tunnel"),
            cell("direct")
        );
    }

    pub fn render(&self, env: &Env, checks: &[(usize, &str, &Verdict)]) -> String {
        let s = self.settings;
        let (d, j) = (self.default_mtu, s.jumbo_mtu);
        let mut o = String::new();
        let _ = writeln!(
            o,
            "pgvpn bench — {}, {}, {} cores, PostgreSQL {}, MTU {d}/{j}",
            env.started_utc, env.cpu_model, env.cores, env.postgres
        );
        let conf: Vec<String> = env
            .pg_settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            o,
            "median of {} run(s); TCP {} s, UDP {} s; {}",
            s.runs,
            s.seconds,
            s.udp_seconds,
            conf.join(" ")
        );
        let _ = writeln!(
            o,
            "{:<32}{:<22}{:<22}tunnel/direct",
            "", "tunnel", "direct (veth)"
        );
        self.row(
            &mut o,
            &format!("TCP Mbit/s (MTU {d})"),
            "tcp_default",
            "mbit",
            None,
            false,
        );
        self.row(
            &mut o,
            &format!("TCP Mbit/s (MTU {j})"),
            "tcp_jumbo",
            "mbit",
            None,
            false,
        );
        self.row(
            &mut o,
            "UDP 1400 B pkt/s / loss",
            "udp1400",
            "pps",
            Some("loss_pct"),
            false,
        );
        self.row(
            &mut o,
            "UDP 64 B pkt/s / loss",
            "udp64",
            "pps",
            Some("loss_pct"),
            false,
        );
        self.row(
            &mut o,
            "UDP 64 B, 100k/s offered",
            "udp64_paced",
            "pps",
            Some("loss_pct"),
            false,
        );
        self.row(
            &mut o,
            "ping idle p50/p99 ms",
            "ping_idle",
            "p50_ms",
            Some("p99_ms"),
            true,
        );
        self.row(
            &mut o,
            "ping under TCP p50/p99 ms",
            "tcp_default",
            "ping_p50_ms",
            Some("ping_p99_ms"),
            true,
        );

        let ceiling = |field: &str| -> String {
            let mut parts = Vec::new();
            for (name, size) in [("1400B", CEILING_SIZE as u32), ("default", d), ("jumbo", j)] {
                if let Some(v) = self.get(&format!("ceiling.{name}.{field}")) {
                    let mbit = if field == "send_pps" {
                        self.get(&format!("ceiling.{name}.send_mbit"))
                            .map(|m| format!(" ({} Mbit/s)", num(m)))
                    } else {
                        Some(format!(" ({} Mbit/s)", num(v * size as f64 * 8.0 / 1e6)))
                    };
                    parts.push(format!(
                        "{}{} at {size} B",
                        num(v),
                        mbit.unwrap_or_default()
                    ));
                }
            }
            if parts.is_empty() {
                "—".into()
            } else {
                parts.join("; ")
            }
        };
        let _ = writeln!(o, "{:<32}{}", "DB ceiling send pkt/s", ceiling("send_pps"));
        let _ = writeln!(o, "{:<32}{}", "DB ceiling recv pkt/s", ceiling("recv_pps"));
        let share: Vec<String> = [("default", d, d), ("jumbo", j, j)]
            .iter()
            .filter_map(|(w, mtu, size)| {
                let p = self.get(&format!("tunnel.tcp_{w}.pct_of_ceiling"))?;
                Some(format!("{} (MTU {mtu} vs {size} B)", pct(p)))
            })
            .collect();
        let _ = writeln!(
            o,
            "{:<32}{}",
            "TCP as % of DB ceiling",
            if share.is_empty() {
                "—".into()
            } else {
                share.join("; ")
            }
        );
        let cpu: Vec<String> = [("default", d), ("jumbo", j)]
            .iter()
            .filter_map(|(w, mtu)| {
                let g = |f: &str| self.get(&format!("tunnel.tcp_{w}.cpu_{f}_s_per_gb"));
                Some(format!(
                    "MTU {mtu}: {} / {} / {}",
                    num(g("db")?),
                    num(g("shim_a")?),
                    num(g("shim_b")?)
                ))
            })
            .collect();
        let _ = writeln!(
            o,
            "{:<32}{}",
            "CPU s/GB db / shim A / shim B",
            if cpu.is_empty() {
                "—".into()
            } else {
                cpu.join("; ")
            }
        );

        if checks.is_empty() {
            let _ = writeln!(o, "{:<32}not run", "log check");
        }
        for (run, what, v) in checks {
            let _ = writeln!(
                o,
                "{:<32}{}",
                format!("log check run {run}, {what}"),
                v.text
            );
        }
        o
    }
}

/// Where the DB's CPU went during a TCP test: shares of the total, largest first.
pub fn cpu_shares(by_process: &BTreeMap<String, f64>) -> String {
    let total: f64 = by_process.values().sum();
    if total <= 0.0 {
        return "—".into();
    }
    let mut v: Vec<(&String, &f64)> = by_process.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .filter(|(_, s)| **s / total >= 0.01)
        .map(|(k, s)| format!("{k} {:.0}%", 100.0 * **s / total))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report without the verdict, duration and table (the caller adds those).
pub fn to_json(
    env: &Env,
    settings: &Settings,
    default_mtu: u32,
    runs: &[RunResult],
    median: &Metrics,
) -> Value {
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "metrics": r.metrics,
                "log_checks": r.checks.iter().map(|(what, v)| json!({"session": what, "text": v.text, "detail": v.json})).collect::<Vec<_>>(),
                "errors": r.errors,
                "db_cpu_seconds_by_process": r.db_cpu,
                "other_harness_namespaces_seen": r.foreign,
            })
        })
        .collect();
    json!({
        "started_utc": env.started_utc,
        "host": {"cpu": env.cpu_model, "cores": env.cores, "kernel": env.kernel, "postgres": env.postgres},
        "postgres_settings": env.pg_settings.iter().cloned().collect::<BTreeMap<String, String>>(),
        "settings": {
            "runs": settings.runs, "seconds": settings.seconds, "udp_seconds": settings.udp_seconds,
            "default_mtu": default_mtu, "jumbo_mtu": settings.jumbo_mtu, "ping_count": settings.ping_count,
            "ceiling_batch": super::ceiling::BATCH, "ceiling_recv_page": super::ceiling::PAGE,
        },
        "median": median,
        "runs": runs,
    })
}

/// Write `bench-<stamp>.json` and `latest.json` into `dir`; returns the first path.
pub fn write_json(dir: &Path, stamp: &str, v: &Value) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(v).expect("serialize") + "\n";
    let path = dir.join(format!("bench-{stamp}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    Ok(path)
}

/// Write `<prefix>-<stamp>.json` and `<prefix>-latest.json` into `dir`; returns the first.
pub fn write_json_as(dir: &Path, prefix: &str, stamp: &str, v: &Value) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(v).expect("serialize") + "\n";
    let path = dir.join(format!("{prefix}-{stamp}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(dir.join(format!("{prefix}-latest.json")), &text)?;
    Ok(path)
}

/// (days since 1970-01-01) → (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (`2026-11-28 21:30 UTC`, `20261128-213005`) for a Unix time.
pub fn timestamps(unix: u64) -> (String, String) {
    let (days, secs) = ((unix / 86400) as i64, unix % 86400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    (
        format!("{y}-{mo:02}-{d:02} {h:02}:{mi:02} UTC"),
        format!("{y}{mo:02}{d:02}-{h:02}{mi:02}{s:02}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_per_key() {
        let mk = |pairs: &[(&str, f64)]| RunResult {
            metrics: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        };
        let runs = [
            mk(&[("a", 3.0), ("b", 1.0)]),
            mk(&[("a", 1.0)]),
            mk(&[("a", 2.0), ("b", 5.0)]),
        ];
        let m = medians(&runs);
        assert_eq!(m["a"], 2.0);
        assert_eq!(m["b"], 3.0);
    }

    #[test]
    fn numbers() {
        assert_eq!(num(18234.7), "18235");
        assert_eq!(num(41.27), "41.3");
        assert_eq!(num(1.9), "1.90");
        assert_eq!(num(0.0312), "0.031");
        assert_eq!(pct(2.34), "2.3%");
        assert_eq!(pct(63.4), "63%");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        // 2026-11-28 21:30:05 UTC
        assert_eq!(
            timestamps(1_795_901_405),
            ("2026-11-28 21:30 UTC".into(), "20261128-213005".into())
        );
    }

    #[test]
    fn shares() {
        let m = BTreeMap::from([
            ("backend alice".to_string(), 6.0),
            ("walwriter".to_string(), 2.0),
            ("x".to_string(), 0.01),
        ]);
        assert_eq!(cpu_shares(&m), "backend alice 75%, walwriter 25%");
    }
}
