//! Exposed ports and preview tokens (`/sandboxes/{id}/ports…`): what the
//! preview proxy ([`crate::preview`]) serves.

use axum::extract::{Path, State};
use stacyvm_api::{ExposePortRequest, PortExposure, PreviewToken, PreviewTokenRequest};
use stacyvm_core::store::{PortRecord, PreviewTokenRecord};

use super::Who;
use crate::error::{ApiError, ApiResult};
use crate::json::{Json, OptBody};
use crate::AppState;

fn port_of(s: &str) -> Result<u16, ApiError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_request(format!("port must be 1-65535, got {s:?}")))
}

/// The host-form URL of a port.
pub fn preview_url(st: &AppState, id: &str, port: u16) -> String {
    let cfg = &st.cfg.preview;
    let url_port = if cfg.url_port == 0 {
        st.cfg.server.port
    } else {
        cfg.url_port
    };
    let default = matches!(
        (cfg.scheme.as_str(), url_port),
        ("http", 80) | ("https", 443)
    );
    let suffix = if default {
        String::new()
    } else {
        format!(":{url_port}")
    };
    let domain = st.cfg.server.preview_domain.trim().trim_matches('.');
    format!("{}://{port}-{id}.{domain}{suffix}/", cfg.scheme)
}

fn exposure(st: &AppState, r: PortRecord) -> PortExposure {
    PortExposure {
        url: preview_url(st, &r.sandbox_id, r.port),
        path: format!("/preview/{}/{}/", r.sandbox_id, r.port),
        sandbox_id: r.sandbox_id,
        port: r.port,
        mode: r.mode,
        created_at: r.created_at,
    }
}

fn token(t: PreviewTokenRecord) -> PreviewToken {
    PreviewToken {
        id: t.id,
        sandbox_id: t.sandbox_id,
        port: t.port,
        token: String::new(),
        url: String::new(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked: t.revoked,
    }
}

/// `GET /sandboxes/{id}/ports`.
pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<PortExposure>>> {
    let ports = st.manager.previews().list(&id, &who).await?;
    Ok(Json::ok(
        ports.into_iter().map(|r| exposure(&st, r)).collect(),
    ))
}

/// `POST /sandboxes/{id}/ports/{port}`.
pub async fn expose(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, port)): Path<(String, String)>,
    OptBody(req): OptBody<ExposePortRequest>,
) -> ApiResult<Json<PortExposure>> {
    let port = port_of(&port)?;
    let r = st
        .manager
        .previews()
        .expose(&id, port, &req.mode, &who)
        .await?;
    Ok(Json::ok(exposure(&st, r)))
}

/// `DELETE /sandboxes/{id}/ports/{port}`.
pub async fn unexpose(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, port)): Path<(String, String)>,
) -> ApiResult<Json<stacyvm_api::StatusResponse>> {
    let port = port_of(&port)?;
    st.manager.previews().unexpose(&id, port, &who).await?;
    Ok(Json::ok(stacyvm_api::StatusResponse::new("unexposed")))
}

/// `GET /sandboxes/{id}/ports/{port}/tokens`.
pub async fn tokens(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, port)): Path<(String, String)>,
) -> ApiResult<Json<Vec<PreviewToken>>> {
    let port = port_of(&port)?;
    let list = st.manager.previews().tokens(&id, port, &who).await?;
    Ok(Json::ok(list.into_iter().map(token).collect()))
}

/// `POST /sandboxes/{id}/ports/{port}/tokens`: the secret is in this
/// answer only.
pub async fn create_token(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, port)): Path<(String, String)>,
    OptBody(req): OptBody<PreviewTokenRequest>,
) -> ApiResult<Json<PreviewToken>> {
    let port = port_of(&port)?;
    let (t, secret) = st
        .manager
        .previews()
        .create_token(&id, port, &req.ttl, &who)
        .await?;
    let url = format!(
        "{}?{}={secret}",
        preview_url(&st, &id, port),
        crate::preview::TOKEN_QUERY
    );
    let mut out = token(t);
    out.token = secret;
    out.url = url;
    Ok(Json::created(out))
}

/// `DELETE /sandboxes/{id}/ports/{port}/tokens/{token}`.
pub async fn revoke_token(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, port, token_id)): Path<(String, String, String)>,
) -> ApiResult<Json<stacyvm_api::StatusResponse>> {
    let port = port_of(&port)?;
    st.manager
        .previews()
        .revoke_token(&id, port, &token_id, &who)
        .await?;
    Ok(Json::ok(stacyvm_api::StatusResponse::new("revoked")))
}
