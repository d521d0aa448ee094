//! Per-owner quotas: overrides of the sandbox cap, max TTL and max exec
//! timeout. Saving or deleting one publishes an event (other control
//! planes see it) and wakes the admission queue.

use chrono::Utc;
use serde_json::json;
use stacyvm_api::{duration, GoDuration, QuotaInput, QuotaUsage};

use crate::events::{self, kind};
use crate::manager::Manager;
use crate::store::QuotaRecord;
use crate::{paths, Error, ErrorKind, Result};

/// Quota rules over the manager's store.
#[derive(Debug, Clone, Copy)]
pub struct Quotas<'a> {
    pub(crate) m: &'a Manager,
}

impl Quotas<'_> {
    pub async fn list(&self) -> Result<Vec<QuotaRecord>> {
        self.m.store().list_quotas().await
    }

    pub async fn get(&self, owner: &str) -> Result<QuotaRecord> {
        self.m.store().get_quota(&owner_id(owner)?).await
    }

    /// Saves an owner's quota (creating or replacing it).
    pub async fn put(&self, owner: &str, input: &QuotaInput) -> Result<QuotaRecord> {
        let o = owner_id(owner)?;
        if input.max_sandboxes < 0 {
            return Err(Error::invalid("max_sandboxes must not be negative"));
        }
        let now = Utc::now();
        let rec = QuotaRecord {
            owner_id: o.clone(),
            max_sandboxes: input.max_sandboxes,
            max_ttl_seconds: quota_secs("max_ttl", &input.max_ttl)?,
            max_exec_timeout_seconds: quota_secs("max_exec_timeout", &input.max_exec_timeout)?,
            created_at: now,
            updated_at: now,
        };
        let saved = self.m.store().upsert_quota(&rec).await?;
        self.m.events().publish(
            kind::QUOTA_SAVED,
            "",
            events::data([
                ("owner_id", json!(o)),
                ("max_sandboxes", json!(saved.max_sandboxes)),
                (
                    "max_ttl",
                    json!(GoDuration::from_secs(saved.max_ttl_seconds).to_string()),
                ),
                (
                    "max_exec_timeout",
                    json!(GoDuration::from_secs(saved.max_exec_timeout_seconds).to_string()),
                ),
            ]),
        );
        self.m.wake_queue();
        Ok(saved)
    }

    pub async fn delete(&self, owner: &str) -> Result<()> {
        let o = owner_id(owner)?;
        self.m.store().delete_quota(&o).await?;
        self.m.events().publish(
            kind::QUOTA_DELETED,
            "",
            events::data([("owner_id", json!(o))]),
        );
        self.m.wake_queue();
        Ok(())
    }

    /// The owner's active sandboxes (across every control plane: counted
    /// in the store) against its quota or the server defaults.
    pub async fn usage(&self, owner: &str) -> Result<QuotaUsage> {
        let o = owner_id(owner)?;
        let quota = match self.m.store().get_quota(&o).await {
            Ok(q) => Some(q),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let active = self
            .m
            .store()
            .list_active_sandboxes()
            .await?
            .iter()
            .filter(|r| r.owner_id == o)
            .count() as i64;
        let d = &self.m.config().defaults;
        let pick = |q: i64, g: GoDuration| if q > 0 { GoDuration::from_secs(q) } else { g };
        Ok(QuotaUsage {
            owner_id: o,
            active_sandboxes: active,
            max_sandboxes: quota
                .as_ref()
                .map(|q| q.max_sandboxes)
                .filter(|n| *n > 0)
                .unwrap_or(d.max_sandboxes_per_owner),
            max_ttl: pick(quota.as_ref().map_or(0, |q| q.max_ttl_seconds), d.max_ttl.0),
            max_exec_timeout: pick(
                quota.as_ref().map_or(0, |q| q.max_exec_timeout_seconds),
                d.max_exec_timeout.0,
            ),
            quota_configured: quota.is_some(),
        })
    }
}

/// A normalised, non-empty owner id.
pub fn owner_id(o: &str) -> Result<String> {
    let o = paths::normalize_owner(o)?;
    if o.is_empty() {
        return Err(Error::invalid("owner_id is required"));
    }
    Ok(o)
}

/// "" / "0" / "0s" = unset; else a whole number of seconds ≥ 1 s.
fn quota_secs(key: &str, v: &str) -> Result<i64> {
    let v = v.trim();
    if v.is_empty() || v == "0" || v == "0s" {
        return Ok(0);
    }
    let n = duration::parse(v).map_err(|e| Error::invalid(format!("parsing {key}: {e}")))?;
    if n < 0 {
        return Err(Error::invalid(format!(
            "parsing {key}: must not be negative"
        )));
    }
    if n < 1_000_000_000 || n % 1_000_000_000 != 0 {
        return Err(Error::invalid(format!(
            "parsing {key}: must be whole seconds of at least 1s"
        )));
    }
    Ok(n / 1_000_000_000)
}
