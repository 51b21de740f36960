//! conn.rs: keywords, environment, password file, defaults and precedence; the TLS files;
//! and what connect() does per sslmode, against stand-in servers on 127.0.0.1 (plain and
//! TLS, with certificates made here). No root, no PostgreSQL.

use super::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};
use postgres::config::ChannelBinding;

fn env() -> Env {
    Env::empty().with_os_user("osuser")
}

fn ok(s: &str, env: &Env) -> Settings {
    parse_with(s, env).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn err(s: &str, env: &Env) -> SettingsError {
    match parse_with(s, env) {
        Ok(st) => panic!("{s}: accepted: {st:?}"),
        Err(e) => e,
    }
}

fn tcp(host: &str) -> Addr {
    Addr::Tcp {
        host: Some(host.into()),
        hostaddr: None,
    }
}

fn unix(dir: &str) -> Addr {
    Addr::Unix(dir.into())
}

fn addrs(s: &Settings) -> Vec<(Addr, u16)> {
    s.targets()
        .iter()
        .map(|t| (t.addr.clone(), t.port))
        .collect()
}

// ---- certificates ----

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A certificate for `cn` with these subject alternative names (DNS names, or IP
/// addresses), signed by `issuer` (else self-signed), valid `days` (from, to) around now.
fn cert(
    cn: &str,
    sans: &[&str],
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
    days: (i64, i64),
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now + days.0 * 86400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + days.1 * 86400).unwrap())
        .unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
    }
    if !sans.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for s in sans {
            if s.parse::<IpAddr>().is_ok() {
                san.ip(s);
            } else {
                san.dns(s);
            }
        }
        let ext = san
            .build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None))
            .unwrap();
        b.append_extension(ext).unwrap();
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256())
        .unwrap();
    b.build()
}

/// A CA and what it signs, written into a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca: X509,
    ca_key: PKey<Private>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = new_key();
        let ca = cert(name, &[], &ca_key, None, true, (-1, 365));
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ca.crt"), ca.to_pem().unwrap()).unwrap();
        Pki { dir, ca, ca_key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_file(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// Issues a certificate, writes `<name>.crt` and `<name>.key` (0600).
    fn issue(
        &self,
        name: &str,
        cn: &str,
        sans: &[&str],
        days: (i64, i64),
    ) -> (X509, PKey<Private>) {
        let key = new_key();
        let c = cert(cn, sans, &key, Some((&self.ca, &self.ca_key)), false, days);
        self.write(name, &c, &key);
        (c, key)
    }

    fn write(&self, name: &str, c: &X509, key: &PKey<Private>) {
        fs::write(self.path(&format!("{name}.crt")), c.to_pem().unwrap()).unwrap();
        let k = self.path(&format!("{name}.key"));
        fs::write(&k, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        fs::set_permissions(&k, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

// ---- keywords, environment, defaults ----

#[test]
fn defaults_for_a_unix_socket() {
    let s = ok("", &env());
    assert_eq!(addrs(&s), [(unix(DEFAULT_SOCKET_DIR), 5432)]);
    let pg = s.config();
    assert_eq!(pg.get_user(), Some("osuser"), "libpq: the OS user");
    assert_eq!(pg.get_dbname(), None, "the server's default: the user name");
    assert_eq!(pg.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    assert_eq!(s.sslmode(), SslMode::VerifyFull);
    assert!(s.tls().is_none(), "no TLS on unix sockets");
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    // sslmode=disable over a socket is nothing to warn about, nor are missing TLS files
    let s = ok("host=/tmp sslmode=disable sslcert=/nonexistent.crt", &env());
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    assert_eq!(addrs(&s), [(unix("/tmp"), 5432)]);
}

#[test]
fn keepalive_and_timeout_defaults_and_overrides() {
    let s = ok("host=db sslmode=disable", &env());
    let pg = s.config();
    assert!(pg.get_keepalives());
    assert_eq!(pg.get_keepalives_idle(), KEEPALIVES_IDLE);
    assert_eq!(pg.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
    assert_eq!(pg.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
    assert_eq!(pg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
    // A dead server is noticed in about 10 s.
    let dead_after = KEEPALIVES_IDLE + KEEPALIVES_INTERVAL * KEEPALIVES_COUNT;
    assert!(dead_after <= Duration::from_secs(11), "{dead_after:?}");
    assert!(TCP_USER_TIMEOUT <= Duration::from_secs(11));

    let s = ok(
        "host=db sslmode=disable keepalives=0 keepalives_idle=30 keepalives_interval=7 \
         keepalives_count=2 tcp_user_timeout=2500 connect_timeout=3",
        &env(),
    );
    let pg = s.config();
    assert!(!pg.get_keepalives());
    assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(30));
    assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(7)));
    assert_eq!(pg.get_keepalives_retries(), Some(2));
    assert_eq!(
        pg.get_tcp_user_timeout(),
        Some(&Duration::from_millis(2500)),
        "milliseconds, as in libpq"
    );
    assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(3)));

    // libpq: tcp_user_timeout=0 is the system default, connect_timeout<=0 waits forever,
    // connect_timeout=1 means 2.
    let pg = ok(
        "host=db sslmode=disable tcp_user_timeout=0 connect_timeout=0",
        &env(),
    );
    assert_eq!(pg.config().get_tcp_user_timeout(), None);
    assert_eq!(pg.config().get_connect_timeout(), None);
    let pg = ok("host=db sslmode=disable connect_timeout='1 '", &env());
    assert_eq!(
        pg.config().get_connect_timeout(),
        Some(&Duration::from_secs(2))
    );

    for bad in [
        "connect_timeout=10s",
        "keepalives=yes",
        "keepalives_idle=0",
        "keepalives_interval=-1",
        "keepalives_count=0",
        "tcp_user_timeout=-5",
        "port=0",
        "port=65536",
        "port=x",
        "hostaddr=not-an-ip",
    ] {
        assert!(
            matches!(
                err(&format!("host=db sslmode=disable {bad}"), &env()),
                SettingsError::InvalidValue { .. }
            ),
            "{bad}"
        );
    }
}

#[test]
fn hosts_ports_and_hostaddrs() {
    let e = env();
    let s = ok(
        "postgresql://h1:5433,h2,%2Ftmp%2Fpg:5435/vpn?sslmode=disable",
        &e,
    );
    assert_eq!(
        addrs(&s),
        [
            (tcp("h1"), 5433),
            (tcp("h2"), 5432),
            (unix("/tmp/pg"), 5435)
        ]
    );
    assert_eq!(s.config().get_dbname(), Some("vpn"));
    // one port for all hosts; an empty host is the default socket
    let s = ok("host=a,,/s port=6000 sslmode=disable", &e);
    assert_eq!(
        addrs(&s),
        [
            (tcp("a"), 6000),
            (unix(DEFAULT_SOCKET_DIR), 6000),
            (unix("/s"), 6000)
        ]
    );
    // hostaddr: connect there, check the certificate against host
    let s = ok(
        "host=db.test,db2.test hostaddr=198.19.0.1,::1 sslmode=disable",
        &e,
    );
    assert_eq!(
        addrs(&s),
        [
            (
                Addr::Tcp {
                    host: Some("db.test".into()),
                    hostaddr: Some("198.19.0.1".parse().unwrap())
                },
                5432
            ),
            (
                Addr::Tcp {
                    host: Some("db2.test".into()),
                    hostaddr: Some("::1".parse().unwrap())
                },
                5432
            )
        ]
    );
    let pg = s.config_for(&s.targets()[0], "x");
    assert_eq!(
        pg.get_hostaddrs(),
        &["198.19.0.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        pg.get_hosts(),
        &[postgres::config::Host::Tcp("db.test".into())]
    );
    // hostaddr alone: fine without verification, refused with verify-full
    let s = ok("hostaddr=198.19.0.1 sslmode=disable", &e);
    assert_eq!(s.targets()[0].tls_name(), "198.19.0.1");
    let m = err("hostaddr=198.19.0.1", &e).to_string();
    assert!(m.contains("verify-full needs a host name"), "{m}");

    for (bad, want) in [
        (
            "host=a,b hostaddr=1.2.3.4",
            "could not match 2 host names to 1 hostaddr values",
        ),
        (
            "host=a,b,c port=1,2",
            "could not match 2 port numbers to 3 hosts",
        ),
    ] {
        assert_eq!(err(&format!("{bad} sslmode=disable"), &e).to_string(), want);
    }
    // Display of a target, for messages
    assert_eq!(s.targets()[0].to_string(), "198.19.0.1 port 5432");
    assert_eq!(
        ok("host=/tmp port=7", &e).targets()[0].to_string(),
        "/tmp/.s.PGSQL.7"
    );
}

#[test]
fn environment_and_precedence() {
    let e = env()
        .with_var("PGHOST", "envhost")
        .with_var("PGPORT", "6543")
        .with_var("PGUSER", "envuser")
        .with_var("PGDATABASE", "envdb")
        .with_var("PGPASSWORD", "envpw")
        .with_var("PGSSLMODE", "disable")
        .with_var("PGCONNECT_TIMEOUT", "4")
        .with_var("PGAPPNAME", "envapp")
        .with_var("PGTARGETSESSIONATTRS", "read-write")
        .with_var("PGOPTIONS", "-c work_mem=1MB");
    let s = ok("", &e);
    assert_eq!(addrs(&s), [(tcp("envhost"), 6543)]);
    let pg = s.config();
    assert_eq!(pg.get_user(), Some("envuser"));
    assert_eq!(pg.get_dbname(), Some("envdb"));
    assert_eq!(s.targets()[0].password(), Some("envpw"));
    assert_eq!(s.sslmode(), SslMode::Disable);
    assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(4)));
    assert_eq!(s.application_name(), Some("envapp"));
    assert_eq!(pg.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
    assert_eq!(pg.get_options(), Some("-c work_mem=1MB"));
    // written out in PGSSLMODE counts as explicit: accepted, with the warning
    assert!(
        s.warnings()[0].contains("sslmode=disable for envhost port 6543"),
        "{:?}",
        s.warnings()
    );

    // the connection string wins
    let s = ok(
        "host=strhost port=1111 user=struser dbname=strdb password=strpw sslmode=disable \
         connect_timeout=9 application_name=strapp target_session_attrs=any",
        &e,
    );
    assert_eq!(addrs(&s), [(tcp("strhost"), 1111)]);
    assert_eq!(s.config().get_user(), Some("struser"));
    assert_eq!(s.config().get_dbname(), Some("strdb"));
    assert_eq!(s.targets()[0].password(), Some("strpw"));
    assert_eq!(
        s.config().get_connect_timeout(),
        Some(&Duration::from_secs(9))
    );
    assert_eq!(s.application_name(), Some("strapp"));
    assert_eq!(
        s.config().get_target_session_attrs(),
        TargetSessionAttrs::Any
    );

    // an empty value in the string hides the variable and means the default
    let s = ok("host='' port='' sslmode=disable", &e);
    assert_eq!(addrs(&s), [(unix(DEFAULT_SOCKET_DIR), 5432)]);
}

#[test]
fn application_name_precedence() {
    let s = ok("", &env());
    assert_eq!(
        s.config_for(&s.targets()[0], "pgvpn-shim uplink")
            .get_application_name(),
        Some("pgvpn-shim uplink")
    );
    let s = ok("fallback_application_name=fb", &env());
    assert_eq!(
        s.config_for(&s.targets()[0], "d").get_application_name(),
        Some("fb")
    );
    let s = ok(
        "fallback_application_name=fb",
        &env().with_var("PGAPPNAME", "envapp"),
    );
    assert_eq!(
        s.config_for(&s.targets()[0], "d").get_application_name(),
        Some("envapp")
    );
    let s = ok("application_name=mine fallback_application_name=fb", &env());
    assert_eq!(
        s.config_for(&s.targets()[0], "d").get_application_name(),
        Some("mine")
    );
}

#[test]
fn session_attrs_and_channel_binding() {
    let e = env();
    let s = ok("target_session_attrs=read-only channel_binding=require", &e);
    assert_eq!(
        s.config().get_target_session_attrs(),
        TargetSessionAttrs::ReadOnly
    );
    assert_eq!(s.config().get_channel_binding(), ChannelBinding::Require);
    assert_eq!(
        ok("", &e).config().get_channel_binding(),
        ChannelBinding::Prefer,
        "libpq's default"
    );
    assert_eq!(
        ok("channel_binding=disable", &e)
            .config()
            .get_channel_binding(),
        ChannelBinding::Disable
    );
    let m = err("target_session_attrs=primary", &e).to_string();
    assert!(
        m.contains("primary, standby and prefer-standby are not supported"),
        "{m}"
    );
    assert!(matches!(
        err("channel_binding=yes", &e),
        SettingsError::InvalidValue {
            keyword: "channel_binding",
            ..
        }
    ));
    assert!(matches!(
        err("sslmode=verify", &e),
        SettingsError::InvalidValue {
            keyword: "sslmode",
            ..
        }
    ));
}

// ---- the password file ----

fn home_with_pgpass(text: &str, mode: u32) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let p = home.path().join(".pgpass");
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    home
}

#[test]
fn passwords_from_the_password_file() {
    let home = home_with_pgpass(
        "localhost:5432:*:alice:socketpw\n\
         /tmp/other:5432:*:alice:otherdirpw\n\
         db1:5433:vpn:alice:db1pw\n\
         db2:*:*:alice:db2pw\n\
         198.19.0.9:5432:alice:alice:addrpw\n",
        0o600,
    );
    let e = env().with_home(home.path());
    let pw = |s: &str| -> Vec<Option<String>> {
        ok(s, &e)
            .targets()
            .iter()
            .map(|t| t.password().map(str::to_string))
            .collect()
    };
    let some = |s: &str| Some(s.to_string());
    // the default socket directory matches "localhost", another directory its path
    assert_eq!(pw("user=alice"), [some("socketpw")]);
    assert_eq!(
        pw("user=alice host=/var/run/postgresql"),
        [some("socketpw")]
    );
    assert_eq!(pw("user=alice host=/tmp/other"), [some("otherdirpw")]);
    // per host, in a multi-host list; the port and database must match
    assert_eq!(
        pw("user=alice dbname=vpn host=db1,db2,db3 port=5433 sslmode=disable"),
        [some("db1pw"), some("db2pw"), None]
    );
    assert_eq!(
        pw("user=alice dbname=other host=db1 port=5433 sslmode=disable"),
        [None]
    );
    // with only hostaddr the address is the host; dbname defaults to the user
    assert_eq!(
        pw("user=alice hostaddr=198.19.0.9 sslmode=disable"),
        [some("addrpw")]
    );
    // a password written out wins, PGPASSWORD too
    assert_eq!(pw("user=alice password=given"), [some("given")]);
    let e2 = e.clone().with_var("PGPASSWORD", "fromenv");
    assert_eq!(
        ok("user=alice", &e2).targets()[0].password(),
        Some("fromenv")
    );
    // passfile / PGPASSFILE name another file
    let other = home_with_pgpass("*:*:*:*:elsewhere\n", 0o600);
    let f = other.path().join(".pgpass");
    assert_eq!(
        pw(&format!("user=alice passfile={}", f.display())),
        [some("elsewhere")]
    );
    let e3 = e.clone().with_var("PGPASSFILE", f.to_str().unwrap());
    assert_eq!(
        ok("user=alice", &e3).targets()[0].password(),
        Some("elsewhere")
    );
    // a missing file is silently no file
    assert_eq!(pw("user=alice passfile=/nonexistent/pgpass"), [None]);
    assert!(ok("user=alice passfile=/nonexistent/pgpass", &e)
        .warnings()
        .is_empty());
}

#[test]
fn a_password_file_others_can_read_is_not_used() {
    let home = home_with_pgpass("*:*:*:*:secret\n", 0o644);
    let s = ok("user=alice", &env().with_home(home.path()));
    assert_eq!(s.targets()[0].password(), None);
    assert_eq!(s.warnings().len(), 1);
    assert!(
        s.warnings()[0].contains("group or world access"),
        "{:?}",
        s.warnings()
    );
    assert!(s.warnings()[0].contains(".pgpass"), "{:?}", s.warnings());
}

// ---- TLS settings and files ----

#[test]
fn tcp_defaults_to_verify_full_with_the_home_root_file() {
    let home = tempfile::tempdir().unwrap();
    let e = env().with_home(home.path());
    // no ~/.postgresql/root.crt: exit 2, naming the file
    match err("host=db.example", &e) {
        SettingsError::File {
            what,
            path,
            problem,
        } => {
            assert_eq!(what, "root certificate file");
            assert_eq!(path, home.path().join(".postgresql/root.crt"));
            assert!(
                problem.contains("does not exist") && problem.contains("verify-full"),
                "{problem}"
            );
        }
        other => panic!("{other:?}"),
    }
    // with it: verify-full, only that CA trusted, no warning
    let pki = Pki::new("Home CA");
    fs::create_dir(home.path().join(".postgresql")).unwrap();
    fs::copy(pki.ca_file(), home.path().join(".postgresql/root.crt")).unwrap();
    let s = ok("host=db.example", &e);
    assert_eq!(s.sslmode(), SslMode::VerifyFull);
    let tls = s.tls().expect("TLS set up");
    assert!(matches!(
        tls.verify(),
        Verify::ChainAndHost(RootCert::File {
            explicit: false,
            ..
        })
    ));
    assert_eq!(
        tls.trusted_roots(),
        Some(1),
        "the OS store is not trusted too"
    );
    assert!(tls.client().is_none(), "no default client certificate");
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    // libpq: require checks the chain when the root file exists (and is warned about)
    let s = ok("host=db.example sslmode=require", &e);
    assert!(matches!(s.tls().unwrap().verify(), Verify::Chain(_)));
    assert!(
        s.warnings()[0].contains("host name is not checked"),
        "{:?}",
        s.warnings()
    );
}

#[test]
fn explicit_root_files_and_the_system_store() {
    let pki = Pki::new("Explicit CA");
    let e = env();
    let s = ok(
        &format!("host=db sslrootcert={}", pki.ca_file().display()),
        &e,
    );
    assert!(matches!(
        s.tls().unwrap().verify(),
        Verify::ChainAndHost(RootCert::File { explicit: true, .. })
    ));
    let s = ok("host=db sslrootcert=system", &e);
    assert!(matches!(
        s.tls().unwrap().verify(),
        Verify::ChainAndHost(RootCert::System)
    ));
    assert_eq!(s.tls().unwrap().trusted_roots(), None);
    assert!(matches!(
        err("host=db sslrootcert=system sslmode=verify-ca", &e),
        SettingsError::Conflict(_)
    ));
    // PGSSLROOTCERT
    let e2 = env().with_var("PGSSLROOTCERT", pki.ca_file().to_str().unwrap());
    assert!(ok("host=db", &e2).tls().is_some());
    // a file that is not PEM
    let junk = pki.path("junk.crt");
    fs::write(&junk, "not a certificate").unwrap();
    match err(&format!("host=db sslrootcert={}", junk.display()), &e) {
        SettingsError::File { what, path, .. } => {
            assert_eq!((what, path), ("root certificate file", junk));
        }
        other => panic!("{other:?}"),
    }
    // a missing file with require: no verification (libpq), warned
    let s = ok("host=db sslmode=require sslrootcert=/nonexistent.crt", &e);
    assert_eq!(s.tls().unwrap().verify(), &Verify::Nothing);
    assert!(
        s.warnings()[0].contains("not checked"),
        "{:?}",
        s.warnings()
    );
    // prefer and allow: accepted, warned
    for m in ["prefer", "allow", "disable"] {
        let s = ok(&format!("host=db sslmode={m}"), &e);
        assert_eq!(s.warnings().len(), 1, "{m}");
        assert!(
            s.warnings()[0].starts_with(&format!("sslmode={m} for db port 5432: ")),
            "{:?}",
            s.warnings()
        );
    }
    assert!(ok("host=db sslmode=disable", &e).tls().is_none());
}

#[test]
fn client_certificate_files() {
    let pki = Pki::new("Client CA");
    pki.issue("alice", "alice", &[], (-1, 30));
    let root = format!("host=db sslrootcert={}", pki.ca_file().display());
    let e = env();
    let s = ok(
        &format!(
            "{root} sslcert={} sslkey={}",
            pki.path("alice.crt").display(),
            pki.path("alice.key").display()
        ),
        &e,
    );
    assert_eq!(
        s.tls().unwrap().client().unwrap().cert,
        pki.path("alice.crt")
    );

    // the environment form
    let e2 = env()
        .with_var("PGSSLROOTCERT", pki.ca_file().to_str().unwrap())
        .with_var("PGSSLCERT", pki.path("alice.crt").to_str().unwrap())
        .with_var("PGSSLKEY", pki.path("alice.key").to_str().unwrap());
    let s = ok("host=db", &e2);
    assert_eq!(s.sslmode(), SslMode::VerifyFull);
    assert_eq!(
        s.tls().unwrap().client().unwrap().key,
        pki.path("alice.key")
    );

    let file_err = |s: &str| match err(s, &e) {
        SettingsError::File {
            what,
            path,
            problem,
        } => (what, path, problem),
        other => panic!("{s}: {other:?}"),
    };
    // an sslcert written out must exist
    let (what, path, problem) = file_err(&format!("{root} sslcert=/nonexistent/me.crt"));
    assert_eq!(
        (what, path),
        (
            "client certificate file",
            PathBuf::from("/nonexistent/me.crt")
        )
    );
    assert_eq!(problem, "does not exist");
    // the key must exist, be private, be a key, and match
    let crt = pki.path("alice.crt");
    let (what, path, _) = file_err(&format!(
        "{root} sslcert={} sslkey=/nonexistent/me.key",
        crt.display()
    ));
    assert_eq!(
        (what, path),
        ("private key file", PathBuf::from("/nonexistent/me.key"))
    );
    let open_key = pki.path("open.key");
    fs::copy(pki.path("alice.key"), &open_key).unwrap();
    fs::set_permissions(&open_key, fs::Permissions::from_mode(0o644)).unwrap();
    let (_, path, problem) = file_err(&format!(
        "{root} sslcert={} sslkey={}",
        crt.display(),
        open_key.display()
    ));
    assert_eq!(path, open_key);
    assert!(problem.contains("group or world access"), "{problem}");
    pki.issue("bob", "bob", &[], (-1, 30));
    let (_, path, problem) = file_err(&format!(
        "{root} sslcert={} sslkey={}",
        crt.display(),
        pki.path("bob.key").display()
    ));
    assert_eq!(path, pki.path("bob.key"));
    assert!(
        problem.contains("does not match the client certificate"),
        "{problem}"
    );
    let not_key = pki.path("notkey.key");
    fs::write(&not_key, "junk").unwrap();
    fs::set_permissions(&not_key, fs::Permissions::from_mode(0o600)).unwrap();
    let (_, path, problem) = file_err(&format!(
        "{root} sslcert={} sslkey={}",
        crt.display(),
        not_key.display()
    ));
    assert_eq!(path, not_key);
    assert!(
        problem.contains("not an unencrypted PEM private key"),
        "{problem}"
    );
    let encrypted = pki.path("enc.key");
    let (_, k) = pki.issue("carol", "carol", &[], (-1, 30));
    let pem = k
        .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_128_cbc(), b"pass")
        .unwrap();
    fs::write(&encrypted, pem).unwrap();
    fs::set_permissions(&encrypted, fs::Permissions::from_mode(0o600)).unwrap();
    let (_, _, problem) = file_err(&format!(
        "{root} sslcert={} sslkey={}",
        pki.path("carol.crt").display(),
        encrypted.display()
    ));
    assert!(
        problem.contains("not an unencrypted PEM private key"),
        "{problem}"
    );
    let bad_crt = pki.path("bad.crt");
    fs::write(&bad_crt, "junk").unwrap();
    let (what, path, _) = file_err(&format!(
        "{root} sslcert={} sslkey={}",
        bad_crt.display(),
        pki.path("alice.key").display()
    ));
    assert_eq!((what, path), ("client certificate file", bad_crt));
}

#[test]
fn default_client_certificate_in_home() {
    let pki = Pki::new("Home client CA");
    let home = tempfile::tempdir().unwrap();
    let dot = home.path().join(".postgresql");
    fs::create_dir(&dot).unwrap();
    fs::copy(pki.ca_file(), dot.join("root.crt")).unwrap();
    let e = env().with_home(home.path());
    // absent: none sent
    assert!(ok("host=db", &e).tls().unwrap().client().is_none());
    // present without its key: an error naming the key
    pki.issue("me", "me", &[], (-1, 30));
    fs::copy(pki.path("me.crt"), dot.join("postgresql.crt")).unwrap();
    match err("host=db", &e) {
        SettingsError::File { what, path, .. } => {
            assert_eq!(
                (what, path),
                ("private key file", dot.join("postgresql.key"))
            );
        }
        other => panic!("{other:?}"),
    }
    fs::copy(pki.path("me.key"), dot.join("postgresql.key")).unwrap();
    let s = ok("host=db", &e);
    let c = s.tls().unwrap().client().unwrap();
    assert_eq!(
        (c.cert.clone(), c.key.clone()),
        (dot.join("postgresql.crt"), dot.join("postgresql.key"))
    );
}

// ---- connect() against stand-in servers ----

const SSL_REQUEST: u32 = 80877103;

/// Reads one length-prefixed startup-phase message; returns its first 4 body bytes as a
/// code (the protocol version, or the SSLRequest code).
fn read_startup(s: &mut impl Read) -> std::io::Result<u32> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut body)?;
    Ok(u32::from_be_bytes(body[..4].try_into().unwrap()))
}

fn error_response(code: &str, msg: &str) -> Vec<u8> {
    let mut body = vec![];
    for (f, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', msg)] {
        body.push(f);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = vec![b'E'];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

type Handler = Box<dyn FnOnce(TcpStream) -> String + Send>;

/// A server on 127.0.0.1 that serves one connection per handler, in order; each handler
/// returns what it saw, collected by `join`.
struct StandIn {
    port: u16,
    thread: JoinHandle<Vec<String>>,
}

impl StandIn {
    fn new(handlers: Vec<Handler>) -> StandIn {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            handlers
                .into_iter()
                .map(|h| {
                    let (s, _) = l.accept().unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    h(s)
                })
                .collect()
        });
        StandIn { port, thread }
    }

    fn join(self) -> Vec<String> {
        self.thread.join().unwrap()
    }
}

/// Answers an SSLRequest with `N`, then (if asked) the startup message with an error.
fn no_tls_then_error(code: &'static str) -> Handler {
    Box::new(move |mut s| {
        let mut seen = vec![];
        loop {
            match read_startup(&mut s) {
                Ok(SSL_REQUEST) => {
                    seen.push("sslrequest");
                    s.write_all(b"N").unwrap();
                }
                Ok(_) => {
                    seen.push("startup");
                    s.write_all(&error_response(code, "stand-in says no"))
                        .unwrap();
                    break;
                }
                Err(_) => break,
            }
        }
        seen.join(",")
    })
}

/// Answers an SSLRequest with `S` and does the TLS handshake as `cert`/`key`; then answers
/// the startup message with an error. With `client_ca`, requires a client certificate from
/// that CA and reports its CN.
fn tls_server(cert: X509, key: PKey<Private>, client_ca: Option<X509>) -> Handler {
    Box::new(move |mut s| {
        if read_startup(&mut s).unwrap() != SSL_REQUEST {
            return "no sslrequest".into();
        }
        s.write_all(b"S").unwrap();
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        b.set_private_key(&key).unwrap();
        b.set_certificate(&cert).unwrap();
        if let Some(ca) = client_ca {
            let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
            store.add_cert(ca).unwrap();
            b.set_verify_cert_store(store.build()).unwrap();
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        let mut tls = match b.build().accept(s) {
            Ok(t) => t,
            Err(e) => return format!("handshake failed: {e}"),
        };
        let client = tls
            .ssl()
            .peer_certificate()
            .map(|c| names(&c).join(","))
            .unwrap_or_default();
        match read_startup(&mut tls) {
            Ok(_) => {
                tls.write_all(&error_response("28P01", "stand-in over TLS says no"))
                    .unwrap();
                format!("tls ok, client cert [{client}]")
            }
            Err(e) => format!("no startup after handshake: {e}"),
        }
    })
}

fn names(c: &openssl::x509::X509Ref) -> Vec<String> {
    c.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .map(|e| e.data().to_string().unwrap())
        .collect()
}

fn connect_err(conninfo: &str, env: &Env) -> DbError {
    let s = ok(conninfo, env);
    match connect(&s, "test") {
        Ok(_) => panic!("{conninfo}: connected to a stand-in"),
        Err(e) => e,
    }
}

const TCP: &str = "host=127.0.0.1 user=alice dbname=vpn connect_timeout=5";

#[test]
fn sslmode_disable_prefer_require_against_a_server_without_tls() {
    let e = env();
    // disable: the startup message comes first
    let srv = StandIn::new(vec![no_tls_then_error("28P01")]);
    let d = connect_err(&format!("{TCP} port={} sslmode=disable", srv.port), &e);
    assert_eq!(srv.join(), ["startup"]);
    assert_eq!(d.class, ErrorClass::Denied);
    assert!(d.message.contains("SQLSTATE 28P01"), "{}", d.message);
    // prefer: asks, hears no, goes on in plaintext
    let srv = StandIn::new(vec![no_tls_then_error("28P01")]);
    let d = connect_err(&format!("{TCP} port={} sslmode=prefer", srv.port), &e);
    assert_eq!(srv.join(), ["sslrequest,startup"]);
    assert!(d.message.contains("SQLSTATE 28P01"), "{}", d.message);
    // require and up: refuse, never plaintext
    for m in [
        "require sslrootcert=/nonexistent",
        "verify-full sslrootcert=system",
    ] {
        let srv = StandIn::new(vec![no_tls_then_error("28P01")]);
        let d = connect_err(&format!("{TCP} port={} sslmode={m}", srv.port), &e);
        assert_eq!(srv.join(), ["sslrequest"], "{m}");
        assert_eq!(d.class, ErrorClass::Denied, "{m}: {}", d.message);
        assert!(
            d.message.contains("server does not support TLS"),
            "{}",
            d.message
        );
    }
}

#[test]
fn sslmode_allow_tries_tls_after_the_server_refuses_plaintext() {
    let srv = StandIn::new(vec![no_tls_then_error("28000"), no_tls_then_error("28000")]);
    let d = connect_err(&format!("{TCP} port={} sslmode=allow", srv.port), &env());
    // The second attempt asks for TLS (the stand-in has none: "server does not support
    // TLS" is what allow then reports).
    assert_eq!(srv.join(), ["startup", "sslrequest"]);
    assert!(
        d.message.contains("server does not support TLS"),
        "{}",
        d.message
    );
}

#[test]
fn verify_full_against_tls_servers() {
    let pki = Pki::new("Test CA");
    let other = Pki::new("Other CA");
    let e = env();
    let root = format!("{TCP} sslrootcert={}", pki.ca_file().display());
    let try_with = |cert: X509, key: PKey<Private>, extra: &str| -> (DbError, String) {
        let srv = StandIn::new(vec![tls_server(cert, key, None)]);
        let d = connect_err(&format!("{root} port={} {extra}", srv.port), &e);
        (d, srv.join().remove(0))
    };

    // the right CA and name (an IP address SAN for 127.0.0.1): TLS up, then the
    // stand-in's error over it
    let (c, k) = pki.issue("good", "db.test", &["db.test", "127.0.0.1"], (-1, 30));
    let (d, seen) = try_with(c, k, "");
    assert_eq!(seen, "tls ok, client cert []");
    assert_eq!(d.class, ErrorClass::Denied);
    assert!(
        d.message.contains("stand-in over TLS says no"),
        "{}",
        d.message
    );

    // another CA
    let (c, k) = other.issue("foreign", "db.test", &["127.0.0.1"], (-1, 30));
    let (d, seen) = try_with(c, k, "");
    assert!(seen.starts_with("handshake failed"), "{seen}");
    assert_eq!(d.class, ErrorClass::Denied);
    assert!(
        d.message.contains("certificate") && d.message.contains("unknown CA"),
        "{}",
        d.message
    );
    assert!(
        d.message
            .starts_with("server certificate of 127.0.0.1 not accepted"),
        "{}",
        d.message
    );

    // self-signed
    let key = new_key();
    let selfsigned = cert("db.test", &["127.0.0.1"], &key, None, false, (-1, 30));
    let (d, _) = try_with(selfsigned, key, "");
    assert!(
        d.message.contains("self-signed") && d.message.contains("unknown CA"),
        "{}",
        d.message
    );

    // wrong host name: a certificate for db.test only, reached as 127.0.0.1
    let (c, k) = pki.issue("named", "db.test", &["db.test"], (-1, 30));
    let (d, _) = try_with(c.clone(), k.clone(), "");
    assert_eq!(d.class, ErrorClass::Denied);
    assert!(
        d.message.contains("certificate") && d.message.contains("wrong host name"),
        "{}",
        d.message
    );
    assert!(
        d.message.contains("is for db.test, not for \"127.0.0.1\""),
        "{}",
        d.message
    );
    // ... and the same certificate is fine as host=db.test hostaddr=127.0.0.1
    let (d, seen) = try_with(c.clone(), k.clone(), "host=db.test hostaddr=127.0.0.1");
    assert_eq!(seen, "tls ok, client cert []");
    assert!(d.message.contains("stand-in over TLS"), "{}", d.message);
    // ... or with verify-ca, which does not check the name
    let (d, seen) = try_with(c, k, "sslmode=verify-ca");
    assert_eq!(seen, "tls ok, client cert []", "{}", d.message);

    // expired, not yet valid
    let (c, k) = pki.issue("old", "db.test", &["127.0.0.1"], (-30, -1));
    let (d, _) = try_with(c, k, "");
    assert!(
        d.message.contains("certificate has expired"),
        "{}",
        d.message
    );
    let (c, k) = pki.issue("young", "db.test", &["127.0.0.1"], (1, 30));
    let (d, _) = try_with(c, k, "");
    assert!(d.message.contains("not valid yet"), "{}", d.message);

    // require without a root file checks nothing: the foreign certificate is accepted
    let (c, k) = other.issue("foreign2", "x", &[], (-1, 30));
    let srv = StandIn::new(vec![tls_server(c, k, None)]);
    let d = connect_err(
        &format!(
            "{TCP} port={} sslmode=require sslrootcert=/nonexistent",
            srv.port
        ),
        &e,
    );
    assert_eq!(srv.join(), ["tls ok, client cert []"], "{}", d.message);
}

#[test]
fn prefer_falls_back_to_plaintext_when_the_handshake_fails() {
    let pki = Pki::new("Prefer CA");
    let other = Pki::new("Prefer other CA");
    let (c, k) = other.issue("foreign", "x", &["127.0.0.1"], (-1, 30));
    let srv = StandIn::new(vec![tls_server(c, k, None), no_tls_then_error("28P01")]);
    let d = connect_err(
        &format!(
            "{TCP} port={} sslmode=prefer sslrootcert={}",
            srv.port,
            pki.ca_file().display()
        ),
        &env(),
    );
    let seen = srv.join();
    assert!(seen[0].starts_with("handshake failed"), "{seen:?}");
    assert_eq!(seen[1], "startup", "then plaintext");
    assert!(d.message.contains("SQLSTATE 28P01"), "{}", d.message);
}

#[test]
fn client_certificate_is_sent_and_its_refusal_is_denied() {
    let pki = Pki::new("mTLS CA");
    let other = Pki::new("mTLS other CA");
    let (sc, sk) = pki.issue("server", "db.test", &["127.0.0.1"], (-1, 30));
    pki.issue("alice", "alice", &[], (-1, 30));
    other.issue("mallory", "mallory", &[], (-1, 30));
    let root = format!("{TCP} sslrootcert={}", pki.ca_file().display());

    let srv = StandIn::new(vec![tls_server(
        sc.clone(),
        sk.clone(),
        Some(pki.ca.clone()),
    )]);
    let d = connect_err(
        &format!(
            "{root} port={} sslcert={} sslkey={}",
            srv.port,
            pki.path("alice.crt").display(),
            pki.path("alice.key").display()
        ),
        &env(),
    );
    assert_eq!(srv.join(), ["tls ok, client cert [alice]"], "{}", d.message);

    // a client certificate from a CA the server does not trust: the server's alert
    let srv = StandIn::new(vec![tls_server(sc, sk, Some(pki.ca.clone()))]);
    let d = connect_err(
        &format!(
            "{root} port={} sslcert={} sslkey={}",
            srv.port,
            other.path("mallory.crt").display(),
            other.path("mallory.key").display()
        ),
        &env(),
    );
    let seen = srv.join();
    assert!(seen[0].starts_with("handshake failed"), "{seen:?}");
    assert_refused_client_certificate(&d);
}

/// TLS 1.3 sends the server's verdict on the client certificate after the client's side
/// of the handshake; if the server's hang-up overtakes its alert the client sees only a
/// reset. Either way the message says what to check.
fn assert_refused_client_certificate(d: &DbError) {
    match d.class {
        ErrorClass::Denied => {
            assert!(
                d.message.contains("the server refused the TLS handshake"),
                "{}",
                d.message
            );
            assert!(d.message.contains("alert"), "{}", d.message);
        }
        ErrorClass::Transient => {
            assert!(
                d.message.contains("refusing our client certificate"),
                "{}",
                d.message
            )
        }
        ErrorClass::Other => panic!("{}", d.message),
    }
}

#[test]
fn hosts_are_tried_in_order_and_the_worst_error_is_reported() {
    // a port nobody listens on
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let srv = StandIn::new(vec![no_tls_then_error("28P01")]);
    let d = connect_err(
        &format!(
            "{TCP} host=127.0.0.1,127.0.0.1 port={dead},{} sslmode=disable",
            srv.port
        ),
        &env(),
    );
    assert_eq!(srv.join(), ["startup"], "the second host was tried");
    assert_eq!(
        d.class,
        ErrorClass::Denied,
        "password refused beats connection refused"
    );
    assert!(
        d.message.contains(&format!("127.0.0.1 port {dead}: ")),
        "{}",
        d.message
    );
    assert!(d.message.contains("SQLSTATE 28P01"), "{}", d.message);

    // only unreachable hosts: transient
    let d = connect_err(&format!("{TCP} port={dead} sslmode=disable"), &env());
    assert_eq!(d.class, ErrorClass::Transient, "{}", d.message);
}

#[test]
fn unix_sockets_never_use_tls() {
    let dir = tempfile::tempdir().unwrap();
    let l = std::os::unix::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let code = read_startup(&mut s).unwrap();
        tx.send(code).unwrap();
        s.write_all(&error_response("28000", "no")).unwrap();
    });
    let d = connect_err(
        &format!(
            "host={} user=alice sslmode=verify-full",
            dir.path().display()
        ),
        &env(),
    );
    t.join().unwrap();
    assert_ne!(
        rx.recv().unwrap(),
        SSL_REQUEST,
        "no SSLRequest on a unix socket"
    );
    assert_eq!(d.class, ErrorClass::Denied);
    assert!(d.message.ends_with("(SQLSTATE 28000)"), "{}", d.message);
}
