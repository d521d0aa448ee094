//! Redaction of secrets in diagnostics (support bundles, printed commands).
//!
//! Three layers, each catching what the others might miss
//! (spec/cluster-and-security.md §11, gaps S-12):
//!
//! 1. **Key rule**: a JSON object member whose name looks secret
//!    (`api_key`, `token`, `signing_key`, `password`, `dsn`, …) has its
//!    whole value replaced, whatever its shape (string, list, map).
//! 2. **Known values**: every secret this process knows — each value under
//!    a secret key of the loaded config, secret environment variables, the
//!    API key sent to the server, passwords in URLs — is replaced wherever
//!    it appears in any string, under any key, in any message.
//! 3. **Patterns**: strings that look like credentials even when their
//!    value is unknown (bearer tokens, signed worker tokens, `key=value`
//!    pairs, URL user info, `sk-…` keys) are masked.
//!
//! [`Redactor::check`] then verifies the rendered output contains none of
//! the known values; callers refuse to write output that fails it.

use regex::Regex;
use serde_json::Value;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Known secret values shorter than this are not searched for inside
/// other strings (they would mangle unrelated text); the key rule still
/// hides them and `config lint` fails them as too short.
const MIN_LITERAL: usize = 4;

/// Name fragments that mark a key, environment variable or header as
/// secret (compared lower-case with `-` as `_`).
const SECRET_KEY_PARTS: &[&str] = &[
    "api_key",
    "apikey",
    "admin_key",
    "signing_key",
    "private_key",
    "key_file",
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "authorization",
    "auth_header",
    "cookie",
    "dsn",
];

/// Whether a key, env var or header name denotes a secret. Separators are
/// ignored, so `api_key`, `API-Key`, `APIKey` and Go-style field names
/// such as `WorkerSigningKeys` all match.
pub fn is_secret_key(name: &str) -> bool {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let n = squash(name);
    SECRET_KEY_PARTS.iter().any(|p| n.contains(&squash(p)))
}

/// Descriptions of the rules, listed in the bundle's `redactions` field.
pub const RULES: &[&str] = &[
    "secret-like keys (api_key, token, signing_key, password, dsn, …): whole value",
    "every known secret value (config, environment, API key sent to the server), wherever it appears",
    "API keys and x-api-key headers",
    "bearer tokens",
    "signed worker tokens",
    "key=value credentials (password, token, secret, signing/private keys)",
    "credentials in URLs (scheme://user:password@host)",
    "sk- style provider keys",
    "PEM private key blocks",
];

/// Masks secrets in strings and JSON values.
#[derive(Debug)]
pub struct Redactor {
    /// Known secret values, longest first (so a secret containing another
    /// is replaced whole).
    literals: Vec<String>,
    patterns: Vec<(Regex, &'static str)>,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

impl Redactor {
    pub fn new() -> Self {
        let rules: [(&str, &'static str); 8] = [
            // A private key pasted where a public one belongs.
            (
                r"(?s)-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                REDACTED,
            ),
            (
                r"stacyvm-worker-v1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
                REDACTED,
            ),
            (r"(?i)(bearer\s+)[a-z0-9._~+/=-]{8,}", "${1}[REDACTED]"),
            (
                r#"(?i)((?:x-api-key|x-admin-api-key|api[_-]?key)"?\s*[:=]\s*["']?)[^"',\s}\]]+"#,
                "${1}[REDACTED]",
            ),
            (
                r#"(?i)((?:password|passwd|token|secret|signing[_-]?key|private[_-]?key)"?\s*[:=]\s*["']?)[^"',\s}\]]+"#,
                "${1}[REDACTED]",
            ),
            // URL user info, with or without a password.
            (r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", "${1}[REDACTED]@"),
            (r"(?i)\bsk-[a-z0-9][a-z0-9_-]{8,}", REDACTED),
            // `Authorization: Basic …` and similar schemes.
            (
                r"(?i)(authorization\s*[:=]\s*[a-z]+\s+)[^\s,;]+",
                "${1}[REDACTED]",
            ),
        ];
        let patterns = rules
            .into_iter()
            .filter_map(|(re, rep)| Regex::new(re).ok().map(|r| (r, rep)))
            .collect();
        Redactor {
            literals: Vec::new(),
            patterns,
        }
    }

    /// Adds a known secret value (and, for URLs, its password).
    pub fn add_secret(&mut self, value: &str) {
        let v = value.trim();
        if v.chars().count() < MIN_LITERAL {
            return;
        }
        if let Some(pw) = url_password(v) {
            self.add_secret(&pw);
        }
        if !self.literals.iter().any(|l| l == v) {
            self.literals.push(v.to_string());
            self.literals
                .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        }
    }

    /// Adds every string under a secret key of `v` (recursively), and the
    /// passwords of URLs anywhere in it.
    pub fn add_secrets_from(&mut self, v: &Value) {
        self.collect(v, false);
    }

    fn collect(&mut self, v: &Value, secret: bool) {
        match v {
            Value::String(s) if secret => self.add_secret(s),
            Value::String(s) => {
                if let Some(pw) = url_password(s) {
                    self.add_secret(&pw);
                }
            }
            Value::Array(a) => {
                for x in a {
                    self.collect(x, secret);
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    self.collect(x, secret || is_secret_key(k));
                }
            }
            _ => {}
        }
    }

    /// Adds the values of secret-looking environment variables.
    pub fn add_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (k, v) in vars {
            if is_secret_key(&k) {
                self.add_secret(&v);
            } else if let Some(pw) = url_password(&v) {
                self.add_secret(&pw);
            }
        }
    }

    /// Redacts one string: known values first, then patterns.
    pub fn text(&self, s: &str) -> String {
        let mut out = s.to_string();
        for l in &self.literals {
            if out.contains(l.as_str()) {
                out = out.replace(l.as_str(), REDACTED);
            }
        }
        for (re, rep) in &self.patterns {
            if re.is_match(&out) {
                out = re.replace_all(&out, *rep).into_owned();
            }
        }
        out
    }

    /// Redacts a JSON value in place: the key rule, then [`Self::text`] on
    /// every string and object key.
    pub fn value(&self, v: &mut Value) {
        match v {
            Value::String(s) => *s = self.text(s),
            Value::Array(a) => {
                for x in a {
                    self.value(x);
                }
            }
            Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    if is_secret_key(&k) && !is_empty(&x) {
                        x = Value::String(REDACTED.into());
                    } else {
                        self.value(&mut x);
                    }
                    m.insert(self.text(&k), x);
                }
            }
            _ => {}
        }
    }

    /// Errors if `rendered` still contains a known secret, verbatim or
    /// JSON-escaped. Returns nothing about the secret itself.
    pub fn check(&self, rendered: &str) -> Result<(), String> {
        for (i, l) in self.literals.iter().enumerate() {
            let escaped = serde_json::to_string(l).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            if rendered.contains(l.as_str()) || rendered.contains(escaped) {
                return Err(format!(
                    "known secret #{i} survived redaction; refusing to write it"
                ));
            }
        }
        Ok(())
    }
}

/// Empty values carry no secret; keeping them shows what is unset.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// The password of `scheme://user:password@host…`, percent-decoding
/// nothing (the literal form is what appears in text).
pub fn url_password(s: &str) -> Option<String> {
    let (_, rest) = s.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, pw) = userinfo.split_once(':')?;
    (!pw.is_empty()).then(|| pw.to_string())
}

/// `url` with any user info replaced by `[REDACTED]` (for printing DSNs).
pub fn url_without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{REDACTED}@{host}{tail}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rule_covers_the_known_leaks() {
        for k in [
            "api_key",
            "APIKey",
            "admin_api_key",
            "worker_signing_key",
            "WorkerSigningKeys",
            "worker_signing_keys",
            "worker_token",
            "worker_tokens",
            "worker_token_file",
            "dsn",
            "STACYVM_DATABASE_DSN",
            "STACYVM_WORKER_BOOTSTRAP_ADMIN_KEY",
            "X-API-Key",
            "X-Admin-API-Key",
            "Authorization",
            "registry_password",
            "secret_ref",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "port",
            "host",
            "preview_domain",
            "runtime",
            "worker_id",
            "keyboard",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn patterns_mask_unknown_credentials() {
        let r = Redactor::new();
        let cases = [
            ("Authorization: Bearer abcdefgh12345678", "abcdefgh12345678"),
            ("token=tok_1234567", "tok_1234567"),
            ("password: 'hunter2'", "hunter2"),
            ("\"api_key\":\"k123456\"", "k123456"),
            ("X-API-Key: key-987654", "key-987654"),
            ("postgres://app:pa55word@db:5432/x", "pa55word"),
            ("https://ghp_abcdef@github.com/x", "ghp_abcdef"),
            ("use sk-proj123456789 please", "sk-proj123456789"),
            (
                "stacyvm-worker-v1.eyJ3b3JrZXIiOiJ3In0.c2lnbmF0dXJl",
                "c2lnbmF0dXJl",
            ),
            ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
            (
                "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBb\n-----END EC PRIVATE KEY-----",
                "MHcCAQEEIBb",
            ),
        ];
        for (input, secret) in cases {
            let out = r.text(input);
            assert!(!out.contains(secret), "{input} -> {out}");
            assert!(out.contains(REDACTED), "{input} -> {out}");
        }
        assert_eq!(r.text("port 7423 on localhost"), "port 7423 on localhost");
    }

    #[test]
    fn known_values_are_removed_everywhere_and_checked() {
        let mut r = Redactor::new();
        r.add_secrets_from(&serde_json::json!({
            "auth": {"worker_signing_keys": ["rot-key-AAAA", "rot-key-BBBB"], "worker_tokens": {"w1": "wt-CCCC"}},
            "custom": {"base_url": "https://u:url-pw-DDDD@x.example"},
            "port": 1234,
        }));
        r.add_env([(
            "STACYVM_REGISTRY_PASSWORD".to_string(),
            "env-EEEE".to_string(),
        )]);
        let mut v = serde_json::json!({
            "message": "failed with rot-key-AAAA and env-EEEE",
            "nested": [{"note": "wt-CCCC rot-key-BBBB url-pw-DDDD"}],
            "rot-key-AAAA": "as a key",
            "worker_tokens": {"w1": "wt-CCCC"},
            "unset_token": "",
        });
        r.value(&mut v);
        let s = v.to_string();
        for m in ["AAAA", "BBBB", "CCCC", "DDDD", "EEEE"] {
            assert!(!s.contains(m), "{m} in {s}");
        }
        assert_eq!(v["worker_tokens"], REDACTED);
        assert_eq!(v["unset_token"], "");
        assert!(r.check(&s).is_ok());
        assert!(r.check("oops wt-CCCC").is_err());
    }

    /// Every `Secret`-typed config field must be caught by the key rule, so
    /// a new secret added to the config cannot slip past the bundle.
    #[test]
    fn every_secret_config_field_matches_the_key_rule() {
        let src = include_str!("../../stacyvm-core/src/config.rs");
        let re = Regex::new(r"pub (\w+): (?:Secret|Vec<Secret>|BTreeMap<String, Secret>),")
            .expect("regex");
        let fields: Vec<&str> = re
            .captures_iter(src)
            .filter_map(|c| c.get(1).map(|m| m.as_str()))
            .collect();
        assert!(fields.len() >= 8, "{fields:?}");
        for f in fields {
            assert!(
                is_secret_key(f),
                "config field {f} holds a Secret but its name is not redacted"
            );
        }
    }

    #[test]
    fn url_helpers() {
        assert_eq!(
            url_password("postgres://app:s3cr3t@db:5432/stacyvm?sslmode=require"),
            Some("s3cr3t".into())
        );
        assert_eq!(url_password("https://example.com/a@b"), None);
        assert_eq!(
            url_without_credentials("postgres://app:s3cr3t@db:5432/stacyvm"),
            "postgres://[REDACTED]@db:5432/stacyvm"
        );
        assert_eq!(
            url_without_credentials("host=db user=app"),
            "host=db user=app"
        );
    }
}
