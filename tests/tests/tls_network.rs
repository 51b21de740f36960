//! The tunnel across a real (namespaced) network, over TLS with verified certificates.
//!
//! PostgreSQL runs in a namespace of its own and listens only on the underlay address
//! 198.19.0.1 (a bridge); the two hosts' namespaces reach it over veth pairs (see
//! `pgvpn_tests::underlay`: no link to the root namespace, no default route anywhere).
//! The server has `ssl = on` with a CA this test makes (the README's openssl commands),
//! `hostssl ... cert` for the peers and `hostnossl ... reject`; the shims log in with
//! client certificates and check the server's (sslmode verify-full, the default).
//!
//! Proves: the tunnel works (ping; TCP with hash-checked bytes); nothing is readable on
//! the wire (a ping payload with a unique marker crosses the tunnel while tcpdump records
//! the underlay: the marker is in the tun capture and not in the underlay one; as the
//! control, a third peer let in without TLS has its marker found there); a server
//! whose certificate comes from a CA the shim does not trust is refused with exit code 3;
//! sslmode=disable fails against this server; the environment form (PGSSLROOTCERT,
//! PGSSLCERT, PGSSLKEY, and verify-full by default) works.
//!
//! Needs root, the extension installed, the shim built, tcpdump and openssl.

#[path = "../../shim/tests/support/pki.rs"]
mod pki;

use pgvpn_tests::cluster::ClusterOptions;
use pgvpn_tests::sql::create_peer;
use pgvpn_tests::underlay::{self, Capture, Underlay, DB_ADDR};
use pgvpn_tests::util::TmpDir;
use pgvpn_tests::{util, Bg, Cluster, Netns, Shim, ShimSpec};
use pki::Ca;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DB: &str = "vpn";
const TUN: &str = "pgvpn0";
const ALICE: &str = "198.18.0.1";
const BOB: &str = "198.18.0.2";
const ALICE_UNDERLAY: &str = "198.19.0.2";
const BOB_UNDERLAY: &str = "198.19.0.3";
/// carol: the control for the wire check, the one peer allowed in without TLS.
const CAROL: &str = "198.18.0.3";
const CAROL_UNDERLAY: &str = "198.19.0.4";

fn netcheck() -> &'static str {
    env!("CARGO_BIN_EXE_pgvpn-netcheck")
}

/// The client files of one peer.
struct ClientFiles {
    crt: PathBuf,
    key: PathBuf,
}

/// Everything one test owns. Field order is drop order: shims, host namespaces, the
/// cluster (stopped inside its namespace), the underlay (the database's namespace), files.
struct Net {
    shims: Vec<Shim>,
    ns_a: Netns,
    ns_b: Netns,
    ns_c: Netns,
    cluster: Cluster,
    underlay: Underlay,
    ca: Ca,
    other_ca: Ca,
    alice: ClientFiles,
    bob: ClientFiles,
    tmp: TmpDir,
}

fn require_env() {
    assert!(
        util::is_root(),
        "needs root (network namespaces, tun devices)"
    );
    assert!(
        pgvpn_tests::shim_path().exists(),
        "pgvpn-shim not built: {} is missing",
        pgvpn_tests::shim_path().display()
    );
}

impl Net {
    fn new() -> Net {
        require_env();
        let tmp = TmpDir::new("tlsnet");
        let pki_dir = tmp.file("pki");
        std::fs::create_dir(&pki_dir).unwrap();
        let ca = Ca::new(&pki_dir, "ca", "pgvpn test CA");
        let other_ca = Ca::new(&pki_dir, "other-ca", "some other CA");
        let server = ca.issue(
            "server",
            "db.test",
            &format!("subjectAltName=DNS:db.test,IP:{DB_ADDR}\nextendedKeyUsage=serverAuth\n"),
        );
        let client = |name: &str| {
            let (crt, key) = ca.issue(name, name, "extendedKeyUsage=clientAuth\n");
            ClientFiles { crt, key }
        };
        let (alice, bob) = (client("alice"), client("bob"));

        let mut underlay = Underlay::new("pgdb");
        let ns_a = Netns::new("alice");
        let ns_b = Netns::new("bob");
        let ns_c = Netns::new("carol");
        underlay.attach(&ns_a, ALICE_UNDERLAY);
        underlay.attach(&ns_b, BOB_UNDERLAY);
        underlay.attach(&ns_c, CAROL_UNDERLAY);

        let opts = ClusterOptions {
            extra_conf: vec![
                format!("listen_addresses = '{DB_ADDR}'"),
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
                "ssl_ca_file = 'ca.crt'".into(),
            ],
            hba: vec![
                // The control peer only, from its own address only.
                format!("hostnossl {DB} carol {CAROL_UNDERLAY}/32 trust"),
                format!(
                    "hostssl {DB} alice,bob {}/{} cert",
                    underlay::SUBNET.split('/').next().unwrap(),
                    underlay::PREFIX_LEN
                ),
                "hostnossl all all 0.0.0.0/0 reject".into(),
            ],
            netns: Some(underlay.db_ns().name().to_string()),
            data_files: vec![
                (server.0.clone(), "server.crt".into()),
                (server.1.clone(), "server.key".into()),
                (ca.crt(), "ca.crt".into()),
            ],
        };
        let cluster = Cluster::start_with(opts);
        cluster.create_db(DB);
        cluster.create_extension(DB);
        create_peer(&cluster, DB, "alice", &[&format!("{ALICE}/32")]);
        create_peer(&cluster, DB, "bob", &[&format!("{BOB}/32")]);
        create_peer(&cluster, DB, "carol", &[&format!("{CAROL}/32")]);
        Net {
            shims: Vec::new(),
            ns_a,
            ns_b,
            ns_c,
            cluster,
            underlay,
            ca,
            other_ca,
            alice,
            bob,
            tmp,
        }
    }

    /// `host=198.19.0.1 port=P user=<role> dbname=vpn` plus `extra`.
    fn conninfo(&self, role: &str, extra: &str) -> String {
        format!(
            "host={DB_ADDR} port={} user={role} dbname={DB} connect_timeout=5 {extra}",
            self.cluster.port()
        )
    }

    /// The connection string with all TLS files written out (verify-full by default).
    fn tls_conninfo(&self, role: &str, files: &ClientFiles) -> String {
        self.conninfo(
            role,
            &format!(
                "sslrootcert={} sslcert={} sslkey={}",
                self.ca.crt().display(),
                files.crt.display(),
                files.key.display()
            ),
        )
    }

    fn spec(&self, role: &str, conninfo: String, addr: &str) -> ShimSpec {
        ShimSpec {
            role: role.into(),
            conninfo,
            address: format!("{addr}/24"),
            tun: TUN.into(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    fn bg(&self, ns: &Netns, name: &str, argv: &[&str]) -> (Bg, PathBuf) {
        let out = self.tmp.file(&format!("{name}.out"));
        let err = self.tmp.file(&format!("{name}.err"));
        (ns.spawn(argv, Some(&out), Some(&err)), out)
    }

    /// Every session of `role` uses TLS and logged in with its client certificate.
    fn assert_tls_sessions(&self, role: &str) {
        let mut su = self.cluster.superuser(DB);
        let rows = su
            .query(
                "SELECT s.ssl, s.client_dn, a.client_addr::text \
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = $1",
                &[&role],
            )
            .unwrap();
        assert!(
            rows.len() >= 2,
            "uplink and downlink of {role}: {} sessions",
            rows.len()
        );
        for r in rows {
            let (ssl, dn, addr): (bool, Option<String>, Option<String>) =
                (r.get(0), r.get(1), r.get(2));
            assert!(ssl, "{role}: a session without TLS");
            assert_eq!(dn.as_deref(), Some(format!("/CN={role}").as_str()));
            let addr = addr.unwrap_or_default();
            assert!(
                addr.starts_with("198.19.0."),
                "{role} came over the underlay: {addr}"
            );
        }
    }
}

/// Waits for a background process to exit successfully and parses its JSON output.
fn finish(mut bg: Bg, out: &Path, timeout: Duration, what: &str) -> serde_json::Value {
    let st = bg.wait_timeout(timeout);
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
    match st {
        None => {
            bg.kill();
            panic!("{what} did not finish within {timeout:?}; stderr:\n{err}");
        }
        Some(st) if !st.success() => panic!("{what} failed ({st}); stderr:\n{err}"),
        Some(_) => {}
    }
    let text = std::fs::read_to_string(out).unwrap_or_default();
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: bad output {text:?}: {e}; stderr:\n{err}"))
}

fn ping(ns: &Netns, dst: &str, extra: &[&str]) {
    let mut argv = vec!["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "20"];
    argv.extend_from_slice(extra);
    argv.push(dst);
    let out = ns.exec(&argv);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("3 received"),
        "{} from {} failed:\n{text}\n{}",
        argv.join(" "),
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tunnel_over_tls_across_a_network() {
    let mut net = Net::new();
    // alice: every TLS file in the connection string.
    let spec_a = net.spec("alice", net.tls_conninfo("alice", &net.alice), ALICE);
    // bob: the environment form, nothing about TLS in the string: verify-full by default.
    let mut spec_b = net.spec("bob", net.conninfo("bob", ""), BOB);
    spec_b.env = vec![
        ("PGSSLROOTCERT".into(), net.ca.crt().display().to_string()),
        ("PGSSLCERT".into(), net.bob.crt.display().to_string()),
        ("PGSSLKEY".into(), net.bob.key.display().to_string()),
    ];
    let a = Shim::start(&net.ns_a, &net.cluster, &spec_a);
    let b = Shim::start(&net.ns_b, &net.cluster, &spec_b);
    for s in [&a, &b] {
        assert!(
            !s.log_tail(200).contains("WARN"),
            "no warning at startup:\n{}",
            s.log_tail(50)
        );
    }
    net.shims.extend([a, b]);
    net.assert_tls_sessions("alice");
    net.assert_tls_sessions("bob");

    // --- ping both ways
    ping(&net.ns_a, BOB, &[]);
    ping(&net.ns_b, ALICE, &[]);

    // --- TCP: 1 MiB of pseudo-random bytes, hashed at both ends
    let bytes: u64 = 1 << 20;
    let (rx, rx_out) = net.bg(
        &net.ns_b,
        "tcp-recv",
        &[netcheck(), "tcp-recv", &format!("{BOB}:5001")],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (tx, tx_out) = net.bg(
        &net.ns_a,
        "tcp-send",
        &[
            netcheck(),
            "tcp-send",
            &format!("{BOB}:5001"),
            &bytes.to_string(),
            "7",
        ],
    );
    let sent = finish(tx, &tx_out, Duration::from_secs(240), "tcp-send");
    let got = finish(rx, &rx_out, Duration::from_secs(30), "tcp-recv");
    assert_eq!(got["bytes"], bytes, "all bytes arrived");
    assert_eq!(got["sha256"], sent["sha256"], "same SHA-256 at both ends");

    // --- nothing readable on the wire: a unique marker in ping payloads, recorded on the
    //     underlay (the database's bridge) and, as the control, on alice's tun device.
    let mut marker = [0u8; 16];
    util::Rng::from_entropy().fill(&mut marker);
    let hex = util::hex(&marker);
    let wire_file = net.tmp.file("underlay.pcap");
    let tun_file = net.tmp.file("tun.pcap");
    let wire = Capture::start(net.underlay.db_ns(), underlay::BRIDGE, &wire_file);
    let tun = Capture::start(&net.ns_a, TUN, &tun_file);
    ping(&net.ns_a, BOB, &["-s", "512", "-p", &hex]);
    std::thread::sleep(Duration::from_millis(300));
    let tun_bytes = tun.stop();
    let wire_bytes = wire.stop();
    assert!(
        underlay::contains(&tun_bytes, &marker),
        "control: the marker crossed alice's tun device ({} bytes captured)",
        tun_bytes.len()
    );
    let db_port = format!("tcp port {}", net.cluster.port());
    let on_wire = underlay::count_packets(&wire_file, &db_port);
    assert!(
        on_wire >= 6,
        "the underlay capture holds the database traffic: {on_wire} packets"
    );
    assert!(
        !underlay::contains(&wire_bytes, &marker),
        "the marker {hex} is readable on the underlay ({} bytes, {on_wire} packets to the database)",
        wire_bytes.len()
    );
    // The capture is of the right wire: both hosts' addresses talk to the database in it.
    for host in [ALICE_UNDERLAY, BOB_UNDERLAY] {
        let n = underlay::count_packets(&wire_file, &format!("host {host} and {db_port}"));
        assert!(n > 0, "no packets of {host} on the underlay");
    }

    // --- the control for the method: carol talks to the database in plaintext (her own
    //     hostnossl line), and her marker is readable on the same wire.
    let spec_c = net.spec("carol", net.conninfo("carol", "sslmode=disable"), CAROL);
    let c = Shim::start(&net.ns_c, &net.cluster, &spec_c);
    assert!(
        c.log_tail(200).contains("sslmode=disable for"),
        "the warning:\n{}",
        c.log_tail(20)
    );
    net.shims.push(c);
    util::Rng::from_entropy().fill(&mut marker);
    let wire_file = net.tmp.file("underlay-plain.pcap");
    let wire = Capture::start(net.underlay.db_ns(), underlay::BRIDGE, &wire_file);
    ping(&net.ns_c, BOB, &["-s", "512", "-p", &util::hex(&marker)]);
    std::thread::sleep(Duration::from_millis(300));
    let wire_bytes = wire.stop();
    assert!(
        underlay::contains(&wire_bytes, &marker),
        "control: a plaintext session's marker is found on the underlay ({} bytes)",
        wire_bytes.len()
    );
}

/// Runs the shim in `ns` until it exits (at most 60 s); returns the exit code and output.
fn run_to_exit(ns: &Netns, spec: &ShimSpec) -> (Option<i32>, String) {
    Shim::run_to_exit(ns, spec, Duration::from_secs(60))
}

#[test]
fn refusals_across_the_network() {
    let net = Net::new();
    // A server whose certificate comes from a CA the shim does not trust: exit 3.
    let spec = net.spec(
        "alice",
        net.conninfo(
            "alice",
            &format!(
                "sslrootcert={} sslcert={} sslkey={}",
                net.other_ca.crt().display(),
                net.alice.crt.display(),
                net.alice.key.display()
            ),
        ),
        ALICE,
    );
    let (code, out) = run_to_exit(&net.ns_a, &spec);
    assert_eq!(code, Some(3), "other CA: exit 3; output:\n{out}");
    assert!(
        out.contains("certificate") && out.contains("unknown CA"),
        "{out}"
    );

    // sslmode=disable against hostnossl ... reject: refused by the server, exit 3.
    let spec = net.spec("alice", net.conninfo("alice", "sslmode=disable"), ALICE);
    let (code, out) = run_to_exit(&net.ns_a, &spec);
    assert_eq!(code, Some(3), "sslmode=disable: exit 3; output:\n{out}");
    assert!(out.contains("no encryption"), "{out}");
    assert!(
        out.contains("sslmode=disable for"),
        "the startup warning: {out}"
    );

    // The default (verify-full) without a root certificate anywhere: exit 2, naming it.
    let mut spec = net.spec("alice", net.conninfo("alice", ""), ALICE);
    spec.env = vec![("HOME".into(), net.tmp.file("nohome").display().to_string())];
    let (code, out) = run_to_exit(&net.ns_a, &spec);
    assert_eq!(code, Some(2), "no root certificate: exit 2; output:\n{out}");
    assert!(
        out.contains("root certificate file") && out.contains("nohome/.postgresql/root.crt"),
        "{out}"
    );

    // The wrong host name: the certificate names db.test and 198.19.0.1; reach it as
    // db.other at the same address.
    let spec = net.spec(
        "alice",
        net.tls_conninfo("alice", &net.alice).replace(
            &format!("host={DB_ADDR}"),
            &format!("host=db.other hostaddr={DB_ADDR}"),
        ),
        ALICE,
    );
    let (code, out) = run_to_exit(&net.ns_a, &spec);
    assert_eq!(code, Some(3), "wrong host name: exit 3; output:\n{out}");
    assert!(
        out.contains("certificate") && out.contains("host name"),
        "{out}"
    );
}
