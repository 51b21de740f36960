//! Network namespaces for the tunnel tests.
//!
//! Safety rules (enforced here, not left to callers):
//! * a namespace is created empty (`ip netns add`): only `lo`, no default route, no veth
//!   to the root namespace. Test traffic can only leave it through a tun device a shim
//!   creates inside it, i.e. through PostgreSQL.
//! * names are `pgvt-<test pid>-<counter>`; namespaces with that prefix whose PID is dead
//!   are removed first (together with processes left inside them).
//! * Drop kills only the processes this value started (by PID, and only while they are
//!   still inside this namespace), then deletes the namespace.

use crate::util::{self, describe, next_id, output, run_ok};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NS_PREFIX: &str = "pgvt-";

/// PIDs in a namespace (`ip netns pids`).
fn ns_pids(name: &str) -> Vec<u32> {
    let out = output(Command::new("ip").args(["netns", "pids", name]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Alive and not a zombie (an exited child not reaped yet is in no namespace).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        st.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

fn list_namespaces() -> Vec<String> {
    let out = output(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Remove namespaces (and the processes in them) left by dead test processes.
pub fn cleanup_stale() {
    for name in list_namespaces() {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || util::pid_alive(pid) {
            continue;
        }
        // Everything in such a namespace was started by a test run of this harness.
        for p in ns_pids(&name) {
            util::signal(p, "KILL");
        }
        let _ = output(Command::new("ip").args(["netns", "del", &name]));
        eprintln!("[netns] removed stale namespace {name}");
    }
}

/// A network namespace owned by this test.
pub struct Netns {
    name: String,
    /// PIDs started in this namespace (by `spawn`/`Shim::start`), for cleanup.
    started: Arc<Mutex<Vec<u32>>>,
}

impl Netns {
    /// Create `pgvt-<pid>-<n>-<tag>` (tag: short, [a-z0-9]) with `lo` up.
    pub fn new(tag: &str) -> Netns {
        assert!(util::is_root(), "network namespaces need root");
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(cleanup_stale);

        let name = format!("{NS_PREFIX}{}-{}-{tag}", std::process::id(), next_id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            started: Arc::new(Mutex::new(Vec::new())),
        };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        // Paranoia: the namespace must not have any route out.
        let routes = ns.ip(&["route", "show", "default"]);
        assert!(
            routes.trim().is_empty(),
            "fresh namespace has a default route?! {routes}"
        );
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `program args…` inside the namespace (`ip netns exec`).
    /// `ip netns exec` execs the program directly, so the child's PID is the program's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `argv` inside the namespace, wait, return its output (no panic on failure).
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        output(&mut c)
    }

    /// Run `argv` inside the namespace; panic if it fails; return stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        run_ok(&mut c)
    }

    /// `ip -n NS <args>`; panic on failure; return stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n NS <args>` without panicking.
    pub fn try_ip(&self, args: &[&str]) -> Output {
        output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Spawn a background process inside the namespace. stdout and stderr go to the given
    /// files (or are discarded). The process is killed when the returned handle or this
    /// namespace is dropped.
    pub fn spawn(&self, argv: &[&str], stdout: Option<&Path>, stderr: Option<&Path>) -> Bg {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        self.spawn_command(c, stdout, stderr)
    }

    /// Spawn a prepared `command()` in the background (see [`Netns::spawn`]).
    pub fn spawn_command(
        &self,
        mut c: Command,
        stdout: Option<&Path>,
        stderr: Option<&Path>,
    ) -> Bg {
        let open =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let (out, err) = match (stdout, stderr) {
            // Same file for both: one open file description, so writes append in order.
            (Some(o), Some(e)) if o == e => {
                let f = open(o);
                let g = f.try_clone().expect("dup log file");
                (Stdio::from(f), Stdio::from(g))
            }
            (o, e) => (
                o.map(|p| Stdio::from(open(p))).unwrap_or_else(Stdio::null),
                e.map(|p| Stdio::from(open(p))).unwrap_or_else(Stdio::null),
            ),
        };
        c.stdin(Stdio::null()).stdout(out).stderr(err);
        let what = describe(&c);
        let child = c.spawn().unwrap_or_else(|e| panic!("spawn `{what}`: {e}"));
        self.started.lock().unwrap().push(child.id());
        Bg {
            child: Some(child),
            what,
        }
    }

    /// Read a file as seen from inside the namespace (sysfs is per-namespace).
    pub fn read_file(&self, path: &str) -> String {
        self.exec_ok(&["cat", path]).trim().to_string()
    }

    /// `(rx_packets, tx_packets)` of a device in this namespace.
    pub fn dev_packets(&self, dev: &str) -> (u64, u64) {
        let out = self.exec_ok(&[
            "cat",
            &format!("/sys/class/net/{dev}/statistics/rx_packets"),
            &format!("/sys/class/net/{dev}/statistics/tx_packets"),
        ]);
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|x| x.parse().expect("counter"))
            .collect();
        assert_eq!(v.len(), 2, "unexpected counters output {out:?}");
        (v[0], v[1])
    }

    /// Create a persistent tun device (survives the process that uses it, so its
    /// counters accumulate across shim restarts).
    pub fn add_persistent_tun(&self, dev: &str) {
        self.ip(&["tuntap", "add", "dev", dev, "mode", "tun"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let started = self.started.lock().unwrap().clone();
        // A process spawned a moment ago may still be `ip netns exec` on its way in (it
        // enters the namespace, then execs): wait for it to arrive or end, or it would
        // escape the kill below and outlive its namespace.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut inside = ns_pids(&self.name);
        while Instant::now() < deadline
            && started.iter().any(|p| !inside.contains(p) && running(*p))
        {
            std::thread::sleep(Duration::from_millis(20));
            inside = ns_pids(&self.name);
        }
        for pid in started.iter().filter(|p| inside.contains(p)) {
            util::signal(*pid, "KILL");
        }
        // Give the kernel a moment to reap, then delete the namespace.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && started.iter().any(|p| ns_pids(&self.name).contains(p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = output(Command::new("ip").args(["netns", "del", &self.name]));
        if !out.status.success() {
            eprintln!(
                "[netns] ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A background process started inside a namespace. Drop kills it (SIGKILL, by PID) and
/// reaps it.
pub struct Bg {
    child: Option<Child>,
    what: String,
}

impl Bg {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Non-blocking: has it exited?
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait up to `timeout` for it to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal (by PID) if it is still running.
    pub fn signal(&mut self, sig: &str) {
        if self.try_wait().is_none() {
            util::signal(self.pid(), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            return c.wait().ok();
        }
        None
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
