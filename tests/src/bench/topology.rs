//! The two ways from host A to host B, each in namespaces of its own:
//!
//! * [`Tunnel`]: a private cluster with the extension, peers alice and bob, and per
//!   session a `pgvpn-shim` in each namespace (started and stopped by [`Tunnel::start`] /
//!   [`Tunnel::stop`], which also runs the log check). The cluster runs in a namespace of
//!   its own on an underlay (`pgvpn_tests::underlay`) that both hosts are attached to, so
//!   a session's shims reach it either through its unix socket or over TCP with TLS
//!   (verify-full, client certificates), as [`Transport`] says.
//! * [`Direct`]: the reference, a veth pair between two namespaces (neither end in the
//!   root namespace).

use super::logcheck::{self, Counters, Rows, Verdict};
use super::measure::Hosts;
use super::pki::Ca;
use super::{check_interrupt, Result, Scratch};
use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::sql::{create_peer, scalar_i64};
use pgvpn_tests::underlay::{self, Underlay, DB_ADDR};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{db_error, Cluster, Netns, Shim, ShimSpec};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const DB: &str = "vpn";
pub const TUN: &str = "pgvpn0";
pub const ALICE: &str = "198.18.0.1";
pub const BOB: &str = "198.18.0.2";
const DIRECT_A: &str = "198.18.1.1";
const DIRECT_B: &str = "198.18.1.2";
const ALICE_UNDERLAY: &str = "198.19.0.2";
const BOB_UNDERLAY: &str = "198.19.0.3";

/// How a session's shims reach the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The cluster's unix socket (the harness's conninfo).
    Unix,
    /// TCP to the underlay address with TLS: sslmode verify-full (the shim's default),
    /// the server's certificate from a CA of this run, client certificates (`cert` auth).
    Tls,
}

/// The run's CA and the files each peer's shim needs for [`Transport::Tls`].
struct Pki {
    ca_crt: PathBuf,
    /// Per role: (certificate, key).
    clients: [(String, (PathBuf, PathBuf)); 2],
    _dir: TmpDir,
}

/// postgresql.conf lines for the bench on top of the harness's (which keeps fsync and
/// synchronous_commit at their durable defaults).
pub const BENCH_CONF: &[&str] = &[
    "shared_buffers = 512MB",
    "wal_buffers = 64MB",
    "max_wal_size = 4GB",
    "min_wal_size = 1GB",
    "checkpoint_timeout = 15min",
    "checkpoint_completion_target = 0.9",
    // The ceiling's bob reads only after 10 s of sending: at 64 B that is over 2M packets
    // waiting, past the default limit of 1M (every send would then be rejected `backlog`).
    "pgvpn.max_backlog = 0",
];

/// Namespaces of other harness users (tests, the demo, another bench) that exist right
/// now: they share the two cores, so figures taken meanwhile are noisy.
pub fn foreign_namespaces() -> Vec<String> {
    let out = pgvpn_tests::util::output(std::process::Command::new("ip").args(["netns", "list"]));
    let mine = format!("{}{}-", pgvpn_tests::netns::NS_PREFIX, std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(pgvpn_tests::netns::NS_PREFIX) && !n.starts_with(&mine))
        .map(str::to_string)
        .collect()
}

/// The direct reference: `veth` A ↔ B.
pub struct Direct {
    pub a: Netns,
    pub b: Netns,
}

impl Direct {
    pub fn new() -> Direct {
        let (a, b) = (Netns::new("da"), Netns::new("db"));
        a.ip(&[
            "link",
            "add",
            "va",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            b.name(),
        ]);
        a.ip(&["addr", "add", &format!("{DIRECT_A}/24"), "dev", "va"]);
        b.ip(&["addr", "add", &format!("{DIRECT_B}/24"), "dev", "vb"]);
        a.ip(&["link", "set", "va", "up"]);
        b.ip(&["link", "set", "vb", "up"]);
        Direct { a, b }
    }

    pub fn set_mtu(&self, mtu: u32) {
        self.a.ip(&["link", "set", "va", "mtu", &mtu.to_string()]);
        self.b.ip(&["link", "set", "vb", "mtu", &mtu.to_string()]);
    }

    pub fn hosts<'a>(&'a self, scratch: &'a Scratch) -> Hosts<'a> {
        Hosts {
            client: &self.a,
            server: &self.b,
            addr: DIRECT_B,
            scratch,
        }
    }
}

/// Two shims running, and where the counters stood when they started.
struct Session {
    shims: [Shim; 2],
    mark: Counters,
    last_id: i64,
}

/// Field order is drop order: shims, host namespaces, the cluster (stopped inside its
/// namespace), the underlay (that namespace), the certificates.
pub struct Tunnel {
    session: Option<Session>,
    pub a: Netns,
    pub b: Netns,
    peers: [i32; 2],
    pub cluster: Cluster,
    _underlay: Underlay,
    pki: Pki,
}

impl Tunnel {
    /// Cluster (with [`BENCH_CONF`]) + extension + peers alice (198.18.0.1) and bob
    /// (198.18.0.2) + a namespace each with a persistent tun device, so the device's
    /// counters outlive the shims.
    pub fn new() -> Tunnel {
        let dir = TmpDir::new("bench-pki");
        let ca = Ca::new(&dir.file(""), "ca", "pgvpn bench CA");
        let server = ca.issue(
            "server",
            "db.bench",
            &format!("subjectAltName=IP:{DB_ADDR}\nextendedKeyUsage=serverAuth\n"),
        );
        let client = |role: &str| {
            let files = ca.issue(role, role, "extendedKeyUsage=clientAuth\n");
            (role.to_string(), files)
        };
        let pki = Pki {
            ca_crt: ca.crt(),
            clients: [client("alice"), client("bob")],
            _dir: dir,
        };

        let mut underlay = Underlay::new("tdb");
        let (a, b) = (Netns::new("ta"), Netns::new("tb"));
        underlay.attach(&a, ALICE_UNDERLAY);
        underlay.attach(&b, BOB_UNDERLAY);
        let mut extra_conf: Vec<String> = BENCH_CONF.iter().map(|s| s.to_string()).collect();
        extra_conf.extend([
            format!("listen_addresses = '{DB_ADDR}'"),
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "ssl_ca_file = 'ca.crt'".into(),
        ]);
        let cluster = Cluster::start_with(ClusterOptions {
            extra_conf,
            hba: vec![
                format!("hostssl {DB} alice,bob {} cert", underlay::SUBNET),
                "host all all 0.0.0.0/0 reject".into(),
            ],
            netns: Some(underlay.db_ns().name().to_string()),
            data_files: vec![
                (server.0, "server.crt".into()),
                (server.1, "server.key".into()),
                (pki.ca_crt.clone(), "ca.crt".into()),
            ],
        });
        cluster.create_db(DB);
        cluster.create_extension(DB);
        let alice = create_peer(&cluster, DB, "alice", &[&format!("{ALICE}/32")]);
        let bob = create_peer(&cluster, DB, "bob", &[&format!("{BOB}/32")]);
        a.add_persistent_tun(TUN);
        b.add_persistent_tun(TUN);
        Tunnel {
            session: None,
            a,
            b,
            peers: [alice, bob],
            cluster,
            _underlay: underlay,
            pki,
        }
    }

    /// `role`'s connection string for `transport`.
    fn conninfo(&self, role: &str, transport: Transport) -> String {
        match transport {
            Transport::Unix => self.cluster.conninfo(role, DB),
            Transport::Tls => {
                let (_, (crt, key)) = self
                    .pki
                    .clients
                    .iter()
                    .find(|(r, _)| r == role)
                    .expect("a client certificate for the role");
                format!(
                    "host={DB_ADDR} port={} user={role} dbname={DB} sslrootcert={} sslcert={} sslkey={}",
                    self.cluster.port(),
                    self.pki.ca_crt.display(),
                    crt.display(),
                    key.display()
                )
            }
        }
    }

    /// How many of the shims' sessions use TLS (pg_stat_ssl), of how many.
    pub fn tls_sessions(&self) -> Result<(i64, i64)> {
        let mut su = self.cluster.superuser(DB);
        let row = su
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.usename IN ('alice', 'bob')",
                &[],
            )
            .map_err(|e| db_error(&e))?;
        Ok((row.get(0), row.get(1)))
    }

    pub fn hosts<'a>(&'a self, scratch: &'a Scratch) -> Hosts<'a> {
        Hosts {
            client: &self.a,
            server: &self.b,
            addr: BOB,
            scratch,
        }
    }

    pub fn postmaster_pid(&self) -> u32 {
        let f = self.cluster.data_dir().join("postmaster.pid");
        let text =
            std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid in postmaster.pid")
    }

    /// PIDs of the running shims (A, B).
    pub fn shim_pids(&self) -> [u32; 2] {
        let s = self.session.as_ref().expect("no tunnel session");
        [s.shims[0].pid(), s.shims[1].pid()]
    }

    /// Start both shims on the unix socket (`--mtu` only if given); returns the tun MTU
    /// in effect.
    pub fn start(&mut self, mtu: Option<u32>) -> u32 {
        self.start_with(mtu, Transport::Unix)
    }

    /// [`Tunnel::start`], the shims connecting by `transport`.
    pub fn start_with(&mut self, mtu: Option<u32>, transport: Transport) -> u32 {
        assert!(
            self.session.is_none(),
            "a tunnel session is already running"
        );
        let mut su = self.cluster.superuser(DB);
        // What the ceilings and the previous session wrote is flushed now, not by a
        // checkpoint in the middle of this session's idle ping (p99 935 ms once).
        su.batch_execute("CHECKPOINT")
            .unwrap_or_else(|e| panic!("CHECKPOINT: {}", db_error(&e)));
        let last_id = scalar_i64(
            &mut su,
            "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM pgvpn.packet_id",
        );
        let mark = self.counters(&mut su);
        let start = |ns: &Netns, role: &str, addr: &str| {
            // The device persists: drop the previous session's address (the shim adds it).
            ns.ip(&["addr", "flush", "dev", TUN]);
            let mut spec = ShimSpec::new(&self.cluster, DB, role, &format!("{addr}/24"), TUN);
            spec.conninfo = self.conninfo(role, transport);
            if let Some(m) = mtu {
                spec.extra_args = vec!["--mtu".into(), m.to_string()];
            }
            Shim::start(ns, &self.cluster, &spec)
        };
        let shims = [start(&self.a, "alice", ALICE), start(&self.b, "bob", BOB)];
        self.session = Some(Session {
            shims,
            mark,
            last_id,
        });
        self.a
            .read_file(&format!("/sys/class/net/{TUN}/mtu"))
            .parse()
            .expect("tun mtu")
    }

    fn counters(&self, su: &mut postgres::Client) -> Counters {
        let rejected = |su: &mut postgres::Client, peer: i32| {
            scalar_i64(
                su,
                &format!(
                    "SELECT sum(packets)::bigint FROM pgvpn.reject_counts WHERE peer = {peer}"
                ),
            )
        };
        let (a_rx, a_tx) = self.a.dev_packets(TUN);
        let (b_rx, b_tx) = self.b.dev_packets(TUN);
        Counters {
            a_rx,
            a_tx,
            b_rx,
            b_tx,
            a_rejected: rejected(su, self.peers[0]),
            b_rejected: rejected(su, self.peers[1]),
        }
    }

    /// Wait until the tunnel is quiet: nothing left for either peer to receive and the tun
    /// counters unchanged for half a second (at most 60 s).
    pub fn settle(&self) -> Result<()> {
        let mut su = self.cluster.superuser(DB);
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut last, mut stable) = (None, 0);
        loop {
            check_interrupt()?;
            let now = (self.a.dev_packets(TUN), self.b.dev_packets(TUN));
            let backlog = scalar_i64(&mut su, "SELECT sum(backlog)::bigint FROM pgvpn.peer_stats");
            stable = if backlog == 0 && last == Some(now) {
                stable + 1
            } else {
                0
            };
            if stable >= 2 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "tunnel not quiet after 60 s (backlog {backlog} packets)"
                ));
            }
            last = Some(now);
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Settle, stop both shims (SIGTERM, exit status 0 expected), then check the log
    /// against the tun counters.
    pub fn stop(&mut self) -> Result<Verdict> {
        let settled = self.settle();
        let mut s = self.session.take().expect("no tunnel session");
        let mut summaries = Vec::new();
        for shim in s.shims.iter_mut() {
            let st = shim.terminate();
            let out = std::fs::read_to_string(shim.log_path()).unwrap_or_default();
            if !st.success() {
                return Err(format!(
                    "{} exited with {st}:\n{}",
                    shim.spec().role,
                    shim.log_tail(20)
                ));
            }
            summaries.push(
                logcheck::parse_summary(&out)
                    .ok_or_else(|| format!("no summary line from {}'s shim", shim.spec().role))?,
            );
        }
        settled?;
        let mut su = self.cluster.superuser(DB);
        let after = self.counters(&mut su);
        let rows = self.rows_since(&mut su, s.last_id)?;
        Ok(logcheck::verify(
            &s.mark,
            &after,
            rows,
            &summaries[0],
            &summaries[1],
        ))
    }

    /// Rows logged with id > `last_id`, by sender (found through the delivery index).
    fn rows_since(&self, su: &mut postgres::Client, last_id: i64) -> Result<Rows> {
        su.batch_execute("SET enable_seqscan = off")
            .map_err(|e| db_error(&e))?;
        let peers = self.peers.to_vec();
        let rows = su
            .query(
                "SELECT src_peer, count(*) FROM pgvpn.packets \
                 WHERE dst_peer = ANY($1::int[]) AND id > $2 GROUP BY src_peer",
                &[&peers, &last_id],
            )
            .map_err(|e| db_error(&e))?;
        let mut r = Rows::default();
        for row in rows {
            let (src, n): (i32, i64) = (row.get(0), row.get(1));
            if src == self.peers[0] {
                r.from_a = n;
            } else if src == self.peers[1] {
                r.from_b = n;
            } else {
                return Err(format!("{n} rows from unexpected peer {src}"));
            }
        }
        Ok(r)
    }
}
