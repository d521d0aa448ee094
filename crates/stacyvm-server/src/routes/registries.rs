//! `/environments/registry-connections` (see
//! `stacyvm_core::manager::registries`).

use axum::extract::{Path, Query, State};
use serde::Deserialize;
use stacyvm_api::{CreateRegistryConnection, RegistryConnection, StatusResponse};

use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json};
use crate::AppState;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct OwnerQuery {
    /// Only this owner's connections.
    pub(crate) owner_id: Option<String>,
}

/// `GET /environments/registry-connections[?owner_id=]`.
pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Query(q): Query<OwnerQuery>,
) -> ApiResult<Json<Vec<RegistryConnection>>> {
    Ok(Json::ok(
        st.manager
            .list_registry_connections(q.owner_id.as_deref(), &who)
            .await?,
    ))
}

/// `POST /environments/registry-connections`: 201.
pub async fn create(
    State(st): State<AppState>,
    Who(who): Who,
    Body2(req): Body2<CreateRegistryConnection>,
) -> ApiResult<Json<RegistryConnection>> {
    Ok(Json::created(
        st.manager.create_registry_connection(req, &who).await?,
    ))
}

/// `DELETE /environments/registry-connections/{id}`.
pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.delete_registry_connection(&id, &who).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}
