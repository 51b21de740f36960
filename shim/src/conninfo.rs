//! The connection string's syntax, read as libpq reads it: `key=value` pairs (values in
//! single quotes when they hold spaces; backslash escapes) or a `postgresql://` URL
//! (`postgresql://user:password@host1:port1,host2:port2/dbname?key=value`, percent-encoded,
//! `[...]` around IPv6 addresses, `%2F...` for a unix socket directory). The result is only
//! keyword → value; what the values mean, the environment and the defaults are conn.rs's
//! business.
//!
//! This is the one parser: the postgres crate's own knows neither the file keywords nor
//! verify-ca/verify-full, and would reject the whole string for them.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::SettingsError;

/// A libpq keyword this client understands, and the environment variable libpq reads when
/// the connection string does not give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyword {
    pub name: &'static str,
    pub env: Option<&'static str>,
}

const fn kw(name: &'static str, env: Option<&'static str>) -> Keyword {
    Keyword { name, env }
}

/// The keywords, with libpq's environment variables (libpq has none for the keepalive and
/// TCP timeout settings).
pub const KEYWORDS: &[Keyword] = &[
    kw("host", Some("PGHOST")),
    kw("hostaddr", Some("PGHOSTADDR")),
    kw("port", Some("PGPORT")),
    kw("user", Some("PGUSER")),
    kw("password", Some("PGPASSWORD")),
    kw("passfile", Some("PGPASSFILE")),
    kw("dbname", Some("PGDATABASE")),
    kw("options", Some("PGOPTIONS")),
    kw("application_name", Some("PGAPPNAME")),
    kw("fallback_application_name", None),
    kw("sslmode", Some("PGSSLMODE")),
    kw("sslrootcert", Some("PGSSLROOTCERT")),
    kw("sslcert", Some("PGSSLCERT")),
    kw("sslkey", Some("PGSSLKEY")),
    kw("channel_binding", Some("PGCHANNELBINDING")),
    kw("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    kw("keepalives", None),
    kw("keepalives_idle", None),
    kw("keepalives_interval", None),
    kw("keepalives_count", None),
    kw("tcp_user_timeout", None),
    kw("target_session_attrs", Some("PGTARGETSESSIONATTRS")),
];

/// libpq keywords that are refused with a reason rather than as unknown.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "service",
        "write the settings out (pg_service.conf is not read)",
    ),
    (
        "servicefile",
        "write the settings out (pg_service.conf is not read)",
    ),
    ("sslpassword", "encrypted private keys are not supported"),
    ("sslcrl", "certificate revocation lists are not supported"),
    (
        "sslcrldir",
        "certificate revocation lists are not supported",
    ),
    (
        "sslcertmode",
        "a client certificate is sent when sslcert (or the default file) exists",
    ),
    ("sslsni", "SNI is always sent for host names"),
    ("sslcompression", "TLS compression is never used"),
    ("ssl_min_protocol_version", "the minimum is TLSv1.2"),
    (
        "ssl_max_protocol_version",
        "the maximum is what libssl offers",
    ),
    (
        "sslnegotiation",
        "only the PostgreSQL negotiation (SSLRequest) is used",
    ),
    ("requiressl", "use sslmode"),
    ("requirepeer", "not implemented"),
    ("require_auth", "not implemented"),
    ("gssencmode", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    ("gsslib", "GSSAPI is not supported"),
    ("krbsrvname", "GSSAPI is not supported"),
    ("load_balance_hosts", "hosts are tried in the order given"),
    ("replication", "not a replication client"),
    ("client_encoding", "the client encoding is UTF8"),
];

pub fn keyword(name: &str) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|k| k.name == name)
}

/// A parsed connection string: keyword → value (a keyword given twice: the last wins, as in
/// libpq). An empty value is kept: it hides the environment variable, and means the default.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConnInfo(BTreeMap<&'static str, String>);

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self
            .0
            .iter()
            .map(|(k, v)| (*k, if *k == "password" { "_" } else { v.as_str() }));
        f.debug_map().entries(shown).finish()
    }
}

impl ConnInfo {
    /// A `postgresql://` or `postgres://` URL, or else a key=value list.
    pub fn parse(s: &str) -> Result<ConnInfo, SettingsError> {
        match ["postgresql://", "postgres://"]
            .iter()
            .find_map(|p| s.strip_prefix(p))
        {
            Some(rest) => parse_url(rest),
            None => parse_key_values(s),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn set(&mut self, name: &str, value: String) -> Result<(), SettingsError> {
        if let Some(k) = keyword(name) {
            self.0.insert(k.name, value);
            Ok(())
        } else if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == name) {
            Err(SettingsError::Unsupported {
                keyword: name.to_string(),
                why,
            })
        } else {
            Err(SettingsError::UnknownKeyword(name.to_string()))
        }
    }
}

fn syntax(msg: impl Into<String>) -> SettingsError {
    SettingsError::Syntax(msg.into())
}

/// libpq's conninfo_parse: `key = value`, whitespace around `=` allowed; an unquoted value
/// ends at whitespace; `\x` is `x` in both forms.
fn parse_key_values(s: &str) -> Result<ConnInfo, SettingsError> {
    let mut info = ConnInfo::default();
    let mut it = s.chars().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        if it.peek().is_none() {
            return Ok(info);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_ws(&mut it);
        if it.next() != Some('=') {
            return Err(syntax(format!("missing \"=\" after \"{key}\"")));
        }
        skip_ws(&mut it);
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(syntax("unterminated quoted string")),
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        info.set(&key, value)?;
    }
}

/// Percent-decoding as libpq does it: a `%` must start a two-digit hex escape, `%00` is
/// refused, the result must be UTF-8.
fn decode(s: &str) -> Result<String, SettingsError> {
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match hex {
            None => return Err(syntax(format!("invalid percent-encoded token: \"{s}\""))),
            Some(b"00") => return Err(syntax(format!("forbidden value %00 in \"{s}\""))),
            Some(_) => {}
        }
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| syntax(format!("\"{s}\" does not decode to UTF-8")))
}

/// libpq's conninfo_uri_parse_options, after the scheme:
/// `[user[:password]@][host[:port][,host[:port]]...][/dbname][?key=value[&...]]`.
fn parse_url(s: &str) -> Result<ConnInfo, SettingsError> {
    let mut info = ConnInfo::default();
    let mut rest = s;
    // Credentials: up to an '@' that comes before any '/' (libpq looks no further).
    if let Some(at) = rest
        .find(['@', '/'])
        .filter(|&i| rest.as_bytes()[i] == b'@')
    {
        let (user, password) = match rest[..at].split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (&rest[..at], None),
        };
        if !user.is_empty() {
            info.set("user", decode(user)?)?;
        }
        if let Some(p) = password {
            info.set("password", decode(p)?)?;
        }
        rest = &rest[at + 1..];
    }

    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    loop {
        let host;
        if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| syntax(format!("missing \"]\" in \"{s}\"")))?;
            if end == 0 {
                return Err(syntax(format!("empty IPv6 address in \"{s}\"")));
            }
            host = &r[..end];
            rest = &r[end + 1..];
        } else {
            let end = rest.find([':', '/', '?', ',']).unwrap_or(rest.len());
            host = &rest[..end];
            rest = &rest[end..];
        }
        hosts.push(decode(host)?);
        let mut port = "";
        if let Some(r) = rest.strip_prefix(':') {
            let end = r.find(['/', '?', ',']).unwrap_or(r.len());
            port = &r[..end];
            rest = &r[end..];
        }
        ports.push(decode(port)?);
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None => break,
        }
    }
    if !rest.is_empty() && !rest.starts_with(['/', '?']) {
        return Err(syntax(format!(
            "unexpected \"{}\" after the host in \"{s}\"",
            &rest[..1]
        )));
    }
    if hosts.iter().any(|h| !h.is_empty()) {
        info.set("host", hosts.join(","))?;
    }
    if ports.iter().any(|p| !p.is_empty()) {
        info.set("port", ports.join(","))?;
    }

    if let Some(r) = rest.strip_prefix('/') {
        let end = r.find('?').unwrap_or(r.len());
        if end > 0 {
            info.set("dbname", decode(&r[..end])?)?;
        }
        rest = &r[end..];
    }
    if let Some(query) = rest.strip_prefix('?') {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').ok_or_else(|| {
                syntax(format!("missing key/value separator \"=\" in \"{param}\""))
            })?;
            let (k, v) = (decode(k)?, decode(v)?);
            // The JDBC spelling, which libpq accepts too.
            if k == "ssl" && v == "true" {
                info.set("sslmode", "require".into())?;
            } else {
                info.set(&k, v)?;
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Vec<(&'static str, String)> {
        ConnInfo::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .0
            .into_iter()
            .collect()
    }

    fn kv(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut v: Vec<_> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        v.sort();
        v
    }

    fn err(s: &str) -> SettingsError {
        ConnInfo::parse(s).expect_err(s)
    }

    #[test]
    fn key_values() {
        assert_eq!(parse(""), kv(&[]));
        assert_eq!(parse("   "), kv(&[]));
        assert_eq!(
            parse("host=db.example port=5433 user=alice dbname=vpn"),
            kv(&[
                ("host", "db.example"),
                ("port", "5433"),
                ("user", "alice"),
                ("dbname", "vpn")
            ])
        );
        // whitespace around '=', quoting, escapes, empty values
        assert_eq!(
            parse("  user =  alice\tpassword='it' "),
            kv(&[("user", "alice"), ("password", "it")])
        );
        assert_eq!(
            parse(r"password='a b\'c\\d' application_name=x\ y"),
            kv(&[("password", r"a b'c\d"), ("application_name", "x y")])
        );
        assert_eq!(parse("host='' port=1"), kv(&[("host", ""), ("port", "1")]));
        assert_eq!(parse("host="), kv(&[("host", "")]));
        // the last of a repeated keyword wins
        assert_eq!(parse("user=a user=b"), kv(&[("user", "b")]));
        // libpq reads "host= port=5" as host "port=5": after '=' whitespace is skipped
        assert_eq!(parse("host= port=5"), kv(&[("host", "port=5")]));
        assert_eq!(
            parse("sslmode=verify-full sslrootcert=/etc/ca.crt sslcert=c sslkey=k"),
            kv(&[
                ("sslmode", "verify-full"),
                ("sslrootcert", "/etc/ca.crt"),
                ("sslcert", "c"),
                ("sslkey", "k")
            ])
        );
    }

    #[test]
    fn key_value_errors() {
        assert!(
            matches!(err("user"), SettingsError::Syntax(m) if m.contains("missing \"=\" after \"user\""))
        );
        assert!(matches!(err("user alice"), SettingsError::Syntax(_)));
        assert!(
            matches!(err("user='alice"), SettingsError::Syntax(m) if m.contains("unterminated"))
        );
        assert_eq!(
            err("colour=blue"),
            SettingsError::UnknownKeyword("colour".into())
        );
        assert!(matches!(
            err("host=x service=mine"),
            SettingsError::Unsupported { keyword, .. } if keyword == "service"
        ));
        assert!(matches!(
            err("sslpassword=x"),
            SettingsError::Unsupported { .. }
        ));
        let msg = err("colour=blue").to_string();
        assert_eq!(msg, "invalid connection option \"colour\"");
    }

    #[test]
    fn urls() {
        assert_eq!(parse("postgresql://"), kv(&[]));
        assert_eq!(parse("postgres://db"), kv(&[("host", "db")]));
        assert_eq!(
            parse("postgresql://alice:s%40cret@db.example:5433/vpn?sslmode=verify-full&connect_timeout=3"),
            kv(&[
                ("user", "alice"),
                ("password", "s@cret"),
                ("host", "db.example"),
                ("port", "5433"),
                ("dbname", "vpn"),
                ("sslmode", "verify-full"),
                ("connect_timeout", "3")
            ])
        );
        // socket directory, percent-encoded
        assert_eq!(
            parse("postgresql://alice@%2Fvar%2Frun%2Fpostgresql:5433/vpn"),
            kv(&[
                ("user", "alice"),
                ("host", "/var/run/postgresql"),
                ("port", "5433"),
                ("dbname", "vpn")
            ])
        );
        // no host, socket directory as a parameter
        assert_eq!(
            parse("postgresql:///vpn?host=/tmp/pg"),
            kv(&[("dbname", "vpn"), ("host", "/tmp/pg")])
        );
        // multi-host, a port for some only; IPv6 in brackets
        assert_eq!(
            parse("postgresql://h1:5433,h2,[::1]:5434/db"),
            kv(&[
                ("host", "h1,h2,::1"),
                ("port", "5433,,5434"),
                ("dbname", "db")
            ])
        );
        assert_eq!(
            parse("postgresql://[2001:db8::1]"),
            kv(&[("host", "2001:db8::1")])
        );
        assert_eq!(parse("postgresql://h1,h2"), kv(&[("host", "h1,h2")]));
        // an empty host in the list stands for the default
        assert_eq!(
            parse("postgresql://h1,/db"),
            kv(&[("host", "h1,"), ("dbname", "db")])
        );
        assert_eq!(
            parse("postgresql://:5433/db"),
            kv(&[("port", "5433"), ("dbname", "db")])
        );
        // user without password; query decodes; ssl=true means sslmode=require
        assert_eq!(
            parse("postgresql://bob@h?application_name=a%20b&ssl=true"),
            kv(&[
                ("user", "bob"),
                ("host", "h"),
                ("application_name", "a b"),
                ("sslmode", "require")
            ])
        );
        // '@' after a '/' is not a credentials separator
        assert_eq!(
            parse("postgresql://h/db%40x"),
            kv(&[("host", "h"), ("dbname", "db@x")])
        );
    }

    #[test]
    fn url_errors() {
        for bad in [
            "postgresql://[::1",
            "postgresql://[]",
            "postgresql://h/db?sslmode",
            "postgresql://h/%zz",
            "postgresql://h/a%0",
            "postgresql://h/a%00b",
            "postgresql://h/%ff",
            "postgresql://[::1]x",
        ] {
            assert!(matches!(err(bad), SettingsError::Syntax(_)), "{bad}");
        }
        assert_eq!(
            err("postgresql://h?colour=blue"),
            SettingsError::UnknownKeyword("colour".into())
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let info = ConnInfo::parse("user=a password=hunter2").unwrap();
        let d = format!("{info:?}");
        assert!(!d.contains("hunter2") && d.contains("password"), "{d}");
    }

    #[test]
    fn keyword_table() {
        assert_eq!(keyword("sslrootcert").unwrap().env, Some("PGSSLROOTCERT"));
        assert_eq!(keyword("keepalives_idle").unwrap().env, None);
        assert!(keyword("nonsense").is_none());
        for (k, _) in UNSUPPORTED {
            assert!(keyword(k).is_none(), "{k} is both supported and not");
        }
    }
}
