//! Medians over runs, the console table, and the JSON file.

use super::ceiling::COMPARED_SIZES;
use super::logcheck::Verdict;
use super::measure::median;
use super::plan::{Metrics, RunResult, Settings};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::PathBuf;

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

impl Env {
    /// The machine, as every report's JSON gives it.
    pub fn host_json(&self) -> Value {
        json!({"cpu": self.cpu_model, "cores": self.cores, "kernel": self.kernel,
               "postgres": self.postgres})
    }

    /// The server's settings (`SHOW`), as every report's JSON gives them.
    pub fn settings_json(&self) -> Value {
        json!(self
            .pg_settings
            .iter()
            .cloned()
            .collect::<BTreeMap<String, String>>())
    }
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
    for n in super::topology::BENCH_CONF
        .iter()
        .filter_map(|l| l.split(" = ").next())
    {
        if !names.contains(&n) {
            names.push(n);
        }
    }
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
        // What TLS costs (#8): the same tunnel, its shims over TCP + TLS instead of the
        // unix socket, in this run.
        let _ = writeln!(
            o,
            "{:<32}{:<22}{:<22}TLS/unix",
            format!("shims over TCP + TLS (MTU {d})"),
            "TCP + TLS",
            "unix socket"
        );
        for (label, key, more, times) in [
            ("  TCP Mbit/s", "tcp_default.mbit", None, false),
            (
                "  ping idle p50/p99 ms",
                "ping_idle.p50_ms",
                Some("ping_idle.p99_ms"),
                true,
            ),
            (
                "  ping under TCP p50/p99 ms",
                "tcp_default.ping_p50_ms",
                Some("tcp_default.ping_p99_ms"),
                true,
            ),
        ] {
            let cell = |link: &str| -> String {
                let main = self.get(&format!("{link}.{key}"));
                let extra = more.and_then(|k| self.get(&format!("{link}.{k}")));
                match (main, extra) {
                    (Some(a), Some(b)) => format!("{} / {}", num(a), num(b)),
                    (Some(a), None) => num(a),
                    _ => "—".into(),
                }
            };
            let ratio = match (
                self.get(&format!("{}.{key}", super::plan::TLS_LINK)),
                self.get(&format!("tunnel.{key}")),
            ) {
                (Some(t), Some(u)) if u > 0.0 && times => format!("×{}", num(t / u)),
                (Some(t), Some(u)) if u > 0.0 => pct(100.0 * t / u),
                _ => "—".into(),
            };
            let _ = writeln!(
                o,
                "{label:<32}{:<22}{:<22}{ratio}",
                cell(super::plan::TLS_LINK),
                cell("tunnel")
            );
        }

        let ceiling = |field: &str| -> String {
            let mut parts = Vec::new();
            let sizes = super::plan::ceiling_sizes(j)
                .into_iter()
                .map(|(name, size)| {
                    let size = if name == "default" { d } else { size as u32 };
                    (name, size)
                });
            for (name, size) in sizes {
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

        let _ = writeln!(
            o,
            "{:<32}{}",
            "floor: 2 durable commits ms",
            match (
                self.get("floor.ms"),
                self.get("floor.commit_p50_ms"),
                self.get("floor.commit_p99_ms")
            ) {
                (Some(f), Some(p50), Some(p99)) => format!(
                    "{} (one-row INSERT + commit p50 {}, p99 {})",
                    num(f),
                    num(p50),
                    num(p99)
                ),
                _ => "—".into(),
            }
        );
        let copy: Vec<String> = COMPARED_SIZES
            .iter()
            .filter_map(|size| {
                let c = self.get(&format!("copy.{size}B.rows_per_s"))?;
                Some(format!("{} at {size} B", num(c)))
            })
            .collect();
        let _ = writeln!(
            o,
            "{:<32}{}",
            "COPY reference rows/s",
            if copy.is_empty() {
                "—".into()
            } else {
                copy.join("; ")
            }
        );
        let _ = writeln!(
            o,
            "\ntargets (issues #12, #14), each a ratio within this run:"
        );
        for t in targets(self.m) {
            let _ = writeln!(
                o,
                "{:<34}{:<50}{:<15}{}",
                t.name,
                t.figure,
                t.target,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "missed",
                    None => "not measured",
                }
            );
        }
        let _ = writeln!(o);

        if checks.is_empty() {
            let _ = writeln!(o, "{:<32}not run", "log check");
        }
        for (run, what, v) in checks {
            let _ = writeln!(
                o,
                "{:<32}{}",
                format!("log check run {run}, {what}: "),
                v.text
            );
        }
        o
    }
}

/// One target of issue #12 or #14 and how this run did against it.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    /// What was measured, as printed.
    pub figure: String,
    pub target: String,
    /// The ratio compared with the target (percent, or a factor for "×" targets).
    pub value: Option<f64>,
    /// None when this run did not measure it.
    pub met: Option<bool>,
}

impl Target {
    fn new(name: impl Into<String>, target: &str) -> Target {
        Target {
            name: name.into(),
            figure: "—".into(),
            target: target.into(),
            value: None,
            met: None,
        }
    }

    fn measured(mut self, figure: String, value: f64, met: bool) -> Target {
        (self.figure, self.value, self.met) = (figure, Some(value), Some(met));
        self
    }

    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "figure": self.figure, "target": self.target,
               "value": self.value, "met": self.met})
    }
}

/// The targets, from the (median) metrics of a run.
pub fn targets(m: &Metrics) -> Vec<Target> {
    let g = |k: &str| m.get(k).copied();
    let mut v = Vec::new();

    let t = Target::new("send, 2,002 vs 2 peers", "≥ 90%");
    v.push(
        match (
            g("peers.2002.send_pps"),
            g("peers.2.send_pps"),
            g("peers.ratio_pct"),
        ) {
            (Some(many), Some(few), Some(p)) => t.measured(
                format!("{} vs {} pkt/s: {}", num(many), num(few), pct(p)),
                p,
                p >= 90.0,
            ),
            _ => t,
        },
    );

    for size in COMPARED_SIZES {
        let t = Target::new(format!("send / COPY rows/s, {size} B"), "≥ 90%");
        let send = super::plan::ceiling_key(size).and_then(|k| g(&format!("ceiling.{k}.send_pps")));
        v.push(
            match (
                send,
                g(&format!("copy.{size}B.rows_per_s")),
                g(&format!("copy.{size}B.send_pct")),
            ) {
                (Some(s), Some(c), Some(p)) => {
                    t.measured(format!("{} / {}: {}", num(s), num(c), pct(p)), p, p >= 90.0)
                }
                _ => t,
            },
        );
    }

    let t = Target::new("idle ping p50 / floor", "≤ ×1.25");
    v.push(
        match (
            g("tunnel.ping_idle.p50_ms"),
            g("floor.ms"),
            g("tunnel.ping_idle.per_floor"),
        ) {
            (Some(p), Some(f), Some(x)) => t.measured(
                format!("{} / {} ms: ×{}", num(p), num(f), num(x)),
                x,
                x <= 1.25,
            ),
            _ => t,
        },
    );

    let t = Target::new("ping p99 under TCP / idle p50", "≤ ×3, ≤ 20 ms");
    v.push(
        match (
            g("tunnel.tcp_default.ping_p99_ms"),
            g("tunnel.ping_idle.p50_ms"),
            g("tunnel.tcp_default.ping_p99_per_idle_p50"),
        ) {
            (Some(p99), Some(idle), Some(x)) => t.measured(
                format!("{} / {} ms: ×{}", num(p99), num(idle), num(x)),
                x,
                x <= 3.0 && p99 <= 20.0,
            ),
            _ => t,
        },
    );

    let t = Target::new("TCP / send ceiling, MTU 8000", "≥ 80%");
    v.push(
        match (
            g("tunnel.tcp_default.mbit"),
            g("ceiling.default.send_mbit"),
            g("tunnel.tcp_default.pct_of_ceiling"),
        ) {
            (Some(tcp), Some(c), Some(p)) => {
                let vs1400 = g("tunnel.tcp_default.pct_of_1400_ceiling")
                    .map(|q| format!(" (of 1400 B's: {})", pct(q)))
                    .unwrap_or_default();
                t.measured(
                    format!("{} / {} Mbit/s: {}{vs1400}", num(tcp), num(c), pct(p)),
                    p,
                    p >= 80.0,
                )
            }
            _ => t,
        },
    );

    let t = Target::new("UDP 64 B / 64 B send ceiling", "≥ 80%");
    v.push(
        match (
            g("tunnel.udp64_best.pps"),
            g("ceiling.64B.send_pps"),
            g("tunnel.udp64_best.pct_of_ceiling"),
        ) {
            (Some(u), Some(c), Some(p)) => t.measured(
                format!("{} / {} pkt/s: {}", num(u), num(c), pct(p)),
                p,
                p >= 80.0,
            ),
            _ => t,
        },
    );

    // Halved against 0.1.0: the tunnel's figure has no 0.1.0 side in this run, so the
    // verdict is the send ceiling's DB CPU per GB at 8000 B, 0.1.0 vs current (baseline).
    let t = Target::new("DB CPU s/GB, 8000 B, vs baseline", "≤ 50%");
    let tunnel = g("tunnel.tcp_default.cpu_db_s_per_gb")
        .map(|x| format!(" (TCP: {})", num(x)))
        .unwrap_or_default();
    v.push(
        match (
            g("baseline.before.8000B.send_cpu_db_s_per_gb"),
            g("baseline.after.8000B.send_cpu_db_s_per_gb"),
            g("baseline.8000B.cpu_ratio_pct"),
        ) {
            (Some(b), Some(a), Some(p)) => t.measured(
                format!("send {} → {} s/GB: {}{tunnel}", num(b), num(a), pct(p)),
                p,
                p <= 50.0,
            ),
            _ => Target {
                figure: format!("no baseline{tunnel}"),
                ..t
            },
        },
    );

    for size in COMPARED_SIZES {
        let t = Target::new(format!("send vs baseline, {size} B"), "≥ 90%");
        v.push(
            match (
                g(&format!("baseline.before.{size}B.send_pps")),
                g(&format!("baseline.after.{size}B.send_pps")),
                g(&format!("baseline.{size}B.send_ratio_pct")),
            ) {
                (Some(b), Some(a), Some(p)) => t.measured(
                    format!("{} → {} pkt/s: {}", num(b), num(a), pct(p)),
                    p,
                    p >= 90.0,
                ),
                _ => t,
            },
        );
    }
    v
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
        "host": env.host_json(),
        "postgres_settings": env.settings_json(),
        "settings": {
            "runs": settings.runs, "seconds": settings.seconds, "udp_seconds": settings.udp_seconds,
            "default_mtu": default_mtu, "jumbo_mtu": settings.jumbo_mtu, "ping_count": settings.ping_count,
            "ceiling_batch": super::ceiling::BATCH, "ceiling_recv_page": super::ceiling::PAGE,
            "baseline": match &settings.baseline {
                Some(super::baseline::Source::Tag(t)) => json!({"tag": t}),
                Some(super::baseline::Source::Bindir(d)) => json!({"bindir": d}),
                None => Value::Null,
            },
        },
        "median": median,
        "targets": targets(median).iter().map(Target::to_json).collect::<Vec<_>>(),
        "runs": runs,
    })
}

/// Writes a report to `<target>/bench/<prefix>-<stamp>.json` (the stamp from `started`)
/// and a copy to `<target>/bench/<latest>`; returns the first path.
pub fn save(prefix: &str, latest: &str, started: u64, v: &Value) -> std::io::Result<PathBuf> {
    let dir = pgvpn_tests::util::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(v).expect("serialize") + "\n";
    let path = dir.join(format!("{prefix}-{}.json", timestamps(started).1));
    std::fs::write(&path, &text)?;
    std::fs::write(dir.join(latest), &text)?;
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
    fn targets_met_missed_unmeasured() {
        let m: Metrics = [
            ("peers.2.send_pps", 1000.0),
            ("peers.2002.send_pps", 950.0),
            ("peers.ratio_pct", 95.0),
            ("tunnel.ping_idle.p50_ms", 2.0),
            ("tunnel.tcp_default.ping_p99_ms", 5.0),
            ("tunnel.tcp_default.ping_p99_per_idle_p50", 2.5),
            ("baseline.before.64B.send_pps", 100.0),
            ("baseline.after.64B.send_pps", 80.0),
            ("baseline.64B.send_ratio_pct", 80.0),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        let t = targets(&m);
        let verdict = |name: &str| t.iter().find(|t| t.name == name).unwrap().met;
        assert_eq!(verdict("send, 2,002 vs 2 peers"), Some(true));
        assert_eq!(verdict("ping p99 under TCP / idle p50"), Some(true));
        assert_eq!(verdict("send vs baseline, 64 B"), Some(false));
        assert_eq!(verdict("send / COPY rows/s, 64 B"), None);
        assert_eq!(verdict("idle ping p50 / floor"), None);
        // ×3 of the idle p50 is not enough when that is above 20 ms.
        let mut slow = m.clone();
        slow.insert("tunnel.ping_idle.p50_ms".into(), 10.0);
        slow.insert("tunnel.tcp_default.ping_p99_ms".into(), 25.0);
        let t = targets(&slow);
        assert_eq!(
            t.iter()
                .find(|t| t.name.starts_with("ping p99"))
                .unwrap()
                .met,
            Some(false)
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
