//! The StacyVM REST API (`/api/v1`) on axum.
//!
//! [`router`] builds the routes of `spec/api.md`; [`serve`] runs them on a
//! listener until the shutdown future resolves, then drains. No global
//! request timeout: long execs, NDJSON streams, WebSockets and SSE are
//! bounded by their own deadlines, not cut at 120 s (gaps C-20).

pub mod error;
pub mod json;
mod middleware;
mod routes;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use stacyvm_core::config::Config;
use stacyvm_core::manager::Manager;
use tokio::net::TcpListener;

/// Server version reported on `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub cfg: Arc<Config>,
    pub system: Arc<routes::system::SystemSampler>,
}

impl AppState {
    pub fn new(manager: Arc<Manager>) -> Self {
        let cfg = Arc::new(manager.config().clone());
        AppState {
            manager,
            cfg,
            system: Arc::new(routes::system::SystemSampler::default()),
        }
    }
}

/// All routes with their middleware.
pub fn router(state: AppState) -> Router {
    let limit = usize::try_from(state.cfg.server.max_body_bytes).unwrap_or(usize::MAX);
    let api = routes::api_routes().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::auth,
    ));
    let inner: Router = Router::new()
        .nest("/api/v1", api)
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone());
    // CORS and request ids wrap routing, so preflights are answered for
    // every path (before auth) and every response carries X-Request-ID.
    Router::new()
        .fallback_service(inner)
        .layer(axum::middleware::from_fn_with_state(
            state,
            middleware::cors,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
}

/// Serves until `shutdown` resolves, then waits for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
