//! Address ranges in CIDR notation, for `--trusted-proxy`.

use std::fmt;
use std::net::IpAddr;

/// An address range: `192.0.2.0/24`, `2001:db8::/32`, or one address (`127.0.0.1`,
/// `::1`: all its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The first address of the range (its host bits are zero).
    addr: IpAddr,
    /// Leading bits that must match: up to 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in the range. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// how a dual-stack socket names an IPv4 peer) is taken as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(self.prefix) & u32::from(ip) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(self.prefix) & u128::from(ip) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses `ADDR/BITS` or a lone `ADDR`. Host bits set below the prefix
/// (`10.0.0.1/8`) are refused rather than silently cleared: such a typo would trust
/// a range other than the one meant.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let t = s.trim();
    let (addr, bits) = match t.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (t, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        format!("invalid address range '{s}': expected e.g. 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1")
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match bits {
        None => max,
        Some(b) => match b.parse::<u8>() {
            Ok(n) if n <= max && !b.starts_with('+') => n,
            _ => {
                return Err(format!(
                    "invalid address range '{s}': the prefix length must be 0 to {max}"
                ))
            }
        },
    };
    let cidr = Cidr { addr, prefix };
    let first = match addr {
        IpAddr::V4(a) => IpAddr::from((u32::from(a) & mask32(prefix)).to_be_bytes()),
        IpAddr::V6(a) => IpAddr::from((u128::from(a) & mask128(prefix)).to_be_bytes()),
    };
    if first != addr {
        return Err(format!(
            "invalid address range '{s}': host bits set below /{prefix}; did you mean {first}/{prefix}?"
        ));
    }
    // An IPv4-mapped range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps: peers
    // are compared in their canonical form, so as IPv6 it would never match one.
    if let (IpAddr::V6(a), true) = (addr, prefix >= 96) {
        if let Some(v4) = a.to_ipv4_mapped() {
            return Ok(Cidr {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
    }
    Ok(cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv4_mapped_range_matches_ipv4_peers() {
        let one = parse_cidr("::ffff:127.0.0.1").unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(one.contains(ip("::ffff:127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let net = parse_cidr("::ffff:10.0.0.0/104").unwrap();
        assert!(net.contains(ip("10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
    }

    #[test]
    fn ranges_contain_their_addresses_and_no_others() {
        let loopback = parse_cidr("127.0.0.0/8").unwrap();
        assert!(loopback.contains(ip("127.0.0.1")));
        assert!(loopback.contains(ip("127.255.255.255")));
        assert!(loopback.contains(ip("::ffff:127.0.0.1")), "mapped is IPv4");
        assert!(!loopback.contains(ip("128.0.0.1")));
        assert!(!loopback.contains(ip("::1")));
        let one = parse_cidr("192.0.2.7").unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let six = parse_cidr("2001:db8::/32").unwrap();
        assert!(six.contains(ip("2001:db8:ffff::1")));
        assert!(!six.contains(ip("2001:db9::1")));
        assert!(!six.contains(ip("32.1.13.184")));
        assert!(parse_cidr("::1").unwrap().contains(ip("::1")));
        let all = parse_cidr("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("::1")));
        assert!(parse_cidr("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn malformed_ranges_say_what_is_wrong() {
        for (bad, why) in [
            (
                "10.0.0.1/8",
                "host bits set below /8; did you mean 10.0.0.0/8?",
            ),
            ("10.0.0.0/33", "the prefix length must be 0 to 32"),
            ("::/129", "the prefix length must be 0 to 128"),
            ("10.0.0.0/", "the prefix length"),
            ("10.0.0.0/+8", "the prefix length"),
            ("localhost/8", "expected e.g. 10.0.0.0/8"),
            ("", "expected e.g."),
        ] {
            let got = parse_cidr(bad).unwrap_err();
            assert!(got.contains(why), "{bad}: {got}");
        }
    }
}
