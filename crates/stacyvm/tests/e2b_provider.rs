//! The provider conformance suite through the E2B provider, against a
//! second `stacyvm serve` (native provider) on loopback that speaks E2B's
//! API: StacyVM driving an E2B-compatible service over E2B's real wire
//! contract (control plane, envd's Connect RPCs, `/files`), the way it
//! would drive E2B's cloud or a self-hosted E2B.
//!
//! Each case starts its own backend server (stopped when the case ends).

mod common;

use std::sync::Arc;

use stacyvm_core::config::{E2bConfig, Secret};
use stacyvm_core::provider::Provider;
use stacyvm_providers::conformance;
use stacyvm_providers::remote::e2b::E2bProvider;

struct Fixture {
    cfg: E2bConfig,
    _server: common::Server,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_PROVIDERS_DEFAULT", "native"),
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ],
    );
    let root = server.url.trim_end_matches("/api/v1").to_string();
    Fixture {
        cfg: E2bConfig {
            enabled: true,
            // The backend is an open loopback server: any key is accepted
            // (with keys configured it would be one of its API keys).
            api_key: Secret::new("e2b_conformance"),
            base_url: root.clone(),
            sandbox_url: root,
            template: "base".into(),
        },
        _server: server,
        _dir: dir,
    }
}

impl conformance::Fixture for Fixture {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(E2bProvider::from_config(&self.cfg).expect("e2b provider"))
    }
    fn image(&self) -> String {
        "base".into()
    }
    fn survives_restart(&self) -> bool {
        true
    }
    /// E2B names users; a numeric uid is refused as `Unsupported`.
    fn supports_users(&self) -> bool {
        false
    }
    /// Ports of an E2B sandbox are reached through E2B's own host names.
    fn supports_archives(&self) -> bool {
        false
    }
    fn supports_connect(&self) -> bool {
        false
    }
}

stacyvm_providers::conformance_tests!(e2b_conformance, fixture());
