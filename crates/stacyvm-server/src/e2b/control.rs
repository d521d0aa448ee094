//! E2B's control plane: create, connect, get, list, kill, timeouts,
//! pause/resume and metrics, translated onto the manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stacyvm_api::SpawnRequest;
use stacyvm_core::manager::Caller;
use stacyvm_core::store::SandboxRecord;
use stacyvm_core::{Error, ErrorKind};

use super::{error, ENVD_VERSION, META_PREFIX};
use crate::json::{decode, json_response};
use crate::routes::Who;
use crate::AppState;

/// `clientID` of every sandbox (the SDKs require the field, nothing reads it).
pub const CLIENT_ID: &str = "stacyvm";

const META_TEMPLATE: &str = "e2b.template";
const META_IDEMPOTENCY: &str = "e2b.idempotency_key";
/// The create's `envVars`, as a JSON object.
pub(crate) const META_ENVS: &str = "e2b.envs";
/// Most bytes of `envVars` (as JSON): one metadata value.
const MAX_ENVS_BYTES: usize = 4096;
/// E2B's default sandbox lifetime when a create names none.
const DEFAULT_TIMEOUT_SECS: i64 = 300;
/// The template `Sandbox.create()` asks for when given none.
const BASE_TEMPLATE: &str = "base";

/// A failed E2B call, answered in E2B's error shape.
pub struct E2bFailure {
    status: StatusCode,
    message: String,
}

impl IntoResponse for E2bFailure {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

impl From<Error> for E2bFailure {
    fn from(e: Error) -> Self {
        // The one error table (and its rule: a 5xx says only its kind).
        let api = crate::error::ApiError::from(e);
        fail(api.status, api.message)
    }
}

fn fail(status: StatusCode, message: impl Into<String>) -> E2bFailure {
    E2bFailure {
        status,
        message: message.into(),
    }
}

type E2bResult<T> = Result<T, E2bFailure>;

/// The body of `POST /sandboxes` and `POST /v2/sandboxes`. Fields StacyVM
/// has no counterpart for (`autoPause`, `secure`, `mcp`, …) are accepted
/// and ignored, as unknown fields are.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    /// Pause instead of kill when the timeout runs out.
    auto_pause: Option<bool>,
    /// `{"enabled": false}` (the SDKs' `lifecycle={"auto_resume": False}`;
    /// a bare boolean is accepted too): a paused sandbox stays paused
    /// until connect/resume. Absent: StacyVM's default, traffic resumes it.
    auto_resume: Option<serde_json::Value>,
    /// Egress rules (snake case on the wire, as the SDKs send them).
    network: Option<E2bNetwork>,
    /// `false` is `deny_out: ["0.0.0.0/0"]`.
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
}

/// E2B's `SandboxNetworkConfig` / `SandboxNetworkUpdateConfig`. Inbound
/// settings (`allow_public_traffic`, `mask_request_host`) are accepted and
/// ignored (previews have their own exposure API); request transforms and
/// a SOCKS5 egress proxy are refused, as E2B's open-source runtime does.
///
/// The SDKs send camel case (`allowOut`, `denyOut`, `dnsServers`,
/// `egressProxy`) but `allow_internet_access` in snake case; either
/// spelling is accepted.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct E2bNetwork {
    #[serde(alias = "allow_out")]
    allow_out: Vec<String>,
    #[serde(alias = "deny_out")]
    deny_out: Vec<String>,
    #[serde(alias = "dns_servers")]
    dns_servers: Option<Vec<String>>,
    rules: Option<serde_json::Value>,
    #[serde(alias = "egress_proxy")]
    egress_proxy: Option<serde_json::Value>,
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    allow_internet_access: Option<bool>,
}

/// The policy of an E2B network config (`None`: none given).
fn e2b_policy(
    network: Option<E2bNetwork>,
    allow_internet_access: Option<bool>,
) -> E2bResult<Option<stacyvm_api::NetworkPolicy>> {
    let n = network.unwrap_or_default();
    if n.rules
        .as_ref()
        .is_some_and(|r| !r.is_null() && r != &serde_json::json!({}))
    {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "network.rules (request transforms) are not supported by this server",
        ));
    }
    if n.egress_proxy.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "network.egress_proxy is not supported by this server",
        ));
    }
    let deny_all = allow_internet_access.or(n.allow_internet_access) == Some(false);
    let p = stacyvm_api::NetworkPolicy {
        deny_all,
        allow_out: n.allow_out,
        deny_out: n.deny_out,
        dns_servers: n.dns_servers,
    };
    Ok((p != stacyvm_api::NetworkPolicy::default()).then_some(p))
}

/// `PUT /sandboxes/{id}/network`: replaces the egress rules; 204.
pub async fn update_network(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let n: E2bNetwork = body_or_default(&body)?;
    live_in(&st, &id, &who, true).await?;
    let policy = e2b_policy(Some(n), None)?;
    st.manager.set_network(&id, policy, &who).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `Sandbox` of E2B's API (create and connect).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct E2bSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    /// The sandbox's envd token (`X-Access-Token` on every envd call).
    /// Only create and connect, which need `sandboxes:write`, hand it out:
    /// a reader must not gain exec through it.
    envd_access_token: String,
    /// Null: the SDK then uses `E2B_DOMAIN` / `E2B_SANDBOX_URL`.
    domain: Option<String>,
}

/// `SandboxDetail` and `ListedSandbox` of E2B's API.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct E2bDetail {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    started_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    envd_version: &'static str,
    cpu_count: i64,
    #[serde(rename = "memoryMB")]
    memory_mb: i64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: i64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
    domain: Option<String>,
}

fn template_of(r: &SandboxRecord) -> String {
    r.metadata
        .get(META_TEMPLATE)
        .cloned()
        .unwrap_or_else(|| r.image.clone())
}

/// The caller's metadata, without the keys StacyVM keeps for this layer.
fn public_metadata(m: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    m.iter()
        .filter(|(k, _)| {
            !k.starts_with(META_PREFIX) && !k.starts_with(stacyvm_core::manager::RESERVED_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `server.e2b_domain`, when host routing is on.
fn domain_of(st: &AppState) -> Option<String> {
    Some(st.cfg.server.e2b_domain.trim().to_string()).filter(|d| !d.is_empty())
}

fn sandbox_of(st: &AppState, r: &SandboxRecord) -> E2bSandbox {
    E2bSandbox {
        template_id: template_of(r),
        sandbox_id: r.id.clone(),
        client_id: CLIENT_ID,
        envd_version: ENVD_VERSION,
        envd_access_token: st.e2b_keys.token(r),
        domain: domain_of(st),
    }
}

fn detail_of(r: &SandboxRecord) -> E2bDetail {
    E2bDetail {
        template_id: template_of(r),
        sandbox_id: r.id.clone(),
        client_id: CLIENT_ID,
        started_at: r.created_at,
        end_at: r.expires_at,
        envd_version: ENVD_VERSION,
        cpu_count: r.vcpus.max(1),
        memory_mb: r.memory_mb,
        disk_size_mb: 0,
        state: if r.state == stacyvm_api::state::PAUSED {
            "paused"
        } else {
            "running"
        },
        metadata: public_metadata(&r.metadata),
        domain: None,
    }
}

/// A live sandbox of the caller, or E2B's 404.
async fn live(st: &AppState, id: &str, who: &Caller) -> E2bResult<Arc<SandboxRecord>> {
    live_in(st, id, who, false).await
}

/// A running (or, with `paused`, paused) sandbox of the caller, or E2B's 404.
async fn live_in(
    st: &AppState,
    id: &str,
    who: &Caller,
    paused: bool,
) -> E2bResult<Arc<SandboxRecord>> {
    match st.manager.get(id, who).await {
        Ok(r) if r.state == "running" => Ok(r),
        Ok(r) if paused && r.state == stacyvm_api::state::PAUSED => Ok(r),
        Ok(_) => Err(fail(
            StatusCode::NOT_FOUND,
            format!("sandbox {id:?} is not running"),
        )),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed
            ) =>
        {
            Err(fail(
                StatusCode::NOT_FOUND,
                format!("sandbox {id:?} not found"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

fn timeout_secs(v: Option<i64>, what: &str) -> E2bResult<i64> {
    match v {
        None => Ok(DEFAULT_TIMEOUT_SECS),
        Some(s) if s > 0 => Ok(s),
        Some(s) => Err(fail(
            StatusCode::BAD_REQUEST,
            format!("{what} must be a positive number of seconds, got {s}"),
        )),
    }
}

/// A body that may be empty (`{}` is assumed) or JSON.
fn body_or_default<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> E2bResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    decode(bytes).map_err(|e| fail(StatusCode::BAD_REQUEST, e.message))
}

/// Creates in flight per (owner, idempotency key): a retried create waits
/// for the first and answers with its sandbox.
static IN_FLIGHT: LazyLock<parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

/// A create's hold on its (owner, key) slot: the slot's entry leaves the
/// map with the last create that used it, whatever the outcome.
struct InFlight {
    slot: String,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = IN_FLIGHT.lock();
        // Ours plus the map's: nobody else waits on this slot.
        if map
            .get(&self.slot)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            map.remove(&self.slot);
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> E2bResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v.to_str().unwrap_or_default();
    let ok = !k.is_empty()
        && k.len() <= 255
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key must be 1 to 255 characters of a-z, 0-9 and -",
        ));
    }
    Ok(Some(k.to_string()))
}

/// `POST /sandboxes`, `POST /v2/sandboxes`: 201 with the new sandbox,
/// answered once its agent answers (the SDK calls envd right away).
pub async fn create(
    State(st): State<AppState>,
    Who(who): Who,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let req: NewSandbox = body_or_default(&body)?;
    let key = idempotency_key(&headers)?;
    let template = req
        .template_id
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or(BASE_TEMPLATE)
        .to_string();
    let timeout = timeout_secs(req.timeout, "timeout")?;
    let mut metadata = req.metadata.unwrap_or_default();
    if let Some(k) = metadata.keys().find(|k| k.starts_with(META_PREFIX)) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("metadata key {k:?}: the prefix {META_PREFIX:?} is reserved"),
        ));
    }
    if let Some(envs) = req.env_vars.filter(|e| !e.is_empty()) {
        // Kept with the sandbox; envd gives them to every process it starts.
        let text = serde_json::to_string(&envs).unwrap_or_default();
        if text.len() > MAX_ENVS_BYTES {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                format!(
                    "envVars take {} bytes as JSON; the limit is {MAX_ENVS_BYTES}",
                    text.len()
                ),
            ));
        }
        metadata.insert(META_ENVS.into(), text);
    }
    metadata.insert(META_TEMPLATE.into(), template.clone());
    let owner = who.owner_for("")?;
    // One create per (owner, key) at a time; a retry finds the first's sandbox.
    let _serial = match &key {
        Some(k) => {
            metadata.insert(META_IDEMPOTENCY.into(), k.clone());
            let slot = format!("{owner}\0{k}");
            let lock = IN_FLIGHT.lock().entry(slot.clone()).or_default().clone();
            let guard = InFlight {
                slot,
                _held: lock.lock_owned().await,
            };
            let earlier = st.manager.list(&who).await?.into_iter().find(|r| {
                r.owner_id == owner
                    && r.state == "running"
                    && r.metadata.get(META_IDEMPOTENCY) == Some(k)
            });
            if let Some(r) = earlier {
                return Ok(json_response(StatusCode::CREATED, &sandbox_of(&st, &r)));
            }
            Some(guard)
        }
        None => None,
    };
    let mut spawn = SpawnRequest {
        ttl: format!("{timeout}s"),
        metadata: Some(metadata),
        on_timeout: if req.auto_pause == Some(true) {
            stacyvm_core::manager::on_timeout::PAUSE.into()
        } else {
            String::new()
        },
        network: e2b_policy(req.network, req.allow_internet_access)?,
        auto_resume: req
            .auto_resume
            .as_ref()
            .and_then(|v| v.as_bool().or_else(|| v["enabled"].as_bool()))
            .filter(|on| !on),
        ..Default::default()
    };
    if template != BASE_TEMPLATE {
        match st.manager.get_template(&template).await {
            Ok(_) => spawn.template = template.clone(),
            Err(e) if e.kind() == ErrorKind::NotFound => spawn.image = template.clone(),
            Err(e) => return Err(e.into()),
        }
    }
    let sb = st.manager.spawn(spawn, &who).await.map_err(|e| {
        if e.kind() == ErrorKind::InvalidInput && template != BASE_TEMPLATE {
            fail(
                StatusCode::BAD_REQUEST,
                format!("template {template:?}: {e}"),
            )
        } else {
            e.into()
        }
    })?;
    let rec = st.manager.get(&sb.id, &who).await?;
    Ok(json_response(StatusCode::CREATED, &sandbox_of(&st, &rec)))
}

/// `GET /sandboxes/{id}`.
pub async fn detail(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> E2bResult<Response> {
    let r = live_in(&st, &id, &who, true).await?;
    Ok(json_response(StatusCode::OK, &detail_of(&r)))
}

/// `DELETE /sandboxes/{id}`: 204, or 404 for a sandbox the caller does
/// not have (the SDK's `kill()` then returns false).
pub async fn kill(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> E2bResult<Response> {
    live_in(&st, &id, &who, true).await?;
    st.manager.destroy(&id, &who).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TimeoutBody {
    timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/timeout`: the sandbox now ends `timeout` seconds
/// from now (shorter or longer), within the caller's max TTL.
pub async fn set_timeout(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let b: TimeoutBody = body_or_default(&body)?;
    let Some(secs) = b.timeout else {
        return Err(fail(StatusCode::BAD_REQUEST, "timeout is required"));
    };
    let secs = timeout_secs(Some(secs), "timeout")?;
    live(&st, &id, &who).await?;
    st.manager.extend(&id, &format!("{secs}s"), &who).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Moves the end of `r` to `secs` from now if that is later.
async fn extend_only(st: &AppState, r: &SandboxRecord, secs: i64, who: &Caller) -> E2bResult<()> {
    if Utc::now() + chrono::Duration::seconds(secs) > r.expires_at {
        st.manager.extend(&r.id, &format!("{secs}s"), who).await?;
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RefreshBody {
    duration: Option<i64>,
}

/// `POST /sandboxes/{id}/refreshes`: keeps the sandbox alive at least
/// `duration` seconds (default E2B's 300) from now.
pub async fn refresh(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let b: RefreshBody = body_or_default(&body)?;
    let secs = timeout_secs(b.duration, "duration")?;
    let r = live(&st, &id, &who).await?;
    extend_only(&st, &r, secs, &who).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/connect` and `/v2/…`: 200 with the sandbox; its
/// end moves to `timeout` from now only if that is later. (201, "was
/// resumed", needs pause.)
pub async fn connect(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let b: TimeoutBody = body_or_default(&body)?;
    let r = live_in(&st, &id, &who, true).await?;
    // A paused sandbox is resumed: 201 says so.
    let (status, r) = if r.state == stacyvm_api::state::PAUSED {
        resume_with(&st, &id, b.timeout, &who).await?;
        (StatusCode::CREATED, live(&st, &id, &who).await?)
    } else {
        (StatusCode::OK, r)
    };
    if let Some(secs) = b.timeout {
        extend_only(&st, &r, timeout_secs(Some(secs), "timeout")?, &who).await?;
    }
    Ok(json_response(status, &sandbox_of(&st, &r)))
}

/// `POST /sandboxes/{id}/pause`: 204; 409 when it is already paused (the
/// SDK returns `False`); 501 in E2B's shape where the provider cannot.
pub async fn pause(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> E2bResult<Response> {
    let r = live_in(&st, &id, &who, true).await?;
    if r.state == stacyvm_api::state::PAUSED {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is already paused"),
        ));
    }
    match st.manager.pause(&id, &who).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) if e.kind() == ErrorKind::Unsupported => Err(fail(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "pause is not supported by the {} provider (see GET /api/v1/providers)",
                r.provider
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

/// `POST /sandboxes/{id}/resume` (older SDKs): 201 with the sandbox; a
/// running sandbox is a conflict.
pub async fn resume(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> E2bResult<Response> {
    let b: TimeoutBody = body_or_default(&body)?;
    let r = live_in(&st, &id, &who, true).await?;
    if r.state != stacyvm_api::state::PAUSED {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is not paused"),
        ));
    }
    resume_with(&st, &id, b.timeout, &who).await?;
    let r = live(&st, &id, &who).await?;
    Ok(json_response(StatusCode::CREATED, &sandbox_of(&st, &r)))
}

/// Resumes a paused sandbox; `timeout` (seconds), when given, is its new
/// time to live.
async fn resume_with(
    st: &AppState,
    id: &str,
    timeout: Option<i64>,
    who: &stacyvm_core::manager::Caller,
) -> E2bResult<()> {
    let ttl = timeout
        .map(|s| timeout_secs(Some(s), "timeout"))
        .transpose()?
        .map(|s| format!("{s}s"));
    st.manager.resume(id, ttl.as_deref(), who).await?;
    Ok(())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Metric {
    timestamp: DateTime<Utc>,
    timestamp_unix: i64,
    cpu_count: i64,
    cpu_used_pct: f64,
    mem_used: u64,
    mem_total: u64,
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

/// `GET /sandboxes/{id}/metrics`: one sample, now.
pub async fn metrics(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> E2bResult<Response> {
    let r = live(&st, &id, &who).await?;
    let stats = st.manager.stats(&id, &who).await?;
    let now = Utc::now();
    let sample = stats.map(|s| Metric {
        timestamp: now,
        timestamp_unix: now.timestamp(),
        cpu_count: r.vcpus.max(1),
        cpu_used_pct: s.cpu_pct,
        mem_used: s.mem_bytes,
        mem_total: s.mem_limit_bytes,
        mem_cache: 0,
        disk_used: 0,
        disk_total: 0,
    });
    Ok(json_response(
        StatusCode::OK,
        &sample.into_iter().collect::<Vec<_>>(),
    ))
}

/// Query of the list routes.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ListQuery {
    /// `k=v&k2=v2`, each key and value percent-encoded.
    metadata: Option<String>,
    /// Comma-separated: `running`, `paused`.
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
}

/// Most sandboxes one page returns (E2B's own cap).
const MAX_PAGE: usize = 100;

/// `GET /sandboxes` (older SDKs): every match, no pagination.
pub async fn list_v1(
    State(st): State<AppState>,
    Who(who): Who,
    Query(q): Query<ListQuery>,
) -> E2bResult<Response> {
    let (page, _) = select(&st, &who, &q, false).await?;
    Ok(json_response(StatusCode::OK, &page))
}

/// `GET /v2/sandboxes`: a page, and `X-Next-Token` when there is more.
pub async fn list_v2(
    State(st): State<AppState>,
    Who(who): Who,
    Query(q): Query<ListQuery>,
) -> E2bResult<Response> {
    let (page, next) = select(&st, &who, &q, true).await?;
    let mut resp = json_response(StatusCode::OK, &page);
    if let Some(t) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", t);
    }
    Ok(resp)
}

fn parse_metadata_filter(s: &str) -> E2bResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(s.as_bytes()) {
        if k.is_empty() {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                "metadata filter: an empty key",
            ));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// The page token: the (start time, id) of the last sandbox returned.
fn token_of(r: &SandboxRecord) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}.{}",
        r.created_at.timestamp_nanos_opt().unwrap_or_default(),
        r.id
    ))
}

fn parse_token(t: &str) -> E2bResult<(i64, String)> {
    use base64::Engine;
    let bad = || {
        fail(
            StatusCode::BAD_REQUEST,
            "nextToken is not a token this server issued",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (ts, id) = raw.split_once('.').ok_or_else(bad)?;
    Ok((ts.parse().map_err(|_| bad())?, id.to_string()))
}

async fn select(
    st: &AppState,
    who: &Caller,
    q: &ListQuery,
    paged: bool,
) -> E2bResult<(Vec<E2bDetail>, Option<String>)> {
    let filters = match &q.metadata {
        Some(m) => parse_metadata_filter(m)?,
        None => Vec::new(),
    };
    let states: Vec<&str> = q
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if let Some(bad) = states.iter().find(|s| !matches!(**s, "running" | "paused")) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("state {bad:?}: expected running or paused"),
        ));
    }
    let desc = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                format!("order {o:?}: expected asc or desc"),
            ))
        }
    };
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if paged && !(1..=MAX_PAGE).contains(&limit) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let after = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(parse_token(t)?),
        None => None,
    };
    let wants_running = states.is_empty() || states.contains(&"running");
    let wants_paused = states.is_empty() || states.contains(&"paused");
    let mut recs: Vec<SandboxRecord> = st.manager.list(who).await?;
    recs.retain(|r| {
        ((wants_running && r.state == "running")
            || (wants_paused && r.state == stacyvm_api::state::PAUSED))
            && filters
                .iter()
                .all(|(k, v)| !k.starts_with(META_PREFIX) && r.metadata.get(k) == Some(v))
    });
    let key = |r: &SandboxRecord| {
        (
            r.created_at.timestamp_nanos_opt().unwrap_or_default(),
            r.id.clone(),
        )
    };
    recs.sort_by_key(key);
    if desc {
        recs.reverse();
    }
    if let Some(cursor) = &after {
        recs.retain(|r| {
            if desc {
                key(r) < *cursor
            } else {
                key(r) > *cursor
            }
        });
    }
    let more = paged && recs.len() > limit;
    if paged {
        recs.truncate(limit);
    }
    let next = more.then(|| recs.last().map(token_of)).flatten();
    Ok((recs.iter().map(detail_of).collect(), next))
}
