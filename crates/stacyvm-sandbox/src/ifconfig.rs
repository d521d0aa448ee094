//! Interface and route setup with the classic `SIOC*` ioctls: what a
//! microVM guest's init needs to bring up `lo` and address `eth0` without
//! netlink or any tool in the image.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// ioctl(2) with a pointer to `arg`, which must be the structure `request`
/// expects (every caller here passes an ifreq or an rtentry).
fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed structure of the type
    // `request` reads and writes, valid for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the
    // kernel reads the family to know which one it got.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets or clears `IFF_UP` on `name`.
pub fn set_up(name: &str, up: bool) -> io::Result<()> {
    let fd = socket()?;
    let mut req = ifreq(name)?;
    ioctl(&fd, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let bit = libc::IFF_UP as libc::c_short;
    req.ifr_ifru.ifru_flags = if up { flags | bit } else { flags & !bit };
    ioctl(&fd, libc::SIOCSIFFLAGS, &mut req)
}

/// Sets the Ethernet address of `name` (which must be down).
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let fd = socket()?;
    let mut req = ifreq(name)?;
    let mut addr = sockaddr(Ipv4Addr::UNSPECIFIED);
    addr.sa_family = libc::ARPHRD_ETHER;
    addr.sa_data = [0; 14];
    for (d, s) in addr.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    ioctl(&fd, libc::SIOCSIFHWADDR, &mut req)
}

/// Gives `name` the IPv4 address `ip` in a subnet of `prefix` bits.
pub fn set_ipv4(name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    if !(1..=32).contains(&prefix) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad prefix length {prefix}"),
        ));
    }
    let fd = socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    ioctl(&fd, libc::SIOCSIFADDR, &mut req)?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)));
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(&fd, libc::SIOCSIFNETMASK, &mut req)
}

/// Adds the IPv4 default route via `gateway` (one that exists is fine).
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let fd = socket()?;
    // SAFETY: rtentry is plain old data; zeroes mean "no value".
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(&fd, libc::SIOCADDRT, &mut rt) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Creates the tap interface `name` (Ethernet frames, no packet-info
/// header, with virtio-net headers) and returns its queue. The interface
/// is not persistent: it disappears when the last descriptor of the queue
/// closes, so a VMM that dies takes its tap with it. Needs CAP_NET_ADMIN.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let fd = OwnedFd::from(tun);
    ioctl(&fd, libc::TUNSETIFF as libc::c_ulong, &mut req)?;
    Ok(fd)
}

/// Creates the tap interface `name` like [`open_tap`] but persistent and
/// owned by `owner` (who may then attach to it by name without
/// CAP_NET_ADMIN, as Firecracker does). It stays until deleted (`ip link
/// del`). Needs CAP_NET_ADMIN.
pub fn create_owned_tap(name: &str, owner: u32) -> io::Result<()> {
    let fd = open_tap(name)?;
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take an integer argument by
    // value; the fd is a tun queue we own.
    unsafe {
        if libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOWNER as _,
            libc::c_ulong::from(owner),
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST as _, 1 as libc::c_ulong) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for bad in ["", "a-name-longer-than-15", "nul\0"] {
            assert!(set_up(bad, true).is_err(), "{bad:?}");
        }
        assert!(set_ipv4("lo", Ipv4Addr::LOCALHOST, 0).is_err());
        assert!(set_up("svm-no-such-if", true).is_err());
    }
}
