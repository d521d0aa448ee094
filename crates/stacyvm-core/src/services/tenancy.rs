//! Tenants, their members and the allow/deny policies of tenants and of
//! the whole server.

use chrono::Utc;
use serde_json::Value;

use super::{check_id, random_suffix};
use crate::manager::Manager;
use crate::store::{PolicyRecord, TenantMemberRecord, TenantRecord};
use crate::{policy, Error, ErrorKind, Result};

/// Tenancy rules over the manager's store.
#[derive(Debug, Clone, Copy)]
pub struct Tenancy<'a> {
    pub(crate) m: &'a Manager,
}

/// A tenant as a caller creates or changes it; empty fields are unset.
#[derive(Debug, Clone, Default)]
pub struct TenantInput {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    pub settings: Option<Value>,
}

/// A policy as a caller creates it.
#[derive(Debug, Clone, Default)]
pub struct PolicyInput {
    pub resource_type: String,
    pub effect: String,
    pub pattern: String,
    /// 0 = the default priority (10).
    pub priority: i64,
}

/// Member roles inside a tenant.
pub const MEMBER_ROLES: [&str; 3] = ["viewer", "operator", "admin"];

impl Tenancy<'_> {
    pub async fn list(&self) -> Result<Vec<TenantRecord>> {
        self.m.store().list_tenants().await
    }

    /// A tenant by id; an unknown one is `NotFound` ("tenant not found").
    pub async fn get(&self, id: &str) -> Result<TenantRecord> {
        self.m
            .store()
            .get_tenant(id)
            .await
            .map_err(|e| not_found(e, "tenant"))
    }

    /// Creates a tenant; an empty id gets a generated `tenant-…` one.
    pub async fn create(&self, b: TenantInput) -> Result<TenantRecord> {
        if b.name.trim().is_empty() {
            return Err(Error::invalid("name is required"));
        }
        let id = if b.id.is_empty() {
            format!("tenant-{}", random_suffix())
        } else {
            b.id
        };
        check_id("tenant id", &id)?;
        let now = Utc::now();
        let t = TenantRecord {
            id,
            name: b.name.trim().to_string(),
            owner_id: b.owner_id,
            settings: settings_text(b.settings.as_ref())?.unwrap_or_else(|| "{}".into()),
            created_at: now,
            updated_at: now,
        };
        self.m.store().create_tenant(&t).await?;
        Ok(t)
    }

    /// Changes the fields given (the id never changes).
    pub async fn update(&self, id: &str, b: TenantInput) -> Result<TenantRecord> {
        let mut t = self.get(id).await?;
        if !b.id.is_empty() && b.id != id {
            return Err(Error::invalid("id cannot be changed"));
        }
        if !b.name.trim().is_empty() {
            t.name = b.name.trim().to_string();
        }
        if !b.owner_id.is_empty() {
            t.owner_id = b.owner_id;
        }
        if let Some(s) = settings_text(b.settings.as_ref())? {
            t.settings = s;
        }
        t.updated_at = Utc::now();
        self.m.store().update_tenant(&t).await?;
        Ok(t)
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        self.get(id).await?;
        self.m.store().delete_tenant(id).await
    }

    pub async fn members(&self, tenant: &str) -> Result<Vec<TenantMemberRecord>> {
        self.get(tenant).await?;
        self.m.store().list_tenant_members(tenant).await
    }

    /// A member's row; `NotFound` when the user is not in the tenant.
    pub async fn member(&self, tenant: &str, user: &str) -> Result<TenantMemberRecord> {
        self.m.store().get_tenant_member(tenant, user).await
    }

    /// Adds a user to a tenant or changes its role.
    pub async fn put_member(
        &self,
        tenant: &str,
        user: &str,
        role: &str,
    ) -> Result<TenantMemberRecord> {
        check_id("user id", user)?;
        if !MEMBER_ROLES.contains(&role) {
            return Err(Error::invalid(format!(
                "role must be viewer, operator, or admin, got {role:?}"
            )));
        }
        self.get(tenant).await?;
        let now = Utc::now();
        self.m
            .store()
            .upsert_tenant_member(&TenantMemberRecord {
                tenant_id: tenant.to_string(),
                user_id: user.to_string(),
                role: role.to_string(),
                created_at: now,
                updated_at: now,
            })
            .await
    }

    pub async fn delete_member(&self, tenant: &str, user: &str) -> Result<()> {
        self.m
            .store()
            .delete_tenant_member(tenant, user)
            .await
            .map_err(|e| not_found(e, "member"))
    }

    /// Policies of a tenant (`Some`) or the server-wide ones (`None`).
    pub async fn policies(&self, tenant: Option<&str>) -> Result<Vec<PolicyRecord>> {
        if let Some(t) = tenant {
            self.get(t).await?;
        }
        self.m.store().list_policies(tenant).await
    }

    /// Creates a policy in a tenant ("" = server-wide).
    pub async fn create_policy(&self, tenant: &str, b: PolicyInput) -> Result<PolicyRecord> {
        policy::validate(&b.resource_type, &b.effect, &b.pattern)?;
        if b.priority < 0 {
            return Err(Error::invalid("priority must not be negative"));
        }
        if !tenant.is_empty() {
            self.get(tenant).await?;
        }
        let now = Utc::now();
        let p = PolicyRecord {
            id: format!("pol-{}", random_suffix()),
            tenant_id: tenant.to_string(),
            resource_type: b.resource_type,
            effect: b.effect,
            pattern: b.pattern,
            priority: if b.priority == 0 { 10 } else { b.priority },
            created_at: now,
            updated_at: now,
        };
        self.m.store().create_policy(&p).await?;
        Ok(p)
    }

    pub async fn delete_policy(&self, tenant: &str, id: &str) -> Result<()> {
        self.m
            .store()
            .delete_policy(tenant, id)
            .await
            .map_err(|e| not_found(e, "policy"))
    }
}

/// `NotFound` from the store, said as "<what> not found".
fn not_found(e: Error, what: &str) -> Error {
    if e.kind() == ErrorKind::NotFound {
        Error::not_found(format!("{what} not found"))
    } else {
        e
    }
}

fn settings_text(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.to_string())),
        Some(_) => Err(Error::invalid("settings must be a JSON object")),
    }
}
