//! A minimal DNS client for the egress proxy: A records of one name from
//! the sandbox's own resolvers, over UDP from the bridge's address (so the
//! query takes the sandboxes' route, not the host's).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// The query for `name`'s A records with id `id`.
pub fn query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    Some(q)
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
    None
}

/// The A records of an answer to query `id`; `None` when it is not one
/// (wrong id, malformed); an error code other than NXDOMAIN is empty.
pub fn answers(id: u16, msg: &[u8]) -> Option<Vec<Ipv4Addr>> {
    if msg.len() < 12 || msg[..2] != id.to_be_bytes() || msg[2] & 0x80 == 0 {
        return None;
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let head = msg.get(at..at + 10)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[8], head[9]]));
        let data = msg.get(at + 10..at + 10 + len)?;
        if kind == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Some(out)
}

/// Resolves `name` with the first of `servers` that answers.
pub async fn resolve(
    name: &str,
    servers: &[Ipv4Addr],
    bind: Ipv4Addr,
) -> std::io::Result<Vec<Ipv4Addr>> {
    let id: u16 = rand::random();
    let q = query(id, name).ok_or_else(|| std::io::Error::other("not a DNS name"))?;
    let mut last = std::io::Error::other("no DNS server to ask");
    for server in servers {
        let sock = tokio::net::UdpSocket::bind(SocketAddr::from((bind, 0))).await?;
        sock.connect(SocketAddr::from((*server, 53))).await?;
        for _attempt in 0..2 {
            sock.send(&q).await?;
            let mut buf = [0u8; 1500];
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => {
                        last = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer from {server}"),
                        );
                        break;
                    }
                    Ok(Err(e)) => {
                        last = e;
                        break;
                    }
                    Ok(Ok(n)) => {
                        if let Some(ips) = answers(id, &buf[..n]) {
                            return Ok(ips);
                        }
                    }
                }
            }
        }
    }
    Err(last)
}

/// A Python DNS server for tests: UDP 53 of `addr` (bound to it, so
/// answers come from the address asked), A records for `names`, NXDOMAIN
/// for the rest. Run it in a network namespace the test owns.
#[cfg(test)]
pub(crate) fn test_server_program(addr: &str, names: &[(&str, &str)]) -> String {
    let table: Vec<String> = names
        .iter()
        .map(|(n, ip)| format!("{n:?}: {ip:?}"))
        .collect();
    format!(
        "import socket\nnames = {{{}}}\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(({addr:?}, 53))\n\
         while True:\n  q, a = s.recvfrom(512)\n  i = 12; labels = []\n  \
         while q[i]:\n    labels.append(q[i+1:i+1+q[i]].decode()); i += 1 + q[i]\n  \
         ip = names.get('.'.join(labels).lower())\n  \
         r = q[:2] + (b'\\x81\\x80' if ip else b'\\x81\\x83') + q[4:6] + (b'\\x00\\x01' if ip else b'\\x00\\x00') + b'\\x00\\x00\\x00\\x00' + q[12:i+5]\n  \
         if ip:\n    r += b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04' + socket.inet_aton(ip)\n  \
         s.sendto(r, a)\n",
        table.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_compression_are_read() {
        let q = query(0x1234, "a.example.com").expect("valid");
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // two answers: a CNAME then an A, both names compressed
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 88, 99, 7]);
        assert_eq!(
            answers(0x1234, &r),
            Some(vec![Ipv4Addr::new(192, 88, 99, 7)])
        );
        assert_eq!(answers(0x9999, &r), None, "another query's answer");
        assert_eq!(answers(0x1234, &q), None, "a query is no answer");
        assert_eq!(answers(0x1234, &r[..r.len() - 2]), None, "truncated");
        assert!(query(1, "a..b").is_none());
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..200);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if b.len() > 3 {
                b[0] = 0;
                b[1] = 1;
                b[2] |= 0x80;
            }
            let _ = answers(1, &b);
        }
    }
}
