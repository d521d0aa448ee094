//! Network setup of a microVM guest: `lo` up, and `eth0` addressed with a
//! default route, with the interface and route ioctls of
//! `stacyvm_sandbox::ifconfig` (no tool in the image needed).
//!
//! The host hands out the address (the bridge lease), the gateway, the
//! MAC for a restored clone and the resolvers; the guest kernel has no IP
//! autoconfiguration (Debian's cloud kernel is built without `IP_PNP`).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use stacyvm_agent_proto::GuestNet;
use stacyvm_sandbox::ifconfig;

/// The interface the host's NIC becomes.
const IFACE: &str = "eth0";

/// Brings the loopback interface up (the kernel leaves it down).
pub fn loopback_up() -> Result<(), String> {
    ifconfig::set_up("lo", true).map_err(|e| format!("lo: {e}"))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut out = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("bad MAC {mac:?}"));
    }
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {mac:?}"))?;
    }
    if out[0] & 1 != 0 {
        return Err(format!("MAC {mac} is a multicast address"));
    }
    Ok(out)
}

/// Parses the kernel command line's `stacyvm.net=<ip>/<len>,<gateway>` and
/// `stacyvm.dns=<ip>[,<ip>…]`.
pub fn from_cmdline(net: &str, dns: Option<&str>) -> Result<GuestNet, String> {
    let (cidr, gw) = net
        .split_once(',')
        .ok_or_else(|| format!("stacyvm.net={net}: want <ip>/<len>,<gateway>"))?;
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| format!("stacyvm.net={net}: want <ip>/<len>,<gateway>"))?;
    Ok(GuestNet {
        address: ip.to_string(),
        prefix: len
            .parse()
            .map_err(|_| format!("stacyvm.net={net}: bad prefix length"))?,
        gateway: gw.to_string(),
        mac: String::new(),
        nameservers: dns
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Checks a configuration before anything is changed.
fn validate(net: &GuestNet) -> Result<(Ipv4Addr, Ipv4Addr, Option<[u8; 6]>), String> {
    let ip: Ipv4Addr = net
        .address
        .parse()
        .map_err(|_| format!("bad address {:?}", net.address))?;
    let gw: Ipv4Addr = net
        .gateway
        .parse()
        .map_err(|_| format!("bad gateway {:?}", net.gateway))?;
    if !(8..=30).contains(&net.prefix) {
        return Err(format!("bad prefix length {}", net.prefix));
    }
    for ns in &net.nameservers {
        ns.parse::<Ipv4Addr>()
            .map_err(|_| format!("bad nameserver {ns:?}"))?;
    }
    let mac = if net.mac.is_empty() {
        None
    } else {
        Some(parse_mac(&net.mac)?)
    };
    Ok((ip, gw, mac))
}

/// Addresses `eth0` (waiting for its driver), sets its MAC when given,
/// adds the default route and writes `/etc/resolv.conf`.
pub fn configure(net: &GuestNet) -> Result<(), String> {
    let (ip, gw, mac) = validate(net)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new("/sys/class/net").join(IFACE).exists() {
        if Instant::now() >= deadline {
            return Err(format!("{IFACE} did not appear (no virtio-net device?)"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let step = |what: &str, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    step("setting eth0 down", ifconfig::set_up(IFACE, false))?;
    // Like the host side: IPv4 only (the host drops IPv6 from VMs anyway).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{IFACE}/disable_ipv6"), "1");
    if let Some(mac) = mac {
        step("setting the MAC", ifconfig::set_mac(IFACE, mac))?;
    }
    step(
        "setting the address",
        ifconfig::set_ipv4(IFACE, ip, net.prefix),
    )?;
    step("setting eth0 up", ifconfig::set_up(IFACE, true))?;
    step("adding the default route", ifconfig::add_default_route(gw))?;
    if !net.nameservers.is_empty() {
        let text: String = net
            .nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        // The image's file may be a symlink into /run (systemd-resolved).
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write("/etc/resolv.conf", text)
            .map_err(|e| format!("writing /etc/resolv.conf: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_and_bad_input() {
        let n = from_cmdline("10.88.0.7/16,10.88.0.1", Some("1.1.1.1,9.9.9.9")).expect("parse");
        assert_eq!(n.address, "10.88.0.7");
        assert_eq!(n.prefix, 16);
        assert_eq!(n.gateway, "10.88.0.1");
        assert_eq!(n.nameservers, ["1.1.1.1", "9.9.9.9"]);
        assert!(validate(&n).is_ok());
        for bad in ["10.88.0.7", "10.88.0.7/16", "10.88.0.7/x,10.88.0.1"] {
            assert!(from_cmdline(bad, None).is_err(), "{bad}");
        }
        for (field, value) in [
            ("address", "300.1.1.1"),
            ("gateway", "x"),
            ("mac", "01:00:5e:00:00:01"),
            ("mac", "52:54"),
        ] {
            let mut m = n.clone();
            match field {
                "address" => m.address = value.into(),
                "gateway" => m.gateway = value.into(),
                _ => m.mac = value.into(),
            }
            assert!(validate(&m).is_err(), "{field}={value}");
        }
        assert_eq!(
            parse_mac("52:54:0a:58:00:07"),
            Ok([0x52, 0x54, 10, 88, 0, 7])
        );
    }
}
