//! `stacyvm serve`: load config, open the store, register providers,
//! reconcile, then serve until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::Utc;
use stacyvm_core::config::{self, Config};
use stacyvm_core::events::EventBus;
use stacyvm_core::manager::{Manager, LOCAL_WORKER};
use stacyvm_core::metrics::Metrics;
use stacyvm_core::provider::Provider;
use stacyvm_core::registry::Registry;
use stacyvm_core::store::WorkerRecord;
use tracing::{info, warn};

fn init_logging(cfg: &Config) {
    let level = cfg.logging.level.to_ascii_lowercase();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STACYVM_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},sqlx=warn,hyper=warn,tower=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.logging.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A CIDR list of the config (validated at load; the key names an error).
fn parse_cidrs(key: &str, list: &[String]) -> Result<Vec<stacyvm_core::cidr::Cidr>> {
    let mut out = Vec::new();
    for entry in list {
        out.push(
            entry
                .parse()
                .map_err(|e| anyhow::anyhow!("{key}: {entry:?}: {e}"))?,
        );
    }
    Ok(out)
}

fn build_providers(cfg: &Config) -> Result<Vec<Arc<dyn Provider>>> {
    let mut v: Vec<Arc<dyn Provider>> = Vec::new();
    if cfg.providers.native.enabled {
        let agent = stacyvm_providers::native::find_agent(&cfg.providers.native.agent_path).ok_or_else(|| {
            anyhow::anyhow!("stacyvm-agent not found next to the stacyvm binary; build it (cargo build -p stacyvm-agent) or set providers.native.agent_path")
        })?;
        let data = std::path::Path::new(&cfg.server.data_dir);
        let opts = stacyvm_providers::native::NativeOptions {
            state_dir: data.join("native"),
            agent_path: agent,
            pids_limit: u64::try_from(cfg.providers.native.pids_limit).unwrap_or(512),
            hidden: vec![cfg.server.data_dir.clone()],
            network_mode: cfg.providers.native.network_mode.clone(),
            bridge: stacyvm_providers::native::net::BridgeOptions {
                name: cfg.providers.native.bridge_name.clone(),
                subnet: stacyvm_providers::native::net::Subnet::parse(
                    &cfg.providers.native.bridge_subnet,
                )
                .map_err(|e| anyhow::anyhow!("providers.native.bridge_subnet: {e}"))?,
                egress_allow: parse_cidrs(
                    "providers.native.egress_allow",
                    &cfg.providers.native.egress_allow,
                )?,
                egress_deny: parse_cidrs(
                    "providers.native.egress_deny",
                    &cfg.providers.native.egress_deny,
                )?,
                ..Default::default()
            },
            warm_pool: usize::try_from(cfg.providers.native.warm_pool).unwrap_or(0),
            pool_memory_mb: cfg.defaults.memory_mb,
            landlock: cfg.providers.native.landlock,
            user_namespace: cfg.providers.native.user_namespace,
            subordinate_ids: stacyvm_providers::native::ids::IdRange::parse(
                &cfg.providers.native.subordinate_ids,
            )
            .map_err(|e| anyhow::anyhow!("providers.native.subordinate_ids: {e}"))?,
            disk: stacyvm_providers::native::disk::DiskCaps {
                per_sandbox: u64::try_from(cfg.providers.native.disk_mb).unwrap_or(0) << 20,
                min_free: u64::try_from(cfg.providers.native.disk_min_free_mb).unwrap_or(0) << 20,
                interval: Duration::from_secs(5),
            },
        };
        v.push(Arc::new(stacyvm_providers::native::NativeProvider::new(
            opts,
        )?));
    }
    if cfg.providers.docker.enabled {
        // The engine is contacted lazily: a stopped dockerd makes the
        // provider unhealthy, not the server fail to start.
        let agent = stacyvm_providers::agent::find_static_agent("")
            .unwrap_or_else(|| PathBuf::from("stacyvm-agent"));
        let state_dir = std::path::Path::new(&cfg.server.data_dir).join("docker");
        v.push(Arc::new(stacyvm_providers::docker::DockerProvider::new(
            stacyvm_providers::docker::DockerOptions::new(
                cfg.providers.docker.clone(),
                state_dir,
                agent,
            ),
        )?));
    }
    if cfg.providers.proot.enabled || cfg.providers.default == "proot" {
        let pc = &cfg.providers.proot;
        let data = std::path::Path::new(&cfg.server.data_dir);
        let opts = stacyvm_providers::proot::ProotOptions {
            base: pc.workspace_base_in(&cfg.server.data_dir),
            // The image store the native provider uses.
            images_dir: data.join("native").join("images"),
            rootfs_path: pc.rootfs_in(&cfg.server.data_dir),
            hidden: vec![cfg.server.data_dir.clone()],
            agent_path: stacyvm_providers::agent::find_static_agent("")
                .unwrap_or_else(|| PathBuf::from("stacyvm-agent")),
            proot_binary: pc.proot_binary.clone(),
            max_sandboxes: usize::try_from(pc.max_sandboxes).unwrap_or(0),
            max_memory_mb: pc.max_memory_mb,
            pids_limit: u64::try_from(pc.pids_limit).unwrap_or(512),
            exec_timeout: pc.default_timeout.std(),
            subordinate_ids: stacyvm_providers::native::ids::IdRange::parse(
                &cfg.providers.native.subordinate_ids,
            )
            .map_err(|e| anyhow::anyhow!("providers.native.subordinate_ids: {e}"))?,
            disk: stacyvm_providers::native::disk::DiskCaps {
                per_sandbox: u64::try_from(pc.max_disk_mb).unwrap_or(0) << 20,
                min_free: 0,
                interval: Duration::from_secs(5),
            },
        };
        v.push(Arc::new(stacyvm_providers::proot::ProotProvider::new(
            opts,
        )?));
    }
    if cfg.providers.mock.enabled {
        let base =
            stacyvm_providers::mock::default_base(std::path::Path::new(&cfg.server.data_dir));
        warn!("the mock provider is enabled: it runs sandbox commands ON THE HOST without isolation; use it for tests only");
        v.push(Arc::new(stacyvm_providers::mock::MockProvider::new(base)?));
    }
    if cfg.providers.custom.enabled {
        // An empty or malformed base_url is a startup error, not a provider
        // that fails every request.
        v.push(Arc::new(
            stacyvm_providers::remote::http::CustomProvider::from_config(&cfg.providers.custom)?,
        ));
    }
    Ok(v)
}

pub async fn run(config_path: Option<PathBuf>) -> Result<()> {
    // Request bodies and file chunks of up to 1 MiB reuse heap memory.
    stacyvm_sandbox::tune_allocator(32 << 20, 64 << 20);
    let loaded = config::load(config_path.as_deref(), std::env::vars())?;
    let cfg = loaded.config;
    init_logging(&cfg);
    match &loaded.source {
        Some(p) => info!(path = %p.display(), "loaded config"),
        None => info!("no config file found; using defaults"),
    }
    for k in &loaded.unknown_keys {
        warn!(key = %k, "unknown config key ignored");
    }
    // Refuses auth.enabled without any credential (keys or OIDC), bad key
    // hashes and unusable OIDC keys before anything is started.
    let authn = stacyvm_server::auth::Authenticator::new(&cfg.auth)
        .map_err(|e| anyhow::anyhow!("{e}; refusing to start"))?;
    let (host, choice) = cfg.listen_host();
    match choice {
        config::ListenChoice::LoopbackNoAuth => warn!(
            "no API key configured: listening on {host} only (the API is open to local users); set auth.api_key to listen on all interfaces, or server.host to choose"
        ),
        _ if !authn.enabled() => warn!(
            "no API key configured: the API is open to anyone who can reach {host}:{}",
            cfg.server.port
        ),
        _ => {}
    }
    std::fs::create_dir_all(&cfg.server.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.server.data_dir))?;
    // The database, sandbox state and images are the server's alone.
    std::fs::set_permissions(
        &cfg.server.data_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("making data dir {} private (0700)", cfg.server.data_dir))?;
    let providers = build_providers(&cfg)?;
    let registry = match Registry::new(providers, &cfg.providers.default) {
        Ok(r) => r,
        Err(e) => {
            bail!("{e}; enable it under providers.<name>.enabled or pick another providers.default")
        }
    };
    let registry = Arc::new(registry);
    let default = registry.get("")?;
    if let Err(e) = default.health().await {
        // Start degraded rather than refusing to serve (gaps C-29); /ready says why.
        warn!(provider = default.name(), error = %e, "the default provider is not healthy");
    }
    let store = stacyvm_store::open(&cfg)
        .await
        .context("opening the database")?;
    info!(engine = store.engine(), path = %cfg.sqlite_path().display(), "store ready");
    let cfg = Arc::new(cfg);
    let manager = Manager::new(
        cfg.clone(),
        store.clone(),
        registry.clone(),
        Arc::new(EventBus::new()),
        Arc::new(Metrics::default()),
    );
    manager
        .reconcile()
        .await
        .context("startup reconciliation")?;
    let reaper = manager.start_reaper(Duration::from_secs(30));
    let heartbeat = tokio::spawn(heartbeat(manager.clone()));
    let (host, _) = cfg.listen_host();
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", cfg.server.port)
    } else {
        format!("{host}:{}", cfg.server.port)
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    info!(addr = %listener.local_addr()?, default_provider = registry.default_name(), version = stacyvm_server::VERSION, "stacyvm is serving");
    let state = stacyvm_server::AppState::new(manager.clone()).map_err(anyhow::Error::msg)?;
    stacyvm_server::serve(listener, state, shutdown_signal()).await?;
    reaper.abort();
    heartbeat.abort();
    // Warm pools hold no user state: nothing of them outlives the server.
    for p in registry.all() {
        p.shutdown().await;
    }
    manager.flush_audit().await;
    info!("stopped");
    Ok(())
}

async fn heartbeat(m: Arc<Manager>) {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "local".into());
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let created = Utc::now();
    loop {
        tick.tick().await;
        let now = Utc::now();
        let d = &m.config().defaults;
        let w = WorkerRecord {
            id: LOCAL_WORKER.into(),
            hostname: host.clone(),
            status: "online".into(),
            providers: m.registry().names(),
            capabilities: vec![
                "api".into(),
                "single_node".into(),
                "spawn".into(),
                "exec".into(),
                "files".into(),
            ],
            capacity: serde_json::json!({"max_sandboxes": d.max_sandboxes, "max_sandboxes_per_owner": d.max_sandboxes_per_owner}),
            last_heartbeat: now,
            created_at: created,
            updated_at: now,
        };
        if let Err(e) = m.store().upsert_worker(&w).await {
            warn!(error = %e, "local worker heartbeat failed");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutdown requested; draining");
}
