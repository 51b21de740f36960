//! pgvpn: the administrator's and auditor's tool. `pgvpn capture` writes the packet log as
//! a pcap file (and follows it live), `pgvpn show` tells what `wg show` tells a WireGuard
//! user. It connects exactly as pgvpn-shim does (the library's `conn` module).
//!
//! The tool's modules live in src/tool/ and are compiled into this binary only: the shim
//! (the library and `pgvpn-shim`) carries none of it.

#[path = "../tool/mod.rs"]
mod tool;

fn main() {
    std::process::exit(tool::main());
}
