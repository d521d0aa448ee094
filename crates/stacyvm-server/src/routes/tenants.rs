//! Tenants, members, policies and per-tenant audit export
//! (`/api/v1/admin/tenants`, `/api/v1/admin/policies`).
//!
//! Routes marked `tenant:admin` in the permission table are open to the
//! admin and to a `tenant_admin` of the tenant in the path only.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_core::services::{PolicyInput, TenantInput};
use stacyvm_core::store::TenantRecord;
use stacyvm_core::Error;

use crate::auth::Role;
use crate::error::{ApiError, ApiResult};
use crate::json::{Body2, Json};
use crate::tenancy::Authed;
use crate::AppState;

/// The admin, or a tenant admin acting in `tenant`.
fn may_manage(who: &Authed, tenant: &str) -> Result<(), ApiError> {
    if who.role == Role::Admin || (who.role == Role::TenantAdmin && who.caller.tenant_id == tenant)
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "FORBIDDEN",
        format!("only an admin or a tenant admin of {tenant:?} may manage it"),
    ))
}

/// A core error as this API has always worded it: a 4xx says only the
/// detail ("tenant not found", "name is required").
fn plain(e: Error) -> ApiError {
    match crate::error::status_of(e.kind()) {
        (status, code) if !status.is_server_error() => ApiError::new(status, code, e.detail()),
        _ => e.into(),
    }
}

fn tenant_json(t: &TenantRecord) -> Value {
    json!({"id": t.id, "name": t.name, "owner_id": t.owner_id, "settings": t.settings,
           "created_at": t.created_at, "updated_at": t.updated_at})
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    owner_id: String,
    #[serde(default)]
    settings: Option<Value>,
}

impl From<TenantBody> for TenantInput {
    fn from(b: TenantBody) -> Self {
        TenantInput {
            id: b.id,
            name: b.name,
            owner_id: b.owner_id,
            settings: b.settings,
        }
    }
}

pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let ts = st.manager.tenancy().list().await?;
    Ok(Json::ok(
        json!({"tenants": ts.iter().map(tenant_json).collect::<Vec<_>>()}),
    ))
}

pub async fn create(
    State(st): State<AppState>,
    Body2(b): Body2<TenantBody>,
) -> ApiResult<Json<Value>> {
    let t = st.manager.tenancy().create(b.into()).await.map_err(plain)?;
    Ok(Json::created(json!({"tenant": tenant_json(&t)})))
}

pub async fn get(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let t = st.manager.tenancy().get(&id).await.map_err(plain)?;
    Ok(Json::ok(json!({"tenant": tenant_json(&t)})))
}

pub async fn update(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Body2(b): Body2<TenantBody>,
) -> ApiResult<Json<Value>> {
    let t = st
        .manager
        .tenancy()
        .update(&id, b.into())
        .await
        .map_err(plain)?;
    Ok(Json::ok(json!({"tenant": tenant_json(&t)})))
}

pub async fn delete(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    st.manager.tenancy().delete(&id).await.map_err(plain)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn members(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let ms = st.manager.tenancy().members(&id).await.map_err(plain)?;
    Ok(Json::ok(json!({ "members": ms })))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    #[serde(default)]
    role: String,
}

pub async fn put_member(
    State(st): State<AppState>,
    who: Authed,
    Path((id, user)): Path<(String, String)>,
    Body2(b): Body2<MemberBody>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let m = st
        .manager
        .tenancy()
        .put_member(&id, &user, &b.role)
        .await
        .map_err(plain)?;
    Ok(Json::ok(json!({ "member": m })))
}

pub async fn delete_member(
    State(st): State<AppState>,
    who: Authed,
    Path((id, user)): Path<(String, String)>,
) -> ApiResult<Response> {
    may_manage(&who, &id)?;
    st.manager
        .tenancy()
        .delete_member(&id, &user)
        .await
        .map_err(plain)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    #[serde(default)]
    resource_type: String,
    #[serde(default)]
    effect: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    priority: i64,
}

impl From<PolicyBody> for PolicyInput {
    fn from(b: PolicyBody) -> Self {
        PolicyInput {
            resource_type: b.resource_type,
            effect: b.effect,
            pattern: b.pattern,
            priority: b.priority,
        }
    }
}

async fn create_policy_in(st: &AppState, tenant: &str, b: PolicyBody) -> ApiResult<Json<Value>> {
    let p = st.manager.tenancy().create_policy(tenant, b.into()).await?;
    Ok(Json::created(json!({ "policy": p })))
}

pub async fn policies(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let ps = st
        .manager
        .tenancy()
        .policies(Some(&id))
        .await
        .map_err(plain)?;
    Ok(Json::ok(json!({ "policies": ps })))
}

pub async fn create_policy(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
    Body2(b): Body2<PolicyBody>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    st.manager.tenancy().get(&id).await.map_err(plain)?;
    create_policy_in(&st, &id, b).await
}

async fn delete_policy_in(st: &AppState, tenant: &str, pid: &str) -> ApiResult<Response> {
    st.manager
        .tenancy()
        .delete_policy(tenant, pid)
        .await
        .map_err(plain)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn delete_policy(
    State(st): State<AppState>,
    who: Authed,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Response> {
    may_manage(&who, &id)?;
    delete_policy_in(&st, &id, &pid).await
}

pub async fn global_policies(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let ps = st.manager.tenancy().policies(None).await?;
    Ok(Json::ok(json!({ "policies": ps })))
}

pub async fn create_global_policy(
    State(st): State<AppState>,
    Body2(b): Body2<PolicyBody>,
) -> ApiResult<Json<Value>> {
    create_policy_in(&st, "", b).await
}

pub async fn delete_global_policy(
    State(st): State<AppState>,
    Path(pid): Path<String>,
) -> ApiResult<Response> {
    delete_policy_in(&st, "", &pid).await
}

/// `GET /admin/tenants/{id}/audit?since=&limit=`: admin and operation
/// audit rows of that tenant since a time (RFC 3339 or look-back).
pub async fn audit(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let since = crate::routes::audit::parse_since(q.get("since").map_or("", String::as_str))?;
    let rows = st.manager.audit_trail().tenant(&id, since).await?;
    Ok(Json::ok(json!({
        "admin_audit": rows.admin,
        "exported_at": Utc::now().to_rfc3339(),
        "op_audit": rows.ops,
        "tenant_id": id,
    })))
}
