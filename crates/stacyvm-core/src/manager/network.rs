//! Egress policies of sandboxes (see [`crate::egress`]): computed at
//! spawn, changed at runtime, re-applied after a restart, and the
//! denials shown to the owner.
//!
//! A sandbox's record keeps, as hidden metadata, its own policy as the
//! caller sees it (`stacyvm.sys.network`), the rules its provider enforces
//! (`stacyvm.sys.egress`, re-applied as they are after a restart) and the
//! `allowed_hosts` of its template (`stacyvm.sys.allowed_hosts`, which
//! bounds later changes as it bounded the spawn).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use stacyvm_api::{NetworkPatch, NetworkPolicy, NetworkStatus, SpawnRequest};
use tracing::warn;

use super::{Caller, Manager};
use crate::egress::{self, EgressRules, Limits};
use crate::error::{Error, Result};
use crate::provider::{capability, Provider};
use crate::store::{PolicyRecord, SandboxRecord};

/// The sandbox's own policy, as shown.
pub const POLICY_KEY: &str = "stacyvm.sys.network";
/// Its template's `allowed_hosts`.
pub const ALLOWED_HOSTS_KEY: &str = "stacyvm.sys.allowed_hosts";
/// Its network mode (`none`, `bridge`).
pub const NETWORK_MODE_KEY: &str = "stacyvm.sys.network_mode";

fn stored<T: serde::de::DeserializeOwned>(
    rec_md: &BTreeMap<String, String>,
    key: &str,
) -> Option<T> {
    rec_md.get(key).and_then(|v| serde_json::from_str(v).ok())
}

/// The template allowlist a sandbox was spawned under.
pub fn allowed_hosts_of(md: &BTreeMap<String, String>) -> Vec<String> {
    stored(md, ALLOWED_HOSTS_KEY).unwrap_or_default()
}

/// A sandbox's own policy (shown on the sandbox object).
pub fn policy_of(md: &BTreeMap<String, String>) -> Option<NetworkPolicy> {
    stored(md, POLICY_KEY)
}

/// The rules its provider enforces.
pub fn rules_of(md: &BTreeMap<String, String>) -> Option<EgressRules> {
    stored(md, egress::METADATA_KEY)
}

/// What a spawn enforces: the metadata to record and the provider's rules.
pub(crate) struct SpawnEgress {
    pub metadata: BTreeMap<String, String>,
    pub rules: Option<EgressRules>,
}

/// Writes (or clears) the hidden keys of a policy and its rules.
fn record(
    md: &mut BTreeMap<String, String>,
    policy: Option<&NetworkPolicy>,
    rules: Option<&EgressRules>,
) {
    for (key, value) in [
        (
            POLICY_KEY,
            policy.and_then(|p| serde_json::to_string(p).ok()),
        ),
        (
            egress::METADATA_KEY,
            rules.and_then(|r| serde_json::to_string(r).ok()),
        ),
    ] {
        match value {
            Some(v) => {
                md.insert(key.to_string(), v);
            }
            None => {
                md.remove(key);
            }
        }
    }
}

/// Whether `provider` can enforce `rules` in `network` mode (`none` has
/// nothing to filter).
fn check_capable(
    provider: &dyn Provider,
    network: &str,
    rules: Option<&EgressRules>,
) -> Result<()> {
    if network == "none" || rules.is_none() {
        return Ok(());
    }
    if provider
        .capabilities()
        .iter()
        .any(|c| c == capability::EGRESS)
    {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "provider {} cannot enforce egress rules; use a provider with the egress capability (native, docker, qemu) or network_mode none",
            provider.name()
        )))
    }
}

impl Manager {
    /// The egress of a new sandbox: its request's policy under the
    /// caller's tenant policies and the template's `allowed_hosts` (for a
    /// snapshot's child, its source sandbox's).
    pub(crate) fn spawn_egress(
        &self,
        req: &SpawnRequest,
        allowed_hosts: &[String],
        policies: &[PolicyRecord],
        provider: &dyn Provider,
        network: &str,
    ) -> Result<SpawnEgress> {
        let parsed = req
            .network
            .as_ref()
            .map(egress::parse)
            .transpose()?
            .filter(|p| !(p.allow.is_empty() && p.deny.is_empty() && p.dns.is_none()));
        let limits = Limits::new(policies, allowed_hosts)?;
        let rules = egress::effective(parsed.as_ref(), &limits)?;
        check_capable(provider, network, rules.as_ref())?;
        let mut metadata = BTreeMap::from([(NETWORK_MODE_KEY.to_string(), network.to_string())]);
        let policy = parsed.as_ref().map(egress::Parsed::to_policy);
        record(&mut metadata, policy.as_ref(), rules.as_ref());
        if !allowed_hosts.is_empty() {
            metadata.insert(
                ALLOWED_HOSTS_KEY.to_string(),
                serde_json::to_string(&allowed_hosts).unwrap_or_default(),
            );
        }
        Ok(SpawnEgress { metadata, rules })
    }

    /// `GET /sandboxes/{id}/network`.
    pub async fn network(&self, id: &str, caller: &Caller) -> Result<NetworkStatus> {
        let rec = self.get(id, caller).await?;
        self.network_status(&rec).await
    }

    async fn network_status(&self, rec: &SandboxRecord) -> Result<NetworkStatus> {
        let rules = rules_of(&rec.metadata);
        let denied = match &rules {
            // A pooled sandbox's rules are its host's, and so would be the
            // denials (other sandboxes' connections): none are shown.
            Some(_) if rec.pool_slot().is_some() => Vec::new(),
            Some(_) => {
                let provider = self.provider_of(rec).await?;
                provider.egress_denials(target(rec)).await?
            }
            None => Vec::new(),
        };
        Ok(NetworkStatus {
            sandbox_id: rec.id.clone(),
            network_mode: self.network_mode_of(rec),
            policy: policy_of(&rec.metadata),
            effective: rules.as_ref().map(|r| NetworkPolicy {
                deny_all: false,
                allow_out: r
                    .allow
                    .iter()
                    .map(ToString::to_string)
                    .chain(r.domains.iter().map(|d| d.as_str().to_string()))
                    .collect(),
                deny_out: r.deny.iter().map(ToString::to_string).collect(),
                dns_servers: r
                    .dns
                    .as_ref()
                    .map(|l| l.iter().map(ToString::to_string).collect()),
            }),
            enforced_deny: rules
                .map(|r| r.enforced.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            denied,
        })
    }

    /// Sandboxes of older servers did not record it: unknown counts as
    /// `bridge` (the strict case).
    fn network_mode_of(&self, rec: &SandboxRecord) -> String {
        rec.metadata
            .get(NETWORK_MODE_KEY)
            .cloned()
            .unwrap_or_else(|| "bridge".into())
    }

    /// `PATCH /sandboxes/{id}/network`: the fields present replace the
    /// policy's.
    pub async fn patch_network(
        &self,
        id: &str,
        patch: NetworkPatch,
        caller: &Caller,
    ) -> Result<NetworkStatus> {
        let rec = self.get(id, caller).await?;
        let mut p = policy_of(&rec.metadata).unwrap_or_default();
        if let Some(v) = patch.allow_out {
            p.allow_out = v;
        }
        if let Some(v) = patch.deny_out {
            p.deny_out = v;
        }
        if let Some(v) = patch.dns_servers {
            p.dns_servers = v;
        }
        match patch.deny_all {
            Some(true) => p.deny_all = true,
            Some(false) => p.deny_out.retain(|c| c != egress::ALL_TRAFFIC),
            None => {}
        }
        self.set_network(id, Some(p), caller).await
    }

    /// Replaces a sandbox's policy (`None`: none), effective at once.
    pub async fn set_network(
        &self,
        id: &str,
        policy: Option<NetworkPolicy>,
        caller: &Caller,
    ) -> Result<NetworkStatus> {
        let rec = self.get(id, caller).await?;
        super::vmpool::refuse_pooled(
            &rec,
            "change its egress rules (they are its pool host's; spawn it with them instead)",
        )?;
        let rec = self.fresh(&rec).await?;
        // A policy that says nothing is no policy.
        let parsed = policy
            .as_ref()
            .map(egress::parse)
            .transpose()?
            .filter(|p| !(p.allow.is_empty() && p.deny.is_empty() && p.dns.is_none()));
        let policies = self
            .store
            .list_policies(Some(rec.tenant_id.as_str()))
            .await?;
        let allowed_hosts = allowed_hosts_of(&rec.metadata);
        let limits = Limits::new(&policies, &allowed_hosts)?;
        let rules = egress::effective(parsed.as_ref(), &limits)?;
        let provider = self.provider_of(&rec).await?;
        check_capable(
            provider.as_ref(),
            &self.network_mode_of(&rec),
            rules.as_ref(),
        )?;
        let res = provider.set_egress(target(&rec), rules.as_ref()).await;
        let shown = parsed.as_ref().map(egress::Parsed::to_policy);
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.network",
            id,
            &rec.image,
            &rec.provider,
            res.is_ok(),
            match &res {
                Ok(()) => serde_json::to_string(&shown).unwrap_or_default(),
                Err(e) => e.to_string(),
            },
        );
        res?;
        let mut updated = (*rec).clone();
        record(&mut updated.metadata, shown.as_ref(), rules.as_ref());
        self.store
            .set_sandbox_metadata(id, &updated.metadata)
            .await?;
        self.cache
            .write()
            .insert(id.to_string(), Arc::new(updated.clone()));
        self.events.publish(
            crate::events::kind::SANDBOX_NETWORK_UPDATED,
            id,
            crate::events::data([("network", json!(shown))]),
        );
        self.network_status(&updated).await
    }

    /// After a restart: puts an adopted sandbox's rules back in force (a
    /// provider's egress proxy listens anew).
    pub(crate) async fn reapply_egress(&self, provider: &Arc<dyn Provider>, rec: &SandboxRecord) {
        let Some(rules) = rules_of(&rec.metadata) else {
            return;
        };
        if let Err(e) = provider.set_egress(target(rec), Some(&rules)).await {
            warn!(sandbox_id = %rec.id, error = %e, "re-applying egress rules after a restart failed");
        }
    }
}

fn target(rec: &SandboxRecord) -> &str {
    if rec.vm_id.is_empty() {
        &rec.id
    } else {
        &rec.vm_id
    }
}
