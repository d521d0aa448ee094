//! The provider registry: name → provider, the default, cached health.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use parking_lot::Mutex;
use stacyvm_api::ProviderHealth;

use crate::error::{Error, Result};
use crate::provider::{Isolation, Provider};

/// Most bytes of image names a heartbeat reports.
pub const MAX_IMAGE_LIST_BYTES: usize = 32 << 10;
/// How long a health result is reused before probing again.
const HEALTH_TTL: Duration = Duration::from_secs(2);
/// Upper bound of the health probes that choose an `auto` default.
const AUTO_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of one health probe.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Registry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
    default: String,
    health: Mutex<BTreeMap<String, (Instant, ProviderHealth)>>,
}

impl Registry {
    /// Builds a registry; `default` must name one of `providers`.
    pub fn new(providers: Vec<Arc<dyn Provider>>, default: &str) -> Result<Self> {
        let mut map = BTreeMap::new();
        for p in providers {
            map.insert(p.name().to_string(), p);
        }
        if !map.contains_key(default) {
            let known: Vec<&str> = map.keys().map(String::as_str).collect();
            return Err(Error::provider_not_found(default).context(&format!(
                "default provider is not available (registered: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(Registry {
            providers: map,
            default: default.to_string(),
            health: Mutex::new(BTreeMap::new()),
        })
    }

    /// Builds a registry whose default may be `auto`: the healthy provider
    /// with the strongest isolation (the first registered among equals);
    /// the mock test double is never chosen.
    pub async fn with_default(providers: Vec<Arc<dyn Provider>>, default: &str) -> Result<Self> {
        if default != "auto" {
            return Self::new(providers, default);
        }
        let probes = providers.iter().map(|p| async move {
            let healthy = matches!(
                tokio::time::timeout(AUTO_PROBE_TIMEOUT, p.health()).await,
                Ok(Ok(()))
            );
            (p.profile().isolation, healthy)
        });
        let ranked = futures::future::join_all(probes).await;
        let mut best: Option<(Isolation, &str)> = None;
        for (p, (iso, healthy)) in providers.iter().zip(ranked) {
            if healthy && iso != Isolation::None && best.is_none_or(|(b, _)| iso > b) {
                best = Some((iso, p.name()));
            }
        }
        let Some((_, name)) = best else {
            return Err(Error::unavailable(
                "providers.default is auto but no enabled provider is healthy",
            ));
        };
        let name = name.to_string();
        Self::new(providers, &name)
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Resolves a provider name ("" = the default).
    pub fn get(&self, name: &str) -> Result<Arc<dyn Provider>> {
        let name = if name.is_empty() { &self.default } else { name };
        self.providers
            .get(name)
            .cloned()
            .ok_or_else(|| Error::provider_not_found(name))
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// Images the providers spawn without fetching (deduplicated, at most
    /// [`MAX_IMAGE_LIST_BYTES`] of names), for the heartbeat's
    /// `capacity.images` (placement locality). A longer list is cut: the
    /// images left out only lose their locality preference.
    pub async fn local_images(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut bytes = 0;
        for p in self.all() {
            for i in p.local_images().await {
                if i.len() > 512 || out.contains(&i) {
                    continue;
                }
                bytes += i.len() + 3;
                if bytes > MAX_IMAGE_LIST_BYTES {
                    return out;
                }
                out.push(i);
            }
        }
        out
    }

    pub fn all(&self) -> Vec<Arc<dyn Provider>> {
        self.providers.values().cloned().collect()
    }

    /// Health of one provider, probed at most every 2 s.
    pub async fn health_of(&self, p: &Arc<dyn Provider>) -> ProviderHealth {
        let name = p.name().to_string();
        if let Some((at, h)) = self.health.lock().get(&name) {
            if at.elapsed() < HEALTH_TTL {
                return h.clone();
            }
        }
        let start = Instant::now();
        let res = tokio::time::timeout(HEALTH_TIMEOUT, p.health()).await;
        let latency = start.elapsed();
        let error = match res {
            Ok(Ok(())) => String::new(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("health check timed out after {}s", HEALTH_TIMEOUT.as_secs()),
        };
        let mut runtime_count = None;
        if error.is_empty()
            && p.capabilities()
                .iter()
                .any(|c| c == crate::provider::capability::RUNTIME_INVENTORY)
        {
            if let Ok(Ok(list)) = tokio::time::timeout(HEALTH_TIMEOUT, p.list_runtimes()).await {
                runtime_count = Some(list.len() as i64);
            }
        }
        let profile = p.profile();
        let h = ProviderHealth {
            name: name.clone(),
            healthy: error.is_empty(),
            default: name == self.default,
            latency_ms: latency.as_millis() as i64,
            last_checked: Utc::now(),
            error,
            capabilities: p.capabilities(),
            runtime_count,
            isolation: profile.isolation.as_str().to_string(),
            network_modes: profile.network_modes,
            default_network_mode: profile.default_network,
        };
        self.health.lock().insert(name, (Instant::now(), h.clone()));
        h
    }

    /// Health of every provider, probed concurrently, sorted by name.
    pub async fn health_all(&self) -> Vec<ProviderHealth> {
        let futs = self.providers.values().map(|p| self.health_of(p));
        futures::future::join_all(futs).await
    }
}
