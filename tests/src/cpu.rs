//! CPU time from /proc/PID/stat (utime + stime, fields 14/15, in clock ticks; for a
//! process they cover all its threads).
//!
//! For the database: the postmaster, every live child of it (backends, walwriter,
//! checkpointer, autovacuum…), and children that exited in between, which the kernel adds
//! to the postmaster's cutime/cstime (fields 16/17) when it reaps them.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

/// Parse `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field n is f[n - 3].
    let n = |i: usize| -> Option<u64> { f.get(i - 3)?.parse().ok() };
    Some(Stat {
        ppid: n(4)? as u32,
        utime: n(14)?,
        stime: n(15)?,
        cutime: n(16)?,
        cstime: n(17)?,
    })
}

pub fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds a process (all its threads) has used so far; 0 if it is gone.
pub fn process_seconds(pid: u32) -> f64 {
    read_stat(pid)
        .map(|s| (s.utime + s.stime) as f64 / ticks_per_second())
        .unwrap_or(0.0)
}

/// What a PostgreSQL process is, from its title (`/proc/PID/cmdline`):
/// `postgres: alice vpn [local] SELECT` → `backend alice`, `postgres: walwriter` →
/// `walwriter`, `postgres: autovacuum worker vpn` → `autovacuum worker`.
pub fn pg_label(cmdline: &str) -> String {
    let title = cmdline.replace('\0', " ");
    let title = title.trim();
    let Some(rest) = title.strip_prefix("postgres: ") else {
        return "postmaster".into();
    };
    if rest.contains("[local]") || rest.contains('(') {
        return format!("backend {}", rest.split_whitespace().next().unwrap_or("?"));
    }
    if rest.starts_with("autovacuum worker") {
        return "autovacuum worker".into();
    }
    rest.to_string()
}

/// CPU ticks of a PostgreSQL cluster's processes at one moment.
#[derive(Clone, Debug, Default)]
pub struct TreeSample {
    /// pid → (label, utime + stime)
    procs: BTreeMap<u32, (String, u64)>,
    /// The postmaster's cutime + cstime: children that have exited.
    reaped: u64,
}

pub fn sample_tree(postmaster: u32) -> TreeSample {
    let mut s = TreeSample::default();
    if let Some(pm) = read_stat(postmaster) {
        s.procs
            .insert(postmaster, ("postmaster".into(), pm.utime + pm.stime));
        s.reaped = pm.cutime + pm.cstime;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return s;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(st) = read_stat(pid) else { continue };
        if st.ppid != postmaster {
            continue;
        }
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        s.procs.insert(pid, (pg_label(&cmd), st.utime + st.stime));
    }
    s
}

/// CPU seconds between two samples, per label (processes started in between count
/// from zero; exited ones under "exited processes").
pub fn tree_delta(before: &TreeSample, after: &TreeSample) -> BTreeMap<String, f64> {
    let tck = ticks_per_second();
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (label, t)) in &after.procs {
        let t0 = before.procs.get(pid).map(|(_, t0)| *t0).unwrap_or(0);
        *out.entry(label.clone()).or_default() += t.saturating_sub(t0) as f64 / tck;
    }
    let reaped = after.reaped.saturating_sub(before.reaped);
    if reaped > 0 {
        *out.entry("exited processes".into()).or_default() += reaped as f64 / tck;
    }
    out
}

/// Watches the database and the two shims during a measurement.
pub struct Probe {
    pub postmaster: u32,
    pub shims: [u32; 2],
}

pub struct ProbeSample {
    tree: TreeSample,
    shims: [f64; 2],
}

/// CPU seconds used between two probe samples.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub db: f64,
    pub db_by_process: BTreeMap<String, f64>,
    pub shims: [f64; 2],
}

impl Probe {
    pub fn sample(&self) -> ProbeSample {
        ProbeSample {
            tree: sample_tree(self.postmaster),
            shims: self.shims.map(process_seconds),
        }
    }

    pub fn usage(&self, before: &ProbeSample, after: &ProbeSample) -> Usage {
        let by = tree_delta(&before.tree, &after.tree);
        Usage {
            db: by.values().sum(),
            db_by_process: by,
            shims: [0, 1].map(|i| (after.shims[i] - before.shims[i]).max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line() {
        // Fields 1..17 of a real line, then the rest.
        let line = "4242 (postgres) S 4100 4100 4100 0 -1 4194560 1234 0 0 0 250 75 3 4 20 0 1 0 \
                    12345 230000000 5000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 4100,
                utime: 250,
                stime: 75,
                cutime: 3,
                cstime: 4
            })
        );
        // A command name with spaces and parentheses.
        let odd = "7 (a b) (c)) R 1 7 7 0 -1 0 0 0 0 0 11 22 33 44 20 0 1 0 5 0 0\n";
        assert_eq!(
            parse_stat(odd),
            Some(Stat {
                ppid: 1,
                utime: 11,
                stime: 22,
                cutime: 33,
                cstime: 44
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0 1"), None);
    }

    #[test]
    fn labels() {
        assert_eq!(
            pg_label("postgres: alice vpn [local] SELECT\0\0"),
            "backend alice"
        );
        assert_eq!(pg_label("postgres: bob vpn [local] idle"), "backend bob");
        assert_eq!(pg_label("postgres: walwriter "), "walwriter");
        assert_eq!(
            pg_label("postgres: autovacuum worker vpn"),
            "autovacuum worker"
        );
        assert_eq!(
            pg_label("/usr/lib/postgresql/15/bin/postgres\0-D\0/tmp/x\0"),
            "postmaster"
        );
    }

    #[test]
    fn delta_counts_new_and_reaped() {
        let mut a = TreeSample::default();
        a.procs.insert(10, ("backend alice".into(), 100));
        a.reaped = 5;
        let mut b = TreeSample::default();
        b.procs.insert(10, ("backend alice".into(), 300));
        b.procs.insert(11, ("walwriter".into(), 50));
        b.reaped = 25;
        let tck = ticks_per_second();
        let d = tree_delta(&a, &b);
        assert_eq!(d["backend alice"], 200.0 / tck);
        assert_eq!(d["walwriter"], 50.0 / tck);
        assert_eq!(d["exited processes"], 20.0 / tck);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(read_stat(std::process::id()).is_some());
    }
}
