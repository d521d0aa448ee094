//! `/quotas`: per-owner overrides of the sandbox cap, max TTL and max exec timeout.

use axum::extract::{Path, State};
use stacyvm_api::{GoDuration, OwnerQuota, QuotaInput, QuotaSummary, QuotaUsage, StatusResponse};
use stacyvm_core::services::quotas::owner_id;
use stacyvm_core::store::QuotaRecord;
use stacyvm_core::Error;

use crate::error::ApiResult;
use crate::json::{Body2, Json};
use crate::tenancy::Authed;
use crate::AppState;

fn to_api(q: &QuotaRecord) -> OwnerQuota {
    OwnerQuota {
        owner_id: q.owner_id.clone(),
        max_sandboxes: q.max_sandboxes,
        max_ttl: GoDuration::from_secs(q.max_ttl_seconds),
        max_exec_timeout: GoDuration::from_secs(q.max_exec_timeout_seconds),
        created_at: q.created_at,
        updated_at: q.updated_at,
    }
}

/// Quotas the caller may read: all for the admin and an operator acting
/// in no tenant, else only its own owner's (F-17: owner ids are OIDC
/// subjects and emails of every tenant).
async fn visible_quotas(st: &AppState, who: &Authed) -> stacyvm_core::Result<Vec<QuotaRecord>> {
    let mut qs = st.manager.quotas().list().await?;
    if !who.sees_server_wide() {
        qs.retain(|q| !who.caller.owner_id.is_empty() && q.owner_id == who.caller.owner_id);
    }
    Ok(qs)
}

/// Another owner's quota or usage is the admin's or a global operator's
/// business only: to anyone else it does not exist (404, like a sandbox
/// of another tenant).
fn may_read(who: &Authed, owner: &str) -> stacyvm_core::Result<()> {
    if who.sees_server_wide() || (!who.caller.owner_id.is_empty() && who.caller.owner_id == owner) {
        return Ok(());
    }
    Err(Error::not_found(format!("quota of owner {owner:?}")))
}

pub async fn list(State(st): State<AppState>, who: Authed) -> ApiResult<Json<Vec<OwnerQuota>>> {
    Ok(Json::ok(
        visible_quotas(&st, &who)
            .await?
            .iter()
            .map(to_api)
            .collect(),
    ))
}

pub async fn summary(State(st): State<AppState>, who: Authed) -> ApiResult<Json<QuotaSummary>> {
    let qs = visible_quotas(&st, &who).await?;
    Ok(Json::ok(QuotaSummary {
        total: qs.len() as i64,
        with_max_sandboxes: qs.iter().filter(|q| q.max_sandboxes > 0).count() as i64,
        with_max_ttl: qs.iter().filter(|q| q.max_ttl_seconds > 0).count() as i64,
        with_max_exec_timeout: qs.iter().filter(|q| q.max_exec_timeout_seconds > 0).count() as i64,
    }))
}

pub async fn get(
    State(st): State<AppState>,
    who: Authed,
    Path(o): Path<String>,
) -> ApiResult<Json<OwnerQuota>> {
    let o = owner_id(&o)?;
    may_read(&who, &o)?;
    Ok(Json::ok(to_api(&st.manager.quotas().get(&o).await?)))
}

pub async fn put(
    State(st): State<AppState>,
    Path(o): Path<String>,
    Body2(input): Body2<QuotaInput>,
) -> ApiResult<Json<OwnerQuota>> {
    Ok(Json::ok(to_api(
        &st.manager.quotas().put(&o, &input).await?,
    )))
}

pub async fn delete(
    State(st): State<AppState>,
    Path(o): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.quotas().delete(&o).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn usage(
    State(st): State<AppState>,
    who: Authed,
    Path(o): Path<String>,
) -> ApiResult<Json<QuotaUsage>> {
    let o = owner_id(&o)?;
    may_read(&who, &o)?;
    Ok(Json::ok(st.manager.quotas().usage(&o).await?))
}
