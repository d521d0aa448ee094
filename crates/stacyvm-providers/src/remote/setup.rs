//! The custom HTTP provider's module: built from `providers.custom.*`, with
//! its own `config lint` and `doctor` checks.

use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_core::checks::{Report, Status};
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::Result;

use super::http::{self, CustomProvider};
use crate::registry::ProviderModule;

pub struct CustomModule;

fn add(r: &mut Report, checks: Vec<http::Check>) {
    for (name, level, message, fix) in checks {
        let status = match level {
            "pass" => Status::Pass,
            "warn" => Status::Warn,
            _ => Status::Fail,
        };
        r.push(&name, status, message, fix.unwrap_or_default());
    }
}

#[async_trait]
impl ProviderModule for CustomModule {
    fn kind(&self) -> &'static str {
        "custom"
    }

    fn provider_name(&self, cfg: &Config) -> String {
        cfg.providers.custom.name.clone()
    }

    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.custom.enabled
    }

    /// An empty or malformed base_url is a startup error, not a provider
    /// that fails every request.
    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(CustomProvider::from_config(
            &cfg.providers.custom,
        )?))
    }

    fn lint(&self, cfg: &Config, production: bool, r: &mut Report) {
        add(r, http::lint(cfg, production));
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        add(r, http::doctor(cfg).await);
    }
}

/// The E2B provider's module: built from `providers.e2b.*`.
pub struct E2bModule;

#[async_trait]
impl ProviderModule for E2bModule {
    fn kind(&self) -> &'static str {
        "e2b"
    }

    fn provider_name(&self, _cfg: &Config) -> String {
        "e2b".into()
    }

    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.e2b.enabled
    }

    /// A missing key or a malformed URL is a startup error.
    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(super::e2b::E2bProvider::from_config(
            &cfg.providers.e2b,
        )?))
    }

    fn lint(&self, cfg: &Config, production: bool, r: &mut Report) {
        let c = &cfg.providers.e2b;
        match super::e2b::E2bProvider::from_config(c) {
            Ok(_) => r.pass("providers.e2b", format!("base_url {}", c.base_url)),
            Err(e) => r.fail(
                "providers.e2b",
                e.to_string(),
                "set providers.e2b.api_key and an http(s) base_url",
            ),
        }
        if production && c.base_url.trim_start().starts_with("http://") {
            r.fail(
                "providers.e2b.base_url",
                "plain http carries the API key and envd tokens unencrypted",
                "use https:// (or a loopback address)",
            );
        }
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        match super::e2b::E2bProvider::from_config(&cfg.providers.e2b) {
            Ok(p) => match p.health().await {
                Ok(()) => r.pass("providers.e2b", "the service answers and accepts the key"),
                Err(e) => r.fail(
                    "providers.e2b",
                    e.to_string(),
                    "check providers.e2b.base_url and api_key",
                ),
            },
            Err(e) => r.fail("providers.e2b", e.to_string(), "fix providers.e2b"),
        }
    }
}
