//! `/templates`: CRUD and spawn-from-template, accepting the SDK aliases.

use axum::extract::{Path, State};
use chrono::Utc;
use stacyvm_api::{
    duration, GoDuration, Sandbox, SpawnRequest, StatusResponse, Template, TemplateInput,
    TemplateSpawnRequest,
};
use stacyvm_core::store::TemplateRecord;
use stacyvm_core::Error;

use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json, OptBody};
use crate::AppState;

pub fn to_api(t: &TemplateRecord) -> Template {
    Template {
        name: t.name.clone(),
        version: t.version,
        image: t.image.clone(),
        description: t.description.clone(),
        setup: t.setup.clone(),
        allowed_hosts: t.allowed_hosts.clone(),
        memory_mb: t.memory_mb,
        cpu_cores: t.cpu_cores,
        ttl_seconds: t.ttl_seconds,
        env: t.env.clone(),
        secrets: t.secrets.clone(),
        pool_size: t.pool_size,
        vcpus: t.cpu_cores,
        ttl: GoDuration::from_secs(t.ttl_seconds),
        provider: t.provider.clone(),
        metadata: t.metadata.clone(),
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

/// Parses `ttl` given as a Go duration string or integer seconds.
fn ttl_seconds(v: &Option<serde_json::Value>) -> stacyvm_core::Result<i64> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .filter(|s| *s >= 0)
            .ok_or_else(|| Error::invalid("ttl must be a non-negative number of seconds")),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(serde_json::Value::String(s)) => {
            let n = duration::parse(s.trim())
                .map_err(|e| Error::invalid(format!("invalid ttl: {e}")))?;
            if n < 0 {
                return Err(Error::invalid("ttl must not be negative"));
            }
            Ok((n + 999_999_999) / 1_000_000_000)
        }
        Some(_) => Err(Error::invalid(
            "ttl must be a duration string like 30m or a number of seconds",
        )),
    }
}

/// Builds a record from input; `defaults` applies the create defaults.
fn from_input(
    name: &str,
    i: &TemplateInput,
    defaults: bool,
) -> stacyvm_core::Result<TemplateRecord> {
    if name.trim().is_empty() {
        return Err(Error::invalid("template name is required"));
    }
    if name.len() > 128 || name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "template name must be at most 128 characters without '/', '\\' or control characters",
        ));
    }
    if i.image.trim().is_empty() {
        return Err(Error::invalid("template image is required"));
    }
    let mut cpu = if i.cpu_cores != 0 {
        i.cpu_cores
    } else {
        i.vcpus
    };
    let mut ttl = if i.ttl_seconds != 0 {
        i.ttl_seconds
    } else {
        ttl_seconds(&i.ttl)?
    };
    let mut mem = i.memory_mb;
    let mut version = i.version;
    if mem < 0 || cpu < 0 || ttl < 0 || i.pool_size < 0 {
        return Err(Error::invalid(
            "memory_mb, cpu_cores, ttl and pool_size must not be negative",
        ));
    }
    if defaults {
        if mem == 0 {
            mem = 512;
        }
        if cpu == 0 {
            cpu = 1;
        }
        if ttl == 0 {
            ttl = 300;
        }
        if version == 0 {
            version = 1;
        }
    }
    let now = Utc::now();
    Ok(TemplateRecord {
        name: name.to_string(),
        version,
        image: i.image.trim().to_string(),
        description: i.description.clone(),
        setup: i.setup.clone(),
        allowed_hosts: i.allowed_hosts.clone(),
        memory_mb: mem,
        cpu_cores: cpu,
        ttl_seconds: ttl,
        env: i.env.clone(),
        secrets: i.secrets.clone(),
        pool_size: i.pool_size,
        provider: i.provider.clone(),
        metadata: i.metadata.clone(),
        created_at: now,
        updated_at: now,
    })
}

pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<Template>>> {
    let ts = st.manager.store().list_templates().await?;
    Ok(Json::ok(ts.iter().map(to_api).collect()))
}

pub async fn create(
    State(st): State<AppState>,
    Body2(input): Body2<TemplateInput>,
) -> ApiResult<Json<Template>> {
    let rec = from_input(&input.name, &input, true)?;
    if !rec.provider.is_empty() {
        st.manager.registry().get(&rec.provider)?;
    }
    st.manager.store().create_template(&rec).await?;
    Ok(Json::created(to_api(&rec)))
}

pub async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Template>> {
    Ok(Json::ok(to_api(&st.manager.get_template(&name).await?)))
}

/// Full replace; unset numeric fields get the create defaults (gaps C-23).
pub async fn replace(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Body2(input): Body2<TemplateInput>,
) -> ApiResult<Json<Template>> {
    let rec = from_input(&name, &input, true)?;
    st.manager.get_template(&name).await?;
    if !rec.provider.is_empty() {
        st.manager.registry().get(&rec.provider)?;
    }
    let saved = st.manager.store().update_template(&rec).await?;
    Ok(Json::ok(to_api(&saved)))
}

pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.get_template(&name).await?;
    st.manager.store().delete_template(&name).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn spawn(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
    OptBody(o): OptBody<TemplateSpawnRequest>,
) -> ApiResult<Json<Sandbox>> {
    // Existence first so an unknown template is a 404, not a spawn error.
    st.manager.get_template(&name).await?;
    let req = SpawnRequest {
        template: name,
        provider: o.provider,
        ttl: o.ttl,
        ..SpawnRequest::default()
    };
    Ok(Json::created(st.manager.spawn(req, &who).await?))
}
