//! `/environments/builds` (see `stacyvm_core::manager::builds`).

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde::Deserialize;
use stacyvm_api::{Build, BuildEntry, BuildSpawnConfig, CreateBuild};

use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json};
use crate::AppState;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListQuery {
    /// Only this owner's builds.
    pub(crate) owner_id: Option<String>,
    /// 1–200 (default 30).
    pub(crate) limit: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct LogQuery {
    /// Start at this byte of the log (default 0).
    pub(crate) offset: Option<u64>,
    /// `1` or `true`: keep streaming until the build ends.
    pub(crate) follow: Option<String>,
}

/// `GET /environments/builds[?owner_id=&limit=]`.
pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<BuildEntry>>> {
    Ok(Json::ok(
        st.manager
            .list_builds(q.owner_id.as_deref(), q.limit.unwrap_or(30), &who)
            .await?,
    ))
}

/// `POST /environments/builds`: 201, queued.
pub async fn create(
    State(st): State<AppState>,
    Who(who): Who,
    Body2(req): Body2<CreateBuild>,
) -> ApiResult<Json<Build>> {
    Ok(Json::created(st.manager.create_build(req, &who).await?))
}

/// `GET /environments/builds/{id}`.
pub async fn get(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Build>> {
    Ok(Json::ok(st.manager.get_build(&id, &who).await?))
}

/// `POST /environments/builds/{id}/cancel`.
pub async fn cancel(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Build>> {
    Ok(Json::ok(st.manager.cancel_build(&id, &who).await?))
}

/// `GET /environments/builds/{id}/spawn-config`.
pub async fn spawn_config(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildSpawnConfig>> {
    Ok(Json::ok(st.manager.build_spawn_config(&id, &who).await?))
}

/// `GET /environments/builds/{id}/logs[?offset=&follow=1]`: plain text,
/// streamed.
pub async fn logs(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes"));
    let rx = st
        .manager
        .build_logs(&id, q.offset.unwrap_or(0), follow, &who)
        .await?;
    let mut resp = Response::new(super::files::stream_body(rx));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies must not buffer a followed log.
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}
