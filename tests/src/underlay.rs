//! A real (namespaced) network under the tunnel: the database host's namespace holds a
//! bridge with [`DB_ADDR`]; every host namespace attached gets a veth pair onto it and an
//! address in [`SUBNET`]. Everything lives in namespaces the test created: each veth pair
//! is created with both ends already inside them (`ip -n HOST link add ... peer ... netns
//! DB`), nothing touches the root namespace, and there is no default route anywhere (only
//! the connected /24).

use crate::netns::Netns;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The underlay: 198.19.0.0/24 (from 198.19.0.0/16, the harness's underlay range).
pub const SUBNET: &str = "198.19.0.0/24";
pub const PREFIX_LEN: u8 = 24;
/// The database host's address on it.
pub const DB_ADDR: &str = "198.19.0.1";
/// The bridge in the database host's namespace.
pub const BRIDGE: &str = "br0";
/// The veth end inside each attached host namespace.
pub const HOST_DEV: &str = "eth0";

/// The database host's namespace with its bridge.
pub struct Underlay {
    db: Netns,
    attached: u32,
}

impl Underlay {
    /// A namespace `tag` with bridge [`BRIDGE`] up and [`DB_ADDR`] on it.
    pub fn new(tag: &str) -> Underlay {
        let db = Netns::new(tag);
        db.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        db.ip(&[
            "addr",
            "add",
            &format!("{DB_ADDR}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ]);
        db.ip(&["link", "set", BRIDGE, "up"]);
        Underlay { db, attached: 0 }
    }

    /// The database host's namespace.
    pub fn db_ns(&self) -> &Netns {
        &self.db
    }

    /// Connects `host` to the bridge: [`HOST_DEV`] in `host` with `addr` (in [`SUBNET`]),
    /// its peer in the database namespace, enslaved to the bridge. Waits until `host`
    /// reaches [`DB_ADDR`].
    pub fn attach(&mut self, host: &Netns, addr: &str) {
        self.attached += 1;
        let peer = format!("vh{}", self.attached);
        host.ip(&[
            "link",
            "add",
            HOST_DEV,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            self.db.name(),
        ]);
        self.db.ip(&["link", "set", &peer, "master", BRIDGE]);
        self.db.ip(&["link", "set", &peer, "up"]);
        host.ip(&[
            "addr",
            "add",
            &format!("{addr}/{PREFIX_LEN}"),
            "dev",
            HOST_DEV,
        ]);
        host.ip(&["link", "set", HOST_DEV, "up"]);
        for ns in [host, &self.db] {
            let routes = ns.ip(&["route", "show", "default"]);
            assert!(
                routes.trim().is_empty(),
                "{} has a default route: {routes}",
                ns.name()
            );
        }
        // The bridge port goes through listening/learning before it forwards.
        let reached =
            crate::util::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
                host.exec(&["ping", "-c", "1", "-W", "1", "-q", DB_ADDR])
                    .status
                    .success()
                    .then_some(())
            });
        assert!(reached.is_some(), "{} cannot reach {DB_ADDR}", host.name());
    }
}

/// `tcpdump -w FILE` on a device inside a namespace, until stopped. Started with
/// `--immediate-mode -U` (each packet processed and written at once) and stopped with
/// SIGINT, so the file holds everything seen.
pub struct Capture {
    bg: crate::netns::Bg,
    file: std::path::PathBuf,
}

impl Capture {
    /// Starts capturing everything on `dev` in `ns` into `file`; returns once tcpdump says
    /// it is listening.
    pub fn start(ns: &Netns, dev: &str, file: &Path) -> Capture {
        assert!(
            Command::new("tcpdump")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "tcpdump is not installed (apt-get install tcpdump)"
        );
        let log = file.with_extension("log");
        let f = file.to_str().expect("utf-8 path");
        let bg = ns.spawn(
            // --immediate-mode: each packet handed over at once (otherwise they wait in a
            // kernel block that SIGINT discards); -Z root: Debian's tcpdump would drop to
            // user tcpdump before opening the file.
            &[
                "tcpdump",
                "-i",
                dev,
                "-n",
                "-s",
                "0",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
                f,
            ],
            None,
            Some(&log),
        );
        let listening =
            crate::util::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|t| t.contains("listening on"))
                    .map(|_| ())
            });
        assert!(
            listening.is_some(),
            "tcpdump on {dev} in {} did not start: {}",
            ns.name(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Capture {
            bg,
            file: file.to_path_buf(),
        }
    }

    /// Stops the capture (SIGINT, then waits) and returns the pcap file's bytes.
    pub fn stop(mut self) -> Vec<u8> {
        self.bg.signal("INT");
        if self.bg.wait_timeout(Duration::from_secs(10)).is_none() {
            self.bg.kill();
        }
        std::fs::read(&self.file).unwrap_or_default()
    }
}

/// How many packets in a pcap file match a tcpdump filter expression.
pub fn count_packets(file: &Path, filter: &str) -> usize {
    let out = Command::new("tcpdump")
        .args(["-r", file.to_str().expect("utf-8 path"), "-nn"])
        .args(filter.split_whitespace())
        .stderr(Stdio::null())
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Does `needle` occur anywhere in `haystack`?
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn contains_finds_bytes() {
        assert!(super::contains(b"abcdef", b"cde"));
        assert!(!super::contains(b"abcdef", b"xyz"));
        assert!(!super::contains(b"abc", b""));
    }
}
