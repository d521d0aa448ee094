//! The StacyVM REST API (`/api/v1`) and the E2B API ([`e2b`]) on axum.
//!
//! [`router`] builds the routes of `spec/api.md`; [`serve`] runs them on a
//! listener until the shutdown future resolves, then drains. No global
//! request timeout: long execs, NDJSON streams, WebSockets and SSE are
//! bounded by their own deadlines, not cut at 120 s (gaps C-20).

pub mod active;
pub mod auth;
pub mod e2b;
pub mod error;
pub mod json;
pub mod mcp;
mod middleware;
pub mod openapi;
pub mod preview;
pub mod ratelimit;
pub mod routes;
pub mod tenancy;
pub mod ui;
pub mod workerauth;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use stacyvm_core::config::Config;
use stacyvm_core::manager::Manager;
use stacyvm_core::store::AdminAuditRecord;
use tokio::net::TcpListener;

pub use auth::{Perm, Role, E2B_ROUTE_PERMISSIONS, ROUTE_PERMISSIONS};

/// Server version reported on `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub cfg: Arc<Config>,
    pub system: Arc<routes::system::SystemSampler>,
    pub auth: Arc<auth::Authenticator>,
    pub ratelimit: Arc<ratelimit::RateLimiter>,
    /// Per-caller caps on concurrent execs, transfers and streams.
    pub active: Arc<active::Active>,
    /// Failed authentication attempts per client address.
    pub failed_auth: Arc<ratelimit::RateLimiter>,
    /// Worker credentials and the worker token issuer.
    pub worker_auth: Arc<workerauth::WorkerAuth>,
    /// The key of E2B envd access tokens.
    pub e2b_keys: Arc<e2b::envd::EnvdKeys>,
    /// Server-wide budget of failed-authentication audit rows.
    failed_auth_rows: Arc<middleware::FailedAuthRows>,
    /// Refuse `Host` headers other than loopback names (the API is open
    /// and bound to loopback: DNS-rebinding guard).
    pub host_checked: bool,
    /// The router MCP tool calls go through (built on first use).
    mcp_router: Arc<std::sync::OnceLock<Router>>,
    /// Ends open MCP streams when the server stops.
    mcp_shutdown: tokio_util::sync::CancellationToken,
    /// The preview proxy's upstream connections.
    pub previews: Arc<preview::PreviewClient>,
    /// The dashboard's browser sessions.
    pub ui: Arc<ui::Sessions>,
}

impl AppState {
    /// Fails on an unusable auth configuration (e.g. `auth.enabled` with
    /// no credential, a malformed key hash or OIDC key).
    pub fn new(manager: Arc<Manager>) -> Result<Self, String> {
        let cfg = Arc::new(manager.config().clone());
        let auth = auth::Authenticator::new(&cfg.auth)?;
        // A signing key too short to trust refuses the start.
        workerauth::WorkerAuth::new(&cfg.auth)?;
        Ok(Self::with_auth(manager, auth))
    }

    /// State with a prepared authenticator (tests tune OIDC refetching).
    pub fn with_auth(manager: Arc<Manager>, auth: auth::Authenticator) -> Self {
        let cfg = Arc::new(manager.config().clone());
        let previews = Arc::new(preview::PreviewClient::new(&manager));
        let ratelimit = Arc::new(ratelimit::RateLimiter::new(&cfg.rate_limit));
        let host_checked =
            !auth.enabled() && stacyvm_core::config::is_loopback_host(cfg.listen_host().0);
        let failed_auth = Arc::new(ratelimit::RateLimiter::failed_auth(&cfg.rate_limit));
        // `new` refused an unusable worker configuration; a test state made
        // with one gets no worker credentials at all.
        let worker_auth = workerauth::WorkerAuth::new(&cfg.auth).unwrap_or_else(|_| {
            workerauth::WorkerAuth::new(&stacyvm_core::config::AuthConfig::default())
                .unwrap_or_else(|_| unreachable!("the default auth config has no signing key"))
        });
        let ui = Arc::new(ui::Sessions::new(&cfg.auth));
        AppState {
            worker_auth: Arc::new(worker_auth),
            e2b_keys: Arc::new(e2b::envd::EnvdKeys::load(&cfg.server.data_dir)),
            active: Arc::new(active::Active::new(&cfg.limits)),
            failed_auth,
            failed_auth_rows: Arc::default(),
            host_checked,
            manager,
            cfg,
            system: Arc::new(routes::system::SystemSampler::default()),
            auth: Arc::new(auth),
            ratelimit,
            mcp_router: Arc::default(),
            mcp_shutdown: tokio_util::sync::CancellationToken::new(),
            previews,
            ui,
        }
    }

    /// Writes an admin audit row (retention applied by the audit service).
    pub async fn audit_admin(&self, rec: AdminAuditRecord) {
        self.manager.audit_trail().record_admin(&rec).await;
    }
}

/// All routes with their middleware.
pub fn router(state: AppState) -> Router {
    let limit = usize::try_from(state.cfg.server.max_body_bytes).unwrap_or(usize::MAX);
    // The permission table is checked on matched routes only, so the
    // matched pattern decides; CORS (outer) answers preflights first.
    let api = routes::api_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::authorize,
    ));
    let e2b = e2b::routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::authorize,
    ));
    // MCP over streamable HTTP: any authenticated caller may connect; its
    // role decides which tools it sees and may call.
    let mcp = Router::new()
        .route_service(
            "/mcp",
            mcp::service(
                state.clone(),
                state.mcp_router.clone(),
                state.mcp_shutdown.child_token(),
            ),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authorize,
        ));
    // The dashboard: its files and its sessions (ui.rs), outside the
    // API's permission table (the page is public; its API calls are not).
    let dashboard = ui::files()
        .route("/ui/oidc/start", axum::routing::get(ui::oidc_start))
        .route("/ui/oidc/callback", axum::routing::get(ui::oidc_callback))
        .route(
            "/ui/session",
            axum::routing::get(ui::current)
                .post(ui::sign_in)
                .delete(ui::sign_out),
        );
    let inner: Router = Router::new()
        .nest("/api/v1", api)
        .merge(dashboard)
        .merge(mcp)
        .merge(e2b)
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(e2b::error_shape))
        .with_state(state.clone());
    // CORS and request ids wrap routing, so preflights are answered for
    // every path (before auth) and every response carries X-Request-ID.
    Router::new()
        .fallback_service(inner)
        // E2B envd calls (with `E2b-Sandbox-Id`) are routed by header.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            e2b::envd::dispatch,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::body_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::host_guard,
        ))
        // Preview hosts and `/preview/…` are the proxy's, before the API's
        // host guard, CORS and body limit (they are the sandbox's to set).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            preview::dispatch,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
}

/// Serves until `shutdown` resolves, then waits for in-flight requests.
///
/// Each connection is served by hyper directly (HTTP/1.1 with upgrades,
/// HTTP/2): a client gets `server.header_read_timeout` to send a request's
/// headers (slowloris connections are closed), and at most
/// `server.max_connections` connections are open at once (more are closed
/// as they arrive, before any work).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::Service as _;

    /// Counts an open connection while it lives.
    struct Open(Arc<AtomicUsize>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    let header_timeout = state.cfg.server.header_read_timeout.std();
    let tunnels = (state.cfg.preview.enabled && state.cfg.preview.tunnel).then(|| state.clone());
    let max = state.cfg.server.max_connections as usize;
    let mcp_shutdown = state.mcp_shutdown.clone();
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if max > 0 && open.load(Ordering::SeqCst) >= max {
            tracing::debug!(%peer, "connection refused: server.max_connections reached");
            drop(tcp);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let counted = Open(open.clone());
        // Streamed responses (file reads) write headers and body
        // separately: without TCP_NODELAY the body of a small file waits
        // for the client's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let mut app = app.clone();
                async move { app.call(req.map(axum::body::Body::new)).await }
            });
        let mut builder = Builder::new(TokioExecutor::new());
        if !header_timeout.is_zero() {
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
        }
        let watcher = graceful.watcher();
        let tunnels = tunnels.clone();
        tokio::spawn(async move {
            let _counted = counted;
            // A public preview's connection may become a tunnel
            // (preview/tunnel.rs); everything else is HTTP.
            let tcp = match tunnels {
                Some(st) => match preview::tunnel::offer(&st, tcp, peer, header_timeout).await {
                    preview::tunnel::Offer::Taken => return,
                    preview::tunnel::Offer::Http(tcp) => tcp,
                },
                None => tcp,
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    // Open MCP streams would hold the graceful shutdown forever.
    mcp_shutdown.cancel();
    graceful.shutdown().await;
    Ok(())
}
