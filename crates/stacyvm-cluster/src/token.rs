//! Signed worker tokens.
//!
//! `stacyvm-worker-v1.<base64url(claims JSON)>.<base64url(HMAC-SHA256)>`,
//! the MAC taken over everything before the last dot. The wire format is
//! the original StacyVM's, so its tokens and tooling interoperate; the
//! checks are stricter where the original was unsafe:
//!
//! - an audience is required and must be the one expected (a token for the
//!   control plane cannot be replayed against a worker's RPC);
//! - scopes only narrow: an unknown scope makes the token invalid instead
//!   of being dropped (the original then granted every scope when none
//!   was left), an explicit empty list grants nothing, and only a token
//!   without a `scopes` claim has them all;
//! - a token id (`jti`) is required, so every token can be revoked;
//! - lifetimes are at most 15 minutes, measured from `iat` and from now.

use std::collections::BTreeSet;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The token prefix (and the MAC domain).
pub const PREFIX: &str = "stacyvm-worker-v1";
/// The longest lifetime a token may have, in seconds.
pub const MAX_TTL_SECS: i64 = 15 * 60;
/// Tolerated clock difference between issuer and verifier, in seconds.
pub const SKEW_SECS: i64 = 30;
/// The shortest signing key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Who a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// A worker calling the control plane (`/api/v1/worker/*`).
    ControlPlane,
    /// A control plane calling a worker's RPC.
    Rpc,
}

impl Audience {
    pub fn as_str(self) -> &'static str {
        match self {
            Audience::ControlPlane => "worker:control-plane",
            Audience::Rpc => "worker:rpc",
        }
    }

    pub fn parse(s: &str) -> Option<Audience> {
        match s {
            "worker:control-plane" => Some(Audience::ControlPlane),
            "worker:rpc" => Some(Audience::Rpc),
            _ => None,
        }
    }
}

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Heartbeat,
    Spawn,
    Destroy,
    Status,
    Exec,
    Files,
    Logs,
    Lease,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::Heartbeat,
        Scope::Spawn,
        Scope::Destroy,
        Scope::Status,
        Scope::Exec,
        Scope::Files,
        Scope::Logs,
        Scope::Lease,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Heartbeat => "worker:heartbeat",
            Scope::Spawn => "worker:spawn",
            Scope::Destroy => "worker:destroy",
            Scope::Status => "worker:status",
            Scope::Exec => "worker:exec",
            Scope::Files => "worker:files",
            Scope::Logs => "worker:logs",
            Scope::Lease => "worker:lease",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The claims of a token, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nbf: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Why a token was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid signed worker token")]
    Malformed,
    #[error("invalid signed worker token (signature)")]
    BadSignature,
    #[error("signed worker token has expired")]
    Expired,
    #[error("signed worker token is not valid yet")]
    NotYetValid,
    #[error("signed worker token lives longer than 15m")]
    TooLong,
    #[error("signed worker token has no audience")]
    MissingAudience,
    #[error("signed worker token is for {0:?}, not this audience")]
    WrongAudience(String),
    #[error("signed worker token has no token id (jti)")]
    MissingId,
    #[error("signed worker token is for worker {0:?}")]
    WrongWorker(String),
    #[error("signed worker token has been revoked")]
    Revoked,
    #[error("scope {0:?} is not a worker scope")]
    UnknownScope(String),
    #[error("worker id {0:?} is not valid")]
    BadWorkerId(String),
    #[error("ttl must be positive and at most 15m")]
    BadTtl,
    #[error("signing key must be at least {MIN_KEY_LEN} bytes")]
    WeakKey,
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct Issue {
    pub worker_id: String,
    pub audience: Audience,
    /// Seconds from now (1 ..= 900).
    pub ttl_secs: i64,
    /// `None`: every scope (the claim is left out).
    pub scopes: Option<Vec<Scope>>,
    /// Seconds from now before the token is valid.
    pub not_before_secs: i64,
    /// A token id of the caller's choosing; random otherwise.
    pub token_id: Option<String>,
}

impl Issue {
    /// A token for `worker_id` and `audience` with every scope.
    pub fn new(worker_id: &str, audience: Audience, ttl_secs: i64) -> Issue {
        Issue {
            worker_id: worker_id.to_string(),
            audience,
            ttl_secs,
            scopes: None,
            not_before_secs: 0,
            token_id: None,
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub claims: Claims,
    /// The scopes the token grants.
    pub scopes: BTreeSet<Scope>,
}

impl Verified {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// Parses a list of scope names; any unknown one is an error.
pub fn parse_scopes<S: AsRef<str>>(names: &[S]) -> Result<Vec<Scope>, TokenError> {
    names
        .iter()
        .map(|n| {
            Scope::parse(n.as_ref()).ok_or_else(|| TokenError::UnknownScope(n.as_ref().into()))
        })
        .collect()
}

/// Makes and signs a token at unix time `now`.
pub fn sign(key: &[u8], issue: &Issue, now: i64) -> Result<(String, Claims), TokenError> {
    if key.len() < MIN_KEY_LEN {
        return Err(TokenError::WeakKey);
    }
    if !stacyvm_core::paths::is_worker_id(&issue.worker_id) {
        return Err(TokenError::BadWorkerId(issue.worker_id.clone()));
    }
    if issue.ttl_secs <= 0 || issue.ttl_secs > MAX_TTL_SECS || issue.not_before_secs < 0 {
        return Err(TokenError::BadTtl);
    }
    let jti = match &issue.token_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => hex::encode(rand::random::<[u8; 16]>()),
    };
    let claims = Claims {
        worker_id: issue.worker_id.clone(),
        jti,
        aud: issue.audience.as_str().into(),
        scopes: issue.scopes.as_ref().map(|s| {
            let set: BTreeSet<Scope> = s.iter().copied().collect();
            set.into_iter().map(|x| x.as_str().to_string()).collect()
        }),
        exp: now + issue.ttl_secs,
        iat: now,
        nbf: if issue.not_before_secs > 0 {
            now + issue.not_before_secs
        } else {
            0
        },
    };
    let payload = serde_json::to_vec(&claims).map_err(|_| TokenError::Malformed)?;
    let signed = format!("{PREFIX}.{}", URL_SAFE_NO_PAD.encode(payload));
    let mut m = mac(key);
    m.update(signed.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    Ok((format!("{signed}.{sig}"), claims))
}

/// Decodes a token's claims without checking anything (`worker token
/// inspect`).
pub fn inspect(token: &str) -> Result<Claims, TokenError> {
    let (signed, _) = split(token)?;
    decode_claims(signed)
}

fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let token = token.trim();
    let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (prefix, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
    if prefix != PREFIX || payload.is_empty() || payload.contains('.') || sig.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok((signed, sig))
}

fn decode_claims(signed: &str) -> Result<Claims, TokenError> {
    let payload = signed
        .split_once('.')
        .map(|(_, p)| p)
        .ok_or(TokenError::Malformed)?;
    let raw = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)
}

/// Checks tokens against a set of keys (the active one and those kept for
/// rotation) and a revocation list.
#[derive(Clone, Default)]
pub struct Verifier {
    keys: Vec<Vec<u8>>,
    revoked: BTreeSet<String>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

impl Verifier {
    /// A verifier for `keys` (empty ones ignored, duplicates kept once).
    pub fn new<K: AsRef<[u8]>>(keys: &[K], revoked: &[String]) -> Verifier {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for k in keys {
            let k = k.as_ref();
            if !k.is_empty() && !out.iter().any(|x| x == k) {
                out.push(k.to_vec());
            }
        }
        Verifier {
            keys: out,
            revoked: revoked
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies `token` for `audience` at unix time `now`; `worker_id`,
    /// when given, must be the token's.
    pub fn verify(
        &self,
        token: &str,
        audience: Audience,
        worker_id: Option<&str>,
        now: i64,
    ) -> Result<Verified, TokenError> {
        let (signed, sig) = split(token)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        // `verify_slice` compares in constant time.
        let signed_ok = self.keys.iter().any(|k| {
            let mut m = mac(k);
            m.update(signed.as_bytes());
            m.verify_slice(&sig).is_ok()
        });
        if !signed_ok {
            return Err(TokenError::BadSignature);
        }
        let claims = decode_claims(signed)?;
        if !stacyvm_core::paths::is_worker_id(&claims.worker_id) {
            return Err(TokenError::BadWorkerId(claims.worker_id));
        }
        if claims.exp <= 0 || now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if claims.nbf > now + SKEW_SECS || claims.iat > now + SKEW_SECS {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp - now > MAX_TTL_SECS + SKEW_SECS
            || (claims.iat > 0 && claims.exp - claims.iat > MAX_TTL_SECS)
        {
            return Err(TokenError::TooLong);
        }
        if claims.aud.is_empty() {
            return Err(TokenError::MissingAudience);
        }
        if claims.aud != audience.as_str() {
            return Err(TokenError::WrongAudience(claims.aud));
        }
        if claims.jti.is_empty() {
            return Err(TokenError::MissingId);
        }
        if self.revoked.contains(&claims.jti) {
            return Err(TokenError::Revoked);
        }
        if let Some(w) = worker_id {
            if w != claims.worker_id {
                return Err(TokenError::WrongWorker(claims.worker_id));
            }
        }
        let scopes = match &claims.scopes {
            None => Scope::ALL.into_iter().collect(),
            Some(list) => parse_scopes(list)?.into_iter().collect(),
        };
        Ok(Verified { claims, scopes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn v() -> Verifier {
        Verifier::new(&[KEY], &[])
    }

    #[test]
    fn round_trip_with_every_scope() {
        let (t, c) = sign(KEY, &Issue::new("w-1", Audience::Rpc, 300), NOW).expect("sign");
        assert!(t.starts_with("stacyvm-worker-v1."));
        assert_eq!(c.jti.len(), 32);
        let ok = v()
            .verify(&t, Audience::Rpc, Some("w-1"), NOW + 10)
            .expect("verify");
        assert_eq!(ok.scopes.len(), 8);
        assert_eq!(inspect(&t).expect("inspect"), c);
    }

    #[test]
    fn refusals() {
        let (t, _) = sign(KEY, &Issue::new("w-1", Audience::Rpc, 300), NOW).expect("sign");
        let e = |r: Result<Verified, TokenError>| r.expect_err("refused");
        assert_eq!(
            e(v().verify(&t, Audience::ControlPlane, None, NOW)),
            TokenError::WrongAudience("worker:rpc".into())
        );
        assert_eq!(
            e(v().verify(&t, Audience::Rpc, Some("w-2"), NOW)),
            TokenError::WrongWorker("w-1".into())
        );
        assert_eq!(
            e(v().verify(&t, Audience::Rpc, None, NOW + 300)),
            TokenError::Expired
        );
        let other = Verifier::new(&[b"another key that is long enough!!".as_slice()], &[]);
        assert_eq!(
            e(other.verify(&t, Audience::Rpc, None, NOW)),
            TokenError::BadSignature
        );
        let jti = inspect(&t).expect("claims").jti;
        let revoking = Verifier::new(&[KEY], &[jti]);
        assert_eq!(
            e(revoking.verify(&t, Audience::Rpc, None, NOW)),
            TokenError::Revoked
        );
        // One flipped byte anywhere breaks it.
        let mut bytes = t.clone().into_bytes();
        let i = PREFIX.len() + 5;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("utf8");
        assert!(v().verify(&tampered, Audience::Rpc, None, NOW).is_err());
        assert_eq!(
            e(v().verify("stacyvm-worker-v1.abc", Audience::Rpc, None, NOW)),
            TokenError::Malformed
        );
        assert_eq!(
            sign(b"short", &Issue::new("w", Audience::Rpc, 60), NOW).expect_err("weak"),
            TokenError::WeakKey
        );
        assert_eq!(
            sign(KEY, &Issue::new("w", Audience::Rpc, 901), NOW).expect_err("long"),
            TokenError::BadTtl
        );
        assert!(sign(KEY, &Issue::new("../w", Audience::Rpc, 60), NOW).is_err());
    }

    /// Forges a token with arbitrary claims under KEY.
    fn forge(claims: &serde_json::Value) -> String {
        let signed = format!("{PREFIX}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut m = mac(KEY);
        m.update(signed.as_bytes());
        format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
        )
    }

    #[test]
    fn scopes_only_narrow() {
        let base = serde_json::json!({"worker_id": "w", "jti": "j1", "aud": "worker:rpc", "exp": NOW + 60, "iat": NOW});
        let with = |scopes: serde_json::Value| {
            let mut c = base.clone();
            c["scopes"] = scopes;
            forge(&c)
        };
        // An unknown scope invalidates the token instead of being dropped
        // into "all scopes" (gaps S-10).
        let t = with(serde_json::json!(["worker:everything"]));
        assert_eq!(
            v().verify(&t, Audience::Rpc, None, NOW)
                .expect_err("unknown"),
            TokenError::UnknownScope("worker:everything".into())
        );
        let t = with(serde_json::json!([]));
        assert!(v()
            .verify(&t, Audience::Rpc, None, NOW)
            .expect("empty")
            .scopes
            .is_empty());
        let t = with(serde_json::json!(["worker:exec"]));
        let ok = v().verify(&t, Audience::Rpc, None, NOW).expect("one");
        assert!(ok.allows(Scope::Exec) && !ok.allows(Scope::Spawn));
        // No audience, no id, a lifetime past 15 minutes: all refused.
        let mut c = base.clone();
        c.as_object_mut().expect("obj").remove("aud");
        assert_eq!(
            v().verify(&forge(&c), Audience::Rpc, None, NOW)
                .expect_err("aud"),
            TokenError::MissingAudience
        );
        let mut c = base.clone();
        c.as_object_mut().expect("obj").remove("jti");
        assert_eq!(
            v().verify(&forge(&c), Audience::Rpc, None, NOW)
                .expect_err("jti"),
            TokenError::MissingId
        );
        let mut c = base.clone();
        c["exp"] = serde_json::json!(NOW + 3600);
        c.as_object_mut().expect("obj").remove("iat");
        assert_eq!(
            v().verify(&forge(&c), Audience::Rpc, None, NOW)
                .expect_err("long"),
            TokenError::TooLong
        );
        let mut c = base;
        c["nbf"] = serde_json::json!(NOW + 120);
        assert_eq!(
            v().verify(&forge(&c), Audience::Rpc, None, NOW)
                .expect_err("nbf"),
            TokenError::NotYetValid
        );
    }

    proptest::proptest! {
        /// Any string is refused or verified without panicking.
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,300}") {
            let _ = v().verify(&s, Audience::Rpc, None, NOW);
            let _ = inspect(&s);
            let with_prefix = format!("{PREFIX}.{s}");
            let _ = v().verify(&with_prefix, Audience::ControlPlane, Some("w"), NOW);
        }
    }
}
