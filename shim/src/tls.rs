//! TLS to the database: sslmode and what it checks, the OpenSSL context built from
//! sslrootcert/sslcert/sslkey, and a failed verification in words.
//!
//! Why OpenSSL (postgres-openssl) and not rustls: libssl is on every box the shim runs on;
//! it gives SCRAM channel binding (tls-server-end-point) out of the box; its verify result
//! codes say exactly what failed (unknown CA, self-signed, expired, host name), which is
//! what a user needs to see; and it reads the same PEM files and system store libpq does,
//! so a libpq connection string means the same thing here.
//!
//! What each sslmode checks (libpq's rules, with the exceptions marked):
//! * disable: no TLS. allow: plaintext first, TLS if the server refuses that. prefer: TLS
//!   if the server offers it, else (or if the handshake fails) plaintext.
//! * require: TLS always; the chain is checked only if the root certificate file exists.
//!   allow and prefer check it in the same case.
//! * verify-ca: the chain must lead to a root in sslrootcert. verify-full: that, and the
//!   certificate must name the host (DNS or IP subject alternative name, else the CN; a
//!   wildcard only as a whole left-most label).
//! * sslrootcert: a PEM file (default ~/.postgresql/root.crt), and then only its
//!   certificates are trusted; `system` means the OS store and requires verify-full.
//! * sslcert/sslkey (default ~/.postgresql/postgresql.crt/.key): sent if the certificate
//!   exists; the key must then exist and be private (0600, or 0640 owned by root).
//!   Differences from libpq: an sslcert written out that does not exist is an error (libpq
//!   silently sends none), and encrypted keys (sslpassword) are refused.
//!
//! The files are read once, at startup; a renewed certificate needs a restart.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Ref, X509StoreContextRef, X509};
use openssl_sys as ffi;
use postgres_openssl::MakeTlsConnector;

use crate::error::{ErrorClass, SettingsError};

/// libpq's sslmode, all six.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn parse(s: &str) -> Result<SslMode, SettingsError> {
        SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| SettingsError::InvalidValue {
                keyword: "sslmode",
                value: s.to_string(),
                expected: "disable, allow, prefer, require, verify-ca or verify-full",
            })
    }
}

/// What is wrong with this mode and check over TCP, for the warning at startup; `None` for
/// verify-full.
pub fn weakness(mode: SslMode, verify: &Verify) -> Option<&'static str> {
    match (mode, verify) {
        (SslMode::VerifyFull, _) => None,
        (SslMode::Disable, _) => Some("the connection is not encrypted: anyone on the network path can read and change the tunnel's packets"),
        (SslMode::Allow | SslMode::Prefer, _) => Some("the connection falls back to plaintext if TLS fails, and the server's host name is not checked"),
        (_, Verify::Nothing) => Some("the server's certificate is not checked (no root certificate file): a man in the middle can read and change the traffic"),
        (_, _) => Some("the server's host name is not checked: any certificate from the CA is accepted"),
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=system`: the OS store.
    System,
    /// A PEM file; `explicit` if the connection string or PGSSLROOTCERT named it.
    File { path: PathBuf, explicit: bool },
}

/// What the handshake checks about the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    Nothing,
    Chain(RootCert),
    ChainAndHost(RootCert),
}

/// sslmode + sslrootcert → what to check. `exists` tells whether the root file exists (a
/// parameter so that the rule is tested without files).
pub fn verification(
    mode: SslMode,
    root: RootCert,
    exists: impl Fn(&Path) -> bool,
) -> Result<Verify, SettingsError> {
    let strict = mode >= SslMode::VerifyCa;
    match root {
        RootCert::System if mode == SslMode::VerifyFull => Ok(Verify::ChainAndHost(root)),
        RootCert::System => Err(SettingsError::Conflict(format!(
            "sslrootcert=system requires sslmode=verify-full (not {mode}): any certificate from any public CA would do"
        ))),
        RootCert::File { ref path, .. } if !exists(path) => {
            if strict {
                Err(SettingsError::File {
                    what: "root certificate file",
                    path: path.clone(),
                    problem: format!("does not exist; sslmode={mode} needs the CA that signed the server's certificate there (or sslrootcert=system for the OS store)"),
                })
            } else {
                Ok(Verify::Nothing)
            }
        }
        RootCert::File { .. } if mode == SslMode::VerifyFull => Ok(Verify::ChainAndHost(root)),
        RootCert::File { .. } => Ok(Verify::Chain(root)),
    }
}

/// A client certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// sslcert/sslkey (each `None` when not written out) → the pair to send, if any. The
/// defaults are under `home`.
pub fn client_cert(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    home: Option<&Path>,
) -> Result<Option<ClientCert>, SettingsError> {
    let default = |name: &str| home.map(|h| h.join(".postgresql").join(name));
    let explicit = cert.is_some();
    let Some(cert) = cert.or_else(|| default("postgresql.crt")) else {
        return Ok(None);
    };
    match fs::metadata(&cert) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(None),
        Err(e) => return Err(file_error("client certificate file", &cert, &e)),
    }
    let Some(key) = key.or_else(|| default("postgresql.key")) else {
        return Err(SettingsError::Conflict(format!(
            "client certificate file \"{}\" needs an sslkey",
            cert.display()
        )));
    };
    let meta = fs::metadata(&key).map_err(|e| file_error("private key file", &key, &e))?;
    if !meta.is_file() {
        return Err(SettingsError::File {
            what: "private key file",
            path: key,
            problem: "is not a plain file".into(),
        });
    }
    if let Some(why) = refuse_key_mode(meta.uid(), meta.mode(), effective_uid()) {
        return Err(SettingsError::File {
            what: "private key file",
            path: key,
            problem: why.into(),
        });
    }
    Ok(Some(ClientCert { cert, key }))
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// libpq's rule for the key file: owned by us, nothing for group and others; owned by
/// root (a key shared through a group), at most group-readable.
pub fn refuse_key_mode(owner: u32, mode: u32, euid: u32) -> Option<&'static str> {
    const WHY: &str = "has group or world access; it must have permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root";
    let bad = if owner == euid {
        mode & 0o077 != 0
    } else if owner == 0 {
        mode & 0o037 != 0
    } else {
        false
    };
    bad.then_some(WHY)
}

fn file_error(what: &'static str, path: &Path, e: &std::io::Error) -> SettingsError {
    let problem = if e.kind() == std::io::ErrorKind::NotFound {
        "does not exist".to_string()
    } else {
        format!("cannot be read ({e})")
    };
    SettingsError::File {
        what,
        path: path.to_path_buf(),
        problem,
    }
}

fn openssl_problem(what: &'static str, path: &Path, e: impl fmt::Display) -> SettingsError {
    SettingsError::File {
        what,
        path: path.to_path_buf(),
        problem: format!("cannot be used: {e}"),
    }
}

/// The TLS side of the settings: an OpenSSL context with the trusted roots and the client
/// certificate loaded, and what to verify.
#[derive(Clone)]
pub struct Tls {
    connector: SslConnector,
    verify: Verify,
    client: Option<ClientCert>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("verify", &self.verify)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files. Every problem names its file.
    pub fn new(verify: Verify, client: Option<ClientCert>) -> Result<Tls, SettingsError> {
        let generic = |e: openssl::error::ErrorStack| {
            SettingsError::Conflict(format!("cannot set up TLS: {e}"))
        };
        // Starts with the OS store loaded; replaced below unless that is what was asked for.
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(generic)?;
        // libpq's default ssl_min_protocol_version.
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(generic)?;
        match &verify {
            Verify::Nothing | Verify::Chain(RootCert::System) => {}
            Verify::ChainAndHost(RootCert::System) => {}
            Verify::Chain(RootCert::File { path, .. })
            | Verify::ChainAndHost(RootCert::File { path, .. }) => {
                let what = "root certificate file";
                let pem = fs::read(path).map_err(|e| file_error(what, path, &e))?;
                let certs =
                    X509::stack_from_pem(&pem).map_err(|e| openssl_problem(what, path, e))?;
                if certs.is_empty() {
                    return Err(openssl_problem(what, path, "no PEM certificate in it"));
                }
                let mut store = X509StoreBuilder::new().map_err(generic)?;
                for c in certs {
                    store
                        .add_cert(c)
                        .map_err(|e| openssl_problem(what, path, e))?;
                }
                b.set_cert_store(store.build());
            }
        }
        if let Some(c) = &client {
            b.set_certificate_chain_file(&c.cert)
                .map_err(|e| openssl_problem("client certificate file", &c.cert, e))?;
            let what = "private key file";
            let pem = fs::read(&c.key).map_err(|e| file_error(what, &c.key, &e))?;
            // An empty passphrase: an encrypted key fails here instead of OpenSSL asking
            // for one on the terminal.
            let key = PKey::private_key_from_pem_callback(&pem, |_| Ok(0)).map_err(|e| {
                openssl_problem(
                    what,
                    &c.key,
                    format!("not an unencrypted PEM private key ({e})"),
                )
            })?;
            let mismatch = || {
                openssl_problem(
                    what,
                    &c.key,
                    format!(
                        "does not match the client certificate \"{}\"",
                        c.cert.display()
                    ),
                )
            };
            b.set_private_key(&key).map_err(|e| {
                let is_mismatch = e
                    .errors()
                    .iter()
                    .any(|x| x.reason().is_some_and(|r| r.contains("mismatch")));
                if is_mismatch {
                    mismatch()
                } else {
                    openssl_problem(what, &c.key, e)
                }
            })?;
            b.check_private_key().map_err(|_| mismatch())?;
        }
        Ok(Tls {
            connector: b.build(),
            verify,
            client,
        })
    }

    pub fn verify(&self) -> &Verify {
        &self.verify
    }

    pub fn client(&self) -> Option<&ClientCert> {
        self.client.as_ref()
    }

    /// Where the trusted roots come from, for messages.
    pub fn roots(&self) -> String {
        match &self.verify {
            Verify::Nothing => "none (not verified)".into(),
            Verify::Chain(RootCert::System) | Verify::ChainAndHost(RootCert::System) => {
                "the system store (sslrootcert=system)".into()
            }
            Verify::Chain(RootCert::File { path, .. })
            | Verify::ChainAndHost(RootCert::File { path, .. }) => path.display().to_string(),
        }
    }

    /// How many root certificates are trusted (`None` for the OS store).
    pub fn trusted_roots(&self) -> Option<usize> {
        match &self.verify {
            Verify::Chain(RootCert::File { .. }) | Verify::ChainAndHost(RootCert::File { .. }) => {
                Some(
                    self.connector
                        .context()
                        .cert_store()
                        .all_certificates()
                        .len(),
                )
            }
            _ => None,
        }
    }

    /// A connector for one connection attempt, and where it records why the server's
    /// certificate was refused.
    pub fn connector(&self) -> (MakeTlsConnector, FailureSlot) {
        let slot = FailureSlot::default();
        let mut make = MakeTlsConnector::new(self.connector.clone());
        let (verify, recorder) = (self.verify.clone(), slot.clone());
        make.set_callback(move |cfg, _domain| {
            let record = recorder.clone();
            let watch = move |ok: bool, ctx: &mut X509StoreContextRef| {
                if !ok {
                    record.set(VerifyFailure::from_context(ctx));
                }
                ok
            };
            match verify {
                Verify::Nothing => {
                    cfg.set_verify(SslVerifyMode::NONE);
                    cfg.set_verify_hostname(false);
                }
                Verify::Chain(_) => {
                    cfg.set_verify_hostname(false);
                    cfg.set_verify_callback(SslVerifyMode::PEER, watch);
                }
                Verify::ChainAndHost(_) => cfg.set_verify_callback(SslVerifyMode::PEER, watch),
            }
            Ok(())
        });
        (make, slot)
    }
}

/// The first verification failure of one handshake.
#[derive(Debug, Clone, Default)]
pub struct FailureSlot(Arc<Mutex<Option<VerifyFailure>>>);

impl FailureSlot {
    fn set(&self, f: VerifyFailure) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert(f);
    }

    pub fn take(&self) -> Option<VerifyFailure> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Why OpenSSL refused a certificate of the server's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// OpenSSL's X509_V_ERR_* code.
    pub code: i32,
    /// 0 for the server's own certificate, 1 for its issuer, ...
    pub depth: u32,
    pub subject: String,
    pub issuer: String,
    /// The DNS and IP subject alternative names (or else the CN) of that certificate.
    pub names: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    /// OpenSSL's own words for `code`.
    pub openssl_says: String,
}

fn dn(name: &openssl::x509::X509NameRef) -> String {
    name.entries()
        .filter_map(|e| {
            let key = e.object().nid().short_name().ok()?;
            Some(format!("{key}={}", e.data().to_string().ok()?))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn names(cert: &X509Ref) -> Vec<String> {
    let mut out = Vec::new();
    for n in cert.subject_alt_names().into_iter().flatten() {
        if let Some(d) = n.dnsname() {
            out.push(d.to_string());
        } else if let Some(ip) = n.ipaddress() {
            let ip = match ip.len() {
                4 => <[u8; 4]>::try_from(ip).map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(ip).map(|b| std::net::IpAddr::from(b).to_string()),
                _ => continue,
            };
            out.extend(ip.ok());
        }
    }
    if out.is_empty() {
        let cn = cert
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME);
        out.extend(cn.filter_map(|e| e.data().to_string().ok()));
    }
    out
}

impl VerifyFailure {
    fn from_context(ctx: &X509StoreContextRef) -> VerifyFailure {
        let cert = ctx.current_cert();
        VerifyFailure {
            code: ctx.error().as_raw(),
            openssl_says: ctx.error().error_string().to_string(),
            depth: ctx.error_depth(),
            subject: cert.map(|c| dn(c.subject_name())).unwrap_or_default(),
            issuer: cert.map(|c| dn(c.issuer_name())).unwrap_or_default(),
            names: cert.map(names).unwrap_or_default(),
            not_before: cert.map(|c| c.not_before().to_string()).unwrap_or_default(),
            not_after: cert.map(|c| c.not_after().to_string()).unwrap_or_default(),
        }
    }

    /// What failed, in words: unknown CA / self-signed, host name, expired, ...
    pub fn reason(&self, host: &str) -> String {
        let which = if self.depth == 0 {
            "the certificate".to_string()
        } else {
            format!("the CA certificate \"{}\" in its chain", self.subject)
        };
        let named = || {
            if self.names.is_empty() {
                "no names".to_string()
            } else {
                self.names.join(", ")
            }
        };
        match self.code {
            ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT => {
                "it is self-signed and not a trusted root (unknown CA)".into()
            }
            ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN => format!(
                "its chain ends in the CA \"{}\", which is not a trusted root (unknown CA)",
                self.subject
            ),
            ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
            | ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
            | ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE => format!(
                "{which} was issued by \"{}\", an unknown CA (not among the trusted roots)",
                self.issuer
            ),
            ffi::X509_V_ERR_CERT_UNTRUSTED | ffi::X509_V_ERR_CERT_REJECTED => {
                format!("{which} is from a CA not trusted for this purpose (unknown CA)")
            }
            ffi::X509_V_ERR_CERT_HAS_EXPIRED => {
                format!("{which} has expired (valid until {})", self.not_after)
            }
            ffi::X509_V_ERR_CERT_NOT_YET_VALID => {
                format!("{which} is not valid yet (valid from {})", self.not_before)
            }
            ffi::X509_V_ERR_HOSTNAME_MISMATCH | ffi::X509_V_ERR_IP_ADDRESS_MISMATCH => format!(
                "wrong host name: the certificate is for {}, not for \"{host}\"",
                named()
            ),
            ffi::X509_V_ERR_CERT_SIGNATURE_FAILURE => {
                format!("the signature on {which} does not verify")
            }
            ffi::X509_V_ERR_INVALID_CA => format!("{which} is not a CA certificate"),
            ffi::X509_V_ERR_INVALID_PURPOSE => {
                format!("{which} is not for TLS server authentication (key usage)")
            }
            ffi::X509_V_ERR_EE_KEY_TOO_SMALL
            | ffi::X509_V_ERR_CA_KEY_TOO_SMALL
            | ffi::X509_V_ERR_CA_MD_TOO_WEAK => {
                format!("{which} uses a key or hash too weak for this system's OpenSSL")
            }
            _ => format!("{which}: {}", self.openssl_says),
        }
    }

    /// Whether the trusted roots are the problem (and so worth naming).
    pub fn is_unknown_ca(&self) -> bool {
        [
            ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
            ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
            ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
            ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
            ffi::X509_V_ERR_CERT_UNTRUSTED,
            ffi::X509_V_ERR_CERT_REJECTED,
        ]
        .contains(&self.code)
    }

    /// The whole message: what, for which host, and why.
    pub fn message(&self, host: &str) -> String {
        format!(
            "server certificate of {host} not accepted: {}",
            self.reason(host)
        )
    }
}

/// A TLS handshake that failed without a certificate verdict of ours: what class and what
/// to say. `None` if there was no TLS handshake error in `e`'s causes.
pub fn handshake_failure(e: &(dyn std::error::Error + 'static)) -> Option<(ErrorClass, String)> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        // After the handshake (TLS 1.3 sends the server's verdict on our certificate then)
        // the error comes wrapped in an io::Error, whose source() skips it.
        let inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if let Some(ssl) = inner.unwrap_or(c).downcast_ref::<openssl::ssl::Error>() {
            if let Some(io) = ssl.io_error() {
                return Some((
                    ErrorClass::Transient,
                    format!("TLS handshake broken off: {io}"),
                ));
            }
            let reasons: Vec<&str> = ssl
                .ssl_error()
                .map(|s| s.errors().iter().filter_map(|e| e.reason()).collect())
                .unwrap_or_default();
            let text = if reasons.is_empty() {
                ssl.to_string()
            } else {
                reasons.join("; ")
            };
            // An alert is the server refusing: a certificate of ours it does not trust, no
            // protocol or cipher in common. Trying again will not help.
            if reasons.iter().any(|r| r.contains("alert")) {
                let hint = if text.contains("certificate") || text.contains(" ca") {
                    " (does the server trust the CA of our client certificate, sslcert?)"
                } else {
                    ""
                };
                return Some((
                    ErrorClass::Denied,
                    format!("the server refused the TLS handshake: {text}{hint}"),
                ));
            }
            return Some((
                ErrorClass::Transient,
                format!("TLS handshake failed: {text}"),
            ));
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, explicit: bool) -> RootCert {
        RootCert::File {
            path: p.into(),
            explicit,
        }
    }

    #[test]
    fn sslmode_names() {
        for m in SslMode::ALL {
            assert_eq!(SslMode::parse(m.as_str()), Ok(m));
        }
        assert!(SslMode::parse("verify_full").is_err());
        assert!(SslMode::parse("").is_err());
    }

    #[test]
    fn weaknesses() {
        let chain = Verify::Chain(file("/ca", false));
        assert_eq!(
            weakness(
                SslMode::VerifyFull,
                &Verify::ChainAndHost(file("/ca", false))
            ),
            None
        );
        assert!(weakness(SslMode::Disable, &Verify::Nothing)
            .unwrap()
            .contains("not encrypted"));
        assert!(weakness(SslMode::Prefer, &chain)
            .unwrap()
            .contains("plaintext"));
        assert!(weakness(SslMode::Allow, &Verify::Nothing)
            .unwrap()
            .contains("plaintext"));
        assert!(weakness(SslMode::Require, &Verify::Nothing)
            .unwrap()
            .contains("not checked"));
        assert!(weakness(SslMode::Require, &chain)
            .unwrap()
            .contains("host name"));
        assert!(weakness(SslMode::VerifyCa, &chain)
            .unwrap()
            .contains("host name"));
    }

    #[test]
    fn what_each_mode_verifies() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        use SslMode::*;
        let f = || file("/ca.crt", false);
        assert_eq!(
            verification(VerifyFull, f(), yes),
            Ok(Verify::ChainAndHost(f()))
        );
        assert_eq!(verification(VerifyCa, f(), yes), Ok(Verify::Chain(f())));
        // libpq: require (allow, prefer) check the chain iff the root file exists
        for m in [Allow, Prefer, Require] {
            assert_eq!(verification(m, f(), yes), Ok(Verify::Chain(f())), "{m}");
            assert_eq!(verification(m, f(), no), Ok(Verify::Nothing), "{m}");
            assert!(matches!(
                verification(m, RootCert::System, yes),
                Err(SettingsError::Conflict(_))
            ));
        }
        for m in [VerifyCa, VerifyFull] {
            match verification(m, file("/nope/root.crt", false), no) {
                Err(SettingsError::File { path, problem, .. }) => {
                    assert_eq!(path, PathBuf::from("/nope/root.crt"));
                    assert!(problem.contains("does not exist"), "{problem}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            verification(VerifyFull, RootCert::System, no),
            Ok(Verify::ChainAndHost(RootCert::System))
        );
        assert!(verification(VerifyCa, RootCert::System, yes).is_err());
    }

    #[test]
    fn key_file_permissions() {
        let me = 1000;
        assert_eq!(refuse_key_mode(me, 0o100600, me), None);
        assert_eq!(refuse_key_mode(me, 0o100400, me), None);
        assert!(refuse_key_mode(me, 0o100640, me).is_some());
        assert!(refuse_key_mode(me, 0o100604, me).is_some());
        // owned by root: group-readable is fine, group-writable or world access is not
        assert_eq!(refuse_key_mode(0, 0o100640, me), None);
        assert!(refuse_key_mode(0, 0o100660, me).is_some());
        assert!(refuse_key_mode(0, 0o100644, me).is_some());
        // root running the shim with its own key: the first rule
        assert!(refuse_key_mode(0, 0o100640, 0).is_some());
        assert_eq!(refuse_key_mode(0, 0o100600, 0), None);
    }

    fn failure(code: i32, depth: u32) -> VerifyFailure {
        VerifyFailure {
            code,
            depth,
            subject: "CN=Test CA".into(),
            issuer: "CN=Root".into(),
            names: vec!["db.test".into(), "198.19.0.1".into()],
            not_before: "Jan  1 00:00:00 2020 GMT".into(),
            not_after: "Jan  2 00:00:00 2020 GMT".into(),
            openssl_says: "certificate revoked".into(),
        }
    }

    #[test]
    fn verify_failures_in_words() {
        let msg = |code, depth| failure(code, depth).message("db.example");
        for code in [
            ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
            ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
            ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
            ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
            ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            ffi::X509_V_ERR_CERT_UNTRUSTED,
        ] {
            let m = msg(code, 0);
            assert!(
                m.contains("certificate") && m.contains("unknown CA"),
                "{code}: {m}"
            );
        }
        assert!(msg(ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, 0).contains("self-signed"));
        assert!(msg(ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, 1).contains("\"CN=Test CA\""));
        assert!(msg(ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, 0)
            .contains("issued by \"CN=Root\""));
        assert!(failure(ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, 1).is_unknown_ca());
        assert!(!failure(ffi::X509_V_ERR_HOSTNAME_MISMATCH, 0).is_unknown_ca());
        let m = msg(ffi::X509_V_ERR_HOSTNAME_MISMATCH, 0);
        assert_eq!(
            m,
            "server certificate of db.example not accepted: wrong host name: the certificate is for db.test, 198.19.0.1, not for \"db.example\""
        );
        assert!(msg(ffi::X509_V_ERR_IP_ADDRESS_MISMATCH, 0).contains("host name"));
        let m = msg(ffi::X509_V_ERR_CERT_HAS_EXPIRED, 0);
        assert!(
            m.contains("has expired (valid until Jan  2 00:00:00 2020 GMT)"),
            "{m}"
        );
        let m = msg(ffi::X509_V_ERR_CERT_HAS_EXPIRED, 1);
        assert!(
            m.contains("the CA certificate \"CN=Test CA\" in its chain has expired"),
            "{m}"
        );
        assert!(msg(ffi::X509_V_ERR_CERT_NOT_YET_VALID, 0).contains("not valid yet"));
        // anything else: OpenSSL's own words
        let m = msg(ffi::X509_V_ERR_CERT_REVOKED, 0);
        assert!(m.contains("certificate revoked"), "{m}");
    }

    #[test]
    fn not_a_tls_error_is_no_handshake_failure() {
        let plain = std::io::Error::other("plain");
        assert_eq!(handshake_failure(&plain), None);
    }
}
