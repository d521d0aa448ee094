//! Check reports shared by `doctor`, `config lint` and `upgrade rehearse`;
//! every provider module contributes its own checks to them.
//!
//! Each check has a dotted name, a status, a message and, for anything
//! that is not a pass, a remediation line. Text output is the spec's
//! `[PASS|WARN|FAIL] name: message` with `      fix: …` under non-passes
//! (spec/config-and-cli.md §5); `--json` prints the same data as JSON.

use std::io::Write;

use serde::Serialize;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub message: String,
    /// How to fix it; always set for WARN and FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// An ordered list of checks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn pass(&mut self, name: &str, message: impl Into<String>) {
        self.checks.push(Check {
            name: name.to_string(),
            status: Status::Pass,
            message: message.into(),
            fix: None,
        });
    }

    pub fn warn(&mut self, name: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, message, fix);
    }

    pub fn fail(&mut self, name: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, message, fix);
    }

    /// A WARN normally, a FAIL when `production` (the spec's "(P)" rules).
    pub fn prod(
        &mut self,
        production: bool,
        name: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let status = if production {
            Status::Fail
        } else {
            Status::Warn
        };
        self.push(name, status, message, fix);
    }

    pub fn push(
        &mut self,
        name: &str,
        status: Status,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let fix = fix.into();
        // Every WARN and FAIL must tell the operator what to do.
        debug_assert!(
            status == Status::Pass || !fix.is_empty(),
            "check {name} has no remediation"
        );
        self.checks.push(Check {
            name: name.to_string(),
            status,
            message: message.into(),
            fix: if status == Status::Pass || fix.is_empty() {
                None
            } else {
                Some(fix)
            },
        });
    }

    pub fn extend(&mut self, other: Report) {
        self.checks.extend(other.checks);
    }

    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    pub fn failures(&self) -> usize {
        self.count(Status::Fail)
    }

    /// Writes the report in the spec's text format.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        for c in &self.checks {
            writeln!(out, "[{}] {}: {}", c.status.label(), c.name, c.message)?;
            if let Some(fix) = &c.fix {
                writeln!(out, "      fix: {fix}")?;
            }
        }
        Ok(())
    }

    /// A one-line summary such as `12 passed, 3 warnings, 1 failed`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} warning(s), {} failed",
            self.count(Status::Pass),
            self.count(Status::Warn),
            self.failures()
        )
    }

    /// The JSON form: `{"ok": bool, "summary": {...}, "checks": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.failures() == 0,
            "summary": {
                "pass": self.count(Status::Pass),
                "warn": self.count(Status::Warn),
                "fail": self.failures(),
            },
            "checks": self.checks,
        })
    }
}

/// `name` found in `$PATH` (or `name` itself when it contains a slash).
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        return is_executable(std::path::Path::new(name)).then(|| std::path::PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| is_executable(c))
}

/// A regular file with an execute bit.
pub fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_fix_lines_for_non_passes_only() {
        let mut r = Report::default();
        r.pass("a", "fine");
        r.warn("b", "meh", "do b");
        r.prod(true, "c", "bad", "do c");
        r.prod(false, "d", "soft", "do d");
        let mut buf = Vec::new();
        r.write_text(&mut buf).expect("write");
        let text = String::from_utf8(buf).expect("utf8");
        assert_eq!(
            text,
            "[PASS] a: fine\n[WARN] b: meh\n      fix: do b\n[FAIL] c: bad\n      fix: do c\n[WARN] d: soft\n      fix: do d\n"
        );
        assert_eq!(r.failures(), 1);
        assert_eq!(r.to_json()["ok"], false);
        assert_eq!(r.to_json()["checks"][2]["status"], "fail");
    }
}
