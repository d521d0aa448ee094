//! Authentication (static API keys, OIDC bearer JWTs) and the one
//! per-route permission table the router enforces.
//!
//! Every route of `/api/v1` has exactly one entry in [`ROUTE_PERMISSIONS`];
//! a matched route without an entry is refused (fail closed). The table is
//! rendered in `docs/security.md` and walked route × role by the tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::Method;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use stacyvm_core::config::AuthConfig;
use subtle::ConstantTimeEq;

/// Scope bits.
pub const READ: u8 = 1;
pub const API: u8 = 2;
pub const OPERATOR: u8 = 4;
pub const ADMIN: u8 = 8;
pub const TENANT_ADMIN: u8 = 16;
/// Changing configuration shared by every tenant (templates): operators
/// and the admin, never a tenant admin (F-15).
pub const SHARED: u8 = 32;

/// The role of an authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `read:*`
    Viewer,
    /// `read:*`, `api:*` (the shared API key; OIDC users without a group)
    Api,
    /// `read:*`, `api:*`, `operator:*`
    Operator,
    /// operator scopes plus tenant administration of its own tenant
    TenantAdmin,
    /// every scope
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Api,
        Role::Operator,
        Role::TenantAdmin,
        Role::Admin,
    ];

    pub fn scopes(self) -> u8 {
        match self {
            Role::Viewer => READ,
            Role::Api => READ | API,
            Role::Operator => READ | API | OPERATOR | SHARED,
            Role::TenantAdmin => READ | API | OPERATOR | TENANT_ADMIN,
            Role::Admin => READ | API | OPERATOR | ADMIN | TENANT_ADMIN | SHARED,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Api => "api",
            Role::Operator => "operator",
            Role::TenantAdmin => "tenant_admin",
            Role::Admin => "admin",
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// No authentication (probes).
    Open,
    /// `read:*`
    Read,
    /// `api:*`
    Write,
    /// `operator:*` (prune, metrics)
    Operate,
    /// `operator:shared`: configuration every tenant uses (templates);
    /// operators and the admin, not tenant admins.
    Shared,
    /// `tenant:admin`: the admin, or a tenant admin for its own tenant
    /// (the handler compares the tenant in the path).
    Tenant,
    /// `admin:*`
    Admin,
    /// Worker credentials with this scope (`/worker/*`): no API key or
    /// OIDC role reaches these routes.
    Worker(stacyvm_cluster::token::Scope),
}

impl Perm {
    pub fn scope(self) -> Option<(u8, &'static str)> {
        match self {
            Perm::Open => None,
            Perm::Read => Some((READ, "read:*")),
            Perm::Write => Some((API, "api:*")),
            Perm::Operate => Some((OPERATOR, "operator:*")),
            Perm::Shared => Some((SHARED, "operator:shared")),
            Perm::Tenant => Some((TENANT_ADMIN, "tenant:admin")),
            Perm::Admin => Some((ADMIN, "admin:*")),
            Perm::Worker(_) => None,
        }
    }

    pub fn allows(self, role: Role) -> bool {
        if let Perm::Worker(_) = self {
            return false;
        }
        self.scope().is_none_or(|(bit, _)| role.scopes() & bit != 0)
    }

    pub fn name(self) -> &'static str {
        match self {
            Perm::Open => "open",
            Perm::Read => "read:*",
            Perm::Write => "api:*",
            Perm::Operate => "operator:*",
            Perm::Shared => "operator:shared",
            Perm::Tenant => "tenant:admin",
            Perm::Admin => "admin:*",
            Perm::Worker(s) => s.as_str(),
        }
    }
}

/// One row of the permission table: method, route pattern under
/// `/api/v1` (axum syntax), permission.
#[derive(Debug, Clone, Copy)]
pub struct RoutePerm {
    pub method: &'static str,
    pub path: &'static str,
    pub perm: Perm,
}

const fn r(method: &'static str, path: &'static str, perm: Perm) -> RoutePerm {
    RoutePerm { method, path, perm }
}

/// The permission of every `/api/v1` route. The router refuses a matched
/// route that is missing here.
pub const ROUTE_PERMISSIONS: &[RoutePerm] = &[
    r("GET", "/health", Perm::Open),
    r("GET", "/live", Perm::Open),
    r("GET", "/ready", Perm::Open),
    r("GET", "/openapi.json", Perm::Open),
    r("GET", "/docs", Perm::Open),
    r("GET", "/sandboxes", Perm::Read),
    r("POST", "/sandboxes", Perm::Write),
    r("DELETE", "/sandboxes", Perm::Operate),
    r("POST", "/sandboxes/admission", Perm::Write),
    r("GET", "/sandboxes/{id}", Perm::Read),
    r("DELETE", "/sandboxes/{id}", Perm::Write),
    r("POST", "/sandboxes/{id}/extend", Perm::Write),
    r("POST", "/sandboxes/{id}/pause", Perm::Write),
    r("POST", "/sandboxes/{id}/resume", Perm::Write),
    r("GET", "/sandboxes/{id}/network", Perm::Read),
    r("PATCH", "/sandboxes/{id}/network", Perm::Write),
    r("PUT", "/sandboxes/{id}/network", Perm::Write),
    r("POST", "/sandboxes/{id}/snapshot", Perm::Write),
    r("POST", "/sandboxes/{id}/fork", Perm::Write),
    r("POST", "/sandboxes/{id}/exec", Perm::Write),
    r("GET", "/sandboxes/{id}/exec/ws", Perm::Write),
    r("GET", "/sandboxes/{id}/execs", Perm::Write),
    r("GET", "/sandboxes/{id}/execs/{exec_id}", Perm::Write),
    r("GET", "/sandboxes/{id}/execs/{exec_id}/stream", Perm::Write),
    r("DELETE", "/sandboxes/{id}/execs/{exec_id}", Perm::Write),
    r("GET", "/sandboxes/{id}/logs", Perm::Read),
    r("GET", "/sandboxes/{id}/stats", Perm::Read),
    r("GET", "/sandboxes/{id}/ports", Perm::Read),
    r("POST", "/sandboxes/{id}/ports/{port}", Perm::Write),
    r("DELETE", "/sandboxes/{id}/ports/{port}", Perm::Write),
    r("GET", "/sandboxes/{id}/ports/{port}/tokens", Perm::Write),
    r("POST", "/sandboxes/{id}/ports/{port}/tokens", Perm::Write),
    r(
        "DELETE",
        "/sandboxes/{id}/ports/{port}/tokens/{token}",
        Perm::Write,
    ),
    r("GET", "/sandboxes/{id}/files", Perm::Read),
    r("POST", "/sandboxes/{id}/files", Perm::Write),
    r("PUT", "/sandboxes/{id}/files", Perm::Write),
    r("DELETE", "/sandboxes/{id}/files", Perm::Write),
    r("GET", "/sandboxes/{id}/files/list", Perm::Read),
    r("POST", "/sandboxes/{id}/files/move", Perm::Write),
    r("POST", "/sandboxes/{id}/files/chmod", Perm::Write),
    r("GET", "/sandboxes/{id}/files/stat", Perm::Read),
    r("GET", "/sandboxes/{id}/files/glob", Perm::Read),
    r("GET", "/sandboxes/{id}/archive", Perm::Read),
    r("PUT", "/sandboxes/{id}/archive", Perm::Write),
    r("GET", "/providers", Perm::Read),
    r("POST", "/providers/test", Perm::Admin),
    r("GET", "/providers/{name}", Perm::Read),
    r("GET", "/pool/status", Perm::Read),
    r("GET", "/snapshots", Perm::Read),
    r("GET", "/snapshots/{id}", Perm::Read),
    r("DELETE", "/snapshots/{id}", Perm::Write),
    r("GET", "/environments/specs", Perm::Read),
    r("POST", "/environments/specs", Perm::Write),
    r("GET", "/environments/specs/{id}", Perm::Read),
    r("DELETE", "/environments/specs/{id}", Perm::Write),
    r("PUT", "/environments/specs/{id}/context", Perm::Write),
    r("GET", "/environments/specs/{id}/suggestions", Perm::Read),
    r("GET", "/environments/builds", Perm::Read),
    r("POST", "/environments/builds", Perm::Write),
    r("GET", "/environments/builds/{id}", Perm::Read),
    r("POST", "/environments/builds/{id}/cancel", Perm::Write),
    r("GET", "/environments/builds/{id}/logs", Perm::Read),
    r("GET", "/environments/builds/{id}/spawn-config", Perm::Read),
    r("GET", "/environments/registry-connections", Perm::Read),
    r("POST", "/environments/registry-connections", Perm::Write),
    r(
        "DELETE",
        "/environments/registry-connections/{id}",
        Perm::Write,
    ),
    r("GET", "/volumes", Perm::Read),
    r("POST", "/volumes", Perm::Write),
    r("GET", "/volumes/{name}", Perm::Read),
    r("DELETE", "/volumes/{name}", Perm::Write),
    r("GET", "/volumes/{name}/archive", Perm::Read),
    r("PUT", "/volumes/{name}/archive", Perm::Write),
    r("GET", "/templates", Perm::Read),
    r("POST", "/templates", Perm::Shared),
    r("GET", "/templates/{name}", Perm::Read),
    r("PUT", "/templates/{name}", Perm::Shared),
    r("DELETE", "/templates/{name}", Perm::Shared),
    r("POST", "/templates/{name}/spawn", Perm::Write),
    r("GET", "/quotas", Perm::Read),
    r("GET", "/quotas/summary", Perm::Read),
    r("GET", "/quotas/{owner}", Perm::Read),
    r("PUT", "/quotas/{owner}", Perm::Admin),
    r("DELETE", "/quotas/{owner}", Perm::Admin),
    r("GET", "/quotas/{owner}/usage", Perm::Read),
    r("GET", "/events", Perm::Read),
    r("GET", "/metrics", Perm::Operate),
    r("GET", "/metrics/prometheus", Perm::Operate),
    r("GET", "/diagnostics", Perm::Admin),
    r("GET", "/system/stats", Perm::Operate),
    r("GET", "/admin/diagnostics", Perm::Admin),
    r("GET", "/admin/metrics", Perm::Admin),
    r("GET", "/admin/metrics/prometheus", Perm::Admin),
    r("GET", "/admin/providers", Perm::Admin),
    r("POST", "/admin/providers/test", Perm::Admin),
    r("GET", "/admin/providers/{name}", Perm::Admin),
    r("GET", "/admin/quotas", Perm::Admin),
    r("GET", "/admin/quotas/summary", Perm::Admin),
    r("GET", "/admin/quotas/{owner}", Perm::Admin),
    r("PUT", "/admin/quotas/{owner}", Perm::Admin),
    r("DELETE", "/admin/quotas/{owner}", Perm::Admin),
    r("GET", "/admin/quotas/{owner}/usage", Perm::Admin),
    r("GET", "/admin/audit", Perm::Admin),
    r("GET", "/admin/op-audit", Perm::Admin),
    r("GET", "/admin/tenants", Perm::Admin),
    r("POST", "/admin/tenants", Perm::Admin),
    r("GET", "/admin/tenants/{tenant}", Perm::Tenant),
    r("PUT", "/admin/tenants/{tenant}", Perm::Admin),
    r("DELETE", "/admin/tenants/{tenant}", Perm::Admin),
    r("GET", "/admin/tenants/{tenant}/members", Perm::Tenant),
    r(
        "PUT",
        "/admin/tenants/{tenant}/members/{user}",
        Perm::Tenant,
    ),
    r(
        "DELETE",
        "/admin/tenants/{tenant}/members/{user}",
        Perm::Tenant,
    ),
    r("GET", "/admin/tenants/{tenant}/audit", Perm::Tenant),
    r("GET", "/admin/tenants/{tenant}/policies", Perm::Tenant),
    r("POST", "/admin/tenants/{tenant}/policies", Perm::Tenant),
    r(
        "DELETE",
        "/admin/tenants/{tenant}/policies/{policy}",
        Perm::Tenant,
    ),
    r("GET", "/admin/policies", Perm::Admin),
    r("GET", "/workers", Perm::Read),
    r("GET", "/workers/{worker}", Perm::Read),
    r("GET", "/admin/workers", Perm::Admin),
    r("GET", "/admin/workers/{worker}", Perm::Admin),
    r("DELETE", "/admin/workers/{worker}", Perm::Admin),
    r("POST", "/admin/workers/{worker}/heartbeat", Perm::Admin),
    r(
        "POST",
        "/admin/workers/{worker}/leases/{resource}/renew",
        Perm::Admin,
    ),
    r("POST", "/admin/worker-tokens", Perm::Admin),
    r(
        "POST",
        "/worker/{worker}/heartbeat",
        Perm::Worker(stacyvm_cluster::token::Scope::Heartbeat),
    ),
    r(
        "POST",
        "/worker/{worker}/leases/{resource}/renew",
        Perm::Worker(stacyvm_cluster::token::Scope::Lease),
    ),
    r("POST", "/admin/policies", Perm::Admin),
    r("DELETE", "/admin/policies/{policy}", Perm::Admin),
];

/// The permission of `method route` (route = axum pattern under `/api/v1`).
/// The permission of every E2B API route (outside `/api/v1`, see
/// `crate::e2b`): the same scopes as their `/api/v1` counterparts.
pub const E2B_ROUTE_PERMISSIONS: &[RoutePerm] = &[
    r("POST", "/sandboxes", Perm::Write),
    r("POST", "/v2/sandboxes", Perm::Write),
    r("GET", "/sandboxes", Perm::Read),
    r("GET", "/v2/sandboxes", Perm::Read),
    r("GET", "/sandboxes/{id}", Perm::Read),
    r("DELETE", "/sandboxes/{id}", Perm::Write),
    r("POST", "/sandboxes/{id}/timeout", Perm::Write),
    r("POST", "/sandboxes/{id}/refreshes", Perm::Write),
    r("POST", "/sandboxes/{id}/connect", Perm::Write),
    r("POST", "/v2/sandboxes/{id}/connect", Perm::Write),
    r("POST", "/sandboxes/{id}/pause", Perm::Write),
    r("POST", "/sandboxes/{id}/resume", Perm::Write),
    r("GET", "/sandboxes/{id}/metrics", Perm::Read),
    r("PUT", "/sandboxes/{id}/network", Perm::Write),
];

/// The permission of an E2B API route.
pub fn e2b_permission(method: &Method, route: &str) -> Option<Perm> {
    E2B_ROUTE_PERMISSIONS
        .iter()
        .find(|p| p.method == method.as_str() && p.path == route)
        .map(|p| p.perm)
}

pub fn permission(method: &Method, route: &str) -> Option<Perm> {
    ROUTE_PERMISSIONS
        .iter()
        .find(|p| p.method == method.as_str() && p.path == route)
        .map(|p| p.perm)
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No authentication is configured: the server is open.
    Unauthenticated,
    ApiKey,
    AdminKey,
    Oidc,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub via: Via,
    /// `auth.api_key_acts_for_users` for API-key identities.
    pub api_key_acts_for_users: bool,
    /// OIDC `sub`; "" for keys.
    pub subject: String,
    pub email: String,
    /// Tenant from a verified claim; "" = none.
    pub tenant_id: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// The admin key (and an open server) may name the end user in
    /// `X-User-ID`; the API key when `auth.api_key_acts_for_users`; an
    /// OIDC user is always itself.
    pub fn may_act_for_others(&self) -> bool {
        match self.via {
            Via::Unauthenticated | Via::AdminKey => true,
            Via::ApiKey => self.api_key_acts_for_users,
            Via::Oidc => false,
        }
    }

    /// The credential that authenticated, as a stable name for rate
    /// limits and per-caller caps: `api-key`, `admin-key`, `oidc:<sub>`;
    /// "" on an open server (no credential at all).
    pub fn credential(&self) -> String {
        match self.via {
            Via::Unauthenticated => String::new(),
            Via::ApiKey => "api-key".into(),
            Via::AdminKey => "admin-key".into(),
            Via::Oidc => format!("oidc:{}", self.subject),
        }
    }

    /// Audit actor label when no `X-User-ID` is given.
    pub fn label(&self) -> String {
        match self.via {
            Via::Unauthenticated => "anonymous".into(),
            Via::ApiKey => "api-key".into(),
            Via::AdminKey => "admin-key".into(),
            Via::Oidc if !self.email.is_empty() => self.email.clone(),
            Via::Oidc => self.subject.clone(),
        }
    }
}

/// Why a request was not authenticated (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    BadKey,
    BadToken(String),
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthFailure::Missing => f.write_str(
                "authentication required: send X-API-Key, X-Admin-API-Key or Authorization: Bearer <JWT>",
            ),
            AuthFailure::BadKey => f.write_str("invalid API key"),
            AuthFailure::BadToken(reason) => write!(f, "invalid JWT: {reason}"),
        }
    }
}

type Hash = [u8; 32];

fn sha256(s: &str) -> Hash {
    Sha256::digest(s.as_bytes()).into()
}

/// A configured key: plain text, or `sha256:<64 hex>` (only the hash is
/// kept either way; comparison is on hashes, in constant time).
fn key_hash(configured: &str) -> Result<Option<Hash>, String> {
    let c = configured.trim();
    if c.is_empty() {
        return Ok(None);
    }
    if let Some(hex) = c.strip_prefix("sha256:") {
        let bytes = hex::decode(hex).map_err(|_| "key hash is not hex".to_string())?;
        let h: Hash = bytes
            .try_into()
            .map_err(|_| "key hash must be 64 hex digits (sha256)".to_string())?;
        return Ok(Some(h));
    }
    Ok(Some(sha256(c)))
}

fn hash_eq(presented: &str, want: Option<&Hash>) -> bool {
    match want {
        Some(w) => bool::from(sha256(presented).ct_eq(w)),
        None => false,
    }
}

/// Resolves credentials to an [`Identity`].
#[derive(Debug)]
pub struct Authenticator {
    api_key: Option<Hash>,
    admin_key: Option<Hash>,
    admin_fallback: bool,
    api_key_acts_for_users: bool,
    oidc: Option<Oidc>,
}

impl Authenticator {
    /// Refuses configurations that would leave the server open by mistake
    /// (S-8) or that name keys it cannot use.
    pub fn new(a: &AuthConfig) -> Result<Self, String> {
        let api_key = key_hash(a.api_key.expose()).map_err(|e| format!("auth.api_key: {e}"))?;
        let admin_key =
            key_hash(a.admin_api_key.expose()).map_err(|e| format!("auth.admin_api_key: {e}"))?;
        let oidc_configured = !a.oidc_issuer.is_empty()
            || !a.oidc_jwks_url.is_empty()
            || !a.oidc_public_key.is_empty();
        if a.oidc_enabled && a.oidc_jwks_url.is_empty() && a.oidc_public_key.is_empty() {
            return Err(
                "auth.oidc_enabled is true but neither auth.oidc_jwks_url nor auth.oidc_public_key is set".into(),
            );
        }
        if !a.oidc_client_id.trim().is_empty() && a.oidc_issuer.trim().is_empty() {
            return Err("auth.oidc_client_id (the dashboard's OIDC sign-in) needs auth.oidc_issuer: its discovery document names the sign-in endpoints, and ID tokens must come from it".into());
        }
        let redirect = &a.oidc_redirect_url;
        let http_url = redirect.starts_with("https://") || redirect.starts_with("http://");
        if !redirect.is_empty() && !http_url {
            return Err(format!(
                "auth.oidc_redirect_url {:?} is not an http(s) URL (this server's /ui/oidc/callback as browsers reach it)",
                a.oidc_redirect_url
            ));
        }
        let oidc = if oidc_configured {
            if a.oidc_jwks_url.is_empty() && a.oidc_public_key.is_empty() {
                return Err(
                    "auth.oidc_issuer is set but neither auth.oidc_jwks_url nor auth.oidc_public_key is".into(),
                );
            }
            Some(Oidc::new(a)?)
        } else {
            None
        };
        if a.enabled && api_key.is_none() && admin_key.is_none() && oidc.is_none() {
            return Err("auth.enabled is true but no auth.api_key, auth.admin_api_key or OIDC key source is configured".into());
        }
        Ok(Authenticator {
            api_key,
            admin_key,
            admin_fallback: a.admin_fallback_enabled,
            api_key_acts_for_users: a.api_key_acts_for_users,
            oidc,
        })
    }

    /// Whether any credential is configured; if not, the server is open.
    pub fn enabled(&self) -> bool {
        self.api_key.is_some() || self.admin_key.is_some() || self.oidc.is_some()
    }

    pub fn oidc(&self) -> Option<&Oidc> {
        self.oidc.as_ref()
    }

    pub fn oidc_mut(&mut self) -> Option<&mut Oidc> {
        self.oidc.as_mut()
    }

    /// Identity of a static key, if it matches one.
    pub fn key_identity(&self, presented: &str) -> Option<Identity> {
        let role_via = if hash_eq(presented, self.admin_key.as_ref()) {
            Some((Role::Admin, Via::AdminKey))
        } else if hash_eq(presented, self.api_key.as_ref()) {
            if self.admin_key.is_none() && self.admin_fallback {
                Some((Role::Admin, Via::AdminKey))
            } else {
                Some((Role::Api, Via::ApiKey))
            }
        } else {
            None
        };
        role_via.map(|(role, via)| Identity {
            role,
            via,
            api_key_acts_for_users: self.api_key_acts_for_users,
            subject: String::new(),
            email: String::new(),
            tenant_id: String::new(),
            groups: Vec::new(),
        })
    }

    /// The identity of a request from its headers (`X-Admin-API-Key`,
    /// `X-API-Key`, `Authorization: Bearer`).
    pub async fn authenticate(
        &self,
        admin_key: Option<&str>,
        api_key: Option<&str>,
        bearer: Option<&str>,
    ) -> Result<Identity, AuthFailure> {
        if !self.enabled() {
            return Ok(Identity {
                role: Role::Admin,
                via: Via::Unauthenticated,
                api_key_acts_for_users: true,
                subject: String::new(),
                email: String::new(),
                tenant_id: String::new(),
                groups: Vec::new(),
            });
        }
        if let Some(tok) = bearer.filter(|t| !t.starts_with("stacyvm-worker-v1.")) {
            return match &self.oidc {
                Some(o) => o.verify(tok).await.map_err(AuthFailure::BadToken),
                None => Err(AuthFailure::BadToken(
                    "bearer tokens are not accepted: OIDC is not configured".into(),
                )),
            };
        }
        let presented: Vec<&str> = [admin_key, api_key].into_iter().flatten().collect();
        if presented.is_empty() {
            return Err(AuthFailure::Missing);
        }
        for p in presented {
            if let Some(id) = self.key_identity(p) {
                return Ok(id);
            }
        }
        Err(AuthFailure::BadKey)
    }
}

/// Key family of a JWS algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

fn kind_of(alg: Algorithm) -> Option<KeyKind> {
    match alg {
        Algorithm::RS256 => Some(KeyKind::Rsa),
        Algorithm::ES256 => Some(KeyKind::P256),
        Algorithm::ES384 => Some(KeyKind::P384),
        _ => None,
    }
}

#[derive(Clone)]
struct Key {
    kind: KeyKind,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?})", self.kind)
    }
}

#[derive(Debug, Default)]
struct JwksCache {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Bumped when a fetch ends (either way).
    generation: u64,
}

/// OIDC bearer verification: RS256, ES256, ES384 with JOSE signatures;
/// `exp` required, `nbf`/`iat` checked with 30 s skew; issuer and audience
/// when configured; JWKS cached 5 min and refetched on an unknown `kid` at
/// most once per `refetch_interval`.
#[derive(Debug)]
pub struct Oidc {
    issuer: String,
    audience: String,
    groups_claim: String,
    tenant_claim: String,
    admin_groups: Vec<String>,
    operator_groups: Vec<String>,
    viewer_groups: Vec<String>,
    static_key: Option<Key>,
    jwks_url: String,
    http: reqwest::Client,
    /// Never held across an await: verifications with cached keys never
    /// wait for a fetch (F-18).
    cache: parking_lot::Mutex<JwksCache>,
    /// Single-flight: one JWKS fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    cache_ttl: Duration,
    refetch_interval: Duration,
}

const LEEWAY_SECS: u64 = 30;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

fn static_key(pem: &str) -> Result<Key, String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(Key {
            kind: KeyKind::Rsa,
            key: k,
        });
    }
    // The EC curve is not recorded by the PEM parser; infer it from the
    // DER length of the SubjectPublicKeyInfo (P-256: 91 bytes, P-384: 120).
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|_| "auth.oidc_public_key is not PEM".to_string())?;
    let kind = match der.len() {
        91 => KeyKind::P256,
        120 => KeyKind::P384,
        _ => {
            return Err(
                "auth.oidc_public_key must be an RSA, P-256 or P-384 public key (PEM)".into(),
            )
        }
    };
    let key = DecodingKey::from_ec_pem(pem.as_bytes())
        .map_err(|e| format!("auth.oidc_public_key: {e}"))?;
    Ok(Key { kind, key })
}

impl Oidc {
    fn new(a: &AuthConfig) -> Result<Self, String> {
        let static_key = if a.oidc_public_key.is_empty() {
            None
        } else {
            Some(static_key(&a.oidc_public_key)?)
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("building the JWKS client: {e}"))?;
        Ok(Oidc {
            issuer: a.oidc_issuer.clone(),
            audience: a.oidc_audience.clone(),
            groups_claim: if a.oidc_groups_claim.is_empty() {
                "groups".into()
            } else {
                a.oidc_groups_claim.clone()
            },
            tenant_claim: a.oidc_tenant_claim.clone(),
            admin_groups: a.oidc_admin_groups.clone(),
            operator_groups: a.oidc_operator_groups.clone(),
            viewer_groups: a.oidc_viewer_groups.clone(),
            static_key,
            jwks_url: a.oidc_jwks_url.clone(),
            http,
            cache: parking_lot::Mutex::new(JwksCache::default()),
            fetching: tokio::sync::Mutex::new(()),
            cache_ttl: Duration::from_secs(300),
            refetch_interval: Duration::from_secs(10),
        })
    }

    /// Shortens the minimum interval between JWKS refetches (tests).
    pub fn set_refetch_interval(&mut self, d: Duration) {
        self.refetch_interval = d;
    }

    async fn fetch_jwks(&self) -> Result<HashMap<String, Key>, String> {
        let mut resp = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .map_err(|e| format!("fetching JWKS: {e}"))?;
        // Redirects are not followed (a 3xx is an error like any other).
        if !resp.status().is_success() {
            return Err(format!("fetching JWKS: HTTP {}", resp.status().as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("fetching JWKS: larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("fetching JWKS: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("fetching JWKS: larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("parsing JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kind = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyKind::Rsa,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => KeyKind::P256,
                    EllipticCurve::P384 => KeyKind::P384,
                    _ => continue,
                },
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.insert(kid, Key { kind, key });
        }
        Ok(keys)
    }

    /// The key for `kid`, refetching the JWKS when the cache is stale or
    /// the kid is unknown (rate-limited).
    async fn key_for(&self, kid: &str) -> Result<Key, String> {
        if let Some(k) = &self.static_key {
            return Ok(k.clone());
        }
        let (cached, seen_generation) = {
            let c = self.cache.lock();
            let fresh = c.fetched.is_some_and(|t| t.elapsed() < self.cache_ttl);
            let cached = c.keys.get(kid).cloned();
            if fresh {
                if let Some(k) = cached {
                    return Ok(k);
                }
            }
            (cached, c.generation)
        };
        // One fetch at a time. A stale but known key is served while
        // another request refreshes the set.
        let _flight = match self.fetching.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(k) = cached {
                    return Ok(k);
                }
                self.fetching.lock().await
            }
        };
        {
            let mut c = self.cache.lock();
            // A fetch finished while this request waited: use its result.
            if c.generation != seen_generation {
                return c
                    .keys
                    .get(kid)
                    .cloned()
                    .ok_or_else(|| format!("unknown key id {kid:?} (JWKS was just refetched)"));
            }
            // At most one fetch per refetch interval, whether the cache is
            // stale or the kid unknown, so a flood of tokens (or an IdP
            // outage) cannot turn into a flood of JWKS requests.
            let may_fetch = c
                .last_attempt
                .is_none_or(|t| t.elapsed() >= self.refetch_interval);
            if !may_fetch {
                if let Some(k) = c.keys.get(kid) {
                    return Ok(k.clone());
                }
                return Err(format!(
                    "unknown key id {kid:?} (JWKS was refetched less than {}s ago)",
                    self.refetch_interval.as_secs()
                ));
            }
            c.last_attempt = Some(Instant::now());
        }
        let fetched = self.fetch_jwks().await;
        let mut c = self.cache.lock();
        c.generation += 1;
        c.keys = fetched?;
        c.fetched = Some(Instant::now());
        c.keys
            .get(kid)
            .cloned()
            .ok_or_else(|| format!("unknown key id {kid:?}"))
    }

    /// Verifies a compact JWS and maps it to an identity.
    pub async fn verify(&self, token: &str) -> Result<Identity, String> {
        self.verify_for(token, &self.audience)
            .await
            .map(|(ident, _)| ident)
    }

    /// The issuer tokens must name (empty: any).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies a token whose audience must include `audience` (none
    /// checked when empty): the identity and the token's claims.
    pub async fn verify_for(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(Identity, Value), String> {
        let header_alg = raw_alg(token)?;
        let alg = match header_alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            other => {
                return Err(format!(
                    "algorithm {other:?} is not accepted (allowed: RS256, ES256, ES384)"
                ))
            }
        };
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed header: {e}"))?;
        let kid = header.kid.unwrap_or_default();
        let key = self.key_for(&kid).await?;
        if kind_of(alg) != Some(key.kind) {
            return Err(format!(
                "algorithm {header_alg} does not match the {:?} key {kid:?}",
                key.kind
            ));
        }
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        if self.issuer.is_empty() {
            v.iss = None;
        } else {
            v.set_issuer(&[&self.issuer]);
        }
        if audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&[audience]);
        }
        let data = jsonwebtoken::decode::<Value>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => "token has expired".to_string(),
                K::ImmatureSignature => "token is not valid yet (nbf)".to_string(),
                K::InvalidAudience => format!("audience does not include {audience:?}"),
                K::InvalidIssuer => format!("issuer is not {:?}", self.issuer),
                K::InvalidSignature => "signature verification failed".to_string(),
                K::MissingRequiredClaim(c) => format!("claim {c:?} is required"),
                _ => format!("token rejected: {e}"),
            }
        })?;
        let claims = data.claims;
        let now = chrono::Utc::now().timestamp();
        if let Some(iat) = claims.get("iat").and_then(Value::as_i64) {
            if iat > now + i64::try_from(LEEWAY_SECS).unwrap_or(30) {
                return Err("token is issued in the future (iat)".into());
            }
        }
        let s = |k: &str| {
            claims
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let subject = s("sub");
        if subject.is_empty() {
            return Err("claim \"sub\" is required".into());
        }
        let groups: Vec<String> = match claims.get(&self.groups_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(g)) => vec![g.clone()],
            _ => Vec::new(),
        };
        let in_any = |list: &[String]| groups.iter().any(|g| list.contains(g));
        let role = if in_any(&self.admin_groups) {
            Role::Admin
        } else if in_any(&self.operator_groups) {
            Role::Operator
        } else if in_any(&self.viewer_groups) {
            Role::Viewer
        } else {
            Role::Api
        };
        let tenant_id = if self.tenant_claim.is_empty() {
            String::new()
        } else {
            s(&self.tenant_claim)
        };
        let ident = Identity {
            role,
            via: Via::Oidc,
            api_key_acts_for_users: false,
            subject,
            email: s("email"),
            tenant_id,
            groups,
        };
        Ok((ident, claims))
    }
}

/// The `alg` of a compact JWS header, read before any key is chosen so
/// `none` and HMAC algorithms are refused by name.
fn raw_alg(token: &str) -> Result<String, String> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("token is not a compact JWS (three dot-separated parts)".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| "header is not base64url".to_string())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| "header is not JSON".to_string())?;
    v.get("alg")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "header has no alg".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_roles() {
        assert!(Perm::Read.allows(Role::Viewer));
        assert!(!Perm::Write.allows(Role::Viewer));
        assert!(Perm::Write.allows(Role::Api));
        assert!(!Perm::Operate.allows(Role::Api));
        assert!(Perm::Operate.allows(Role::TenantAdmin));
        assert!(!Perm::Shared.allows(Role::TenantAdmin));
        assert!(Perm::Shared.allows(Role::Operator));
        assert!(Perm::Shared.allows(Role::Admin));
        // Tenant admins cannot change the templates every tenant uses.
        for m in [Method::POST, Method::PUT, Method::DELETE] {
            let path = if m == Method::POST {
                "/templates"
            } else {
                "/templates/{name}"
            };
            let p = permission(&m, path).expect("entry");
            assert!(!p.allows(Role::TenantAdmin), "{m} {path}");
            assert!(p.allows(Role::Operator), "{m} {path}");
        }
        assert!(!Perm::Admin.allows(Role::Operator));
        assert!(!Perm::Tenant.allows(Role::Operator));
        assert!(Perm::Tenant.allows(Role::TenantAdmin));
        assert!(Perm::Tenant.allows(Role::Admin));
        assert!(!Perm::Admin.allows(Role::TenantAdmin));
        assert!(Perm::Admin.allows(Role::Admin));
    }

    #[test]
    fn key_hashes_are_accepted_and_compared() {
        let h = hex::encode(sha256("k1"));
        let want = key_hash(&format!("sha256:{h}"))
            .expect("hash")
            .expect("some");
        assert!(hash_eq("k1", Some(&want)));
        assert!(!hash_eq("k2", Some(&want)));
        assert!(key_hash("sha256:zz").is_err());
        assert!(key_hash("sha256:abcd").is_err());
        assert_eq!(key_hash(" ").expect("empty"), None);
    }

    #[test]
    fn raw_alg_reads_none_and_rejects_garbage() {
        assert_eq!(raw_alg("eyJhbGciOiJub25lIn0.e30.").expect("alg"), "none");
        assert!(raw_alg("a.b").is_err());
        assert!(raw_alg("!!.b.c").is_err());
    }

    #[test]
    fn routes_are_unique() {
        for (i, a) in ROUTE_PERMISSIONS.iter().enumerate() {
            for b in &ROUTE_PERMISSIONS[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "duplicate {} {}",
                    a.method,
                    a.path
                );
            }
        }
    }
}
