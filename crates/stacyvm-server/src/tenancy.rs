//! From a verified identity to the orchestrator's [`Caller`]: owner,
//! actor and tenant, never taken on the caller's word alone (S-3, S-4).

use axum::http::{HeaderMap, StatusCode};
use stacyvm_core::manager::{Caller, Scope};
use stacyvm_core::ErrorKind;

use crate::auth::{Identity, Role, Via};
use crate::error::ApiError;
use crate::AppState;

/// The authorised caller of a request (request extension).
#[derive(Debug, Clone)]
pub struct Authed {
    pub identity: Identity,
    /// Effective role (a tenant membership may narrow or widen it).
    pub role: Role,
    pub caller: Caller,
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn forbidden(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", msg)
}

/// Resolves owner, actor and tenant:
/// - `X-User-ID` names the owner for the admin key and, when
///   `auth.api_key_acts_for_users`, the API key (service credentials); an
///   OIDC caller is its `sub`, and a different `X-User-ID` is refused.
/// - The tenant is the OIDC tenant claim; `X-Tenant-ID` is believed from
///   the admin key, and otherwise only when the user is a member of that
///   tenant (membership role `viewer` narrows the role to viewer, `admin`
///   widens an OIDC user to `tenant_admin`).
pub async fn caller_of(
    st: &AppState,
    id: &Identity,
    h: &HeaderMap,
    request_id: &str,
) -> Result<Authed, ApiError> {
    let asked_user = header(h, "x-user-id");
    let owner = if id.via == Via::Oidc {
        if !asked_user.is_empty() && asked_user != id.subject {
            return Err(forbidden(
                "X-User-ID cannot override the subject of an OIDC token",
            ));
        }
        id.subject.clone()
    } else if !asked_user.is_empty() && !id.may_act_for_others() {
        return Err(forbidden(
            "this API key may not act for other users (auth.api_key_acts_for_users is false)",
        ));
    } else {
        asked_user
    };
    let owner = stacyvm_core::paths::normalize_owner(&owner).map_err(ApiError::from)?;
    let actor = if owner.is_empty() || id.via == Via::Oidc {
        id.label()
    } else {
        format!("{}:{owner}", id.label())
    };
    let asked_tenant = header(h, "x-tenant-id");
    let mut role = id.role;
    let tenant_id = if asked_tenant.is_empty() || asked_tenant == id.tenant_id {
        id.tenant_id.clone()
    } else if matches!(id.via, Via::AdminKey | Via::Unauthenticated) {
        asked_tenant
    } else {
        if owner.is_empty() {
            return Err(forbidden(
                "X-Tenant-ID from an API key needs X-User-ID of a member of that tenant",
            ));
        }
        let member = match st.manager.tenancy().member(&asked_tenant, &owner).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(forbidden(format!(
                    "user {owner:?} is not a member of tenant {asked_tenant:?}"
                )))
            }
            Err(e) => return Err(ApiError::from(e)),
        };
        match member.role.as_str() {
            "viewer" => role = Role::Viewer,
            "admin" if id.via == Via::Oidc && role != Role::Admin => role = Role::TenantAdmin,
            _ => {}
        }
        asked_tenant
    };
    let scope = scope_of(st, id, role, &owner);
    Ok(Authed {
        identity: id.clone(),
        role,
        caller: Caller {
            owner_id: owner,
            tenant_id,
            actor,
            request_id: request_id.to_string(),
            scope,
            names_owners: id.may_act_for_others(),
        },
    })
}

/// Which sandboxes a caller reaches (F-6):
/// - the admin (and an open server): every tenant when it names none;
/// - operators and tenant admins: their tenant (no tenant is a tenant);
/// - viewers and api callers, with `auth.owner_scoping`: what they own in
///   their tenant. A static key that may act for users and names none is
///   a service credential and reaches its tenant.
fn scope_of(st: &AppState, id: &Identity, role: Role, owner: &str) -> Scope {
    match role {
        Role::Admin => Scope::Global,
        Role::Operator | Role::TenantAdmin => Scope::Tenant,
        Role::Viewer | Role::Api => {
            let service = id.may_act_for_others() && owner.is_empty();
            if st.cfg.auth.owner_scoping && !service {
                Scope::Owner
            } else {
                Scope::Tenant
            }
        }
    }
}

impl Authed {
    /// Whether this caller may see server-wide facts: other owners'
    /// quotas and usage, global sandbox counts, provider configuration
    /// (the admin, or an operator acting in no tenant; F-17).
    pub fn sees_server_wide(&self) -> bool {
        self.role == Role::Admin
            || (self.role == Role::Operator && self.caller.tenant_id.is_empty())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Authed>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "caller identity missing",
            )
        })
    }
}
