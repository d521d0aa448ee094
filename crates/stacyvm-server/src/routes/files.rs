//! `/sandboxes/{id}/files…`: the eight file routes.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use base64::Engine;
use serde::Deserialize;
use stacyvm_api::{ChmodRequest, FileInfo, MoveFileRequest, StatusResponse, WriteFileRequest};

use super::Who;
use crate::error::{ApiError, ApiResult};
use crate::json::{Body2, Json};
use crate::AppState;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathQuery {
    /// Absolute path in the sandbox (required).
    #[schemars(required)]
    path: Option<String>,
    /// `true` deletes a directory with its contents (`DELETE` only).
    recursive: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct UploadQuery {
    /// Absolute path in the sandbox (required).
    #[schemars(required)]
    path: Option<String>,
    /// Octal permission bits, e.g. `0755` (default `0644`).
    mode: Option<String>,
}

/// Extension: `PUT /files?path=…&mode=…` with the raw file as the body
/// (no JSON or base64 encoding; binary-safe). The body streams to the
/// sandbox with backpressure (a few chunks in memory at a time), up to
/// `limits.max_file_bytes`.
pub async fn upload(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> ApiResult<Json<StatusResponse>> {
    let path = required(q.path)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let write = st
        .manager
        .write_file_stream(&id, &path, rx, q.mode.as_deref().unwrap_or(""), &who);
    match stacyvm_core::provider::feed(body.into_data_stream(), tx, u64::MAX, write).await {
        Ok(_) => Ok(Json::ok(StatusResponse::new("written"))),
        Err(stacyvm_core::provider::Feed::Write(e)) => Err(e.into()),
        Err(stacyvm_core::provider::Feed::Body(m)) => Err(ApiError::bad_request(m)),
        Err(stacyvm_core::provider::Feed::TooLarge(m)) => Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            m,
        )),
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GlobQuery {
    /// Absolute glob pattern, e.g. `/workspace/**/*.py` (required).
    #[schemars(required)]
    pattern: Option<String>,
}

fn required(p: Option<String>) -> ApiResult<String> {
    match p {
        Some(p) if !p.trim().is_empty() => Ok(p),
        _ => Err(ApiError::bad_request("path query parameter required")),
    }
}

pub async fn write(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<WriteFileRequest>,
) -> ApiResult<Json<StatusResponse>> {
    let data = match req.encoding.as_str() {
        "" | "utf-8" | "utf8" | "text" => req.content.into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(req.content.as_bytes())
            .map_err(|e| {
                ApiError::bad_request(format!("invalid input: content is not valid base64: {e}"))
            })?,
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid input: unsupported encoding {other:?} (allowed: utf-8, base64)"
            )))
        }
    };
    st.manager
        .write_file(&id, &req.path, data, &req.mode, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("written")))
}

pub async fn read(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let path = required(q.path)?;
    let file = st.manager.read_file_stream(&id, &path, &who).await?;
    let size = file.size;
    // Streamed with backpressure: the agent sends as fast as the client reads.
    let chunks = tokio_stream::wrappers::ReceiverStream::new(file.chunks);
    let body = Body::from_stream(futures::StreamExt::map(chunks, |c| {
        c.map(bytes::Bytes::from)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // The size when the read started: a file that changes meanwhile ends
    // the response early (the client sees a short body), never silently.
    // (/proc files report 0 and are sent chunked.)
    if size > 0 {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<StatusResponse>> {
    let path = required(q.path)?;
    let recursive = q.recursive.as_deref() == Some("true");
    st.manager.delete_file(&id, &path, recursive, &who).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Vec<FileInfo>>> {
    let path = q.path.unwrap_or_default();
    Ok(Json::ok(st.manager.list_files(&id, &path, &who).await?))
}

pub async fn mv(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<MoveFileRequest>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager
        .move_file(&id, &req.old_path, &req.new_path, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("moved")))
}

pub async fn chmod(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<ChmodRequest>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager
        .chmod_file(&id, &req.path, &req.mode, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("chmod applied")))
}

pub async fn stat(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<FileInfo>> {
    let path = required(q.path)?;
    Ok(Json::ok(st.manager.stat_file(&id, &path, &who).await?))
}

pub async fn glob(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<GlobQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let pattern = match q.pattern {
        Some(p) if !p.trim().is_empty() => p,
        _ => return Err(ApiError::bad_request("pattern query parameter required")),
    };
    Ok(Json::ok(st.manager.glob_files(&id, &pattern, &who).await?))
}
