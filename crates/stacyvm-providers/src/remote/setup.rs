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
