//! Self-tests of the harness that need neither the extension nor the shim.

use pgvpn_tests::{netns::Netns, util, Cluster};
use std::process::Command;

#[test]
fn cluster_starts_without_extension_and_is_socket_only() {
    let cluster = Cluster::start();
    let mut su = cluster.superuser("postgres");
    let listen: String = su.query_one("SHOW listen_addresses", &[]).unwrap().get(0);
    assert_eq!(listen, "", "no TCP listener");
    let fsync: String = su.query_one("SHOW fsync", &[]).unwrap().get(0);
    assert_eq!(fsync, "on");
    let sc: String = su.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(sc, "on");
    let v: i32 = su
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .unwrap()
        .get(0);
    assert!(
        (150000..160000).contains(&v),
        "PostgreSQL 15 expected, got {v}"
    );

    cluster.create_db("x");
    cluster.create_login_role("someone");
    let mut c = cluster.connect("someone", "x");
    let who: String = c.query_one(pgvpn_core::sql::WHOAMI, &[]).unwrap().get(0);
    assert_eq!(who, "someone");
    assert!(cluster
        .conninfo("someone", "x")
        .starts_with(&format!("host={} ", cluster.dir().display())));
    assert!(cluster
        .dir()
        .join(format!(".s.PGSQL.{}", cluster.port()))
        .exists());

    let dir = cluster.dir().to_path_buf();
    drop(c);
    drop(su);
    drop(cluster);
    assert!(!dir.exists(), "cluster dir removed on drop");
}

#[test]
fn netns_is_isolated_and_cleaned_up() {
    if !util::is_root() {
        panic!("this test needs root (network namespaces)");
    }
    let ns = Netns::new("self");
    let name = ns.name().to_string();
    let links = ns.ip(&["-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(
        links.contains("lo:") && links.contains("UP"),
        "lo up: {links}"
    );
    assert!(ns.ip(&["route", "show"]).trim().is_empty());
    assert!(ns
        .ip(&["-6", "route", "show"])
        .lines()
        .all(|l| !l.starts_with("default")));
    let out = ns.exec_ok(&["cat", "/sys/class/net/lo/statistics/rx_packets"]);
    assert!(out.trim().parse::<u64>().is_ok());

    let mut bg = ns.spawn(&["sleep", "60"], None, None);
    let pid = bg.pid();
    assert!(util::pid_alive(pid));
    assert!(bg.try_wait().is_none());
    drop(ns);
    let list = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!list.contains(&name), "namespace deleted");
    assert!(
        bg.wait_timeout(std::time::Duration::from_secs(5)).is_some(),
        "process killed with its namespace"
    );
}
