//! Reading capture files back with tshark (Debian package `tshark`): the independent
//! check that what `pgvpn capture` writes is a valid pcap/pcapng that Wireshark's
//! dissectors read as the packets in the log.

use std::path::Path;
use std::process::Command;

use crate::util::{describe, output};

/// Is tshark installed?
pub fn available() -> bool {
    Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Panics with an install hint unless tshark is there.
pub fn require() {
    assert!(
        available(),
        "tshark is not installed (apt-get install tshark): the capture tests read their files with it"
    );
}

/// tshark's stderr without its warning about running as root.
fn complaints(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.contains("Running as user") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `fields` of every frame of `file` (matching the display filter `filter`, if any),
/// one row per frame, in file order. Panics if tshark fails or complains about the file
/// (e.g. "appears to have been cut short").
pub fn fields(file: &Path, fields: &[&str], filter: Option<&str>) -> Vec<Vec<String>> {
    let mut c = Command::new("tshark");
    c.arg("-n").arg("-r").arg(file);
    c.args(["-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]);
    for f in fields {
        c.args(["-e", f]);
    }
    if let Some(f) = filter {
        c.args(["-Y", f]);
    }
    let out = output(&mut c);
    let err = complaints(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "`{}` failed ({}): {err}",
        describe(&c),
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// How many frames `file` holds, if tshark reads it without a complaint; else what it
/// said. A file that ends inside a packet record is a complaint.
pub fn frames(file: &Path) -> Result<usize, String> {
    let out = output(Command::new("tshark").arg("-n").arg("-r").arg(file).args([
        "-T",
        "fields",
        "-e",
        "frame.number",
    ]));
    let err = complaints(&out.stderr);
    if !out.status.success() || !err.is_empty() {
        return Err(format!("tshark ({}): {err}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}
