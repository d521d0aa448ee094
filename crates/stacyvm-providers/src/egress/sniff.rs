//! The name a connection asks for, from its first bytes: the TLS SNI of a
//! ClientHello or the `Host` header of an HTTP/1 request.

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough yet (and under [`MAX_SNIFF`]).
    More,
    /// The name asked for (lowercase, no port, no trailing dot).
    Name(String),
    /// Neither HTTP nor TLS with a server name (or malformed).
    Nameless,
}

/// Bytes read before giving up on finding a name.
pub const MAX_SNIFF: usize = 16 * 1024;

pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::More,
        Some(0x16) => tls(buf),
        Some(b) if b.is_ascii_uppercase() => http(buf),
        Some(_) => Sniff::Nameless,
    }
}

/// A name as a DNS name: ASCII letters, digits, `-`, `_` and dots only.
fn clean(name: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(name).ok()?.trim_end_matches('.');
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then(|| s.to_ascii_lowercase())
}

fn http(buf: &[u8]) -> Sniff {
    // A request line starts with a method token and a space.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if buf.len() < 16 {
            Sniff::More
        } else {
            Sniff::Nameless
        };
    }
    if buf[method_len] != b' ' || method_len > 16 {
        return Sniff::Nameless;
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"));
    let Some(end) = end else {
        return if buf.len() < MAX_SNIFF {
            Sniff::More
        } else {
            Sniff::Nameless
        };
    };
    let mut hosts = buf[..end]
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            line[..colon]
                .eq_ignore_ascii_case(b"host")
                .then(|| line[colon + 1..].trim_ascii())
        });
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        // None, or two Host headers (a smuggling attempt): no name.
        return Sniff::Nameless;
    };
    // Drop a port; a bracketed IPv6 literal is no name.
    let host = match host.iter().rposition(|b| *b == b':') {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        Some(_) => return Sniff::Nameless,
        None => host,
    };
    match clean(host) {
        Some(name) => Sniff::Name(name),
        None => Sniff::Nameless,
    }
}

/// Reads a big-endian length of `n` bytes at `at`.
fn be(buf: &[u8], at: usize, n: usize) -> Option<usize> {
    let bytes = buf.get(at..at + n)?;
    Some(
        bytes
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b)),
    )
}

fn tls(buf: &[u8]) -> Sniff {
    if buf.len() < 5 {
        return Sniff::More;
    }
    let Some(record_len) = be(buf, 3, 2) else {
        return Sniff::More;
    };
    if buf[1] != 3 || record_len == 0 || record_len > MAX_SNIFF {
        return Sniff::Nameless;
    }
    if buf.len() < 5 + record_len {
        return Sniff::More;
    }
    match client_hello_sni(&buf[5..5 + record_len]) {
        Some(name) => Sniff::Name(name),
        None => Sniff::Nameless,
    }
}

/// The host_name of the server_name extension of a ClientHello handshake
/// message (RFC 8446 §4.1.2, RFC 6066 §3).
fn client_hello_sni(hs: &[u8]) -> Option<String> {
    if *hs.first()? != 1 {
        return None;
    }
    let body_len = be(hs, 1, 3)?;
    let body = hs.get(4..4 + body_len)?;
    // version (2) + random (32)
    let mut at = 34;
    let session_len = be(body, at, 1)?;
    at += 1 + session_len;
    let suites_len = be(body, at, 2)?;
    at += 2 + suites_len;
    let compression_len = be(body, at, 1)?;
    at += 1 + compression_len;
    let ext_total = be(body, at, 2)?;
    at += 2;
    let exts = body.get(at..at + ext_total)?;
    let mut e = 0;
    while e + 4 <= exts.len() {
        let kind = be(exts, e, 2)?;
        let len = be(exts, e + 2, 2)?;
        let data = exts.get(e + 4..e + 4 + len)?;
        if kind == 0 {
            let list_len = be(data, 0, 2)?;
            let list = data.get(2..2 + list_len)?;
            let mut i = 0;
            while i + 3 <= list.len() {
                let name_type = list[i];
                let n = be(list, i + 1, 2)?;
                let name = list.get(i + 3..i + 3 + n)?;
                if name_type == 0 {
                    return clean(name);
                }
                i += 3 + n;
            }
            return None;
        }
        e += 4 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello for `name` as the bytes a TLS client sends (built by
    /// hand from RFC 8446's layout).
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        let entry_len = 3 + name.len();
        sni.extend_from_slice(&(entry_len as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut exts = Vec::new();
        // A supported_versions extension before the name, as real clients send.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tls_sni_is_read_whole_or_asked_for() {
        let hello = client_hello("API.Example.com");
        assert_eq!(sniff(&hello), Sniff::Name("api.example.com".into()));
        for cut in [1, 4, 5, 20, hello.len() - 1] {
            assert_eq!(sniff(&hello[..cut]), Sniff::More, "cut at {cut}");
        }
        let mut no_sni = hello.clone();
        // Rename the server_name extension to an unknown one.
        let pos = no_sni.len() - ("api.example.com".len() + 9);
        no_sni[pos] = 0x7f;
        assert_eq!(sniff(&no_sni), Sniff::Nameless);
        assert_eq!(sniff(&client_hello("evil\u{0}.com")), Sniff::Nameless);
    }

    #[test]
    fn http_host_is_read_and_smuggling_refused() {
        let req = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: Example.COM:8080\r\n\r\n";
        assert_eq!(sniff(req), Sniff::Name("example.com".into()));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a.b\r\n"), Sniff::More);
        assert_eq!(sniff(b"GE"), Sniff::More);
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a com\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n",
            b"\x00\x01binary",
        ] {
            assert_eq!(
                sniff(bad),
                Sniff::Nameless,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_SNIFF + 10, b'a');
        assert_eq!(sniff(&huge), Sniff::Nameless);
    }

    /// Arbitrary bytes never panic and never claim a name from garbage
    /// that is neither HTTP nor TLS.
    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let hello = client_hello("a.example.com");
        for _ in 0..20_000 {
            let mut b = if rng.gen_bool(0.5) {
                hello.clone()
            } else {
                let n = rng.gen_range(0..300);
                (0..n).map(|_| rng.gen()).collect()
            };
            for _ in 0..rng.gen_range(0..6) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            let _ = sniff(&b);
        }
    }
}
