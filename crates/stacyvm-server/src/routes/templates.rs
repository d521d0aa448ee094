//! `/templates`: CRUD and spawn-from-template, accepting the SDK aliases.

use axum::extract::{Path, State};
use stacyvm_api::{
    GoDuration, Sandbox, SpawnRequest, StatusResponse, Template, TemplateInput,
    TemplateSpawnRequest,
};
use stacyvm_core::store::TemplateRecord;

use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json, OptBody};
use crate::AppState;

pub fn to_api(st: &AppState, t: &TemplateRecord) -> Template {
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
        files: t.files.clone(),
        pool: st.manager.template_pool(t),
        vcpus: t.cpu_cores,
        ttl: GoDuration::from_secs(t.ttl_seconds),
        provider: t.provider.clone(),
        metadata: t.metadata.clone(),
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<Template>>> {
    let ts = st.manager.templates().list().await?;
    Ok(Json::ok(ts.iter().map(|t| to_api(&st, t)).collect()))
}

pub async fn create(
    State(st): State<AppState>,
    Body2(input): Body2<TemplateInput>,
) -> ApiResult<Json<Template>> {
    let t = st.manager.templates().create(&input).await?;
    Ok(Json::created(to_api(&st, &t)))
}

pub async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Template>> {
    let t = st.manager.templates().get(&name).await?;
    Ok(Json::ok(to_api(&st, &t)))
}

/// Full replace; unset numeric fields get the create defaults (gaps C-23).
pub async fn replace(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Body2(input): Body2<TemplateInput>,
) -> ApiResult<Json<Template>> {
    let t = st.manager.templates().replace(&name, &input).await?;
    Ok(Json::ok(to_api(&st, &t)))
}

pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.templates().delete(&name).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn spawn(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
    OptBody(o): OptBody<TemplateSpawnRequest>,
) -> ApiResult<Json<Sandbox>> {
    // Existence first so an unknown template is a 404, not a spawn error.
    st.manager.templates().get(&name).await?;
    let req = SpawnRequest {
        template: name,
        provider: o.provider,
        ttl: o.ttl,
        ..SpawnRequest::default()
    };
    Ok(Json::created(st.manager.spawn(req, &who).await?))
}
