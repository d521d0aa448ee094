//! `stacyvm serve`: load config, open the store, register providers,
//! reconcile, then serve until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::Utc;
use stacyvm_core::config::{self, Config};
use stacyvm_core::events::EventBus;
use stacyvm_core::manager::Manager;
use stacyvm_core::metrics::Metrics;
use stacyvm_core::registry::Registry;
use stacyvm_core::store::WorkerRecord;
use tracing::{info, warn};

pub(crate) fn init_logging(cfg: &Config) {
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

/// Every open connection — API calls, previews, the egress proxy's
/// relays — holds a descriptor: the soft limit on open files goes up to
/// the hard one (systemd's default soft limit is 1024).
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "could not raise the open-files limit");
            }
        }
    }
}

pub async fn run(config_path: Option<PathBuf>) -> Result<()> {
    // Request bodies and file chunks of up to 1 MiB reuse heap memory.
    stacyvm_sandbox::tune_allocator(32 << 20, 64 << 20);
    raise_open_files();
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
    let mut cfg = cfg;
    cfg.worker.id = control_plane_id(&cfg)?;
    if !cfg.worker.local_sandboxes {
        // An API-only control plane: no sandbox starts here, so none is
        // kept warm either.
        cfg.providers.native.warm_pool = 0;
    }
    let providers = stacyvm_providers::registry::build(&cfg)?;
    let registry = match Registry::with_default(providers, &cfg.providers.default).await {
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
    if cfg.is_postgres() {
        info!(engine = store.engine(), worker_id = %cfg.worker.id, "store ready (a cluster: control planes share this database)");
    } else {
        info!(engine = store.engine(), path = %cfg.sqlite_path().display(), "store ready");
    }
    let cfg = Arc::new(cfg);
    let bus = Arc::new(EventBus::new());
    // Control planes on one Postgres share their events (and invalidate
    // each other's caches with them).
    let bridge = if cfg.is_postgres() {
        // Two connections of its own: the listener, and the notifier.
        let pg = stacyvm_store::PostgresStore::with_options(
            stacyvm_store::parse_dsn(cfg.database.dsn.expose())?.application_name("stacyvm-events"),
            2,
        )
        .await
        .context("opening the event bridge")?;
        Some(pg.bridge_events(bus.clone(), cfg.worker.id.clone()))
    } else {
        None
    };
    let manager = Manager::new(
        cfg.clone(),
        store.clone(),
        registry.clone(),
        bus,
        Arc::new(Metrics::default()),
    );
    // Named volumes live on this host (a loop-mounted file system each).
    if cfg.worker.local_sandboxes {
        let root = std::path::Path::new(&cfg.server.data_dir).join("volumes");
        let min_free = u64::try_from(cfg.providers.native.disk_min_free_mb)
            .unwrap_or(0)
            .saturating_mul(1024 * 1024);
        match stacyvm_providers::volumes::LoopVolumes::new(root, min_free) {
            Ok(v) => manager.attach_volumes(Arc::new(v)),
            Err(why) => info!("volumes are not available: {why}"),
        }
    }
    // A cluster: with worker credentials this control plane reaches the
    // sandboxes of workers and places new ones on them.
    if let Some(workers) = stacyvm_cluster::remote::Workers::from_config(&cfg, store.clone())? {
        manager.attach_remote(Arc::new(workers));
        info!(
            tls = cfg.worker.rpc_tls.enabled,
            "worker RPC client ready: sandboxes may run on workers"
        );
    }
    let rpc_server = serve_rpc(&cfg, &registry).await?;
    let watcher = manager.is_clustered().then(|| {
        let m = manager.clone();
        let every = (m.stale_after() / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = m.watch_workers().await {
                    warn!(error = %e, "checking workers failed");
                }
                if let Err(e) = m.migrate_draining().await {
                    warn!(error = %e, "moving sandboxes off draining workers failed");
                }
            }
        })
    });
    manager
        .reconcile()
        .await
        .context("startup reconciliation")?;
    let reaper = manager.start_reaper(Duration::from_secs(30));
    let pools = manager.start_pools();
    manager.start_builds();
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
    pools.abort();
    heartbeat.abort();
    if let Some(b) = bridge {
        b.abort();
    }
    if let Some(w) = watcher {
        w.abort();
    }
    if let Some((stop, task)) = rpc_server {
        stop.cancel();
        let _ = task.await;
    }
    // Warm pools hold no user state: nothing of them outlives the server.
    for p in registry.all() {
        p.shutdown().await;
    }
    manager.flush_audit().await;
    info!("stopped");
    Ok(())
}

/// Worker RPC on a control plane (`worker.listen_addr`), so the other
/// control planes of a cluster reach the sandboxes that run here.
async fn serve_rpc(
    cfg: &Config,
    registry: &Arc<Registry>,
) -> Result<
    Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
> {
    if cfg.worker.listen_addr.is_empty() {
        return Ok(None);
    }
    let id = if cfg.worker.id.is_empty() {
        stacyvm_core::manager::LOCAL_WORKER
    } else {
        cfg.worker.id.as_str()
    };
    let rpc = stacyvm_cluster::rpc::WorkerRpc::new(
        registry.clone(),
        stacyvm_cluster::rpc::RpcAuth::from_config(cfg, id),
    );
    rpc.persist_fences(std::path::Path::new(&cfg.server.data_dir).join("worker-fences.json"))
        .map_err(anyhow::Error::msg)?;
    let tls = if cfg.worker.rpc_tls.enabled {
        Some(stacyvm_cluster::tls::server_config(&cfg.worker.rpc_tls)?)
    } else {
        warn!("worker.rpc_tls is off: worker RPC is plain HTTP (use it only on a trusted network)");
        None
    };
    let listener = tokio::net::TcpListener::bind(&cfg.worker.listen_addr)
        .await
        .with_context(|| format!("listening on worker.listen_addr {}", cfg.worker.listen_addr))?;
    info!(addr = %listener.local_addr()?, "worker RPC listening");
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let router = rpc.router();
    let task = tokio::spawn(async move {
        stacyvm_cluster::tls::serve(listener, router, tls, async move { s.cancelled().await }).await
    });
    Ok(Some((stop, task)))
}

/// This control plane's worker id. `worker.id` when set. On SQLite (one
/// machine) `local`, as always. On Postgres every control plane needs its
/// own: one is made once (`cp-<hostname>-<random>`) and kept in the data
/// dir, so a restart is the same control plane.
fn control_plane_id(cfg: &Config) -> Result<String> {
    if !cfg.worker.id.is_empty() || !cfg.is_postgres() {
        return Ok(cfg.worker.id.clone());
    }
    let path = std::path::Path::new(&cfg.server.data_dir).join("control-plane-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if stacyvm_core::paths::is_worker_id(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => bail!(
            "{} does not hold a valid worker id; delete it to make a new one, or set worker.id",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let rnd: [u8; 4] = rand::random();
    let id = format!(
        "cp-{}-{}",
        host.trim_matches('-'),
        rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    info!(worker_id = %id, "this control plane's worker id (kept in {})", path.display());
    Ok(id)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}

async fn heartbeat(m: Arc<Manager>) {
    let host = hostname();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let created = Utc::now();
    loop {
        tick.tick().await;
        let now = Utc::now();
        let d = &m.config().defaults;
        let w = WorkerRecord {
            id: m.worker_id().into(),
            hostname: host.clone(),
            status: "online".into(),
            providers: m.registry().names(),
            capabilities: [
                "api",
                if m.store().engine() == "sqlite" {
                    "single_node"
                } else {
                    "control_plane"
                },
                "spawn",
                "exec",
                "files",
            ]
            .map(String::from)
            .to_vec(),
            capacity: {
                let mut c = serde_json::json!({"max_sandboxes": d.max_sandboxes, "max_sandboxes_per_owner": d.max_sandboxes_per_owner});
                let url = stacyvm_cluster::rpc::advertised_url(
                    m.config(),
                    &m.config().worker.listen_addr,
                );
                if !url.is_empty() {
                    c["rpc_url"] = url.into();
                }
                c["images"] = m.registry().local_images().await.into();
                c
            },
            last_heartbeat: now,
            created_at: created,
            updated_at: now,
        };
        if let Err(e) = m.store().upsert_worker(&w).await {
            warn!(error = %e, "local worker heartbeat failed");
        }
    }
}

pub(crate) async fn shutdown_signal() {
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
