//! The password file (`passfile`, PGPASSFILE, default ~/.pgpass) as libpq reads it: lines
//! `hostname:port:database:username:password`; a field that is exactly `*` matches
//! anything; `\:` and `\\` stand for `:` and `\`; a line starting with `#` is a comment; the
//! first matching line wins. A file that is not a plain file, or that the group or others
//! may access, is ignored with a warning (libpq's rule, so that a password is never taken
//! from a file others can read or write).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Any,
    Is(String),
}

impl Field {
    fn matches(&self, s: &str) -> bool {
        match self {
            Field::Any => true,
            Field::Is(f) => f == s,
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Line {
    fields: [Field; 4],
    password: String,
}

/// The lines of a password file that have all five fields.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PassFile {
    lines: Vec<Line>,
}

impl std::fmt::Debug for PassFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PassFile({} lines)", self.lines.len())
    }
}

/// Splits one line into the four key fields and the password, undoing the escapes. `None`
/// if it has fewer than four unescaped colons.
fn parse_line(line: &str) -> Option<Line> {
    let mut fields = Vec::with_capacity(4);
    let (mut cur, mut escaped_any) = (String::new(), false);
    let mut it = line.chars();
    while fields.len() < 4 {
        match it.next()? {
            ':' => {
                // `*` is a wildcard only when written bare; `\*` is a star.
                fields.push(if cur == "*" && !escaped_any {
                    Field::Any
                } else {
                    Field::Is(std::mem::take(&mut cur))
                });
                cur.clear();
                escaped_any = false;
            }
            '\\' => {
                escaped_any = true;
                cur.extend(it.next());
            }
            c => cur.push(c),
        }
    }
    // The password ends at the end of the line or at an unescaped colon, as in libpq.
    let mut password = String::new();
    while let Some(c) = it.next() {
        match c {
            ':' => break,
            '\\' => password.extend(it.next().or(Some('\\'))),
            c => password.push(c),
        }
    }
    let fields: [Field; 4] = fields.try_into().ok()?;
    Some(Line { fields, password })
}

impl PassFile {
    pub fn parse(text: &str) -> PassFile {
        let lines = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        PassFile { lines }
    }

    /// The password of the first line matching all four. The caller passes what libpq
    /// compares: `localhost` for the default socket directory, the port as a number.
    pub fn lookup(&self, host: &str, port: &str, dbname: &str, user: &str) -> Option<&str> {
        if dbname.is_empty() || user.is_empty() {
            return None;
        }
        let key = [host, port, dbname, user];
        self.lines
            .iter()
            .find(|l| l.fields.iter().zip(key).all(|(f, k)| f.matches(k)))
            .map(|l| l.password.as_str())
    }
}

/// What reading a password file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No such file: nothing to say (libpq is silent too).
    Missing,
    /// The file exists but is not used; the warning says why.
    Ignored(String),
    File(PassFile),
}

/// Why a file with these permission bits must not be used, if it must not.
pub fn refuse_mode(mode: u32) -> Option<&'static str> {
    (mode & 0o077 != 0)
        .then_some("has group or world access; permissions should be u=rw (0600) or less")
}

pub fn load(path: &Path) -> Loaded {
    let warn = |problem: &str| {
        Loaded::Ignored(format!(
            "password file \"{}\" {problem}; not used",
            path.display()
        ))
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return warn(&format!("cannot be read ({e})")),
    };
    if !meta.is_file() {
        return warn("is not a plain file");
    }
    if let Some(why) = refuse_mode(meta.permissions().mode()) {
        return warn(why);
    }
    match fs::read(path) {
        Ok(bytes) => Loaded::File(PassFile::parse(&String::from_utf8_lossy(&bytes))),
        Err(e) => warn(&format!("cannot be read ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# comment line
db.example:5432:vpn:alice:first
db.example:5432:vpn:alice:second (never: the first match wins)
*:5433:*:bob:wild
h\\:colon:*:*:carol:c\\:o\\\\lon:ignored after an unescaped colon
\\*:*:*:dave:literal star
localhost:5432:*:erin:socket\r
short:line:only
";

    fn lookup(h: &str, p: &str, d: &str, u: &str) -> Option<String> {
        PassFile::parse(FILE).lookup(h, p, d, u).map(str::to_string)
    }

    #[test]
    fn matching() {
        assert_eq!(
            lookup("db.example", "5432", "vpn", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup("db.example", "5433", "vpn", "alice"),
            None,
            "port differs"
        );
        assert_eq!(lookup("db.example", "5432", "other", "alice"), None);
        assert_eq!(
            lookup("anything", "5433", "any", "bob").as_deref(),
            Some("wild")
        );
        assert_eq!(lookup("anything", "5432", "any", "bob"), None);
        // escapes: "h:colon" as the host, password "c:o\lon" ends at the unescaped colon
        assert_eq!(
            lookup("h:colon", "1", "x", "carol").as_deref(),
            Some("c:o\\lon")
        );
        // an escaped star is a star, not a wildcard
        assert_eq!(
            lookup("*", "1", "x", "dave").as_deref(),
            Some("literal star")
        );
        assert_eq!(lookup("other", "1", "x", "dave"), None);
        // CRLF line ends; comments and short lines are skipped
        assert_eq!(
            lookup("localhost", "5432", "x", "erin").as_deref(),
            Some("socket")
        );
        assert_eq!(lookup("short", "line", "only", ""), None);
        assert_eq!(lookup("# comment line", "", "", ""), None);
        // libpq looks nothing up without a database or user name
        assert_eq!(
            PassFile::parse("*:*:*:*:pw").lookup("h", "1", "", "u"),
            None
        );
        assert_eq!(
            PassFile::parse("*:*:*:*:pw").lookup("h", "1", "d", "u"),
            Some("pw")
        );
        // an empty password field is an empty password
        assert_eq!(
            PassFile::parse("*:*:*:*:").lookup("h", "1", "d", "u"),
            Some("")
        );
        assert!(!format!("{:?}", PassFile::parse(FILE)).contains("first"));
    }

    #[test]
    fn permissions() {
        assert_eq!(refuse_mode(0o100600), None);
        assert_eq!(refuse_mode(0o100400), None);
        for bad in [0o100640, 0o100604, 0o100660, 0o100644, 0o100610] {
            assert!(
                refuse_mode(bad).unwrap().contains("group or world"),
                "{bad:o}"
            );
        }
    }

    #[test]
    fn loading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgpass");
        assert_eq!(load(&p), Loaded::Missing);
        fs::write(&p, "*:*:*:*:pw\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        match load(&p) {
            Loaded::Ignored(w) => {
                assert!(
                    w.contains(&*p.to_string_lossy()) && w.contains("group or world"),
                    "{w}"
                )
            }
            other => panic!("{other:?}"),
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        match load(&p) {
            Loaded::File(f) => assert_eq!(f.lookup("h", "1", "d", "u"), Some("pw")),
            other => panic!("{other:?}"),
        }
        match load(dir.path()) {
            Loaded::Ignored(w) => assert!(w.contains("not a plain file"), "{w}"),
            other => panic!("{other:?}"),
        }
    }
}
