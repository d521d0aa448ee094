//! `/quotas`: per-owner overrides of the sandbox cap, max TTL and max exec timeout.

use axum::extract::{Path, State};
use chrono::Utc;
use serde_json::json;
use stacyvm_api::{
    duration, GoDuration, OwnerQuota, QuotaInput, QuotaSummary, QuotaUsage, StatusResponse,
};
use stacyvm_core::events::{self, kind};
use stacyvm_core::store::QuotaRecord;
use stacyvm_core::{paths, Error, ErrorKind};

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

fn owner(o: &str) -> stacyvm_core::Result<String> {
    let o = paths::normalize_owner(o)?;
    if o.is_empty() {
        return Err(Error::invalid("owner_id is required"));
    }
    Ok(o)
}

/// "" / "0" / "0s" = unset; else a whole number of seconds ≥ 1 s.
fn quota_secs(key: &str, v: &str) -> stacyvm_core::Result<i64> {
    let v = v.trim();
    if v.is_empty() || v == "0" || v == "0s" {
        return Ok(0);
    }
    let n = duration::parse(v).map_err(|e| Error::invalid(format!("parsing {key}: {e}")))?;
    if n < 0 {
        return Err(Error::invalid(format!(
            "parsing {key}: must not be negative"
        )));
    }
    if n < 1_000_000_000 || n % 1_000_000_000 != 0 {
        return Err(Error::invalid(format!(
            "parsing {key}: must be whole seconds of at least 1s"
        )));
    }
    Ok(n / 1_000_000_000)
}

/// Quotas the caller may read: all for the admin and an operator acting
/// in no tenant, else only its own owner's (F-17: owner ids are OIDC
/// subjects and emails of every tenant).
async fn visible_quotas(st: &AppState, who: &Authed) -> stacyvm_core::Result<Vec<QuotaRecord>> {
    let mut qs = st.manager.store().list_quotas().await?;
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
    let o = owner(&o)?;
    may_read(&who, &o)?;
    Ok(Json::ok(to_api(&st.manager.store().get_quota(&o).await?)))
}

pub async fn put(
    State(st): State<AppState>,
    Path(o): Path<String>,
    Body2(input): Body2<QuotaInput>,
) -> ApiResult<Json<OwnerQuota>> {
    let o = owner(&o)?;
    if input.max_sandboxes < 0 {
        return Err(Error::invalid("max_sandboxes must not be negative").into());
    }
    let now = Utc::now();
    let rec = QuotaRecord {
        owner_id: o.clone(),
        max_sandboxes: input.max_sandboxes,
        max_ttl_seconds: quota_secs("max_ttl", &input.max_ttl)?,
        max_exec_timeout_seconds: quota_secs("max_exec_timeout", &input.max_exec_timeout)?,
        created_at: now,
        updated_at: now,
    };
    let saved = st.manager.store().upsert_quota(&rec).await?;
    let api = to_api(&saved);
    st.manager.events().publish(
        kind::QUOTA_SAVED,
        "",
        events::data([
            ("owner_id", json!(o)),
            ("max_sandboxes", json!(api.max_sandboxes)),
            ("max_ttl", json!(api.max_ttl.to_string())),
            ("max_exec_timeout", json!(api.max_exec_timeout.to_string())),
        ]),
    );
    st.manager.wake_queue();
    Ok(Json::ok(api))
}

pub async fn delete(
    State(st): State<AppState>,
    Path(o): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    let o = owner(&o)?;
    st.manager.store().delete_quota(&o).await?;
    st.manager.events().publish(
        kind::QUOTA_DELETED,
        "",
        events::data([("owner_id", json!(o))]),
    );
    st.manager.wake_queue();
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn usage(
    State(st): State<AppState>,
    who: Authed,
    Path(o): Path<String>,
) -> ApiResult<Json<QuotaUsage>> {
    let o = owner(&o)?;
    may_read(&who, &o)?;
    let quota = match st.manager.store().get_quota(&o).await {
        Ok(q) => Some(q),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let active = st
        .manager
        .store()
        .list_active_sandboxes()
        .await?
        .iter()
        .filter(|r| r.owner_id == o)
        .count() as i64;
    let d = &st.cfg.defaults;
    let pick = |q: i64, g: GoDuration| if q > 0 { GoDuration::from_secs(q) } else { g };
    Ok(Json::ok(QuotaUsage {
        owner_id: o,
        active_sandboxes: active,
        max_sandboxes: quota
            .as_ref()
            .map(|q| q.max_sandboxes)
            .filter(|n| *n > 0)
            .unwrap_or(d.max_sandboxes_per_owner),
        max_ttl: pick(quota.as_ref().map_or(0, |q| q.max_ttl_seconds), d.max_ttl.0),
        max_exec_timeout: pick(
            quota.as_ref().map_or(0, |q| q.max_exec_timeout_seconds),
            d.max_exec_timeout.0,
        ),
        quota_configured: quota.is_some(),
    }))
}
