//! Another version of the extension without touching the system's PostgreSQL (the
//! other tests use the version installed there): a private, relocatable copy of
//! PostgreSQL 15, and builds of `pgvpn_ext` (the current tree's, or a tagged commit's)
//! to install into it.
//!
//! * [`PrivatePg`]: `/usr/lib/postgresql/15` and `/usr/share/postgresql/15` copied into
//!   a temporary prefix with the same layout under it (`usr/include/postgresql` is a
//!   link to the system's headers). PostgreSQL finds its share and lib directories
//!   relative to its binaries, so the copy's `bin/` is a complete installation; point
//!   the harness at it with `PGVPN_PG_BINDIR`. Any pgvpn files copied from the system
//!   are removed: only what the test installs is there.
//! * [`installed`]: the current version's files as `make install` put them into the
//!   system's PostgreSQL (`make test-e2e` installs first). Taking them from there
//!   instead of building the tree a second time keeps the upgrade test cheap on a clean
//!   clone (a release build of the extension is minutes on CI).
//! * [`Builder`]: `cargo pgrx install` of a tagged commit into a build copy of
//!   PostgreSQL kept with its cargo target directory and its own `PGRX_HOME` under
//!   `<target>/pgvpn-upgrade/`. The resulting files are copied out, cached there by
//!   commit id (built once per target directory), and installed into a [`PrivatePg`].
//!   A lock file serialises concurrent runs. The upgrade test takes a dev build without
//!   debuginfo: only the old version's SQL and behaviour matter there, not its speed,
//!   and an unoptimised build takes about half as long on a cold cache. The bench's
//!   before/after comparison takes [`Builder::release`] builds (each commit's own release
//!   profile, as `make install` builds it): a dev build is unoptimised Rust, which made
//!   a version whose work is in Rust look slower beside one whose work is in SQL.

use crate::util::{describe, run_ok, tail, workspace_dir};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const LIB: &str = "usr/lib/postgresql/15";
const SHARE: &str = "usr/share/postgresql/15";

/// Copies the system's PostgreSQL 15 into `root` (same layout), without pgvpn's files.
fn copy_system_pg(root: &Path) {
    for sub in [LIB, SHARE] {
        let dest = root.join(sub);
        fs::create_dir_all(dest.parent().unwrap()).expect("create prefix");
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(Path::new("/").join(sub))
                .arg(dest.parent().unwrap()),
        );
    }
    fs::create_dir_all(root.join("usr/include")).expect("create include dir");
    std::os::unix::fs::symlink(
        "/usr/include/postgresql",
        root.join("usr/include/postgresql"),
    )
    .expect("link the headers");
    remove_pgvpn(root);
}

/// Removes every pgvpn file (library, control file, scripts) from the prefix `root`.
fn remove_pgvpn(root: &Path) {
    for dir in [
        root.join(LIB).join("lib"),
        root.join(SHARE).join("extension"),
    ] {
        for e in fs::read_dir(&dir).expect("read prefix dir").flatten() {
            if e.file_name().to_string_lossy().starts_with("pgvpn") {
                fs::remove_file(e.path()).expect("remove old pgvpn file");
            }
        }
    }
}

/// A temporary copy of PostgreSQL 15 (removed on drop).
pub struct PrivatePg {
    root: PathBuf,
}

impl PrivatePg {
    pub fn new(tag: &str) -> PrivatePg {
        let root = std::env::temp_dir().join(format!(
            "pgvpn-pgcopy-{}-{}-{tag}",
            std::process::id(),
            crate::util::next_id()
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("create prefix");
        let pg = PrivatePg { root };
        copy_system_pg(&pg.root);
        pg
    }

    /// The copy's `bin/` (for `PGVPN_PG_BINDIR`).
    pub fn bindir(&self) -> PathBuf {
        self.root.join(LIB).join("bin")
    }

    /// Installs a build of the extension (replacing whatever pgvpn files were there).
    pub fn install(&self, ext: &ExtFiles) {
        remove_pgvpn(&self.root);
        for (from, sub) in ext.files() {
            let to = self.root.join(sub).join(from.file_name().unwrap());
            fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("install {} as {}: {e}", from.display(), to.display()));
        }
    }

    /// The extension's default version as the installed control file says.
    pub fn default_version(&self) -> String {
        control_default_version(&self.root.join(SHARE).join("extension/pgvpn.control"))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn control_default_version(control: &Path) -> String {
    let text =
        fs::read_to_string(control).unwrap_or_else(|e| panic!("read {}: {e}", control.display()));
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "default_version").then(|| v.trim().trim_matches('\'').to_string())
        })
        .unwrap_or_else(|| panic!("no default_version in {}", control.display()))
}

/// One build of the extension: its library and its `share/extension` files.
#[derive(Clone, Debug)]
pub struct ExtFiles {
    dir: PathBuf,
}

impl ExtFiles {
    /// (file, the prefix-relative directory it is installed into).
    fn files(&self) -> Vec<(PathBuf, String)> {
        let mut out = vec![(self.dir.join("lib/pgvpn.so"), format!("{LIB}/lib"))];
        for e in fs::read_dir(self.dir.join("extension"))
            .expect("read build files")
            .flatten()
        {
            out.push((e.path(), format!("{SHARE}/extension")));
        }
        out
    }

    /// The scripts it has (`pgvpn--0.1.0.sql`, `pgvpn--0.1.0--0.2.0.sql`, ...).
    pub fn scripts(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.join("extension"))
            .expect("read build files")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        v.sort();
        v
    }

    pub fn default_version(&self) -> String {
        control_default_version(&self.dir.join("extension/pgvpn.control"))
    }
}

/// `pg_config` of the installation the other tests use: the system's PostgreSQL 15,
/// where `make install` puts the current version, unless `PGVPN_PG_BINDIR` names another.
fn pg_config(what: &str) -> PathBuf {
    PathBuf::from(
        run_ok(Command::new(crate::cluster::pg_bindir().join("pg_config")).arg(what))
            .trim()
            .to_string(),
    )
}

/// The current version's files from the installation the tests use ([`pg_config`]: the
/// system's PostgreSQL unless `PGVPN_PG_BINDIR` says otherwise), copied to `out` (replaced):
/// the library, the control file, the default version's install script and the upgrade
/// scripts that lead to it. Other scripts there (an older version's install script left
/// by an earlier `make install`) are not taken: the old version comes from its own build.
///
/// `draft` replaces (or adds) the upgrade script of its name: a draft tried before it is
/// installed. Panics if the extension is not installed, or if another upgrade script in
/// the tree's `sql/` differs from the installed one (the install is older than the tree:
/// run `make install`), so that a stale install cannot pass for the tree.
pub fn installed(out: &Path, draft: Option<&Path>) -> ExtFiles {
    let lib = pg_config("--pkglibdir").join("pgvpn.so");
    let ext = pg_config("--sharedir").join("extension");
    let control = ext.join("pgvpn.control");
    assert!(
        lib.exists() && control.exists(),
        "pgvpn is not installed into the system's PostgreSQL ({} / {}): `make install` first \
         (make test-e2e does)",
        lib.display(),
        control.display()
    );
    let version = control_default_version(&control);
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out.join("lib")).expect("create ext dir");
    fs::create_dir_all(out.join("extension")).expect("create ext dir");
    fs::copy(&lib, out.join("lib/pgvpn.so")).expect("copy the installed pgvpn.so");
    let install_script = format!("pgvpn--{version}.sql");
    let upgrade_suffix = format!("--{version}.sql");
    for e in fs::read_dir(&ext).expect("read extension dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let upgrade = name.starts_with("pgvpn--")
            && name.ends_with(&upgrade_suffix)
            && name.matches("--").count() == 2;
        if name == "pgvpn.control" || name == install_script || upgrade {
            fs::copy(e.path(), out.join("extension").join(&name)).expect("copy installed file");
        }
    }
    let draft_name = draft.map(|d| {
        let name = d.file_name().expect("a file name");
        fs::copy(d, out.join("extension").join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", d.display()));
        name.to_string_lossy().into_owned()
    });
    assert!(
        out.join("extension").join(&install_script).exists(),
        "the system's PostgreSQL has pgvpn.control for {version} but no {install_script}"
    );
    for e in fs::read_dir(workspace_dir().join("sql"))
        .expect("read sql/")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pgvpn--") && name.matches("--").count() == 2)
            || draft_name.as_deref() == Some(name.as_str())
        {
            continue;
        }
        let tree = fs::read(e.path()).expect("read upgrade script");
        let inst = fs::read(ext.join(&name)).ok();
        assert!(
            inst.as_deref() == Some(&tree[..]),
            "{name} in the tree's sql/ is not the one installed in {} (missing or older): \
             `make install` first",
            ext.display()
        );
    }
    ExtFiles {
        dir: out.to_path_buf(),
    }
}

/// The cargo target directory this program was built in: the nearest ancestor of the
/// executable that cargo marked with `CACHEDIR.TAG` (`<target>/release/bench` and
/// `<target>/release/deps/upgrade-…` alike), else `$CARGO_TARGET_DIR` or the default.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::util::target_dir)
}

/// Builds of pgvpn_ext into a private copy of PostgreSQL; holds the cache's lock.
pub struct Builder {
    cache: PathBuf,
    release: bool,
    _lock: File,
}

impl Builder {
    /// Opens (creating it if needed) `<target>/pgvpn-upgrade/` and waits for its lock.
    pub fn open() -> Builder {
        let cache = target_dir().join("pgvpn-upgrade");
        fs::create_dir_all(&cache).expect("create build cache");
        let lock = File::create(cache.join("lock")).expect("create lock file");
        // SAFETY: flock on a file descriptor we own; released when the file is closed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "lock {}", cache.join("lock").display());
        Builder {
            cache,
            release: false,
            _lock: lock,
        }
    }

    /// Builds with `--release` (cached apart from the dev builds): for speed comparisons.
    pub fn release(mut self) -> Builder {
        self.release = true;
        self
    }

    /// The build copy of PostgreSQL, keyed by the system's version (its path must stay
    /// the same between runs: pgrx rebuilds its bindings when pg_config's path changes).
    fn build_prefix(&self) -> PathBuf {
        let v = run_ok(Command::new("/usr/lib/postgresql/15/bin/pg_config").arg("--version"));
        let key: String = v
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let root = self.cache.join(format!("pg-{key}"));
        if !root.join(LIB).join("bin/pg_config").exists() {
            let _ = fs::remove_dir_all(&root);
            copy_system_pg(&root);
        }
        root
    }

    /// A PGRX_HOME whose config.toml names the build copy's pg_config (written once:
    /// pgrx rebuilds its bindings when that file changes).
    fn pgrx_home(&self, pg_config: &Path) -> PathBuf {
        let home = self.cache.join("pgrx-home");
        let config = home.join("config.toml");
        let want = format!("pg15 = \"{}\"", pg_config.display());
        if !fs::read_to_string(&config)
            .unwrap_or_default()
            .contains(&want)
        {
            let _ = fs::remove_dir_all(&home);
            fs::create_dir_all(&home).expect("create PGRX_HOME");
            let mut c = self.cargo(&home, &workspace_dir());
            c.args(["pgrx", "init", "--pg15"]).arg(pg_config);
            self.run_logged(c, "pgrx-init");
        }
        home
    }

    /// `cargo` for the builds: the toolchain the current tree pins (a tagged tree may
    /// have no rust-toolchain.toml), and the cache's target directory.
    fn cargo(&self, pgrx_home: &Path, cwd: &Path) -> Command {
        let mut c = Command::new("cargo");
        c.current_dir(cwd)
            .env("PGRX_HOME", pgrx_home)
            .env("CARGO_TARGET_DIR", self.cache.join("cargo"))
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("CARGO_PROFILE_DEV_INCREMENTAL", "false")
            .env_remove("CARGO_MAKEFLAGS")
            .env_remove("CARGO_PRIMARY_PACKAGE")
            .env_remove("CARGO_MANIFEST_DIR");
        if let Some(tc) = pinned_toolchain() {
            c.env("RUSTUP_TOOLCHAIN", tc);
        }
        c
    }

    /// Runs a build step with its output in `<cache>/<name>.log`; panics with the log's
    /// tail if it fails.
    fn run_logged(&self, mut c: Command, name: &str) {
        let log = self.cache.join(format!("{name}.log"));
        let f = File::create(&log).expect("create build log");
        c.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let st = c
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(&c)));
        assert!(
            st.success(),
            "`{}` failed ({st}); the end of {}:\n{}",
            describe(&c),
            log.display(),
            tail(&log, 40)
        );
    }

    /// `cargo pgrx install` (dev profile, or release: see [`Builder::release`]) of the
    /// pgvpn_ext in workspace `src` into the build copy, then its files copied to `out`
    /// (only a tagged version is built here).
    fn install_tree(&self, src: &Path, out: &Path, name: &str) -> ExtFiles {
        let root = self.build_prefix();
        let pg_config = root.join(LIB).join("bin/pg_config");
        let home = self.pgrx_home(&pg_config);
        remove_pgvpn(&root);
        let mut c = self.cargo(&home, &src.join("pgvpn_ext"));
        c.args(["pgrx", "install", "--pg-config"]).arg(&pg_config);
        if self.release {
            c.arg("--release");
        }
        self.run_logged(c, &format!("build-{name}"));
        let _ = fs::remove_dir_all(out);
        fs::create_dir_all(out.join("lib")).unwrap();
        fs::create_dir_all(out.join("extension")).unwrap();
        fs::copy(
            root.join(LIB).join("lib/pgvpn.so"),
            out.join("lib/pgvpn.so"),
        )
        .expect("the build installed pgvpn.so");
        for e in fs::read_dir(root.join(SHARE).join("extension"))
            .unwrap()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("pgvpn") {
                fs::copy(e.path(), out.join("extension").join(e.file_name())).unwrap();
            }
        }
        ExtFiles {
            dir: out.to_path_buf(),
        }
    }

    /// The extension as of `tag` (or, where the tag is not in this clone, the commit
    /// `commit` it names), built once and then taken from the cache.
    pub fn tagged(&self, tag: &str, commit: &str) -> ExtFiles {
        let id = resolve_commit(tag, commit);
        let profile = if self.release { "-release" } else { "" };
        let out = self.cache.join(format!("ext-{id}{profile}"));
        if out.join("complete").exists() {
            return ExtFiles { dir: out };
        }
        eprintln!(
            "[pgcopy] building pgvpn_ext {tag} ({id}) once; later runs take it from {}",
            out.display()
        );
        let src = self.cache.join(format!("src-{id}"));
        let _ = fs::remove_dir_all(&src);
        fs::create_dir_all(&src).unwrap();
        // git archive: a read-only look at the commit (no checkout, no worktree entry).
        let archive = src.join("src.tar");
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(workspace_dir())
                .args(["archive", "--format=tar", "-o"])
                .arg(&archive)
                .arg(&id),
        );
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&src),
        );
        let files = self.install_tree(&src, &out, &format!("{tag}{profile}"));
        File::create(out.join("complete")).unwrap();
        files
    }
}

/// The commit `tag` points at, else `commit` if this clone has it; panics with what to do
/// if neither is reachable.
pub fn resolve_commit(tag: &str, commit: &str) -> String {
    for rev in [tag, commit] {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace_dir())
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{rev}^{{commit}}"))
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = out {
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).trim().to_string();
            }
        }
    }
    panic!(
        "neither the tag {tag} nor the commit {commit} is in the repository at {} \
         (a shallow clone, or one without tags?): `git fetch --tags` or `git fetch \
         --unshallow` first; the upgrade test builds that version to upgrade from",
        workspace_dir().display()
    )
}

/// The `channel` of the current tree's rust-toolchain.toml, if there is one.
fn pinned_toolchain() -> Option<String> {
    let text = fs::read_to_string(workspace_dir().join("rust-toolchain.toml")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "channel").then(|| v.trim().trim_matches('"').to_string())
    })
}
