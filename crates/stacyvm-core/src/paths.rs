//! Path, mode and id rules shared by every provider.

use rand::RngCore;

use crate::error::{Error, Result};

/// Default working directory inside a sandbox.
pub const WORKSPACE: &str = "/workspace";

/// Normalises a sandbox path: required, no NUL, relative paths resolve
/// against `/workspace`, `.`/`..` resolved lexically. Climbing above `/` is
/// an error, never clamped.
pub fn normalize(path: &str) -> Result<String> {
    if path.trim().is_empty() {
        return Err(Error::invalid("path is required"));
    }
    if path.contains('\0') {
        return Err(Error::invalid("path must not contain NUL bytes"));
    }
    if path.len() > 4096 {
        return Err(Error::invalid("path is longer than 4096 bytes"));
    }
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{WORKSPACE}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for comp in joined.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(Error::invalid(format!(
                        "path {path:?} escapes sandbox root"
                    )));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Normalises a glob pattern like a path; `..` components are rejected.
pub fn normalize_pattern(pattern: &str) -> Result<String> {
    if pattern.trim().is_empty() {
        return Err(Error::invalid("pattern is required"));
    }
    if pattern.split('/').any(|c| c == "..") {
        return Err(Error::invalid(format!(
            "pattern {pattern:?} must not contain '..'"
        )));
    }
    normalize(pattern)
}

/// Parses an octal mode string (`644`, `0755`, `executable`); "" → 0644.
pub fn parse_mode(mode: &str) -> Result<u32> {
    let m = mode.trim();
    if m.is_empty() {
        return Ok(0o644);
    }
    if m == "executable" {
        return Ok(0o755);
    }
    let digits = m.strip_prefix("0o").unwrap_or(m);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(Error::invalid(format!(
            "mode {mode:?} is not an octal file mode like 644 or 0755"
        )));
    }
    let v = u32::from_str_radix(digits, 8)
        .map_err(|_| Error::invalid(format!("mode {mode:?} is invalid")))?;
    if v > 0o7777 {
        return Err(Error::invalid(format!("mode {mode:?} is larger than 7777")));
    }
    if v & 0o6000 != 0 {
        // A setuid/setgid file is a privilege-escalation tool for whoever
        // can reach it; the API never makes one.
        return Err(Error::invalid(format!(
            "mode {mode:?} sets the setuid or setgid bit, which the file API does not allow"
        )));
    }
    Ok(v)
}

/// A new sandbox id: `sb-` + 8 lowercase hex chars.
pub fn new_sandbox_id() -> String {
    let mut b = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut b);
    format!("sb-{}", hex::encode(b))
}

/// A fresh snapshot id: `snap-` and 16 hex digits.
pub fn new_snapshot_id() -> String {
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    format!("snap-{}", hex::encode(b))
}

/// Whether `id` has the snapshot id shape (`snap-` + 16 hex digits).
pub fn is_snapshot_id(id: &str) -> bool {
    id.len() == 21
        && id.starts_with("snap-")
        && id[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `id` has the sandbox id shape.
pub fn is_sandbox_id(id: &str) -> bool {
    id.len() == 11
        && id.starts_with("sb-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A worker or control-plane id: 1–64 of `[A-Za-z0-9._-]`, starting with
/// a letter or digit (it appears in URLs, leases and log lines).
pub fn is_worker_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Validates and trims an owner id (spec: ≤128 chars, no `/` `\`,
/// no whitespace or control characters).
pub fn normalize_owner(owner: &str) -> Result<String> {
    let o = owner.trim();
    if o.is_empty() {
        return Ok(String::new());
    }
    if o.chars().count() > 128 {
        return Err(Error::invalid("owner_id must be at most 128 characters"));
    }
    if o.contains(['/', '\\']) {
        return Err(Error::invalid("owner_id must not contain '/' or '\\'"));
    }
    if o.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            "owner_id must not contain whitespace or control characters",
        ));
    }
    Ok(o.to_string())
}

/// Quotes `s` for a POSIX shell with single quotes.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// Builds argv for an exec request (spec/runtime.md §1).
pub fn build_argv(mode: &str, command: &str, args: &[String]) -> Result<Vec<String>> {
    match mode {
        "" | "shell" => {
            if command.trim().is_empty() {
                return Err(Error::invalid("command is required"));
            }
            let mut line = command.to_string();
            for a in args {
                line.push(' ');
                line.push_str(&shell_quote(a));
            }
            Ok(vec!["/bin/sh".into(), "-c".into(), line])
        }
        "argv" => {
            if command.is_empty() {
                return Err(Error::invalid("argv exec mode requires command"));
            }
            let mut v = Vec::with_capacity(args.len() + 1);
            v.push(command.to_string());
            v.extend(args.iter().cloned());
            Ok(v)
        }
        other => Err(Error::invalid(format!("unsupported exec mode {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalize_rules() {
        assert_eq!(normalize("a.txt").expect("rel"), "/workspace/a.txt");
        assert_eq!(
            normalize("/workspace/./x/../y").expect("dots"),
            "/workspace/y"
        );
        assert_eq!(normalize("/").expect("root"), "/");
        assert_eq!(normalize("../x").expect("up from workspace"), "/x");
        assert!(normalize("../../x").is_err());
        assert!(normalize("/../etc").is_err());
        assert!(normalize("").is_err());
        assert!(normalize("   ").is_err());
        assert!(normalize("a\0b").is_err());
    }

    #[test]
    fn mode_rules() {
        assert_eq!(parse_mode("").expect("default"), 0o644);
        assert_eq!(parse_mode("755").expect("755"), 0o755);
        assert_eq!(parse_mode("0600").expect("0600"), 0o600);
        assert_eq!(parse_mode("executable").expect("exe"), 0o755);
        assert!(parse_mode("rwx").is_err());
        assert!(parse_mode("888").is_err());
        assert!(parse_mode("77777").is_err());
        assert!(parse_mode("4755").is_err(), "setuid");
        assert!(parse_mode("2755").is_err(), "setgid");
        assert_eq!(parse_mode("1777").expect("sticky"), 0o1777);
    }

    #[test]
    fn argv_rules() {
        let v = build_argv("", "echo", &["$HOME;echo pwned".into(), "it's".into()]).expect("shell");
        assert_eq!(v[2], "echo '$HOME;echo pwned' 'it'\"'\"'s'");
        let v = build_argv("argv", "echo", &["$HOME;echo pwned".into()]).expect("argv");
        assert_eq!(v, vec!["echo".to_string(), "$HOME;echo pwned".to_string()]);
        assert!(build_argv("argv", "", &[]).is_err());
        assert!(build_argv("bash", "x", &[]).is_err());
    }

    #[test]
    fn owner_rules() {
        assert_eq!(normalize_owner(" alice ").expect("trim"), "alice");
        assert!(normalize_owner("a/b").is_err());
        assert!(normalize_owner("a b").is_err());
        assert!(normalize_owner("a\tb").is_err());
        assert!(normalize_owner(&"x".repeat(129)).is_err());
    }

    proptest! {
        #[test]
        fn normalized_paths_are_absolute_and_clean(p in "[a-z./]{1,30}") {
            if let Ok(n) = normalize(&p) {
                prop_assert!(n.starts_with('/'));
                prop_assert!(!n.split('/').any(|c| c == ".." || c == "."));
                prop_assert!(!n.contains("//"));
            }
        }
    }
}
