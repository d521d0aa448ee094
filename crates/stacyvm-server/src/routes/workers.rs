//! `/workers`, `/admin/workers`, `/worker/{id}/…` (called by workers with
//! worker credentials) and `/admin/worker-tokens`.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use stacyvm_api::{
    LeaseRenewRequest, LeaseResponse, LeaseToken, Worker, WorkerHeartbeat, WorkerTokenRequest,
    WorkerTokenResponse,
};
use stacyvm_core::manager::workers::to_api;
use stacyvm_core::manager::Caller;
use stacyvm_core::store::LeaseRecord;
use stacyvm_core::Error;

use super::Who;
use crate::error::{ApiError, ApiResult};
use crate::json::{Body2, Json, OptBody};
use crate::workerauth::WorkerIdentity;
use crate::AppState;

/// A request made with worker credentials (the middleware verified them,
/// the scope of the route and the worker id of the path).
pub struct WorkerWho {
    pub identity: WorkerIdentity,
    pub caller: Caller,
}

impl<S: Send + Sync> FromRequestParts<S> for WorkerWho {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<WorkerIdentity>() {
            Some(w) => Ok(WorkerWho {
                identity: w.clone(),
                caller: Caller {
                    actor: format!("worker:{}", w.worker_id),
                    ..Caller::default()
                },
            }),
            None => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "worker identity missing",
            )),
        }
    }
}

fn lease_token(l: &LeaseRecord) -> LeaseToken {
    LeaseToken {
        resource_id: l.resource_id.clone(),
        holder_id: l.holder_id.clone(),
        generation: l.generation,
        expires_at: l.expires_at,
    }
}

fn ttl_of(req: &LeaseRenewRequest) -> stacyvm_core::Result<std::time::Duration> {
    let bad = || Error::invalid("ttl must be a positive duration");
    let n = stacyvm_api::duration::parse(req.ttl.trim()).map_err(|_| bad())?;
    u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .map(std::time::Duration::from_nanos)
        .ok_or_else(bad)
}

/// `GET /workers`, `GET /admin/workers`.
pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<Worker>>> {
    Ok(Json::ok(
        st.manager
            .workers()
            .await?
            .iter()
            .map(|w| to_api(w, st.manager.stale_after()))
            .collect(),
    ))
}

/// `GET /workers/{worker}`, `GET /admin/workers/{worker}`.
pub async fn get(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Worker>> {
    Ok(Json::ok(to_api(
        &st.manager.worker(&id).await?,
        st.manager.stale_after(),
    )))
}

/// `DELETE /admin/workers/{worker}`.
pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    st.manager.delete_worker(&id, &who).await?;
    Ok(Json::ok(serde_json::json!({"status": "deleted"})))
}

/// `POST /admin/workers/{worker}/heartbeat`: an operator records a
/// heartbeat on a worker's behalf.
pub async fn admin_heartbeat(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    OptBody(hb): OptBody<WorkerHeartbeat>,
) -> ApiResult<Json<Worker>> {
    Ok(Json::ok(to_api(
        &st.manager.worker_heartbeat(&id, hb, &who).await?,
        st.manager.stale_after(),
    )))
}

/// `POST /admin/workers/{worker}/leases/{resource}/renew`.
pub async fn admin_renew(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, resource)): Path<(String, String)>,
    Body2(req): Body2<LeaseRenewRequest>,
) -> ApiResult<Json<LeaseResponse>> {
    let l = st
        .manager
        .renew_worker_lease(&id, &resource, ttl_of(&req)?, &who)
        .await?;
    Ok(Json::ok(LeaseResponse {
        lease: lease_token(&l),
    }))
}

/// `POST /worker/{worker}/heartbeat` (worker credentials, `worker:heartbeat`).
pub async fn heartbeat(
    State(st): State<AppState>,
    w: WorkerWho,
    OptBody(hb): OptBody<WorkerHeartbeat>,
) -> ApiResult<Json<Worker>> {
    let id = w.identity.worker_id.clone();
    Ok(Json::ok(to_api(
        &st.manager.worker_heartbeat(&id, hb, &w.caller).await?,
        st.manager.stale_after(),
    )))
}

/// `POST /worker/{worker}/leases/{resource}/renew` (`worker:lease`).
pub async fn renew(
    State(st): State<AppState>,
    w: WorkerWho,
    Path((_, resource)): Path<(String, String)>,
    Body2(req): Body2<LeaseRenewRequest>,
) -> ApiResult<Json<LeaseResponse>> {
    let l = st
        .manager
        .renew_worker_lease(&w.identity.worker_id, &resource, ttl_of(&req)?, &w.caller)
        .await?;
    Ok(Json::ok(LeaseResponse {
        lease: lease_token(&l),
    }))
}

/// `POST /admin/worker-tokens`: a signed worker token, so workers never
/// hold the signing key.
pub async fn issue_token(
    State(st): State<AppState>,
    Who(who): Who,
    Body2(req): Body2<WorkerTokenRequest>,
) -> ApiResult<Json<WorkerTokenResponse>> {
    let now = chrono::Utc::now().timestamp();
    match st.worker_auth.issue(&req, now) {
        None => Err(ApiError::unavailable(
            "worker token signing key is not configured (auth.worker_signing_key)",
        )),
        Some(Err(msg)) => Err(ApiError::bad_request(msg)),
        Some(Ok(t)) => {
            st.manager
                .audit_worker_token(&who, &t.worker_id, &t.token_id, &t.audience);
            Ok(Json::ok(t))
        }
    }
}
