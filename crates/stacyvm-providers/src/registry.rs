//! The provider plug-in seam.
//!
//! Each provider module exposes one [`ProviderModule`]: it builds the
//! provider from config and contributes its own `config lint` and `doctor`
//! checks. `serve`, `doctor` and `config lint` iterate [`modules`] and name
//! no provider. Adding a provider is one module, one config section and one
//! line in [`modules`].

use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_core::checks::Report;
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::Result;

/// One provider kind, as the server, `doctor` and `config lint` see it.
#[async_trait]
pub trait ProviderModule: Send + Sync {
    /// The config section, `providers.<kind>`.
    fn kind(&self) -> &'static str;

    /// The registry name the provider gets (the kind, unless the config
    /// renames it).
    fn provider_name(&self, _cfg: &Config) -> String {
        self.kind().to_string()
    }

    /// Whether the config turns it on.
    fn enabled(&self, cfg: &Config) -> bool;

    /// Builds the provider; a config it cannot use is an `InvalidInput`
    /// naming the key. Nothing external (an engine, a backend) is contacted:
    /// an unreachable dependency makes the provider unhealthy, not the
    /// server fail to start.
    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>>;

    /// Static checks of its config section (`config lint`); `production`
    /// turns the spec's (P) rules into failures. Called only when enabled.
    fn lint(&self, _cfg: &Config, _production: bool, _r: &mut Report) {}

    /// Checks of this host for it (`doctor`); `production` as for `lint`.
    /// Called only when enabled.
    async fn doctor(&self, _cfg: &Config, _production: bool, _r: &mut Report) {}
}

/// Every provider kind compiled in, in registration order (which is also
/// the tie-break of `providers.default: auto`).
pub fn modules() -> Vec<&'static dyn ProviderModule> {
    vec![
        &crate::native::setup::NativeModule,
        #[cfg(feature = "docker")]
        &crate::docker::setup::DockerModule,
        #[cfg(feature = "proot")]
        &crate::proot::setup::ProotModule,
        #[cfg(feature = "microvm")]
        &crate::microvm::setup::QemuModule,
        #[cfg(feature = "microvm")]
        &crate::microvm::setup::FirecrackerModule,
        #[cfg(feature = "custom")]
        &crate::remote::setup::CustomModule,
        #[cfg(feature = "custom")]
        &crate::remote::setup::E2bModule,
        #[cfg(feature = "mock")]
        &crate::mock::MockModule,
    ]
}

/// The module whose provider is registered as `name`.
pub fn module_named(cfg: &Config, name: &str) -> Option<&'static dyn ProviderModule> {
    modules()
        .into_iter()
        .find(|m| m.provider_name(cfg) == name || m.kind() == name)
}

/// Builds every enabled provider.
pub fn build(cfg: &Config) -> Result<Vec<Arc<dyn Provider>>> {
    if cfg!(not(feature = "mock")) && cfg.providers.mock.enabled {
        return Err(stacyvm_core::Error::invalid(
            "providers.mock.enabled: this binary has no mock provider (a test double, built only with the cargo feature `mock`); use native",
        ));
    }
    modules()
        .into_iter()
        .filter(|m| m.enabled(cfg))
        .map(|m| m.build(cfg))
        .collect()
}

/// `config lint` for every provider: the default names an enabled one,
/// then each enabled provider's own checks.
pub fn lint(cfg: &Config, production: bool, r: &mut Report) {
    lint_default(cfg, r);
    if cfg!(not(feature = "mock")) && cfg.providers.mock.enabled {
        r.fail(
            "providers.mock.enabled",
            "this binary has no mock provider (a test double, built only with the cargo feature `mock`)",
            "set providers.mock.enabled: false and use native",
        );
    }
    for m in modules() {
        if m.enabled(cfg) {
            m.lint(cfg, production, r);
        } else {
            r.warn(
                &format!("providers.{}", m.kind()),
                format!("{} is not enabled; {} checks skipped", m.kind(), m.kind()),
                format!("ignore unless you use the {} provider", m.kind()),
            );
        }
    }
}

/// `providers.default` names an enabled provider (or `auto`).
pub fn lint_default(cfg: &Config, r: &mut Report) {
    let default = match cfg.providers.default.as_str() {
        "" => "native",
        d => d,
    };
    if default == "auto" {
        r.pass(
            "providers.default",
            "auto (the healthy enabled provider with the strongest isolation)",
        );
    } else {
        match module_named(cfg, default) {
            Some(m) if m.enabled(cfg) => {
                r.pass("providers.default", format!("{default} (enabled)"));
            }
            Some(m) => r.fail(
                "providers.default",
                format!("the default provider {default:?} is not enabled"),
                format!(
                    "set providers.{}.enabled: true or choose an enabled provider",
                    m.kind()
                ),
            ),
            None => r.fail(
                "providers.default",
                format!("unknown provider {default:?}"),
                format!(
                    "use auto or one of: {}",
                    modules()
                        .iter()
                        .map(|m| m.kind())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
}

/// `doctor` for every provider: each enabled one checks this host; a
/// disabled one gets one WARN line.
pub async fn doctor(cfg: &Config, production: bool, r: &mut Report) {
    for m in modules() {
        if m.enabled(cfg) {
            m.doctor(cfg, production, r).await;
        } else {
            r.warn(
                m.kind(),
                format!("not enabled; {} checks skipped", m.kind()),
                format!(
                    "ignore unless you use the {0} provider (providers.{0}.enabled)",
                    m.kind()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use stacyvm_core::checks::Status;
    #[cfg(feature = "mock")]
    use stacyvm_core::registry::Registry;

    use super::*;
    #[cfg(feature = "mock")]
    use crate::conformance::Fixture;

    fn cfg(yaml: &str) -> Config {
        stacyvm_core::config::from_yaml_str(yaml, &BTreeMap::new())
            .expect("config")
            .config
    }

    fn status(r: &Report, name: &str) -> Option<Status> {
        r.checks.iter().find(|c| c.name == name).map(|c| c.status)
    }

    #[test]
    fn the_default_must_name_an_enabled_provider_by_its_registry_name() {
        let mut r = Report::default();
        lint(&cfg("providers:\n  default: nope\n"), false, &mut r);
        assert_eq!(status(&r, "providers.default"), Some(Status::Fail));
        let c = &r
            .checks
            .iter()
            .find(|c| c.name == "providers.default")
            .expect("check");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("native") && f.contains("auto")),
            "{c:?}"
        );

        let mut r = Report::default();
        lint(
            &cfg("providers:\n  default: docker\n  docker:\n    enabled: false\n"),
            false,
            &mut r,
        );
        assert_eq!(status(&r, "providers.default"), Some(Status::Fail));

        // A renamed custom provider is found by its registry name.
        let mut r = Report::default();
        lint(
            &cfg("providers:\n  default: mine\n  custom:\n    enabled: true\n    name: mine\n    base_url: http://127.0.0.1:9\n"),
            false,
            &mut r,
        );
        assert_eq!(
            status(&r, "providers.default"),
            Some(Status::Pass),
            "{:?}",
            r.checks
        );

        let mut r = Report::default();
        lint(&cfg("providers:\n  default: auto\n"), false, &mut r);
        assert_eq!(status(&r, "providers.default"), Some(Status::Pass));
        // Disabled providers get one line each and no checks of their own.
        assert_eq!(status(&r, "providers.docker"), Some(Status::Warn));
        assert_eq!(status(&r, "providers.docker.runtime"), None);
    }

    #[cfg(feature = "mock")]
    #[test]
    fn build_makes_exactly_the_enabled_providers() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = cfg(&format!(
            "server:\n  data_dir: {}\nproviders:\n  native:\n    enabled: false\n  mock:\n    enabled: true\n  custom:\n    enabled: true\n    name: byo\n    base_url: http://127.0.0.1:9\n",
            dir.path().display()
        ));
        let names: Vec<String> = build(&c)
            .expect("build")
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        assert_eq!(names, ["byo", "mock"]);
        let bad = cfg("providers:\n  native:\n    enabled: false\n  custom:\n    enabled: true\n    base_url: ''\n");
        let e = build(&bad).expect_err("an enabled custom provider needs a base_url");
        assert_eq!(e.kind(), stacyvm_core::ErrorKind::InvalidInput, "{e}");
    }

    #[cfg(feature = "mock")]
    #[tokio::test]
    async fn auto_picks_the_strongest_healthy_provider_and_never_the_mock() {
        let dir = tempfile::tempdir().expect("tmp");
        let mock: Arc<dyn Provider> =
            Arc::new(crate::mock::MockProvider::new(dir.path().join("mock")).expect("mock"));
        let e = Registry::with_default(vec![mock.clone()], "auto")
            .await
            .expect_err("the mock test double is never chosen");
        assert!(
            e.to_string().contains("no enabled provider is healthy"),
            "{e}"
        );
        let fx = crate::native::tests::fixture();
        let native = fx.provider();
        let r = Registry::with_default(vec![mock, native], "auto")
            .await
            .expect("native is healthy");
        assert_eq!(r.default_name(), "native");
    }
}
