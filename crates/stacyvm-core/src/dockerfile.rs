//! The Dockerfile subset environment builds run: `FROM`, `RUN`, `ENV`,
//! `WORKDIR` and `COPY` (from the spec's uploaded context).
//!
//! Anything else is refused with the line and the instruction named, never
//! skipped: an image that silently lacks a step is worse than a build that
//! says what it cannot do. `#` starts a comment line; a line ending in `\`
//! continues on the next. `RUN` takes the shell form or the JSON exec form
//! (whose words are quoted for `/bin/sh`). `ENV` takes `KEY=VALUE` pairs
//! (double quotes group a value with spaces) or `KEY VALUE`; its variables
//! are set for the later steps of the build. `COPY` takes context paths
//! (no globs, no `..`, no flags) and a destination, absolute or relative
//! to the current `WORKDIR`.

use crate::error::{Error, Result};
use crate::provider::BuildStep;

/// Longest Dockerfile accepted.
pub const MAX_BYTES: usize = 64 * 1024;
/// Most steps one Dockerfile may have.
const MAX_STEPS: usize = 200;

/// A parsed Dockerfile: its base image and steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub from: String,
    pub steps: Vec<BuildStep>,
}

fn bad(line: usize, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("dockerfile line {line}: {msg}"))
}

/// Logical lines (continuations joined) with the number of their first line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if cur.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        // Comment lines inside a continuation are dropped, as Docker does.
        if cur.is_some() && trimmed.starts_with('#') {
            continue;
        }
        let (start, mut acc) = cur.take().unwrap_or((n, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                acc.push_str(head);
                acc.push(' ');
                cur = Some((start, acc));
            }
            None => {
                acc.push_str(trimmed);
                out.push((start, acc));
            }
        }
    }
    if let Some((start, acc)) = cur {
        out.push((start, acc));
    }
    out
}

/// Quotes a word for `/bin/sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `KEY=VALUE …` or `KEY VALUE`.
fn env_pairs(line: usize, args: &str) -> Result<Vec<(String, String)>> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.len() <= 256
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit()
    };
    if !args.contains('=') {
        let (k, v) = args
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad(line, "ENV needs KEY=VALUE (or KEY VALUE)"))?;
        if !valid_key(k) {
            return Err(bad(line, format!("ENV: {k:?} is not a variable name")));
        }
        return Ok(vec![(k.to_string(), v.trim().to_string())]);
    }
    let mut out = Vec::new();
    let mut chars = args.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if !valid_key(&key) {
            return Err(bad(line, format!("ENV: {key:?} is not a variable name")));
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(bad(line, "ENV: an unclosed quote"));
            }
        } else {
            while let Some(c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A context path: relative, no `..`, normalised (`.` = the whole context).
fn context_path(line: usize, p: &str) -> Result<String> {
    if p.contains(['*', '?', '[']) {
        return Err(bad(line, format!("COPY {p:?}: globs are not supported")));
    }
    if p.starts_with('/') {
        return Err(bad(
            line,
            format!("COPY {p:?}: sources are paths in the build context, not absolute"),
        ));
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(bad(
                    line,
                    format!("COPY {p:?}: '..' leaves the build context"),
                ))
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Parses `text`; errors name the line and what is wrong.
pub fn parse(text: &str) -> Result<Parsed> {
    if text.len() > MAX_BYTES {
        return Err(Error::invalid(format!(
            "dockerfile: at most {} KiB",
            MAX_BYTES / 1024
        )));
    }
    if text.contains('\0') {
        return Err(Error::invalid("dockerfile: a NUL byte"));
    }
    let mut from = None;
    let mut steps = Vec::new();
    let mut workdir = "/".to_string();
    for (n, line) in logical_lines(text) {
        let (word, args) = match line.split_once(char::is_whitespace) {
            Some((w, a)) => (w, a.trim()),
            None => (line.as_str(), ""),
        };
        let instr = word.to_ascii_uppercase();
        if from.is_none() && instr != "FROM" {
            return Err(bad(
                n,
                format!("{instr} before FROM; a Dockerfile starts with FROM"),
            ));
        }
        match instr.as_str() {
            "FROM" => {
                if from.is_some() {
                    return Err(bad(
                        n,
                        "a second FROM: multi-stage builds are not supported",
                    ));
                }
                let words: Vec<&str> = args.split_whitespace().collect();
                match words.as_slice() {
                    [image] if !image.starts_with("--") => from = Some(image.to_string()),
                    _ => {
                        return Err(bad(
                            n,
                            "FROM takes one image (no --platform, no AS: multi-stage builds are not supported)",
                        ))
                    }
                }
            }
            "RUN" => {
                if args.is_empty() {
                    return Err(bad(n, "RUN needs a command"));
                }
                if args.starts_with("--") {
                    return Err(bad(n, "RUN flags (--mount, --network) are not supported"));
                }
                let cmd = if args.starts_with('[') {
                    let words: Vec<String> = serde_json::from_str(args)
                        .map_err(|_| bad(n, "RUN [...] must be a JSON array of strings"))?;
                    if words.is_empty() {
                        return Err(bad(n, "RUN [] has no command"));
                    }
                    words
                        .iter()
                        .map(|w| sh_quote(w))
                        .collect::<Vec<_>>()
                        .join(" ")
                } else {
                    args.to_string()
                };
                steps.push(BuildStep::Run(cmd));
            }
            "ENV" => {
                for (k, v) in env_pairs(n, args)? {
                    steps.push(BuildStep::Env(k, v));
                }
            }
            "WORKDIR" => {
                if args.is_empty() || args.contains('$') {
                    return Err(bad(n, "WORKDIR needs a path (variables are not expanded)"));
                }
                workdir = if args.starts_with('/') {
                    args.to_string()
                } else {
                    format!("{}/{args}", workdir.trim_end_matches('/'))
                };
                steps.push(BuildStep::Workdir(workdir.clone()));
            }
            "COPY" => {
                let words: Vec<&str> = args.split_whitespace().collect();
                if let Some(flag) = words.iter().find(|w| w.starts_with("--")) {
                    return Err(bad(
                        n,
                        format!(
                            "COPY {flag} is not supported (files are copied as the image's root)"
                        ),
                    ));
                }
                if args.starts_with('[') {
                    return Err(bad(n, "COPY [...] (the JSON form) is not supported"));
                }
                let [sources @ .., dest] = words.as_slice() else {
                    return Err(bad(n, "COPY needs a source and a destination"));
                };
                if sources.is_empty() {
                    return Err(bad(n, "COPY needs a source and a destination"));
                }
                if dest.contains('$') {
                    return Err(bad(n, "COPY: variables are not expanded"));
                }
                let mut dest = if dest.starts_with('/') {
                    dest.to_string()
                } else {
                    format!("{}/{dest}", workdir.trim_end_matches('/'))
                };
                // Several sources go into a directory.
                if sources.len() > 1 && !dest.ends_with('/') {
                    dest.push('/');
                }
                let sources = sources
                    .iter()
                    .map(|s| context_path(n, s))
                    .collect::<Result<Vec<_>>>()?;
                steps.push(BuildStep::Copy { sources, dest });
            }
            other => {
                return Err(bad(
                    n,
                    format!("{other} is not supported (supported: FROM, RUN, ENV, WORKDIR, COPY)"),
                ))
            }
        }
        if steps.len() > MAX_STEPS {
            return Err(Error::invalid(format!(
                "dockerfile: at most {MAX_STEPS} steps"
            )));
        }
    }
    let from = from.ok_or_else(|| Error::invalid("dockerfile: no FROM"))?;
    Ok(Parsed { from, steps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_parses() {
        let p = parse(
            "# a tool image\nFROM debian:bookworm\nENV A=1 B=\"two words\"\nENV C three\nRUN apt-get update && \\\n    # comment inside\n    apt-get install -y jq\nRUN [\"echo\", \"it's\"]\nWORKDIR /app\nWORKDIR src\nCOPY . .\nCOPY a.txt b/c.txt /etc/tool/\nCOPY conf/x.yml conf.yml\n",
        )
        .expect("parse");
        assert_eq!(p.from, "debian:bookworm");
        assert_eq!(
            p.steps,
            vec![
                BuildStep::Env("A".into(), "1".into()),
                BuildStep::Env("B".into(), "two words".into()),
                BuildStep::Env("C".into(), "three".into()),
                BuildStep::Run("apt-get update &&  apt-get install -y jq".into()),
                BuildStep::Run(r"'echo' 'it'\''s'".into()),
                BuildStep::Workdir("/app".into()),
                BuildStep::Workdir("/app/src".into()),
                BuildStep::Copy {
                    sources: vec![String::new()],
                    dest: "/app/src/.".into()
                },
                BuildStep::Copy {
                    sources: vec!["a.txt".into(), "b/c.txt".into()],
                    dest: "/etc/tool/".into()
                },
                BuildStep::Copy {
                    sources: vec!["conf/x.yml".into()],
                    dest: "/app/src/conf.yml".into()
                },
            ]
        );
    }

    #[test]
    fn what_is_not_supported_is_named_with_its_line() {
        for (text, want) in [
            ("FROM a\nADD x /x\n", "line 2: ADD is not supported"),
            ("FROM a\nCMD [\"sh\"]\n", "line 2: CMD is not supported"),
            ("FROM a\nUSER nobody\n", "USER is not supported"),
            ("RUN true\n", "line 1: RUN before FROM"),
            ("FROM a AS b\n", "multi-stage"),
            ("FROM a\nFROM b\n", "second FROM"),
            ("FROM --platform=x a\n", "one image"),
            (
                "FROM a\nCOPY --chown=1 x /x\n",
                "--chown=1 is not supported",
            ),
            (
                "FROM a\nCOPY ../etc/passwd /x\n",
                "leaves the build context",
            ),
            ("FROM a\nCOPY /etc/passwd /x\n", "not absolute"),
            ("FROM a\nCOPY *.py /x\n", "globs"),
            ("FROM a\nCOPY x\n", "source and a destination"),
            ("FROM a\nRUN --mount=type=cache x\n", "RUN flags"),
            ("FROM a\nRUN [\"unterminated\"\n", "JSON array"),
            ("FROM a\nRUN\n", "needs a command"),
            ("FROM a\nENV 1X=2\n", "not a variable name"),
            ("FROM a\nENV A=\"open\n", "unclosed quote"),
            ("FROM a\nWORKDIR $HOME\n", "not expanded"),
            ("# only a comment\n", "no FROM"),
            ("FROM a\nRUN x\0\n", "NUL"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let big = format!("FROM a\n{}", "RUN true\n".repeat(201));
        assert!(parse(&big)
            .expect_err("steps")
            .to_string()
            .contains("200 steps"));
        let huge = format!("FROM a\nRUN {}\n", "x".repeat(MAX_BYTES));
        assert!(parse(&huge).is_err());
    }

    #[test]
    fn arbitrary_text_never_panics() {
        // A bounded sweep of awkward inputs (the proptest of the parser).
        let pieces = [
            "FROM", "RUN", "ENV", "COPY", "WORKDIR", " ", "\\\n", "\n", "\"", "=", "[", "]", "..",
            "/", "#", "a", "\t", "é", "--x",
        ];
        let mut seed = 0x2545f491u32;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                s.push_str(pieces[(seed as usize) % pieces.len()]);
            }
            let _ = parse(&s);
        }
    }
}
