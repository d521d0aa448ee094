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
use stacyvm_core::store::{
    AdminAuditFilter, OpAuditFilter, PolicyRecord, TenantMemberRecord, TenantRecord,
};
use stacyvm_core::{policy, Error};

use crate::auth::Role;
use crate::error::{ApiError, ApiResult};
use crate::json::{Body2, Json};
use crate::tenancy::Authed;
use crate::AppState;

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

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

fn check_id(kind: &str, id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} must be 1-128 characters of letters, digits, '-', '_', '.', '@'"
        )))
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

fn settings_text(v: Option<&Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.to_string())),
        Some(_) => Err(ApiError::bad_request("settings must be a JSON object")),
    }
}

pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let ts = st.manager.store().list_tenants().await?;
    Ok(Json::ok(
        json!({"tenants": ts.iter().map(tenant_json).collect::<Vec<_>>()}),
    ))
}

pub async fn create(
    State(st): State<AppState>,
    Body2(b): Body2<TenantBody>,
) -> ApiResult<Json<Value>> {
    if b.name.trim().is_empty() {
        return Err(ApiError::bad_request("name is required"));
    }
    let id = if b.id.is_empty() {
        format!("tenant-{}", random_suffix())
    } else {
        b.id.clone()
    };
    check_id("tenant id", &id)?;
    let now = Utc::now();
    let t = TenantRecord {
        id,
        name: b.name.trim().to_string(),
        owner_id: b.owner_id,
        settings: settings_text(b.settings.as_ref())?.unwrap_or_else(|| "{}".into()),
        created_at: now,
        updated_at: now,
    };
    st.manager.store().create_tenant(&t).await?;
    Ok(Json::created(json!({"tenant": tenant_json(&t)})))
}

async fn load(st: &AppState, id: &str) -> Result<TenantRecord, ApiError> {
    match st.manager.store().get_tenant(id).await {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == stacyvm_core::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "tenant not found",
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn get(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    let t = load(&st, &id).await?;
    Ok(Json::ok(json!({"tenant": tenant_json(&t)})))
}

pub async fn update(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Body2(b): Body2<TenantBody>,
) -> ApiResult<Json<Value>> {
    let mut t = load(&st, &id).await?;
    if !b.id.is_empty() && b.id != id {
        return Err(ApiError::bad_request("id cannot be changed"));
    }
    if !b.name.trim().is_empty() {
        t.name = b.name.trim().to_string();
    }
    if !b.owner_id.is_empty() {
        t.owner_id = b.owner_id;
    }
    if let Some(s) = settings_text(b.settings.as_ref())? {
        t.settings = s;
    }
    t.updated_at = Utc::now();
    st.manager.store().update_tenant(&t).await?;
    Ok(Json::ok(json!({"tenant": tenant_json(&t)})))
}

pub async fn delete(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    load(&st, &id).await?;
    st.manager.store().delete_tenant(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn members(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    load(&st, &id).await?;
    let ms = st.manager.store().list_tenant_members(&id).await?;
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
    check_id("user id", &user)?;
    if !matches!(b.role.as_str(), "viewer" | "operator" | "admin") {
        return Err(ApiError::bad_request(format!(
            "role must be viewer, operator, or admin, got {:?}",
            b.role
        )));
    }
    load(&st, &id).await?;
    let now = Utc::now();
    let m = st
        .manager
        .store()
        .upsert_tenant_member(&TenantMemberRecord {
            tenant_id: id,
            user_id: user,
            role: b.role,
            created_at: now,
            updated_at: now,
        })
        .await?;
    Ok(Json::ok(json!({ "member": m })))
}

pub async fn delete_member(
    State(st): State<AppState>,
    who: Authed,
    Path((id, user)): Path<(String, String)>,
) -> ApiResult<Response> {
    may_manage(&who, &id)?;
    match st.manager.store().delete_tenant_member(&id, &user).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) if e.kind() == stacyvm_core::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "member not found",
        )),
        Err(e) => Err(e.into()),
    }
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

async fn create_policy_in(st: &AppState, tenant: &str, b: PolicyBody) -> ApiResult<Json<Value>> {
    policy::validate(&b.resource_type, &b.effect, &b.pattern)?;
    if b.priority < 0 {
        return Err(Error::invalid("priority must not be negative").into());
    }
    let now = Utc::now();
    let p = PolicyRecord {
        id: format!("pol-{}", random_suffix()),
        tenant_id: tenant.to_string(),
        resource_type: b.resource_type,
        effect: b.effect,
        pattern: b.pattern,
        priority: if b.priority == 0 { 10 } else { b.priority },
        created_at: now,
        updated_at: now,
    };
    st.manager.store().create_policy(&p).await?;
    Ok(Json::created(json!({ "policy": p })))
}

pub async fn policies(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    load(&st, &id).await?;
    let ps = st.manager.store().list_policies(Some(&id)).await?;
    Ok(Json::ok(json!({ "policies": ps })))
}

pub async fn create_policy(
    State(st): State<AppState>,
    who: Authed,
    Path(id): Path<String>,
    Body2(b): Body2<PolicyBody>,
) -> ApiResult<Json<Value>> {
    may_manage(&who, &id)?;
    load(&st, &id).await?;
    create_policy_in(&st, &id, b).await
}

async fn delete_policy_in(st: &AppState, tenant: &str, pid: &str) -> ApiResult<Response> {
    match st.manager.store().delete_policy(tenant, pid).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) if e.kind() == stacyvm_core::ErrorKind::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "policy not found",
        )),
        Err(e) => Err(e.into()),
    }
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
    let ps = st.manager.store().list_policies(None).await?;
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
    let store = st.manager.store();
    let admin = store
        .list_admin_audit(&AdminAuditFilter {
            tenant_id: id.clone(),
            since,
            limit: 200,
            ..AdminAuditFilter::default()
        })
        .await?;
    let ops = store
        .list_op_audit(&OpAuditFilter {
            tenant_id: id.clone(),
            since,
            limit: 200,
            ..OpAuditFilter::default()
        })
        .await?;
    Ok(Json::ok(json!({
        "admin_audit": admin,
        "exported_at": Utc::now().to_rfc3339(),
        "op_audit": ops,
        "tenant_id": id,
    })))
}
