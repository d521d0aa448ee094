//! The E2B API on StacyVM's listener (docs/e2b.md).
//!
//! The official `e2b` SDKs (Python 2.63, JS 2.51) pointed at this server
//! with `E2B_API_URL` send their control-plane REST here: the routes of
//! [`routes`], outside `/api/v1`, authorised by the same layer with the
//! same keys, roles, tenants, quotas, policies and audit (every operation
//! goes through the [`Manager`](stacyvm_core::manager::Manager) as
//! `/api/v1` does; the E2B routes only translate). Wire facts:
//! the wire contract in docs/e2b.md.
//!
//! What E2B's objects carry that StacyVM's do not is kept in the
//! sandbox's metadata under the reserved `e2b.` prefix (the template the
//! caller named, the create's `Idempotency-Key`), hidden from E2B's
//! `metadata` and refused in a caller's own.

mod control;
pub mod envd;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use crate::AppState;

pub use control::CLIENT_ID;

/// The envd version StacyVM reports: it decides which client features the
/// SDKs turn on (docs/e2b.md, "Wire contract").
pub const ENVD_VERSION: &str = "0.5.7";

/// Metadata keys StacyVM keeps for the E2B layer.
pub(crate) const META_PREFIX: &str = "e2b.";

/// The E2B control-plane routes (authorised by the caller of [`routes`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(control::create).get(control::list_v1))
        .route("/v2/sandboxes", post(control::create).get(control::list_v2))
        .route(
            "/sandboxes/{id}",
            get(control::detail).delete(control::kill),
        )
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(control::refresh))
        .route("/sandboxes/{id}/connect", post(control::connect))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/pause", post(control::pause))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(control::update_network),
        )
        .route("/sandboxes/{id}/resume", post(control::resume))
        .route("/sandboxes/{id}/metrics", get(control::metrics))
}

/// E2B's error body: a numeric `code` (the HTTP status) and a `message`;
/// the SDKs read both keys of every error.
#[derive(Debug, Serialize)]
pub struct E2bError {
    pub code: u16,
    pub message: String,
}

/// An error as E2B reports it.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = crate::json::json_response(
        status,
        &E2bError {
            code: status.as_u16(),
            message: message.into(),
        },
    );
    // A failure after side effects must not be retried by the SDK's
    // automatic retries on 502/503/504.
    if status.is_server_error() {
        resp.headers_mut()
            .insert("should-retry", HeaderValue::from_static("false"));
    }
    resp
}

/// Every error answered outside `/api/v1` (the E2B routes, the
/// authorisation layer, unknown paths and methods) in E2B's shape, so an
/// SDK meets a typed exception and never a parse failure.
pub async fn error_shape(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/api/") || path.starts_with("/ui/") || path == "/mcp" {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Error bodies are small JSON documents this server wrote.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return error(status, status.canonical_reason().unwrap_or("error"));
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if v.get("code").is_some_and(serde_json::Value::is_u64) {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let message = v
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error"))
        .to_string();
    let mut out = error(status, message);
    for (k, val) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), val.clone());
        }
    }
    out.into_response()
}
