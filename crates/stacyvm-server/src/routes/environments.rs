//! `/environments/specs` (see `stacyvm_core::manager::environments`).

use axum::extract::{Path, Query, State};
use stacyvm_api::{CreateEnvironmentSpec, EnvironmentSpec, SpecSuggestions, StatusResponse};

use super::registries::OwnerQuery;
use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json};
use crate::AppState;

/// `GET /environments/specs[?owner_id=]`.
pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Query(q): Query<OwnerQuery>,
) -> ApiResult<Json<Vec<EnvironmentSpec>>> {
    Ok(Json::ok(
        st.manager
            .list_environment_specs(q.owner_id.as_deref(), &who)
            .await?,
    ))
}

/// `POST /environments/specs`: 201.
pub async fn create(
    State(st): State<AppState>,
    Who(who): Who,
    Body2(req): Body2<CreateEnvironmentSpec>,
) -> ApiResult<Json<EnvironmentSpec>> {
    Ok(Json::created(
        st.manager.create_environment_spec(req, &who).await?,
    ))
}

/// `GET /environments/specs/{id}`.
pub async fn get(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<EnvironmentSpec>> {
    Ok(Json::ok(st.manager.get_environment_spec(&id, &who).await?))
}

/// `DELETE /environments/specs/{id}`.
pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.delete_environment_spec(&id, &who).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

/// `GET /environments/specs/{id}/suggestions`.
pub async fn suggestions(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<SpecSuggestions>> {
    Ok(Json::ok(st.manager.spec_suggestions(&id, &who).await?))
}

/// `PUT /environments/specs/{id}/context`: the build context (tar or
/// tar.gz) the spec's Dockerfile `COPY`s from.
pub async fn put_context(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<super::files::ArchiveWritten>> {
    let (report, sum) = super::files::intake_archive(&headers, body, |rx| {
        st.manager.put_spec_context(&id, rx, &who)
    })
    .await?;
    Ok(Json::ok(super::files::ArchiveWritten {
        status: "stored".into(),
        path: String::new(),
        entries: report.entries,
        bytes: report.bytes,
        sha256: sum,
    }))
}
