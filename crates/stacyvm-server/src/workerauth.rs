//! Worker credentials on the control plane: who may call
//! `/api/v1/worker/*`, and the central issuer of signed worker tokens
//! (`POST /api/v1/admin/worker-tokens`), so workers never hold the
//! signing key.
//!
//! A worker proves itself with `X-Worker-ID` and a token in `X-Worker-Token`
//! (or `Authorization: Bearer`): a signed token for the audience
//! `worker:control-plane` whose worker id is the header's, or a static
//! token. A per-worker static token (`auth.worker_tokens[id]`) is the only
//! static token that worker may use; the shared `auth.worker_token` serves
//! the others. Static tokens carry every worker scope.

use std::collections::{BTreeMap, BTreeSet};

use stacyvm_api::{WorkerTokenRequest, WorkerTokenResponse};
use stacyvm_cluster::token::{self, Audience, Issue, Scope, TokenError, Verifier};
use stacyvm_core::config::AuthConfig;
use subtle::ConstantTimeEq;

/// A verified worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub worker_id: String,
    pub scopes: BTreeSet<Scope>,
    /// `signed:<jti>` or `static`.
    pub credential: String,
}

/// Why a worker was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerAuthError {
    /// No worker credential is configured at all (503).
    NotConfigured,
    /// Missing or wrong credentials (401); the reason is logged, not sent.
    Invalid(String),
}

/// Worker credentials from `auth.*`.
pub struct WorkerAuth {
    verifier: Verifier,
    signing_key: Option<Vec<u8>>,
    shared: Option<String>,
    per_worker: BTreeMap<String, String>,
}

impl std::fmt::Debug for WorkerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerAuth")
            .field("verifier", &self.verifier)
            .field("signing_key", &self.signing_key.is_some())
            .field("shared", &self.shared.is_some())
            .field("per_worker", &self.per_worker.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl WorkerAuth {
    /// Refuses a signing key shorter than 32 bytes.
    pub fn new(a: &AuthConfig) -> Result<WorkerAuth, String> {
        let active = a.worker_signing_key.expose().trim().to_string();
        if !active.is_empty() && active.len() < token::MIN_KEY_LEN {
            return Err(format!(
                "auth.worker_signing_key must be at least {} bytes",
                token::MIN_KEY_LEN
            ));
        }
        let mut keys: Vec<Vec<u8>> = Vec::new();
        if !active.is_empty() {
            keys.push(active.clone().into_bytes());
        }
        for k in &a.worker_signing_keys {
            let k = k.expose().trim();
            if !k.is_empty() {
                keys.push(k.as_bytes().to_vec());
            }
        }
        let shared = Some(a.worker_token.expose().trim().to_string()).filter(|s| !s.is_empty());
        let per_worker = a
            .worker_tokens
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().trim().to_string()))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Ok(WorkerAuth {
            verifier: Verifier::new(&keys, &a.worker_revoked_token_ids),
            signing_key: (!active.is_empty()).then(|| active.into_bytes()),
            shared,
            per_worker,
        })
    }

    /// Whether any worker credential is configured.
    pub fn configured(&self) -> bool {
        self.verifier.has_keys() || self.shared.is_some() || !self.per_worker.is_empty()
    }

    /// Checks a worker's credentials at unix time `now`.
    pub fn authenticate(
        &self,
        worker_id: &str,
        credential: &str,
        now: i64,
    ) -> Result<WorkerIdentity, WorkerAuthError> {
        if !self.configured() {
            return Err(WorkerAuthError::NotConfigured);
        }
        let worker_id = worker_id.trim();
        let credential = credential.trim();
        if worker_id.is_empty() || credential.is_empty() {
            return Err(WorkerAuthError::Invalid(
                "X-Worker-ID and a worker token are required".into(),
            ));
        }
        if credential.starts_with(token::PREFIX) {
            return match self.verifier.verify(
                credential,
                Audience::ControlPlane,
                Some(worker_id),
                now,
            ) {
                Ok(v) => Ok(WorkerIdentity {
                    worker_id: v.claims.worker_id.clone(),
                    credential: format!("signed:{}", v.claims.jti),
                    scopes: v.scopes,
                }),
                Err(e) => Err(WorkerAuthError::Invalid(e.to_string())),
            };
        }
        let expected = match self.per_worker.get(worker_id) {
            Some(own) => Some(own),
            None => self.shared.as_ref(),
        };
        match expected {
            Some(t) if ct_eq(t, credential) => Ok(WorkerIdentity {
                worker_id: worker_id.to_string(),
                scopes: Scope::ALL.into_iter().collect(),
                credential: "static".into(),
            }),
            _ => Err(WorkerAuthError::Invalid(
                "static worker token mismatch".into(),
            )),
        }
    }

    /// Issues a signed token (`POST /admin/worker-tokens`). `None` when no
    /// signing key is configured.
    pub fn issue(
        &self,
        req: &WorkerTokenRequest,
        now: i64,
    ) -> Option<Result<WorkerTokenResponse, String>> {
        let key = self.signing_key.as_ref()?;
        Some(issue_with(key, req, now))
    }
}

fn issue_with(
    key: &[u8],
    req: &WorkerTokenRequest,
    now: i64,
) -> Result<WorkerTokenResponse, String> {
    let worker_id = req.worker_id.trim();
    if worker_id.is_empty() {
        return Err("worker_id is required".into());
    }
    let ttl = if req.ttl.trim().is_empty() {
        300
    } else {
        let d = stacyvm_api::duration::parse(req.ttl.trim())
            .map_err(|_| "invalid ttl; use a Go duration like 5m or 15m".to_string())?;
        if d <= 0 {
            return Err("invalid ttl; use a Go duration like 5m or 15m".into());
        }
        let secs = d / 1_000_000_000;
        if secs > token::MAX_TTL_SECS || (secs == token::MAX_TTL_SECS && d % 1_000_000_000 != 0) {
            return Err("ttl exceeds maximum allowed worker token lifetime of 15m".into());
        }
        secs.max(1)
    };
    let audience = match req.audience.trim() {
        "" => Audience::ControlPlane,
        a => Audience::parse(a)
            .ok_or_else(|| "audience must be worker:control-plane or worker:rpc".to_string())?,
    };
    let scopes = match &req.scopes {
        None => None,
        Some(list) => Some(token::parse_scopes(list).map_err(|e| match e {
            TokenError::UnknownScope(s) => {
                format!("only worker:* scopes may be issued; scope {s:?} is not permitted")
            }
            e => e.to_string(),
        })?),
    };
    let issue = Issue {
        worker_id: worker_id.to_string(),
        audience,
        ttl_secs: ttl,
        scopes,
        not_before_secs: 0,
        token_id: None,
    };
    let (t, claims) = token::sign(key, &issue, now).map_err(|e| e.to_string())?;
    Ok(WorkerTokenResponse {
        token: t,
        token_id: claims.jti,
        worker_id: claims.worker_id,
        audience: claims.aud,
        scopes: claims.scopes,
        expires_at: chrono::DateTime::from_timestamp(claims.exp, 0).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_core::config::Secret;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn auth(f: impl FnOnce(&mut AuthConfig)) -> WorkerAuth {
        let mut a = AuthConfig::default();
        f(&mut a);
        WorkerAuth::new(&a).expect("auth")
    }

    #[test]
    fn nothing_configured_is_unavailable() {
        let a = auth(|_| {});
        assert_eq!(
            a.authenticate("w1", "x", NOW),
            Err(WorkerAuthError::NotConfigured)
        );
        assert!(a.issue(&WorkerTokenRequest::default(), NOW).is_none());
    }

    #[test]
    fn per_worker_tokens_override_the_shared_one() {
        let a = auth(|a| {
            a.worker_token = Secret::new("shared-token");
            a.worker_tokens
                .insert("w1".into(), Secret::new("own-token"));
        });
        assert!(a.authenticate("w1", "own-token", NOW).is_ok());
        assert!(
            a.authenticate("w1", "shared-token", NOW).is_err(),
            "w1 has its own"
        );
        assert!(a.authenticate("w2", "shared-token", NOW).is_ok());
        assert!(a.authenticate("w2", "own-token", NOW).is_err());
        assert!(a.authenticate("", "shared-token", NOW).is_err());
    }

    #[test]
    fn issued_tokens_verify_for_their_worker_and_audience_only() {
        let a = auth(|a| a.worker_signing_key = Secret::new(KEY));
        let req = |w: &str, aud: &str, scopes: Option<Vec<&str>>| WorkerTokenRequest {
            worker_id: w.into(),
            ttl: "2m".into(),
            scopes: scopes.map(|s| s.into_iter().map(String::from).collect()),
            audience: aud.into(),
        };
        let t = a
            .issue(&req("w1", "", Some(vec!["worker:heartbeat"])), NOW)
            .expect("key")
            .expect("issue");
        assert_eq!(t.audience, "worker:control-plane");
        let id = a.authenticate("w1", &t.token, NOW + 1).expect("verify");
        assert_eq!(id.scopes, [Scope::Heartbeat].into_iter().collect());
        assert!(matches!(
            a.authenticate("w2", &t.token, NOW),
            Err(WorkerAuthError::Invalid(_))
        ));
        let rpc = a
            .issue(&req("w1", "worker:rpc", None), NOW)
            .expect("key")
            .expect("issue");
        assert!(
            a.authenticate("w1", &rpc.token, NOW).is_err(),
            "an RPC token is not for the control plane"
        );
        let e = a
            .issue(&req("w1", "", Some(vec!["worker:all"])), NOW)
            .expect("key")
            .expect_err("scope");
        assert!(e.contains("not permitted"), "{e}");
        let e = a
            .issue(
                &WorkerTokenRequest {
                    ttl: "16m".into(),
                    ..req("w1", "", None)
                },
                NOW,
            )
            .expect("key")
            .expect_err("ttl");
        assert!(e.contains("15m"), "{e}");
        let e = a
            .issue(&req("", "", None), NOW)
            .expect("key")
            .expect_err("id");
        assert_eq!(e, "worker_id is required");
        let revoked = auth(|a| {
            a.worker_signing_key = Secret::new(KEY);
            a.worker_revoked_token_ids = vec![t.token_id.clone()];
        });
        assert!(revoked.authenticate("w1", &t.token, NOW).is_err());
    }

    #[test]
    fn a_short_signing_key_is_refused() {
        let a = AuthConfig {
            worker_signing_key: Secret::new("too-short"),
            ..AuthConfig::default()
        };
        assert!(WorkerAuth::new(&a).expect_err("short").contains("32 bytes"));
    }
}
