//! CIDR blocks (`10.0.0.0/8`, `fd00::/8`) as the configuration writes them.

use std::net::IpAddr;
use std::str::FromStr;

/// An IP network: an address whose host bits are zero, and a prefix length.
/// A bare address is a single host (`/32` or `/128`).
/// Destinations no `bridge` sandbox may reach by default, whatever the
/// provider (IPv4): this network, private (RFC 1918), CGNAT (RFC 6598,
/// which holds Alibaba's metadata 100.100.100.200), loopback, link-local
/// (169.254/16, which holds 169.254.169.254), IETF protocol assignments,
/// documentation, benchmarking, multicast and reserved (with broadcast).
pub const BLOCKED_EGRESS_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR block (like 10.0.0.0/8)")]
    Address(String),
    #[error("prefix length {given:?} must be a number from 0 to {max}")]
    Prefix { given: String, max: u8 },
    #[error("{given} has host bits set (did you mean {suggested}?)")]
    HostBits { given: String, suggested: String },
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies inside this block (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(s.to_string()))?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            None => max,
            Some(l) => {
                l.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| CidrError::Prefix {
                        given: l.to_string(),
                        max,
                    })?
            }
        };
        let masked = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if masked != addr {
            return Err(CidrError::HostBits {
                given: s.to_string(),
                suggested: format!("{masked}/{prefix}"),
            });
        }
        Ok(Cidr { addr, prefix })
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<std::net::Ipv4Addr> for Cidr {
    fn from(ip: std::net::Ipv4Addr) -> Cidr {
        Cidr {
            addr: IpAddr::V4(ip),
            prefix: 32,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocks_and_single_hosts() {
        let c: Cidr = "10.0.0.0/8".parse().expect("v4");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.is_ipv4());
        assert!(c.contains("10.255.1.2".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!(!c.contains("::a00:1".parse().expect("ip")));
        let h: Cidr = "192.0.2.7".parse().expect("host");
        assert_eq!(h.to_string(), "192.0.2.7/32");
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("203.0.113.9".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(!v6.is_ipv4());
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert_eq!("::1".parse::<Cidr>().expect("v6 host").prefix(), 128);
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits {
                given: "10.0.0.1/8".into(),
                suggested: "10.0.0.0/8".into()
            })
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "fd00::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        for bad in [
            "",
            "x",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            " 10.0.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
    }
}
