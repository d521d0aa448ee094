//! Request ids, API-key authentication, CORS, 404/405 bodies.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of this request (incoming `X-Request-ID` or a new UUID).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Reuses or creates `X-Request-ID` and echoes it on every response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

fn eq_ct(a: &str, b: &str) -> bool {
    !b.is_empty() && a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn is_open_path(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/live" | "/ready" | "/api/v1/health" | "/api/v1/live" | "/api/v1/ready"
    )
}

/// API-key check: when a key is configured, every route but the probes
/// needs `X-API-Key` or `X-Admin-API-Key` matching it.
pub async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let a = &st.cfg.auth;
    let keys = [a.api_key.expose(), a.admin_api_key.expose()];
    if keys.iter().all(|k| k.is_empty())
        || is_open_path(req.uri().path())
        || req.method() == Method::OPTIONS
    {
        return next.run(req).await;
    }
    let presented: Vec<&str> = ["x-admin-api-key", "x-api-key"]
        .iter()
        .filter_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
        .collect();
    let ok = presented.iter().any(|p| keys.iter().any(|k| eq_ct(p, k)));
    if !ok {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "invalid or missing API key",
        )
        .into_response();
    }
    next.run(req).await
}

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
const ALLOW_HEADERS: &str =
    "Content-Type, X-API-Key, X-Admin-API-Key, X-Request-ID, X-User-ID, X-Tenant-ID, Authorization";
const EXPOSE_HEADERS: &str = "X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After";

/// CORS with exact-origin lists; preflights are answered before auth.
pub async fn cors(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/v1") {
        return next.run(req).await;
    }
    let origins = &st.cfg.server.cors_allowed_origins;
    let any = origins.is_empty() || origins.iter().any(|o| o == "*");
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed_origin = match (&origin, any) {
        (_, true) => Some("*".to_string()),
        (Some(o), false) if origins.iter().any(|x| x == o) => Some(o.clone()),
        _ => None,
    };
    let is_preflight = req.method() == Method::OPTIONS;
    let mut resp = if is_preflight {
        if origin.is_some() && allowed_origin.is_none() {
            let mut r = Response::new(Body::from("CORS origin is not allowed"));
            *r.status_mut() = StatusCode::FORBIDDEN;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return r;
        }
        Response::new(Body::empty())
    } else {
        next.run(req).await
    };
    set_cors_headers(resp.headers_mut(), allowed_origin.as_deref(), any);
    resp
}

fn set_cors_headers(h: &mut HeaderMap, origin: Option<&str>, any: bool) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if !any {
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if let Some(o) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
    }
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("route not found: {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}
