//! A real `stacyvm-server` on a loopback listener, with the mock provider
//! and a SQLite store in a temp dir: the harness of the API test suites.

#![allow(dead_code)]

use std::sync::Arc;

use stacyvm_core::config::Config;
use stacyvm_core::events::EventBus;
use stacyvm_core::manager::Manager;
use stacyvm_core::metrics::Metrics;
use stacyvm_core::registry::Registry;
use stacyvm_providers::mock::MockProvider;
use stacyvm_store::SqliteStore;

pub struct TestServer {
    /// `http://127.0.0.1:<port>` (no path).
    pub root: String,
    pub http: reqwest::Client,
    pub manager: Arc<Manager>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a server on `cfg` (its data dir and default provider replaced).
pub async fn start_with(mut cfg: Config) -> TestServer {
    let dir = tempfile::tempdir().expect("tmp");
    cfg.server.data_dir = dir.path().to_string_lossy().to_string();
    cfg.providers.default = "mock".into();
    let provider = Arc::new(MockProvider::new(dir.path().join("mock")).expect("mock"));
    let registry = Arc::new(Registry::new(vec![provider], "mock").expect("registry"));
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .expect("store"),
    );
    let manager = Manager::new(
        Arc::new(cfg),
        store,
        registry,
        Arc::new(EventBus::new()),
        Arc::new(Metrics::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let root = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = stacyvm_server::AppState::new(manager.clone()).expect("state");
    tokio::spawn(stacyvm_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    TestServer {
        root,
        http: reqwest::Client::new(),
        manager,
        _dir: dir,
        _stop: tx,
    }
}
