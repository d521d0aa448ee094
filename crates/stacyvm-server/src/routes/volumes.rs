//! `/volumes`: named persistent volumes (see `stacyvm_core::volumes`).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use stacyvm_api::{CreateVolumeRequest, StatusResponse, Volume};

use super::files::{archive_format, intake_archive, tar_response, ArchiveWritten};
use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json};
use crate::AppState;

/// `GET /volumes`.
pub async fn list(State(st): State<AppState>, Who(who): Who) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json::ok(st.manager.list_volumes(&who).await?))
}

/// `POST /volumes`: 201 with the volume.
pub async fn create(
    State(st): State<AppState>,
    Who(who): Who,
    Body2(req): Body2<CreateVolumeRequest>,
) -> ApiResult<Json<Volume>> {
    Ok(Json::created(st.manager.create_volume(req, &who).await?))
}

/// `GET /volumes/{name}`.
pub async fn get(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    Ok(Json::ok(st.manager.get_volume(&name, &who).await?))
}

/// `DELETE /volumes/{name}`.
pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.delete_volume(&name, &who).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExportQuery {
    /// `tar` (default) or `tar.gz`.
    format: Option<String>,
}

/// `GET /volumes/{name}/archive[?format=tar.gz]`.
pub async fn export(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    let gzip = archive_format(q.format.as_deref())?;
    let stream = st.manager.export_volume(&name, &who).await?;
    Ok(tar_response(stream.chunks, gzip))
}

/// `PUT /volumes/{name}/archive`: the body is a tar or tar.gz.
pub async fn import(
    State(st): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<ArchiveWritten>> {
    let (report, sum) = intake_archive(&headers, body, |rx| {
        st.manager.import_volume(&name, rx, &who)
    })
    .await?;
    Ok(Json::ok(ArchiveWritten {
        status: "extracted".into(),
        path: "/".into(),
        entries: report.entries,
        bytes: report.bytes,
        sha256: sum,
    }))
}
