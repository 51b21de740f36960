//! `pgvpn_core::cidr::parse` on arbitrary strings: it takes users' `--address` and
//! `--host` arguments, so it must never panic, and what it accepts must print back
//! (Display) into a string that parses to the same network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgvpn_core::cidr;
use std::net::IpAddr;

fuzz_target!(|s: &str| {
    let net = match cidr::parse(s) {
        Ok(net) => net,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let max = if net.addr().is_ipv4() { 32 } else { 128 };
    assert!(net.prefix_len() <= max, "{s:?} -> {net}");
    assert_eq!(net.max_prefix_len(), max);

    // The address part is exactly what std parses; a bare address is a host.
    let t = s.trim();
    match t.split_once('/') {
        None => {
            assert_eq!(net.addr(), t.parse::<IpAddr>().unwrap());
            assert_eq!(net.prefix_len(), max, "{s:?}");
        }
        Some((addr, _)) => assert_eq!(net.addr(), addr.parse::<IpAddr>().unwrap()),
    }

    // Display round trip, for the network as given (host bits kept) and truncated.
    let shown = net.to_string();
    assert_eq!(cidr::parse(&shown), Ok(net), "{s:?} -> {shown:?}");
    let trunc = net.trunc();
    assert_eq!(cidr::parse(&trunc.to_string()), Ok(trunc), "{s:?}");
    // ipnet's own parser accepts what we print.
    assert_eq!(shown.parse::<ipnet::IpNet>(), Ok(net), "{shown:?}");
});
