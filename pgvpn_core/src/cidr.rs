//! The one CIDR parser: the shim's `--address` and the tools' `--host` filters take it
//! from users, the extension reads `cidr` values back from PostgreSQL with it.
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// Why a string is not an address with an optional prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

/// `198.18.0.1/15`, `fd00::1/64`, or a bare address (a host: /32 or /128). Host bits
/// are kept, as `ip addr add` wants them; [`IpNet::trunc`] gives the network.
pub fn parse(s: &str) -> Result<IpNet, CidrError> {
    let s = s.trim();
    match s.split_once('/') {
        None => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| CidrError(format!("`{s}` is not an IP address with optional /prefix"))),
        Some((addr, len)) => {
            let addr: IpAddr = addr.parse().map_err(|_| {
                CidrError(format!("`{s}` is not an IP address with optional /prefix"))
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            // Plain digits only: Rust's integer parsing would also take "+8" and "008".
            let plain = !len.is_empty()
                && len.bytes().all(|b| b.is_ascii_digit())
                && (len == "0" || !len.starts_with('0'));
            match len.parse::<u8>() {
                Ok(len) if plain && len <= max => {
                    Ok(IpNet::new(addr, len).expect("length checked"))
                }
                _ => Err(CidrError(format!("`{s}`: prefix length must be 0..={max}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_prefixes() {
        assert_eq!(parse("198.18.0.1/15").unwrap().to_string(), "198.18.0.1/15");
        assert_eq!(
            parse("198.18.0.1/15").unwrap().trunc().to_string(),
            "198.18.0.0/15"
        );
        assert_eq!(parse(" 198.19.0.1 ").unwrap().to_string(), "198.19.0.1/32");
        assert_eq!(parse("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(parse("fd00::/64").unwrap().prefix_len(), 64);
        assert_eq!(parse("0.0.0.0/0").unwrap().prefix_len(), 0);
        // PostgreSQL's cidr output always parses.
        assert_eq!(parse("10.0.0.0/8").unwrap().prefix_len(), 8);
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "nonsense",
            "198.18.0.1/33",
            "fd00::1/129",
            "198.18.0.1/x",
            "1.2.3/8",
            "/8",
            "1.2.3.4/+8",
            "1.2.3.4/008",
            "1.2.3.4/",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse("198.18.0.1/33").unwrap_err().to_string(),
            "`198.18.0.1/33`: prefix length must be 0..=32"
        );
    }
}
