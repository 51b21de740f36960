//! How to reach the database, all of it: a connection string (conninfo.rs) plus the PG*
//! environment and ~/.pgpass (pgpass.rs) → [`Settings`], checked and with the TLS files
//! loaded (tls.rs); and settings → a connected `postgres::Client`, host by host.
//!
//! The keywords mean what they mean to libpq, with one deliberate difference: over TCP the
//! default sslmode is verify-full (libpq's is prefer). A weaker sslmode over TCP must be
//! written out (in the string or PGSSLMODE) and is warned about once at startup. Unix
//! sockets never use TLS.
//!
//! Dead or partitioned servers: unless the connection string says otherwise, every TCP
//! connection gets keepalives after [`KEEPALIVES_IDLE`] of silence, [`KEEPALIVES_COUNT`]
//! probes [`KEEPALIVES_INTERVAL`] apart, and [`TCP_USER_TIMEOUT`] for unacknowledged data:
//! a dead server is noticed in about 10 s instead of the kernel's two hours. Connecting
//! gives up after [`CONNECT_TIMEOUT`] per host (libpq: none).
//!
//! Hosts are tried in order (libpq's multi-host failover, with target_session_attrs); each
//! gets its own password from the password file, as in libpq.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postgres::config::{ChannelBinding, SslMode as PgSslMode, TargetSessionAttrs};
use postgres::{Client, NoTls};

use crate::conninfo::{self, ConnInfo};
use crate::error::{DbError, ErrorClass, SettingsError};
use crate::pgpass;
use crate::tls::{self, RootCert, SslMode, Tls, Verify};

/// Debian's libpq default socket directory, the host when none is given.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
pub const DEFAULT_PORT: u16 = 5432;
/// A host that silently drops packets must not stall a reconnect (or shutdown) for minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive probes after this much silence, ...
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(5);
/// ... this far apart, ...
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(1);
/// ... and the connection is dead after this many unanswered: 5 + 5 × 1 = 10 s.
pub const KEEPALIVES_COUNT: u32 = 5;
/// Data sent but not acknowledged for this long: the connection is dead (the case
/// keepalives do not cover, e.g. a query sent into a partition).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the settings read from outside the connection string: PG* variables, the home
/// directory (for ~/.pgpass and ~/.postgresql/) and the OS user name (the default user).
/// A value, so that tests do not touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
    os_user: Option<String>,
}

impl Env {
    /// This process's environment (only the variables libpq reads).
    pub fn process() -> Env {
        let vars = conninfo::KEYWORDS
            .iter()
            .filter_map(|k| k.env)
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
            .collect();
        Env {
            vars,
            home: std::env::home_dir(),
            os_user: whoami::username().ok(),
        }
    }

    /// Nothing set, no home directory, no OS user name.
    pub fn empty() -> Env {
        Env::default()
    }

    pub fn with_var(mut self, name: &str, value: &str) -> Env {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    pub fn with_home(mut self, home: impl Into<PathBuf>) -> Env {
        self.home = Some(home.into());
        self
    }

    pub fn with_os_user(mut self, user: &str) -> Env {
        self.os_user = Some(user.to_string());
        self
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// Where one host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A unix socket directory.
    Unix(PathBuf),
    /// TCP to `hostaddr` if given, else to `host` (resolved); `host` is also the name the
    /// certificate must carry. At least one of the two is set.
    Tcp {
        host: Option<String>,
        hostaddr: Option<IpAddr>,
    },
}

/// One host of the list, with its own port and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: Addr,
    pub port: u16,
    password: Option<String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "_"))
            .finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            Addr::Unix(dir) => write!(f, "{}/.s.PGSQL.{}", dir.display(), self.port),
            Addr::Tcp {
                host: Some(h),
                hostaddr: Some(a),
            } => write!(f, "{h} ({a}) port {}", self.port),
            Addr::Tcp { host: Some(h), .. } => write!(f, "{h} port {}", self.port),
            Addr::Tcp {
                hostaddr: Some(a), ..
            } => write!(f, "{a} port {}", self.port),
            Addr::Tcp { .. } => write!(f, "? port {}", self.port),
        }
    }
}

impl Target {
    pub fn is_tcp(&self) -> bool {
        matches!(self.addr, Addr::Tcp { .. })
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The name the TLS layer gets (SNI, and checked against the certificate in
    /// verify-full): the host, else the address.
    fn tls_name(&self) -> String {
        match &self.addr {
            Addr::Tcp { host: Some(h), .. } => h.clone(),
            Addr::Tcp {
                hostaddr: Some(a), ..
            } => a.to_string(),
            _ => String::new(),
        }
    }

    /// The host field libpq matches in the password file: `localhost` for the default
    /// socket directory, else the host as written, else the address.
    fn pgpass_host(&self) -> String {
        match &self.addr {
            Addr::Unix(d) if d == Path::new(DEFAULT_SOCKET_DIR) => "localhost".into(),
            Addr::Unix(d) => d.display().to_string(),
            Addr::Tcp { .. } => self.tls_name(),
        }
    }
}

/// Everything needed to connect, checked at startup.
#[derive(Debug, Clone)]
pub struct Settings {
    /// All but the host, port, password, TLS mode and application name.
    base: postgres::Config,
    targets: Vec<Target>,
    /// For TCP hosts.
    sslmode: SslMode,
    /// Set up iff some host is TCP and sslmode is not disable.
    tls: Option<Tls>,
    application_name: Option<String>,
    warnings: Vec<String>,
}

/// Parses a connection string in this process's environment.
pub fn parse(s: &str) -> Result<Settings, SettingsError> {
    parse_with(s, &Env::process())
}

pub fn parse_with(s: &str, env: &Env) -> Result<Settings, SettingsError> {
    Settings::resolve(&ConnInfo::parse(s)?, env)
}

fn invalid(keyword: &'static str, value: &str, expected: &'static str) -> SettingsError {
    SettingsError::InvalidValue {
        keyword,
        value: value.to_string(),
        expected,
    }
}

/// libpq's integers: optional sign, digits, trailing whitespace.
fn int(keyword: &'static str, v: &str, expected: &'static str) -> Result<i64, SettingsError> {
    v.trim_end()
        .parse()
        .map_err(|_| invalid(keyword, v, expected))
}

fn seconds_at_least_one(keyword: &'static str, v: &str) -> Result<Duration, SettingsError> {
    const E: &str = "a whole number of seconds, at least 1";
    match int(keyword, v, E)? {
        n @ 1.. => Ok(Duration::from_secs(n as u64)),
        _ => Err(invalid(keyword, v, E)),
    }
}

impl Settings {
    /// The connection string's keywords, else the environment, else the defaults.
    pub fn resolve(info: &ConnInfo, env: &Env) -> Result<Settings, SettingsError> {
        let get = Lookup { info, env };
        let mut warnings = Vec::new();
        let mut pg = postgres::Config::new();
        let user = get.get("user").map(str::to_string).or(env.os_user.clone());
        if let Some(u) = &user {
            pg.user(u);
        }
        let dbname = get.get("dbname");
        if let Some(d) = dbname {
            pg.dbname(d);
        }
        if let Some(o) = get.get("options") {
            pg.options(o);
        }
        socket_options(&get, &mut pg)?;
        session_options(&get, &mut pg)?;
        let application_name = get
            .get("application_name")
            .or_else(|| get.get("fallback_application_name"))
            .map(str::to_string);

        let mut targets = targets(get.get("host"), get.get("hostaddr"), get.get("port"))?;
        let user = user.as_deref().unwrap_or("");
        passwords(
            &get,
            user,
            dbname.unwrap_or(user),
            &mut targets,
            &mut warnings,
        );

        let sslmode = get
            .get("sslmode")
            .map(SslMode::parse)
            .transpose()?
            .unwrap_or(SslMode::VerifyFull);
        let tcp: Vec<&Target> = targets.iter().filter(|t| t.is_tcp()).collect();
        let tls = if tcp.is_empty() || sslmode == SslMode::Disable {
            None
        } else {
            Some(tls_for(&get, sslmode, &tcp)?)
        };
        let verify = tls.as_ref().map_or(&Verify::Nothing, |t| t.verify());
        if let (false, Some(why)) = (tcp.is_empty(), tls::weakness(sslmode, verify)) {
            let hosts: Vec<String> = tcp.iter().map(|t| t.to_string()).collect();
            warnings.push(format!("sslmode={sslmode} for {}: {why}", hosts.join(", ")));
        }

        Ok(Settings {
            base: pg,
            targets,
            sslmode,
            tls,
            application_name,
            warnings,
        })
    }

    /// The hosts, in the order they are tried.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The settings common to all hosts (user, dbname, timeouts, keepalives, ...).
    pub fn config(&self) -> &postgres::Config {
        &self.base
    }

    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    pub fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// What the user should hear about once, at startup (a weak sslmode over TCP, a
    /// password file that is not used).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// These settings with `-c name=value` added to the options sent at startup, unless
    /// the options (the connection string's, or PGOPTIONS) already mention `name`: a
    /// server setting the program wants by default and the connection string can override.
    pub fn with_default_setting(&self, name: &str, value: &str) -> Settings {
        let mut s = self.clone();
        let existing = s.base.get_options().unwrap_or("").to_string();
        if !existing.contains(name) {
            let joined = if existing.trim().is_empty() {
                format!("-c {name}={value}")
            } else {
                format!("{existing} -c {name}={value}")
            };
            s.base.options(&joined);
        }
        s
    }

    /// These settings, accepting only a server that allows writes (target_session_attrs =
    /// read-write): a standby is skipped, and the next host is tried.
    pub fn read_write(&self) -> Settings {
        let mut s = self.clone();
        s.base.target_session_attrs(TargetSessionAttrs::ReadWrite);
        s
    }

    /// These settings, with `f` called for every NOTICE (or WARNING) the server sends on
    /// the connections they open, instead of the postgres crate's default (an info! line).
    pub fn with_notice_callback(
        &self,
        f: impl Fn(postgres::error::DbError) + Send + Sync + 'static,
    ) -> Settings {
        let mut s = self.clone();
        s.base.notice_callback(f);
        s
    }

    /// The postgres crate's settings for one host.
    pub fn config_for(&self, t: &Target, application_name: &str) -> postgres::Config {
        let mut pg = self.base.clone();
        match &t.addr {
            Addr::Unix(dir) => {
                pg.host_path(dir);
            }
            Addr::Tcp { hostaddr, .. } => {
                // The postgres crate needs a host name for TLS; with hostaddr alone that is
                // the address (verify-full is refused without a host, see resolve).
                pg.host(&t.tls_name());
                if let Some(a) = hostaddr {
                    pg.hostaddr(*a);
                }
            }
        }
        pg.port(t.port);
        if let Some(p) = &t.password {
            pg.password(p);
        }
        pg.application_name(self.application_name.as_deref().unwrap_or(application_name));
        pg
    }
}

/// A keyword's value: the connection string's, else its environment variable's. A keyword
/// in the string hides the variable even when empty; empty means the default.
struct Lookup<'a> {
    info: &'a ConnInfo,
    env: &'a Env,
}

impl<'a> Lookup<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        let env = self.env;
        let from_env = || conninfo::keyword(name)?.env.and_then(|v| env.var(v));
        self.info
            .get(name)
            .or_else(from_env)
            .filter(|v| !v.is_empty())
    }

    /// Under the home directory (`~` when there is none, which then does not exist).
    fn home_file(&self, rel: &str) -> PathBuf {
        self.env
            .home
            .clone()
            .unwrap_or_else(|| PathBuf::from("~"))
            .join(rel)
    }
}

/// connect_timeout, keepalives*, tcp_user_timeout: libpq's meanings, our defaults.
fn socket_options(get: &Lookup<'_>, pg: &mut postgres::Config) -> Result<(), SettingsError> {
    match get.get("connect_timeout") {
        None => {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        Some(v) => match int("connect_timeout", v, "a whole number of seconds")? {
            // libpq: zero or less waits forever; the minimum is 2 s.
            ..=0 => {}
            n => {
                pg.connect_timeout(Duration::from_secs(n.max(2) as u64));
            }
        },
    }
    if let Some(v) = get.get("keepalives") {
        pg.keepalives(int("keepalives", v, "0 or 1")? != 0);
    }
    pg.keepalives_idle(match get.get("keepalives_idle") {
        Some(v) => seconds_at_least_one("keepalives_idle", v)?,
        None => KEEPALIVES_IDLE,
    });
    pg.keepalives_interval(match get.get("keepalives_interval") {
        Some(v) => seconds_at_least_one("keepalives_interval", v)?,
        None => KEEPALIVES_INTERVAL,
    });
    pg.keepalives_retries(match get.get("keepalives_count") {
        Some(v) => {
            const E: &str = "a whole number, at least 1";
            u32::try_from(int("keepalives_count", v, E)?)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid("keepalives_count", v, E))?
        }
        None => KEEPALIVES_COUNT,
    });
    const MS: &str = "a whole number of milliseconds";
    match get.get("tcp_user_timeout") {
        None => {
            pg.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // Milliseconds, as in libpq; 0 is the system default.
        Some(v) => match int("tcp_user_timeout", v, MS)? {
            0 => {}
            n @ 1.. => {
                pg.tcp_user_timeout(Duration::from_millis(n as u64));
            }
            _ => return Err(invalid("tcp_user_timeout", v, MS)),
        },
    }
    Ok(())
}

/// target_session_attrs and channel_binding, as far as the postgres crate has them.
fn session_options(get: &Lookup<'_>, pg: &mut postgres::Config) -> Result<(), SettingsError> {
    if let Some(v) = get.get("target_session_attrs") {
        pg.target_session_attrs(match v {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            _ => return Err(invalid("target_session_attrs", v, "any, read-write or read-only; primary, standby and prefer-standby are not supported")),
        });
    }
    if let Some(v) = get.get("channel_binding") {
        pg.channel_binding(match v {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => return Err(invalid("channel_binding", v, "disable, prefer or require")),
        });
    }
    Ok(())
}

/// The password: the string's or PGPASSWORD, else the password file's line for each host.
fn passwords(
    get: &Lookup<'_>,
    user: &str,
    dbname: &str,
    targets: &mut [Target],
    warnings: &mut Vec<String>,
) {
    if let Some(p) = get.get("password") {
        for t in targets {
            t.password = Some(p.to_string());
        }
        return;
    }
    let file = get
        .get("passfile")
        .map_or_else(|| get.home_file(".pgpass"), PathBuf::from);
    match pgpass::load(&file) {
        pgpass::Loaded::Missing => {}
        pgpass::Loaded::Ignored(w) => warnings.push(w),
        pgpass::Loaded::File(f) => {
            for t in targets {
                let port = t.port.to_string();
                t.password = f
                    .lookup(&t.pgpass_host(), &port, dbname, user)
                    .map(str::to_string);
            }
        }
    }
}

/// The TLS context for the TCP hosts: trusted roots, client certificate (files read and
/// checked now).
fn tls_for(get: &Lookup<'_>, sslmode: SslMode, tcp: &[&Target]) -> Result<Tls, SettingsError> {
    if sslmode == SslMode::VerifyFull {
        let nameless = tcp
            .iter()
            .find(|t| matches!(t.addr, Addr::Tcp { host: None, .. }));
        if let Some(t) = nameless {
            return Err(SettingsError::Conflict(format!(
                "sslmode=verify-full needs a host name to check the server's certificate against, and {t} has none: add host=<the name in its certificate> next to hostaddr"
            )));
        }
    }
    let root = match get.get("sslrootcert") {
        Some("system") => RootCert::System,
        Some(p) => RootCert::File {
            path: p.into(),
            explicit: true,
        },
        None => RootCert::File {
            path: get.home_file(".postgresql/root.crt"),
            explicit: false,
        },
    };
    let verify = tls::verification(sslmode, root, Path::exists)?;
    let client = tls::client_cert(
        get.get("sslcert").map(PathBuf::from),
        get.get("sslkey").map(PathBuf::from),
        get.env.home.as_deref(),
    )?;
    Tls::new(verify, client)
}

/// host, hostaddr and port (comma-separated lists) → the hosts in order.
fn targets(
    host: Option<&str>,
    hostaddr: Option<&str>,
    port: Option<&str>,
) -> Result<Vec<Target>, SettingsError> {
    let hosts: Vec<&str> = host.map(|h| h.split(',').collect()).unwrap_or_default();
    let addrs = hostaddr
        .map(|v| {
            v.split(',')
                .map(|a| match a.trim() {
                    "" => Ok(None),
                    a => a
                        .parse::<IpAddr>()
                        .map(Some)
                        .map_err(|_| invalid("hostaddr", a, "an IPv4 or IPv6 address")),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(SettingsError::Conflict(format!(
            "could not match {} host names to {} hostaddr values",
            hosts.len(),
            addrs.len()
        )));
    }
    let n = hosts.len().max(addrs.len()).max(1);
    let ports = port
        .map(|v| {
            v.split(',')
                .map(|p| match p.trim() {
                    "" => Ok(DEFAULT_PORT),
                    p => p
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| invalid("port", p, "a number from 1 to 65535")),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    if ports.len() > 1 && ports.len() != n {
        return Err(SettingsError::Conflict(format!(
            "could not match {} port numbers to {n} hosts",
            ports.len()
        )));
    }
    Ok((0..n)
        .map(|i| {
            let host = hosts.get(i).copied().unwrap_or("");
            let hostaddr = addrs.get(i).copied().flatten();
            let addr = match hostaddr {
                Some(a) => Addr::Tcp {
                    host: (!host.is_empty() && !host.starts_with('/')).then(|| host.to_string()),
                    hostaddr: Some(a),
                },
                None if host.is_empty() => Addr::Unix(DEFAULT_SOCKET_DIR.into()),
                None if host.starts_with('/') => Addr::Unix(host.into()),
                None => Addr::Tcp {
                    host: Some(host.to_string()),
                    hostaddr: None,
                },
            };
            Target {
                addr,
                port: ports
                    .get(i)
                    .or(ports.first())
                    .copied()
                    .unwrap_or(DEFAULT_PORT),
                password: None,
            }
        })
        .collect())
}

/// A connected client. `application_name` is used unless the connection string (or
/// PGAPPNAME) set one. Hosts are tried in order; if all fail, the error is the most
/// severe of theirs (a certificate or password refused beats a host that is down).
pub fn connect(settings: &Settings, application_name: &str) -> Result<Client, DbError> {
    let mut failures = Vec::new();
    for t in settings.targets() {
        match connect_target(settings, t, application_name) {
            Ok(c) => return Ok(c),
            Err(e) => failures.push((t, e)),
        }
    }
    Err(combine(failures))
}

fn severity(c: ErrorClass) -> u8 {
    match c {
        ErrorClass::Transient => 0,
        ErrorClass::Other => 1,
        ErrorClass::Denied => 2,
    }
}

fn combine(mut failures: Vec<(&Target, DbError)>) -> DbError {
    if failures.len() == 1 {
        return failures.remove(0).1;
    }
    let class = failures
        .iter()
        .map(|(_, e)| e.class)
        .max_by_key(|c| severity(*c))
        .unwrap_or(ErrorClass::Transient);
    let all: Vec<String> = failures.iter().map(|(t, e)| format!("{t}: {e}")).collect();
    DbError::new(
        class,
        format!("no host accepted the connection: {}", all.join("; ")),
    )
}

fn connect_target(s: &Settings, t: &Target, application_name: &str) -> Result<Client, DbError> {
    let pg = s.config_for(t, application_name);
    if !t.is_tcp() {
        return plain(&pg).map_err(DbError::from);
    }
    match s.sslmode {
        SslMode::Disable => plain(&pg).map_err(DbError::from),
        // Plaintext first; TLS if the server turned that down (e.g. only hostssl lines).
        SslMode::Allow => match plain(&pg) {
            Err(e) if e.as_db_error().is_some() => {
                with_tls(s, t, &pg, PgSslMode::Require).map_err(|(e, _)| e)
            }
            r => r.map_err(DbError::from),
        },
        // TLS if offered (the postgres crate falls back when the server says no); a failed
        // handshake falls back too, as in libpq.
        SslMode::Prefer => match with_tls(s, t, &pg, PgSslMode::Prefer) {
            Err((_, true)) => plain(&pg).map_err(DbError::from),
            r => r.map_err(|(e, _)| e),
        },
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            with_tls(s, t, &pg, PgSslMode::Require).map_err(|(e, _)| e)
        }
    }
}

fn plain(pg: &postgres::Config) -> Result<Client, postgres::Error> {
    let mut pg = pg.clone();
    pg.ssl_mode(PgSslMode::Disable);
    pg.connect(NoTls)
}

/// A TLS connection; on failure also whether the handshake itself failed.
fn with_tls(
    s: &Settings,
    t: &Target,
    pg: &postgres::Config,
    mode: PgSslMode,
) -> Result<Client, (DbError, bool)> {
    let Some(tls) = &s.tls else {
        // resolve() sets TLS up for every TCP host unless sslmode=disable.
        return Err((DbError::new(ErrorClass::Other, "TLS is not set up"), false));
    };
    let (connector, failure) = tls.connector();
    let mut pg = pg.clone();
    pg.ssl_mode(mode);
    pg.connect(connector).map_err(|e| {
        let host = t.tls_name();
        if let Some(f) = failure.take() {
            let mut msg = f.message(&host);
            if f.is_unknown_ca() {
                msg.push_str(&format!(" [trusted roots: {}]", tls.roots()));
            }
            return (DbError::new(ErrorClass::Denied, msg), true);
        }
        match tls::handshake_failure(&e) {
            Some((class, why)) => (DbError::new(class, format!("TLS with {t}: {why}")), true),
            None => {
                let hint = tls.client().is_some() && broken_off(&e);
                let mut d = DbError::from(e);
                if hint {
                    // TLS 1.3 sends the server's verdict on our certificate after the
                    // handshake; when the server hangs up at once the alert is often lost
                    // to the reset. Still transient (it may be a restart), but say so.
                    d.message.push_str(
                        " (if this persists: the server may be refusing our client certificate; is sslcert from a CA in its ssl_ca_file?)",
                    );
                }
                (d, false)
            }
        }
    })
}

/// The server hung up (reset, EOF) rather than answering.
fn broken_off(e: &postgres::Error) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind::*;
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    e.is_closed()
}

#[cfg(test)]
mod tests;
