//! A throwaway CA and the certificates it signs, made with the `openssl` command exactly as
//! the README's deployment section says (EC P-256 keys; the CA with basicConstraints and
//! keyUsage; servers with subjectAltName and serverAuth, clients with clientAuth, the CN
//! being the role). Shared by the shim's TLS test and the test harness crate (which
//! includes this file with `#[path]`), so both exercise the same commands.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.crt`, `<name>.key` in `dir`) and the certificates it signs.
pub struct Ca {
    dir: PathBuf,
    name: String,
}

impl Ca {
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650
    ///  -subj /CN=<cn> -addext basicConstraints=critical,CA:TRUE
    ///  -addext keyUsage=critical,keyCertSign,cRLSign -keyout <name>.key -out <name>.crt`
    pub fn new(dir: &Path, name: &str, cn: &str) -> Ca {
        let (key, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        #[rustfmt::skip]
        openssl(dir, &[
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "3650", "-subj", &subj,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", &key, "-out", &crt,
        ]);
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    pub fn crt(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    /// `<name>.crt` and `<name>.key` (0600) for CN `cn`, with the extensions in `ext`
    /// (written to `<name>.ext`, e.g. "subjectAltName=DNS:db.test\nextendedKeyUsage=serverAuth"):
    /// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=<cn>
    ///  -keyout <name>.key -out <name>.csr`, then
    /// `openssl x509 -req -in <name>.csr -CA <ca>.crt -CAkey <ca>.key -CAcreateserial
    ///  -days 825 -extfile <name>.ext -out <name>.crt`.
    pub fn issue(&self, name: &str, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        let d = &self.dir;
        let f = |suffix: &str| format!("{name}.{suffix}");
        let (ca_crt, ca_key) = (format!("{}.crt", self.name), format!("{}.key", self.name));
        fs::write(d.join(f("ext")), ext).unwrap();
        let subj = format!("/CN={cn}");
        #[rustfmt::skip]
        openssl(d, &[
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", &subj, "-keyout", &f("key"), "-out", &f("csr"),
        ]);
        #[rustfmt::skip]
        openssl(d, &[
            "x509", "-req", "-in", &f("csr"), "-CA", &ca_crt, "-CAkey", &ca_key,
            "-CAcreateserial", "-days", "825", "-extfile", &f("ext"), "-out", &f("crt"),
        ]);
        let key = d.join(f("key"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        (d.join(f("crt")), key)
    }
}
