//! Command-line flags and environment variables → [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use pgvpn_core::cidr;
use pgvpn_core::limits::{DEFAULT_MTU, MIN_MTU_IPV6};

/// Default tun device name.
pub const DEFAULT_TUN: &str = "pgvpn0";

const MTU_HELP: &str = "MTU of the tun device. pgvpn adds no outer header, so the tunnel MTU \
is independent of the network's; the default is the largest packet whose log row still fits \
in one heap page (no TOAST), and bigger packets mean fewer rows per byte. Use the same value \
on every host. IPv6 needs at least 1280";

/// Moves IP packets between a Linux tun device and a pgvpn database.
///
/// Every packet read from the tun device is handed to `pgvpn.send()`; every packet the
/// database holds for this peer (`pgvpn.recv()`) is written to the tun device. The peer is
/// the database role the shim logs in as. All routing, filtering and logging is done by the
/// database.
///
/// Logs go to stderr (level from RUST_LOG, default info); "ready: ..." is logged once packets
/// flow both ways. On SIGINT/SIGTERM the shim flushes, stores its cursor and prints a
/// one-line counter summary on stdout; a second signal exits at once (status 1). While the
/// database is unreachable the device stays up, packets from it are dropped and counted,
/// and the shim reconnects with backoff (100 ms doubling to 5 s; each wait is drawn at random
/// from its upper half, so that hosts do not all reconnect at once).
///
/// Exit codes: 0 clean shutdown (SIGINT/SIGTERM), 1 other fatal error, 2 bad flags or
/// connection string (or a certificate or key file it names is missing or unusable),
/// 3 authentication failed / server certificate not accepted / role is not a pgvpn peer /
/// no privilege, 4 tun device could not be created or configured.
#[derive(Debug, Parser)]
#[command(name = "pgvpn-shim", version, about, long_about)]
pub struct Cli {
    /// Connection string: libpq key=value ("host=db.example user=alice dbname=vpn") or URL
    /// ("postgresql://alice@db.example/vpn"), with libpq's keywords and PG* variables
    /// (PGHOST, PGSSLROOTCERT, ...; the string wins) and ~/.pgpass. Host defaults to the
    /// unix socket directory /var/run/postgresql, user to the OS user. Over TCP the default
    /// is sslmode=verify-full with ~/.postgresql/root.crt (sslrootcert=system: the OS
    /// store), and ~/.postgresql/postgresql.crt/.key as client certificate if present; a
    /// weaker sslmode must be written out and is warned about.
    #[arg(
        long,
        env = "PGVPN_DB",
        value_name = "CONNINFO",
        hide_env_values = true
    )]
    pub db: String,

    /// Address to put on the tun device, as CIDR (198.18.0.1/15, fd00::1/64). Repeat the
    /// flag for several; the environment variable takes a comma-separated list. Without a
    /// prefix length the address is a host address (/32, /128).
    #[arg(long, env = "PGVPN_ADDRESS", value_name = "CIDR", required = true,
          value_delimiter = ',', value_parser = parse_cidr)]
    pub address: Vec<IpNet>,

    /// Name of the tun device to create.
    #[arg(long, env = "PGVPN_TUN", value_name = "NAME", default_value = DEFAULT_TUN,
          value_parser = parse_ifname)]
    pub tun: String,

    #[arg(long, env = "PGVPN_MTU", value_name = "N", default_value_t = DEFAULT_MTU,
          value_parser = clap::value_parser!(u32).range(68..=65535), help = MTU_HELP)]
    pub mtu: u32,

    /// Most packets handed to one pgvpn.send() call. A lone packet is sent at once; under
    /// load, batches are sized to take about 2 ms (fq::BATCH_TARGET), up to this many.
    #[arg(long, env = "PGVPN_BATCH_MAX", value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub batch_max: u32,

    /// Store the delivery cursor (pgvpn.ack) this often while packets arrive, and at most
    /// this long after the last one. Never per packet.
    #[arg(long, env = "PGVPN_ACK_INTERVAL_MS", value_name = "MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_interval_ms: u64,

    /// Also store it as soon as this many packets were written since the last ack
    /// (whichever of the two comes first).
    #[arg(long, env = "PGVPN_ACK_EVERY", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_every: u64,

    /// Serve the counters (those of the shutdown summary, queue gauges, pgvpn.send()
    /// latency) on http://ADDR:PORT/metrics in the Prometheus text format, e.g.
    /// 127.0.0.1:9187 or [::1]:9187. Off by default; an address that cannot be bound is
    /// exit code 2.
    #[arg(long, env = "PGVPN_METRICS", value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// An address with prefix length, as given to `ip addr add` (host bits kept).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    cidr::parse(s).map_err(|e| e.to_string())
}

fn parse_ifname(s: &str) -> Result<String, String> {
    // IFNAMSIZ is 16 including the NUL; the kernel also refuses '/', ':' and whitespace.
    if s.is_empty() || s.len() > 15 {
        return Err("interface name must be 1..=15 bytes".into());
    }
    if s == "." || s == ".." || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("`{s}` is not a valid interface name"));
    }
    Ok(s.to_string())
}

/// Everything the shim needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub pg: crate::conn::Settings,
    pub addresses: Vec<IpNet>,
    pub tun: String,
    pub mtu: u32,
    pub batch_max: usize,
    pub ack_interval: Duration,
    pub ack_every: u64,
    pub metrics: Option<SocketAddr>,
}

/// A configuration error that clap's own validation does not catch (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--db: {0}")]
    ConnInfo(#[from] crate::error::SettingsError),
    #[error("--mtu {0} is below 1280, the minimum for IPv6 address {1}")]
    MtuTooSmallForIpv6(u32, IpNet),
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let pg = crate::conn::parse(&cli.db)?;
        if cli.mtu < MIN_MTU_IPV6 {
            if let Some(v6) = cli.address.iter().find(|c| c.addr().is_ipv6()) {
                return Err(ConfigError::MtuTooSmallForIpv6(cli.mtu, *v6));
            }
        }
        Ok(Config {
            pg,
            addresses: cli.address,
            tun: cli.tun,
            mtu: cli.mtu,
            batch_max: cli.batch_max as usize,
            ack_interval: Duration::from_millis(cli.ack_interval_ms),
            ack_every: cli.ack_every,
            metrics: cli.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Addr;

    /// clap reads the process environment on every parse and `environment_variables` sets
    /// PGVPN_*: every test here holds this lock so none sees another's variables.
    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["pgvpn-shim"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
    }

    #[test]
    fn defaults() {
        let _env = lock();
        let cli = parse(&["--db", "host=/tmp user=alice", "--address", "198.18.0.1/15"]).unwrap();
        assert_eq!(cli.tun, "pgvpn0");
        assert_eq!(cli.mtu, DEFAULT_MTU);
        assert_eq!(cli.batch_max, 256);
        assert_eq!(cli.ack_interval_ms, 200);
        assert_eq!(cli.ack_every, 4096);
        let cfg = Config::from_cli(cli).unwrap();
        assert_eq!(cfg.addresses, vec![cidr::parse("198.18.0.1/15").unwrap()]);
        assert_eq!(cfg.pg.config().get_user(), Some("alice"));
        assert_eq!(cfg.pg.targets()[0].addr, Addr::Unix("/tmp".into()));
        assert_eq!(cfg.ack_interval, Duration::from_millis(200));
    }

    #[test]
    fn repeated_and_comma_separated_addresses() {
        let _env = lock();
        let cli = parse(&[
            "--db",
            "user=a",
            "--address",
            "198.18.0.1/15",
            "--address",
            "fd00::1/64,198.19.0.1",
            "--tun",
            "vpn1",
            "--mtu",
            "1400",
            "--batch-max",
            "10",
            "--ack-interval-ms",
            "50",
            "--ack-every",
            "7",
        ])
        .unwrap();
        let cfg = Config::from_cli(cli).unwrap();
        let got: Vec<String> = cfg.addresses.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["198.18.0.1/15", "fd00::1/64", "198.19.0.1/32"]);
        assert_eq!(
            (cfg.tun.as_str(), cfg.mtu, cfg.batch_max, cfg.ack_every),
            ("vpn1", 1400, 10, 7)
        );
        // no host given: the default unix socket directory
        assert_eq!(
            cfg.pg.targets()[0].addr,
            Addr::Unix("/var/run/postgresql".into())
        );
    }

    #[test]
    fn rejects_bad_values() {
        let _env = lock();
        assert!(parse(&["--db", "user=a"]).is_err(), "address is required");
        assert!(
            parse(&["--address", "198.18.0.1/15"]).is_err(),
            "db is required"
        );
        for bad in [
            "198.18.0.1/33",
            "fd00::1/129",
            "nonsense",
            "198.18.0.1/x",
            "",
        ] {
            assert!(
                parse(&["--db", "user=a", "--address", bad]).is_err(),
                "{bad}"
            );
        }
        let base = ["--db", "user=a", "--address", "198.18.0.1/15"];
        for extra in [
            &["--mtu", "10"][..],
            &["--mtu", "70000"],
            &["--batch-max", "0"],
            &["--ack-every", "0"],
            &["--tun", "a/b"],
            &["--tun", "waytoolonginterfacename"],
        ] {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            assert!(parse(&v).is_err(), "{extra:?}");
        }
        let e = parse(&["--address", "1.2.3.4"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn bad_conninfo_and_mtu_for_v6() {
        let _env = lock();
        let cli = parse(&["--db", "host=/tmp port=notaport", "--address", "198.18.0.1"]).unwrap();
        assert!(matches!(
            Config::from_cli(cli),
            Err(ConfigError::ConnInfo(_))
        ));
        let cli = parse(&["--db", "user='unterminated", "--address", "198.18.0.1"]).unwrap();
        assert!(matches!(
            Config::from_cli(cli),
            Err(ConfigError::ConnInfo(_))
        ));
        let cli = parse(&["--db", "user=a", "--address", "fd00::1/64", "--mtu", "1000"]).unwrap();
        assert!(matches!(
            Config::from_cli(cli),
            Err(ConfigError::MtuTooSmallForIpv6(1000, _))
        ));
        let cli = parse(&["--db", "user=a", "--address", "198.18.0.1", "--mtu", "1000"]).unwrap();
        assert!(Config::from_cli(cli).is_ok());
    }

    #[test]
    fn metrics_address() {
        let _env = lock();
        let base = ["--db", "user=a", "--address", "198.18.0.1"];
        let cfg = Config::from_cli(parse(&base).unwrap()).unwrap();
        assert_eq!(cfg.metrics, None, "off by default");
        for (arg, want) in [
            ("127.0.0.1:9187", "127.0.0.1:9187"),
            ("[::1]:9187", "[::1]:9187"),
        ] {
            let mut v = base.to_vec();
            v.extend_from_slice(&["--metrics", arg]);
            let cfg = Config::from_cli(parse(&v).unwrap()).unwrap();
            assert_eq!(cfg.metrics.map(|a| a.to_string()).as_deref(), Some(want));
        }
        for bad in ["9187", "localhost", "127.0.0.1", "1.2.3.4:99999"] {
            let mut v = base.to_vec();
            v.extend_from_slice(&["--metrics", bad]);
            assert!(parse(&v).is_err(), "{bad}");
        }
        std::env::set_var("PGVPN_METRICS", "127.0.0.2:9100");
        let cfg = Config::from_cli(parse(&base).unwrap()).unwrap();
        std::env::remove_var("PGVPN_METRICS");
        assert_eq!(cfg.metrics, Some("127.0.0.2:9100".parse().unwrap()));
    }

    #[test]
    fn environment_variables() {
        let _env = lock();
        // Tests that read the environment hold ENV_LOCK (set_var is safe in edition 2021,
        // but still racy with concurrent readers).
        let vars = [
            ("PGVPN_DB", "host=/run/pg port=5544 user=bob dbname=vpn"),
            ("PGVPN_ADDRESS", "198.18.0.2/15,fd00::2/64"),
            ("PGVPN_TUN", "envtun"),
            ("PGVPN_MTU", "1400"),
            ("PGVPN_BATCH_MAX", "32"),
            ("PGVPN_ACK_INTERVAL_MS", "1000"),
            ("PGVPN_ACK_EVERY", "99"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let cfg = Config::from_cli(parse(&[]).unwrap()).unwrap();
        assert_eq!(cfg.pg.config().get_user(), Some("bob"));
        assert_eq!(cfg.pg.targets()[0].port, 5544);
        assert_eq!(cfg.addresses.len(), 2);
        assert_eq!(cfg.tun, "envtun");
        assert_eq!(cfg.mtu, 1400);
        assert_eq!(cfg.batch_max, 32);
        assert_eq!(cfg.ack_interval, Duration::from_secs(1));
        assert_eq!(cfg.ack_every, 99);
        // flags win over the environment
        let cfg = Config::from_cli(parse(&["--mtu", "1500", "--tun", "x"]).unwrap()).unwrap();
        assert_eq!((cfg.mtu, cfg.tun.as_str()), (1500, "x"));
        for (k, _) in vars {
            std::env::remove_var(k);
        }
    }
}
