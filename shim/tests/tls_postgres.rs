//! The connection code against a real PostgreSQL 15 with TLS: a throwaway CA and
//! certificates made with the `openssl` command (the same commands the README gives), a
//! private server on 127.0.0.1 only (`hostssl ... cert` for roles, `scram-sha-256` for one
//! role with a password, `hostnossl ... reject`), and the library's `conn` module as the
//! client. No network namespaces and no tun device; as root the server runs as the
//! `postgres` OS user (runuser), otherwise as the current user. The server and the temp
//! dir go away when the test ends, also on panic.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgvpn_shim::conn::{self, Env, Settings};
use pgvpn_shim::error::{DbError, ErrorClass};
use pgvpn_shim::runtime::EXIT_DENIED;
use pgvpn_shim::tls::SslMode;

#[path = "support/pki.rs"]
mod pki;
use pki::Ca;

const BINDIR: &str = "/usr/lib/postgresql/15/bin";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private PostgreSQL 15 with ssl=on, listening on 127.0.0.1 only (and a unix socket in
/// its directory for setting it up). Stopped and removed on drop.
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl Server {
    fn command(&self, program: &str) -> Command {
        let path = Path::new(BINDIR).join(program);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(self.dir.path());
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// `server` = (certificate, key) issued by `ca`, which also signs client certificates.
    fn start(ca: &Ca, server: &(PathBuf, PathBuf)) -> Server {
        assert!(
            Path::new(BINDIR).join("initdb").exists(),
            "PostgreSQL 15 server binaries not found in {BINDIR}"
        );
        let dir = tempfile::Builder::new()
            .prefix("pgvpn-shim-tls-")
            .tempdir()
            .unwrap();
        let mut s = Server {
            dir,
            port: Server::free_port(),
            running: false,
        };
        if is_root() {
            run(Command::new("chown").arg("postgres:").arg(s.dir.path()));
        }
        run(s
            .command("initdb")
            .arg("-D")
            .arg(s.data())
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=reject"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"]));
        for (from, to) in [
            (&server.0, "server.crt"),
            (&server.1, "server.key"),
            (&ca.crt(), "ca.crt"),
        ] {
            let dest = s.data().join(to);
            fs::copy(from, &dest).unwrap();
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                run(Command::new("chown").arg("postgres:").arg(&dest));
            }
        }
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'ca.crt'\nmax_connections = 20\nshared_buffers = 16MB\nfsync = off\n\
             log_connections = on\n",
            s.port,
            s.dir.path().display()
        );
        let mut existing = fs::read_to_string(s.data().join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        fs::write(s.data().join("postgresql.conf"), existing).unwrap();
        fs::write(
            s.data().join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all scram_user 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 cert\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let out = s
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(s.data())
            .arg("-l")
            .arg(s.log())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(s.log()).unwrap_or_default()
        );
        s.running = true;
        s
    }

    /// As the superuser over the unix socket (trust), through the library too.
    fn admin(&self, sql: &str) {
        let st = conn::parse_with(
            &format!(
                "host={} port={} user=postgres dbname=postgres",
                self.dir.path().display(),
                self.port
            ),
            &Env::empty(),
        )
        .unwrap();
        let mut c = conn::connect(&st, "tls test setup").unwrap();
        c.batch_execute(sql).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = fs::read_to_string(self.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- server log (tail) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.running {
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(self.data())
                .output();
        }
        // The TempDir removes the directory.
    }
}

/// Environment of a user with no home files and no PG* variables.
fn clean_env() -> Env {
    Env::empty().with_os_user("nobody-in-particular")
}

fn settings(s: &str, env: &Env) -> Settings {
    conn::parse_with(s, env).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn try_connect(s: &str, env: &Env) -> Result<postgres::Client, DbError> {
    conn::connect(&settings(s, env), "tls test")
}

/// Connects and returns (current_user, whether the session uses TLS).
fn who(s: &str, env: &Env) -> (String, bool) {
    let mut c = try_connect(s, env).unwrap_or_else(|e| panic!("{s}: {e}"));
    let row = c
        .query_one(
            "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn refused(s: &str, env: &Env) -> DbError {
    match try_connect(s, env) {
        Ok(_) => panic!("{s}: connected"),
        Err(e) => {
            eprintln!("refused as expected: {e}");
            e
        }
    }
}

/// The keepalive timers of our TCP connections to `port`, in seconds, from `ss`.
fn keepalive_timers(port: u16) -> Vec<f64> {
    let out = run(Command::new("ss").args([
        "-tnoH",
        "state",
        "established",
        "dst",
        "127.0.0.1",
        "dport",
        "=",
        &format!(":{port}"),
    ]));
    out.lines()
        .filter_map(|l| {
            let t = l.split("timer:(keepalive,").nth(1)?;
            ss_duration(t.split(',').next()?)
        })
        .collect()
}

/// ss's timer format: "4.996sec", "996ms", "9min59sec", "1h2min".
fn ss_duration(v: &str) -> Option<f64> {
    let (mut total, mut num) = (0.0, String::new());
    let mut unit = String::new();
    let mut flush = |num: &mut String, unit: &mut String| -> Option<()> {
        let n: f64 = num.parse().ok()?;
        total += n * match unit.as_str() {
            "ms" => 0.001,
            "sec" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        num.clear();
        unit.clear();
        Some(())
    };
    for c in v.chars() {
        if c.is_ascii_digit() || c == '.' {
            if !unit.is_empty() {
                flush(&mut num, &mut unit)?;
            }
            num.push(c);
        } else {
            unit.push(c);
        }
    }
    flush(&mut num, &mut unit)?;
    Some(total)
}

#[test]
fn ss_timer_format() {
    assert_eq!(ss_duration("4.5sec"), Some(4.5));
    assert_eq!(ss_duration("996ms"), Some(0.996));
    assert_eq!(ss_duration("9min59sec"), Some(599.0));
    assert_eq!(ss_duration("1h2min"), Some(3720.0));
    assert_eq!(ss_duration("soon"), None);
}

#[test]
fn tls_against_a_real_server() {
    let pki = tempfile::Builder::new()
        .prefix("pgvpn-shim-pki-")
        .tempdir()
        .unwrap();
    let p = pki.path();
    let ca = Ca::new(p, "ca", "pgvpn test CA");
    let other = Ca::new(p, "other-ca", "some other CA");
    let server_cert = ca.issue(
        "server",
        "db.test",
        "subjectAltName=DNS:db.test\nextendedKeyUsage=serverAuth\n",
    );
    let (alice_crt, alice_key) = ca.issue("alice", "alice", "extendedKeyUsage=clientAuth\n");
    // Same CN, wrong CA.
    let (forged_crt, forged_key) = other.issue("forged", "alice", "extendedKeyUsage=clientAuth\n");

    let srv = Server::start(&ca, &server_cert);
    let pw_secret = "s3cret:with\\specials";
    srv.admin(&format!(
        "CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; \
         CREATE ROLE scram_user LOGIN PASSWORD '{}';",
        pw_secret.replace('\'', "''")
    ));
    let env = clean_env();
    let port = srv.port;
    let base = format!("port={port} dbname=postgres connect_timeout=5");
    let client = format!(
        "sslcert={} sslkey={}",
        alice_crt.display(),
        alice_key.display()
    );
    let right_ca = format!("sslrootcert={}", ca.crt().display());

    // 1. verify-full (the default) with the right CA and the name in the certificate:
    //    connected, over TLS, logged in by the client certificate's CN.
    let good = format!("host=db.test hostaddr=127.0.0.1 {base} user=alice {right_ca} {client}");
    assert_eq!(settings(&good, &env).sslmode(), SslMode::VerifyFull);
    assert!(settings(&good, &env).warnings().is_empty());
    assert_eq!(who(&good, &env), ("alice".to_string(), true));

    // 2. A CA from another chain: certificate error, exit code 3.
    let e = refused(
        &format!(
            "host=db.test hostaddr=127.0.0.1 {base} user=alice sslrootcert={} {client}",
            other.crt().display()
        ),
        &env,
    );
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    assert_eq!(e.class.exit_code(), EXIT_DENIED);
    assert!(
        e.message.contains("certificate") && e.message.contains("unknown CA"),
        "{e}"
    );

    // 3. The right CA but the wrong host name: reached as 127.0.0.1, the certificate is
    //    for db.test.
    let e = refused(
        &format!("host=127.0.0.1 {base} user=alice {right_ca} {client}"),
        &env,
    );
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    assert!(
        e.message.contains("certificate") && e.message.contains("host name"),
        "{e}"
    );
    assert!(e.message.contains("db.test"), "{e}");
    // verify-ca does not check the name.
    let ca_only = format!("host=127.0.0.1 {base} user=alice sslmode=verify-ca {right_ca} {client}");
    assert_eq!(who(&ca_only, &env), ("alice".to_string(), true));

    // 4. sslmode=disable against hostnossl ... reject: refused by the server.
    let e = refused(
        &format!("host=127.0.0.1 {base} user=alice sslmode=disable"),
        &env,
    );
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    assert!(
        e.message.contains("no encryption") && e.message.contains("28000"),
        "{e}"
    );
    // prefer gets TLS (and no verification): the server allows it, the client cert logs in.
    let prefer = format!("host=127.0.0.1 {base} user=alice sslmode=prefer {client}");
    assert_eq!(who(&prefer, &env), ("alice".to_string(), true));
    // allow: plaintext refused by the server, then TLS.
    let allow = format!("host=127.0.0.1 {base} user=alice sslmode=allow {client}");
    assert_eq!(who(&allow, &env), ("alice".to_string(), true));

    // 5. Client certificates and pg_hba `cert`: none sent, the wrong role, a forged one.
    let e = refused(
        &format!("host=db.test hostaddr=127.0.0.1 {base} user=alice {right_ca}"),
        &env,
    );
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    assert!(e.message.contains("certificate"), "{e}");
    let e = refused(
        &format!("host=db.test hostaddr=127.0.0.1 {base} user=bob {right_ca} {client}"),
        &env,
    );
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    assert!(
        e.message
            .contains("certificate authentication failed for user \"bob\""),
        "{e}"
    );
    let e = refused(
        &format!(
            "host=db.test hostaddr=127.0.0.1 {base} user=alice {right_ca} sslcert={} sslkey={}",
            forged_crt.display(),
            forged_key.display()
        ),
        &env,
    );
    // TLS 1.3: the server's alert, or (when its hang-up overtakes the alert) a reset with
    // a hint; see conn.rs.
    match e.class {
        ErrorClass::Denied => assert!(
            e.message.contains("the server refused the TLS handshake"),
            "{e}"
        ),
        ErrorClass::Transient => {
            assert!(e.message.contains("refusing our client certificate"), "{e}")
        }
        ErrorClass::Other => panic!("{e}"),
    }

    // 6. SCRAM with channel binding over TLS (tls-server-end-point), the password from a
    //    password file; one that others can read is not used.
    let home = tempfile::tempdir().unwrap();
    let pgpass = home.path().join(".pgpass");
    fs::write(
        &pgpass,
        format!(
            "db.test:{port}:*:scram_user:{}\n",
            pw_secret.replace('\\', "\\\\").replace(':', "\\:")
        ),
    )
    .unwrap();
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600)).unwrap();
    let home_env = clean_env().with_home(home.path());
    let scram = format!(
        "host=db.test hostaddr=127.0.0.1 {base} user=scram_user {right_ca} channel_binding=require"
    );
    assert_eq!(who(&scram, &home_env), ("scram_user".to_string(), true));
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o644)).unwrap();
    let st = settings(&scram, &home_env);
    assert!(
        st.warnings()[0].contains("group or world access"),
        "{:?}",
        st.warnings()
    );
    let e = conn::connect(&st, "tls test")
        .err()
        .expect("no password, no login");
    assert_eq!(e.class, ErrorClass::Denied, "{e}");
    // channel_binding=require cannot be met by certificate authentication (no SCRAM).
    let e = refused(&format!("{good} channel_binding=require"), &env);
    assert_eq!(e.class, ErrorClass::Denied, "{e}");

    // 7. Hosts in order: a dead port first, then the server; target_session_attrs.
    let dead = Server::free_port();
    let multi = format!(
        "host=db.test,db.test hostaddr=127.0.0.1,127.0.0.1 port={dead},{port} dbname=postgres \
         user=alice {right_ca} {client} target_session_attrs=read-write"
    );
    assert_eq!(who(&multi, &env), ("alice".to_string(), true));

    // 8. The keepalive defaults are on the socket: the first probe within 5 s of silence
    //    (the kernel's default is two hours); and an override is honoured.
    let held = try_connect(&good, &env).unwrap();
    let timers = keepalive_timers(port);
    assert_eq!(timers.len(), 1, "one connection from us: {timers:?}");
    assert!(timers[0] <= 5.0, "keepalive timer {timers:?}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let held = try_connect(&format!("{good} keepalives_idle=600"), &env).unwrap();
    let timers = keepalive_timers(port);
    assert!(
        timers.len() == 1 && timers[0] > 60.0,
        "keepalive timer {timers:?}"
    );
    drop(held);

    // 9. The environment form: PGSSLROOTCERT, PGSSLCERT, PGSSLKEY and nothing about TLS in
    //    the string: verify-full by default, client certificate login.
    let empty_home = tempfile::tempdir().unwrap();
    let vars = [
        ("PGSSLROOTCERT", ca.crt()),
        ("PGSSLCERT", alice_crt.clone()),
        ("PGSSLKEY", alice_key.clone()),
        ("HOME", empty_home.path().to_path_buf()),
    ];
    let saved: Vec<_> = vars
        .iter()
        .map(|(k, _)| (*k, std::env::var_os(k)))
        .collect();
    for (k, v) in &vars {
        // No other test in this file reads the environment.
        std::env::set_var(k, v);
    }
    for k in [
        "PGSSLMODE",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
    ] {
        std::env::remove_var(k);
    }
    let from_env = conn::parse(&format!(
        "host=db.test hostaddr=127.0.0.1 {base} user=alice"
    ));
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    let from_env = from_env.unwrap();
    assert_eq!(from_env.sslmode(), SslMode::VerifyFull);
    assert!(from_env.warnings().is_empty(), "{:?}", from_env.warnings());
    let mut c = conn::connect(&from_env, "tls test").unwrap();
    let me: String = c
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(me, "alice");
    // ... and the same without the CA in the environment: the default file is missing.
    let e = conn::parse_with(
        &format!("host=db.test {base} user=alice"),
        &clean_env().with_home(empty_home.path()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("root certificate file"), "{e}");
}
