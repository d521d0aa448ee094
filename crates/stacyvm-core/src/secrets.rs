//! The server's secrets: values templates name (`secrets: [{name,
//! inject_at}]`) and sandboxes receive, never stored in the database nor
//! returned by the API.
//!
//! A secret `NAME` is the file `<data_dir>/secrets/NAME` (one trailing
//! newline dropped), else the server's environment variable
//! `STACYVM_SECRET_NAME`. Both are read when they are used (each exec of
//! a sandbox with a secret in its environment, each spawn writing a secret
//! file), so a rotated secret applies from the next use.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest secret value accepted (64 KiB).
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where secrets come from.
#[derive(Debug, Clone)]
pub struct Secrets {
    dir: PathBuf,
}

impl Secrets {
    pub fn new(data_dir: &Path) -> Secrets {
        Secrets {
            dir: data_dir.join("secrets"),
        }
    }

    /// The directory secret files live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The value of secret `name`; a typed 400 naming where to put it
    /// when it is not set.
    pub fn resolve(&self, name: &str) -> Result<String> {
        check_name(name)?;
        let file = self.dir.join(name);
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() => {
                if m.len() > MAX_SECRET_BYTES {
                    return Err(Error::invalid(format!(
                        "secret {name} is larger than {MAX_SECRET_BYTES} bytes"
                    )));
                }
                let mut v = std::fs::read_to_string(&file).map_err(|e| {
                    Error::internal(format!("reading secret {name}")).with_source(e)
                })?;
                if v.ends_with('\n') {
                    v.pop();
                    if v.ends_with('\r') {
                        v.pop();
                    }
                }
                return Ok(v);
            }
            Ok(_) => {
                return Err(Error::invalid(format!(
                    "secret {name}: {} is not a regular file",
                    file.display()
                )))
            }
            Err(_) => {}
        }
        let var = env_var(name);
        match std::env::var(&var) {
            Ok(v) if v.len() as u64 <= MAX_SECRET_BYTES => Ok(v),
            Ok(_) => Err(Error::invalid(format!(
                "secret {name} is larger than {MAX_SECRET_BYTES} bytes"
            ))),
            Err(_) => Err(Error::invalid(format!(
                "secret {name} is not set on this server (put it in {} or the server's environment as {var})",
                file.display()
            ))),
        }
    }
}

/// The server environment variable that may hold secret `name`.
pub fn env_var(name: &str) -> String {
    format!("STACYVM_SECRET_{}", name.to_ascii_uppercase())
}

/// A secret name: a letter or `_`, then letters, digits and `_`, at most
/// 128 (a file name and an environment variable name both).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "secret name {name:?} must be letters, digits and _ (not starting with a digit), at most 128"
        )))
    }
}

/// Where a template secret goes in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Inject {
    /// The environment variable of every exec.
    Env(String),
    /// A file (mode 0400) written at spawn.
    File(String),
}

/// Parses `inject_at`: empty or `env` (a variable named like the secret),
/// `env:VAR`, or an absolute path.
pub fn inject_of(name: &str, inject_at: &str) -> Result<Inject> {
    let at = inject_at.trim();
    if at.is_empty() || at == "env" {
        return Ok(Inject::Env(name.to_string()));
    }
    if let Some(var) = at.strip_prefix("env:") {
        check_name(var).map_err(|_| {
            Error::invalid(format!("inject_at {at:?}: {var:?} is not a variable name"))
        })?;
        return Ok(Inject::Env(var.to_string()));
    }
    if at.starts_with('/') {
        let p = crate::paths::normalize(at)?;
        if p == "/" {
            return Err(Error::invalid("inject_at must name a file, not /"));
        }
        return Ok(Inject::File(p));
    }
    Err(Error::invalid(format!(
        "inject_at {at:?} must be \"env\", \"env:VAR\" or an absolute file path"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_targets() {
        for bad in ["", "1abc", "a-b", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("GH_TOKEN").expect("ok");
        assert_eq!(inject_of("T", "").expect("env"), Inject::Env("T".into()));
        assert_eq!(
            inject_of("T", "env:OTHER").expect("env"),
            Inject::Env("OTHER".into())
        );
        assert_eq!(
            inject_of("T", "/run/secrets/../t").expect("file"),
            Inject::File("/run/t".into())
        );
        for bad in ["env:1X", "relative/path", "/", "file:/x"] {
            assert!(inject_of("T", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_then_environment() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Secrets::new(dir.path());
        std::fs::create_dir_all(s.dir()).expect("mkdir");
        std::fs::write(s.dir().join("FROM_FILE"), "v1\n").expect("write");
        assert_eq!(s.resolve("FROM_FILE").expect("file"), "v1");
        let e = s.resolve("STACYVM_UNIT_NOT_SET").expect_err("unset");
        assert!(
            e.to_string()
                .contains("STACYVM_SECRET_STACYVM_UNIT_NOT_SET"),
            "{e}"
        );
        assert!(s.resolve("../etc/passwd").is_err());
    }
}
