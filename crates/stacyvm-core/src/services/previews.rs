//! Live preview: which ports of a sandbox the preview proxy serves, their
//! access tokens, and the admission of each proxied request.
//!
//! Nothing is reachable until its owner exposes a port
//! (`POST /sandboxes/{id}/ports/{port}`), `public` or `token` (the
//! default). Tokens are scoped to one sandbox and port, expire, can be
//! revoked, and only a SHA-256 of their secret is stored. Tenant and
//! server policies of type `preview` decide which modes may be used
//! (`deny public`, `deny *`). Exposure changes are audited and published
//! as `preview.changed` events, which also evict the proxy's cache on
//! every control plane.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use stacyvm_api::duration;

use crate::manager::{Caller, Manager};
use crate::store::{PortRecord, PreviewTokenRecord, SandboxRecord};
use crate::{policy, Error, ErrorKind, Result};
use stacyvm_api::state;

/// Event type of an exposure or token change.
pub const PREVIEW_CHANGED: &str = "preview.changed";
/// Prefix of a preview token's secret.
pub const TOKEN_PREFIX: &str = "svp_";
/// Exposure modes.
pub const MODES: [&str; 2] = ["public", "token"];

/// How long the proxy trusts a cached exposure (changes made here evict
/// it at once; other control planes' through their events).
const CACHE_TTL: Duration = Duration::from_secs(2);
const CACHE_MAX: usize = 4096;

/// What the proxy asks before it forwards a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Forward it.
    Open,
    /// Forward it; the token was valid (the proxy sets its cookie).
    Token,
}

/// When an exposure was read, and what it was (`None`: not exposed).
type Cached = (Instant, Option<PortRecord>);

/// The proxy's cache of exposures: `(sandbox, port)` → the record, or
/// `None` for "not exposed", with when it was read.
#[derive(Debug, Default)]
pub struct PreviewCache {
    entries: parking_lot::Mutex<HashMap<(String, u16), Cached>>,
}

impl PreviewCache {
    fn get(&self, id: &str, port: u16) -> Option<Option<PortRecord>> {
        let map = self.entries.lock();
        let (at, rec) = map.get(&(id.to_string(), port))?;
        (at.elapsed() < CACHE_TTL).then(|| rec.clone())
    }

    fn put(&self, id: &str, port: u16, rec: Option<PortRecord>) {
        let mut map = self.entries.lock();
        if map.len() >= CACHE_MAX {
            map.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if map.len() >= CACHE_MAX {
                map.clear();
            }
        }
        map.insert((id.to_string(), port), (Instant::now(), rec));
    }

    /// Forgets every cached port of a sandbox.
    pub fn evict(&self, id: &str) {
        self.entries.lock().retain(|(sb, _), _| sb != id);
    }
}

/// Preview rules over the manager's store.
#[derive(Debug, Clone, Copy)]
pub struct Previews<'a> {
    pub(crate) m: &'a Manager,
}

/// Hex SHA-256 of a token's secret.
pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn check_port(port: u16) -> Result<()> {
    if port == 0 {
        return Err(Error::invalid("port must be between 1 and 65535"));
    }
    Ok(())
}

fn parse_ttl(s: &str, what: &str) -> Result<chrono::Duration> {
    let nanos =
        duration::parse(s.trim()).map_err(|e| Error::invalid(format!("parsing {what}: {e}")))?;
    if nanos <= 0 {
        return Err(Error::invalid(format!(
            "{what} must be positive, got {s:?}"
        )));
    }
    Ok(chrono::Duration::nanoseconds(nanos))
}

impl Previews<'_> {
    /// A live sandbox the caller may change, checked for the proxy's use.
    async fn sandbox(&self, id: &str, caller: &Caller) -> Result<std::sync::Arc<SandboxRecord>> {
        self.m.get(id, caller).await
    }

    fn publish(&self, id: &str, port: u16, what: &str) {
        self.m.previews_cache().evict(id);
        let data = std::collections::BTreeMap::from([
            ("port".to_string(), serde_json::json!(port)),
            ("change".to_string(), serde_json::json!(what)),
        ]);
        self.m.events().publish(PREVIEW_CHANGED, id, Some(data));
    }

    /// Exposes `port` of sandbox `id` in `mode` (`""` = `token`), or
    /// changes the mode of an exposed port.
    pub async fn expose(
        &self,
        id: &str,
        port: u16,
        mode: &str,
        caller: &Caller,
    ) -> Result<PortRecord> {
        check_port(port)?;
        let mode = if mode.trim().is_empty() {
            "token"
        } else {
            mode.trim()
        };
        if !MODES.contains(&mode) {
            return Err(Error::invalid(format!(
                "mode must be public or token, got {mode:?}"
            )));
        }
        let rec = self.sandbox(id, caller).await?;
        let policies = self
            .m
            .store()
            .list_policies(Some(rec.tenant_id.as_str()))
            .await?;
        let resource = format!("{port}:{mode}");
        if let Err(e) = policy::check(&policies, "preview", mode) {
            self.m.audit_op(
                caller,
                &rec,
                "preview.expose",
                &resource,
                false,
                e.to_string(),
            );
            return Err(e);
        }
        let existing = self.m.store().list_ports(id).await?;
        let max = self.m.config().preview.max_ports_per_sandbox;
        if !existing.iter().any(|p| p.port == port) && existing.len() >= usize::from(max) {
            let e = Error::limit(format!(
                "sandbox {id} already exposes {max} ports (preview.max_ports_per_sandbox)"
            ));
            self.m.audit_op(
                caller,
                &rec,
                "preview.expose",
                &resource,
                false,
                e.to_string(),
            );
            return Err(e);
        }
        let created_at = existing
            .iter()
            .find(|p| p.port == port)
            .map_or_else(Utc::now, |p| p.created_at);
        let r = PortRecord {
            sandbox_id: id.to_string(),
            port,
            mode: mode.to_string(),
            created_by: caller.actor.clone(),
            created_at,
        };
        self.m.store().put_port(&r).await?;
        self.m.audit_op(
            caller,
            &rec,
            "preview.expose",
            &resource,
            true,
            String::new(),
        );
        self.publish(id, port, "expose");
        Ok(r)
    }

    /// Stops serving `port` and drops its tokens.
    pub async fn unexpose(&self, id: &str, port: u16, caller: &Caller) -> Result<()> {
        check_port(port)?;
        let rec = self.sandbox(id, caller).await?;
        let res = self.m.store().delete_port(id, port).await;
        self.m.audit_op(
            caller,
            &rec,
            "preview.unexpose",
            &port.to_string(),
            res.is_ok(),
            res.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        res?;
        self.publish(id, port, "unexpose");
        Ok(())
    }

    /// A sandbox's exposed ports.
    pub async fn list(&self, id: &str, caller: &Caller) -> Result<Vec<PortRecord>> {
        self.sandbox(id, caller).await?;
        self.m.store().list_ports(id).await
    }

    /// Issues a token for an exposed port: the record and its secret
    /// (shown once).
    pub async fn create_token(
        &self,
        id: &str,
        port: u16,
        ttl: &str,
        caller: &Caller,
    ) -> Result<(PreviewTokenRecord, String)> {
        check_port(port)?;
        let rec = self.sandbox(id, caller).await?;
        let cfg = &self.m.config().preview;
        let max = parse_ttl(&cfg.max_token_ttl, "preview.max_token_ttl")?;
        let ttl = if ttl.trim().is_empty() {
            parse_ttl(&cfg.default_token_ttl, "preview.default_token_ttl")?
        } else {
            parse_ttl(ttl, "ttl")?
        };
        if ttl > max {
            return Err(Error::invalid(format!(
                "ttl is longer than preview.max_token_ttl ({})",
                cfg.max_token_ttl
            )));
        }
        self.m.store().get_port(id, port).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::not_found(format!(
                    "port {port} of sandbox {id} is not exposed; expose it first (POST /sandboxes/{id}/ports/{port})"
                ))
            } else {
                e
            }
        })?;
        let secret = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 24]>()));
        let now = Utc::now();
        let t = PreviewTokenRecord {
            id: format!("pt-{}", hex::encode(rand::random::<[u8; 8]>())),
            sandbox_id: id.to_string(),
            port,
            hash: token_hash(&secret),
            created_by: caller.actor.clone(),
            created_at: now,
            expires_at: now + ttl,
            revoked: false,
        };
        self.m.store().insert_preview_token(&t).await?;
        self.m.audit_op(
            caller,
            &rec,
            "preview.token.create",
            &format!("{port}:{}", t.id),
            true,
            format!("expires {}", t.expires_at.to_rfc3339()),
        );
        Ok((t, secret))
    }

    /// A port's tokens (without secrets).
    pub async fn tokens(
        &self,
        id: &str,
        port: u16,
        caller: &Caller,
    ) -> Result<Vec<PreviewTokenRecord>> {
        check_port(port)?;
        self.sandbox(id, caller).await?;
        self.m.store().list_preview_tokens(id, port).await
    }

    /// Revokes a token: the next request that carries it is refused.
    pub async fn revoke_token(
        &self,
        id: &str,
        port: u16,
        token_id: &str,
        caller: &Caller,
    ) -> Result<()> {
        let rec = self.sandbox(id, caller).await?;
        let owned = self
            .m
            .store()
            .list_preview_tokens(id, port)
            .await?
            .iter()
            .any(|t| t.id == token_id);
        let res = if owned {
            self.m.store().revoke_preview_token(id, token_id).await
        } else {
            Err(Error::not_found(format!(
                "preview token {token_id:?} of port {port}"
            )))
        };
        self.m.audit_op(
            caller,
            &rec,
            "preview.token.revoke",
            &format!("{port}:{token_id}"),
            res.is_ok(),
            res.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        res?;
        self.publish(id, port, "revoke");
        Ok(())
    }

    /// Whether a proxied request for `port` of `id` may pass, given the
    /// token it carries. Unknown sandboxes and unexposed ports are the same
    /// `NotFound` (the proxy does not tell which ids exist); a missing,
    /// unknown, expired or revoked token is `Forbidden` (401 at the proxy).
    pub async fn admit(&self, id: &str, port: u16, token: Option<&str>) -> Result<Admit> {
        let nowhere = || Error::not_found(format!("no preview at port {port} of {id}"));
        if port == 0 || !crate::paths::is_sandbox_id(id) {
            return Err(nowhere());
        }
        let exposure = match self.m.previews_cache().get(id, port) {
            Some(e) => e,
            None => {
                let e = match self.m.store().get_port(id, port).await {
                    Ok(r) => Some(r),
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                self.m.previews_cache().put(id, port, e.clone());
                e
            }
        };
        let Some(exposure) = exposure else {
            return Err(nowhere());
        };
        // A destroyed sandbox's ports go with it, but rows written by a
        // crashed server may linger: the sandbox must be live.
        match self.m.live_record(id).await {
            Ok(r) if r.state != state::DESTROYED => {}
            _ => return Err(nowhere()),
        }
        if exposure.mode == "public" {
            return Ok(Admit::Open);
        }
        let Some(secret) = token.filter(|t| t.starts_with(TOKEN_PREFIX) && t.len() <= 128) else {
            return Err(Error::forbidden(
                "this preview needs a token (X-StacyVM-Preview-Token header or stacyvm_token query parameter)",
            ));
        };
        let t = match self.m.store().find_preview_token(&token_hash(secret)).await {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::forbidden("the preview token is not valid"))
            }
            Err(e) => return Err(e),
        };
        if t.sandbox_id != id || t.port != port {
            return Err(Error::forbidden("the preview token is for another preview"));
        }
        if t.revoked {
            return Err(Error::forbidden("the preview token was revoked"));
        }
        if t.expires_at <= Utc::now() {
            return Err(Error::forbidden("the preview token has expired"));
        }
        Ok(Admit::Token)
    }
}
