//! Route table of `/api/v1`.

pub mod audit;
pub mod files;
pub mod quotas;
pub mod sandboxes;
pub mod system;
pub mod templates;
pub mod tenants;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::routing::{delete, get, post, put};
use axum::Router;
use stacyvm_core::manager::Caller;

use crate::error::ApiError;
use crate::tenancy::Authed;
use crate::AppState;

pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(system::health))
        .route("/live", get(system::live))
        .route("/ready", get(system::ready))
        .route(
            "/sandboxes",
            post(sandboxes::spawn)
                .get(sandboxes::list)
                .delete(sandboxes::prune),
        )
        .route("/sandboxes/admission", post(sandboxes::admission))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::destroy),
        )
        .route("/sandboxes/{id}/extend", post(sandboxes::extend))
        .route("/sandboxes/{id}/snapshot", post(sandboxes::snapshot))
        .route("/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/sandboxes/{id}/exec", post(sandboxes::exec))
        .route("/sandboxes/{id}/exec/ws", get(sandboxes::exec_ws))
        .route("/sandboxes/{id}/logs", get(sandboxes::logs))
        .route("/sandboxes/{id}/stats", get(sandboxes::stats))
        .route(
            "/sandboxes/{id}/files",
            post(files::write)
                .put(files::upload)
                .get(files::read)
                .delete(files::delete),
        )
        .route("/sandboxes/{id}/files/list", get(files::list))
        .route("/sandboxes/{id}/files/move", post(files::mv))
        .route("/sandboxes/{id}/files/chmod", post(files::chmod))
        .route("/sandboxes/{id}/files/stat", get(files::stat))
        .route("/sandboxes/{id}/files/glob", get(files::glob))
        .route("/providers", get(system::providers))
        .route("/providers/test", post(system::providers_test))
        .route("/providers/{name}", get(system::provider))
        .route("/pool/status", get(system::pool_status))
        .route("/snapshots", get(system::snapshots))
        .route(
            "/snapshots/{id}",
            get(system::snapshot).delete(system::delete_snapshot),
        )
        .route("/templates", get(templates::list).post(templates::create))
        .route(
            "/templates/{name}",
            get(templates::get)
                .put(templates::replace)
                .delete(templates::delete),
        )
        .route("/templates/{name}/spawn", post(templates::spawn))
        .route("/quotas", get(quotas::list))
        .route("/quotas/summary", get(quotas::summary))
        .route(
            "/quotas/{owner}",
            get(quotas::get).put(quotas::put).delete(quotas::delete),
        )
        .route("/quotas/{owner}/usage", get(quotas::usage))
        .route("/events", get(system::events))
        .route("/metrics", get(system::metrics))
        .route("/metrics/prometheus", get(system::prometheus))
        .route("/diagnostics", get(system::diagnostics))
        .route("/system/stats", get(system::system_stats))
        // Admin aliases used by the web dashboard (api.md §12).
        .route("/admin/diagnostics", get(system::diagnostics))
        .route("/admin/metrics", get(system::metrics))
        .route("/admin/metrics/prometheus", get(system::prometheus))
        .route("/admin/providers", get(system::providers))
        .route("/admin/providers/test", post(system::providers_test))
        .route("/admin/providers/{name}", get(system::provider))
        .route("/admin/quotas", get(quotas::list))
        .route("/admin/quotas/summary", get(quotas::summary))
        .route(
            "/admin/quotas/{owner}",
            get(quotas::get).put(quotas::put).delete(quotas::delete),
        )
        .route("/admin/quotas/{owner}/usage", get(quotas::usage))
        .route("/admin/audit", get(audit::admin_audit))
        .route("/admin/op-audit", get(audit::op_audit))
        .route("/admin/tenants", get(tenants::list).post(tenants::create))
        .route(
            "/admin/tenants/{tenant}",
            get(tenants::get)
                .put(tenants::update)
                .delete(tenants::delete),
        )
        .route("/admin/tenants/{tenant}/members", get(tenants::members))
        .route(
            "/admin/tenants/{tenant}/members/{user}",
            put(tenants::put_member).delete(tenants::delete_member),
        )
        .route("/admin/tenants/{tenant}/audit", get(tenants::audit))
        .route(
            "/admin/tenants/{tenant}/policies",
            get(tenants::policies).post(tenants::create_policy),
        )
        .route(
            "/admin/tenants/{tenant}/policies/{policy}",
            delete(tenants::delete_policy),
        )
        .route(
            "/admin/policies",
            get(tenants::global_policies).post(tenants::create_global_policy),
        )
        .route(
            "/admin/policies/{policy}",
            delete(tenants::delete_global_policy),
        )
}

/// The caller of a request, as the authorization layer resolved it.
pub struct Who(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authed>() {
            Some(a) => Ok(Who(a.caller.clone())),
            None => Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "caller identity missing",
            )),
        }
    }
}
