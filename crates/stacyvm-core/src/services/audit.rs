//! The audit trail: requests (admin audit) and sandbox operations (op
//! audit), its retention, and its exports.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::manager::Manager;
use crate::store::{AdminAuditFilter, AdminAuditRecord, OpAuditFilter, OpAuditRecord};
use crate::Result;

/// Most rows one export returns.
pub const MAX_EXPORT_ROWS: i64 = 500;
/// Rows per kind in a tenant's audit export.
pub const TENANT_EXPORT_ROWS: i64 = 200;

/// Audit rules over the manager's store.
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    pub(crate) m: &'a Manager,
}

/// A tenant's admin and operation audit rows.
#[derive(Debug, Clone)]
pub struct TenantAudit {
    pub admin: Vec<AdminAuditRecord>,
    pub ops: Vec<OpAuditRecord>,
}

impl Audit<'_> {
    /// Writes a request's audit row, then applies
    /// `auth.admin_audit_retention` at most once a minute (or once per
    /// retention period if shorter), not after every write (C-28). A
    /// failed write is logged: the request it records already happened.
    pub async fn record_admin(&self, rec: &AdminAuditRecord) {
        let store = self.m.store();
        if let Err(e) = store.insert_admin_audit(rec).await {
            tracing::warn!(error = %e, "writing admin audit failed");
            return;
        }
        let keep = self.m.config().auth.admin_audit_retention;
        if keep.is_zero() || keep.0.is_negative() {
            return;
        }
        let Ok(keep) = chrono::Duration::from_std(keep.std()) else {
            return;
        };
        let every = keep
            .to_std()
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        {
            let mut last = self.m.audit_pruned.lock();
            if last.is_some_and(|t| t.elapsed() < every) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = store.prune_audit(Utc::now() - keep).await {
            tracing::warn!(error = %e, "pruning audit failed");
        }
    }

    /// Request rows, newest first; the limit is clamped to 1–500.
    pub async fn admin(&self, mut f: AdminAuditFilter) -> Result<Vec<AdminAuditRecord>> {
        f.limit = f.limit.clamp(1, MAX_EXPORT_ROWS);
        self.m.store().list_admin_audit(&f).await
    }

    /// Operation rows, newest first; the limit is clamped to 1–500.
    pub async fn ops(&self, mut f: OpAuditFilter) -> Result<Vec<OpAuditRecord>> {
        f.limit = f.limit.clamp(1, MAX_EXPORT_ROWS);
        self.m.store().list_op_audit(&f).await
    }

    /// A tenant's rows of both kinds since a time.
    pub async fn tenant(&self, tenant: &str, since: Option<DateTime<Utc>>) -> Result<TenantAudit> {
        let admin = self
            .admin(AdminAuditFilter {
                tenant_id: tenant.to_string(),
                since,
                limit: TENANT_EXPORT_ROWS,
                ..AdminAuditFilter::default()
            })
            .await?;
        let ops = self
            .ops(OpAuditFilter {
                tenant_id: tenant.to_string(),
                since,
                limit: TENANT_EXPORT_ROWS,
                ..OpAuditFilter::default()
            })
            .await?;
        Ok(TenantAudit { admin, ops })
    }
}
