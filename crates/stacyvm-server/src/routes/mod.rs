//! Route table of `/api/v1`.

pub mod audit;
pub mod builds;
pub mod environments;
pub mod files;
pub mod ports;
pub mod quotas;
pub mod registries;
pub mod sandboxes;
pub mod system;
pub mod templates;
pub mod tenants;
pub mod volumes;
pub mod workers;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::routing::MethodRouter;
use axum::Router;
use stacyvm_core::manager::Caller;

use crate::error::ApiError;
use crate::openapi::{schema, Body, Doc, Op, Reply};
use crate::tenancy::Authed;
use crate::AppState;

/// Builds `/api/v1` from [`table`].
pub fn api_routes() -> Router<AppState> {
    table()
        .into_iter()
        .fold(Router::new(), |r, (op, method)| r.route(op.path, method))
}

/// The documented operations of `/api/v1` (for [`crate::openapi`]).
pub fn operations() -> Vec<Op> {
    table().into_iter().map(|(op, _)| op).collect()
}

/// One row: the operation's documentation and its handler.
macro_rules! op {
    ($m:ident $path:literal, $h:expr, $doc:expr) => {
        (
            Op {
                method: method_name(stringify!($m)),
                path: $path,
                doc: $doc,
            },
            axum::routing::$m($h),
        )
    };
}

const fn method_name(m: &str) -> &'static str {
    match m.as_bytes() {
        b"get" => "GET",
        b"post" => "POST",
        b"put" => "PUT",
        b"patch" => "PATCH",
        b"delete" => "DELETE",
        _ => panic!("unknown method"),
    }
}

/// Every route of `/api/v1`, with what `openapi.json` says of it. The
/// permission of each is in [`crate::auth::ROUTE_PERMISSIONS`] (the tests
/// check that the two tables name the same routes).
fn table() -> Vec<(Op, MethodRouter<AppState>)> {
    use stacyvm_api as a;
    let obj = Reply::Object;
    let status = Reply::Json(schema::<a::StatusResponse>);
    let sandbox = Reply::Json(schema::<a::Sandbox>);
    let text = |what| Reply::Other("text/plain", what);
    let files = |s| Doc::new("files", s, status);
    vec![
        op!(get "/health", system::health, Doc::new("system", "Server health and provider status", Reply::Json(schema::<a::HealthResponse>))),
        op!(get "/live", system::live, Doc::new("system", "Liveness", Reply::Json(schema::<a::HealthResponse>))),
        op!(get "/ready", system::ready, Doc::new("system", "Readiness: the store answers and a provider is healthy (503 otherwise)", obj)),
        op!(get "/openapi.json", openapi_json, Doc::new("system", "This document (OpenAPI 3.1)", obj)),
        op!(get "/docs", openapi_page, Doc::new("system", "This document as a page", Reply::Other("text/html", "HTML"))),
        op!(post "/sandboxes", sandboxes::spawn, Doc::new("sandboxes", "Spawn a sandbox", sandbox).body(Body::OptionalJson(schema::<a::SpawnRequest>))),
        op!(get "/sandboxes", sandboxes::list, Doc::new("sandboxes", "List the caller's sandboxes", Reply::Json(schema::<Vec<a::Sandbox>>))),
        op!(delete "/sandboxes", sandboxes::prune, Doc::new("sandboxes", "Remove expired and destroyed sandboxes", Reply::Json(schema::<a::PruneResponse>))),
        op!(post "/sandboxes/admission", sandboxes::admission, Doc::new("sandboxes", "Would this spawn be admitted now? (nothing is spawned)", Reply::Json(schema::<a::AdmissionDecision>)).body(Body::OptionalJson(schema::<a::SpawnRequest>))),
        op!(get "/sandboxes/{id}", sandboxes::get, Doc::new("sandboxes", "One sandbox", sandbox)),
        op!(delete "/sandboxes/{id}", sandboxes::destroy, Doc::new("sandboxes", "Destroy a sandbox", status)),
        op!(post "/sandboxes/{id}/extend", sandboxes::extend, Doc::new("sandboxes", "Extend a sandbox's time to live", sandbox).body(Body::Json(schema::<a::ExtendRequest>))),
        op!(post "/sandboxes/{id}/pause", sandboxes::pause, Doc::new("sandboxes", "Pause a sandbox: its processes frozen, its time to live stopped", sandbox)),
        op!(post "/sandboxes/{id}/resume", sandboxes::resume, Doc::new("sandboxes", "Resume a paused sandbox (any exec, file operation or preview request does too)", sandbox)),
        op!(get "/sandboxes/{id}/network", sandboxes::network, Doc::new("network", "The sandbox's egress policy and the connections it refused lately", Reply::Json(schema::<a::NetworkStatus>))),
        op!(patch "/sandboxes/{id}/network", sandboxes::patch_network, Doc::new("network", "Change the sandbox's egress policy (the fields given replace the policy's), at once", Reply::Json(schema::<a::NetworkStatus>)).body(Body::Json(schema::<a::NetworkPatch>))),
        op!(put "/sandboxes/{id}/network", sandboxes::put_network, Doc::new("network", "Replace the sandbox's egress policy, at once", Reply::Json(schema::<a::NetworkStatus>)).body(Body::Json(schema::<a::NetworkPolicy>))),
        op!(post "/sandboxes/{id}/snapshot", sandboxes::snapshot, Doc::new("snapshots", "Snapshot a sandbox", Reply::Json(schema::<a::SnapshotSummary>))),
        op!(post "/sandboxes/{id}/fork", sandboxes::fork, Doc::new("snapshots", "Fork a sandbox into children", Reply::Json(schema::<a::ForkResponse>)).body(Body::OptionalJson(schema::<a::ForkRequest>))),
        op!(post "/sandboxes/{id}/exec", sandboxes::exec, Doc::new("exec", "Run a command (JSON result, or NDJSON with stream: true)", Reply::JsonOrNdjson(schema::<a::ExecResponse>)).body(Body::Json(schema::<a::ExecRequest>))),
        op!(get "/sandboxes/{id}/exec/ws", sandboxes::exec_ws, Doc::new("exec", "Run a command over a WebSocket (stdin, signals, pty)", Reply::WebSocket)),
        op!(get "/sandboxes/{id}/execs", sandboxes::execs, Doc::new("exec", "Running and recent streamed execs", Reply::Json(schema::<Vec<a::ExecInfo>>))),
        op!(get "/sandboxes/{id}/execs/{exec_id}", sandboxes::exec_info, Doc::new("exec", "One streamed exec", Reply::Json(schema::<a::ExecInfo>))),
        op!(get "/sandboxes/{id}/execs/{exec_id}/stream", sandboxes::exec_resume, Doc::new("exec", "Reattach to a streamed exec from an output offset (NDJSON, ends with the exit record)", Reply::Other("application/x-ndjson", "Output lines, then the exit record")).query(schema::<sandboxes::ResumeQuery>)),
        op!(delete "/sandboxes/{id}/execs/{exec_id}", sandboxes::exec_kill, Doc::new("exec", "Kill a running streamed exec", Reply::Json(schema::<a::ExecInfo>))),
        op!(get "/sandboxes/{id}/logs", sandboxes::logs, Doc::new("sandboxes", "The sandbox's log lines", Reply::Json(schema::<Vec<String>>)).query(schema::<sandboxes::LogsQuery>)),
        op!(get "/sandboxes/{id}/stats", sandboxes::stats, Doc::new("sandboxes", "CPU and memory of a sandbox", obj)),
        op!(get "/sandboxes/{id}/ports", ports::list, Doc::new("previews", "The sandbox's exposed ports and their preview URLs", Reply::Json(schema::<Vec<a::PortExposure>>))),
        op!(post "/sandboxes/{id}/ports/{port}", ports::expose, Doc::new("previews", "Expose a port through the preview proxy (public or token mode)", Reply::Json(schema::<a::PortExposure>)).body(Body::OptionalJson(schema::<a::ExposePortRequest>))),
        op!(delete "/sandboxes/{id}/ports/{port}", ports::unexpose, Doc::new("previews", "Stop serving a port (its tokens go too)", status)),
        op!(get "/sandboxes/{id}/ports/{port}/tokens", ports::tokens, Doc::new("previews", "A port's preview tokens (without secrets)", Reply::Json(schema::<Vec<a::PreviewToken>>))),
        op!(post "/sandboxes/{id}/ports/{port}/tokens", ports::create_token, Doc::new("previews", "Issue an expiring preview token (the secret is shown once)", Reply::Json(schema::<a::PreviewToken>)).body(Body::OptionalJson(schema::<a::PreviewTokenRequest>))),
        op!(delete "/sandboxes/{id}/ports/{port}/tokens/{token}", ports::revoke_token, Doc::new("previews", "Revoke a preview token", status)),
        op!(post "/sandboxes/{id}/files", files::write, files("Write a file (JSON, base64 or text)").body(Body::Json(schema::<a::WriteFileRequest>))),
        op!(put "/sandboxes/{id}/files", files::upload, files("Upload a file (raw body, streamed)").body(Body::Raw("application/octet-stream")).query(schema::<files::UploadQuery>)),
        op!(get "/sandboxes/{id}/files", files::read, Doc::new("files", "Read a file (raw bytes, streamed)", Reply::Other("application/octet-stream", "The file's bytes")).query(schema::<files::PathQuery>)),
        op!(delete "/sandboxes/{id}/files", files::delete, files("Delete a file or directory").query(schema::<files::PathQuery>)),
        op!(get "/sandboxes/{id}/files/list", files::list, Doc::new("files", "List a directory", Reply::Json(schema::<Vec<a::FileInfo>>)).query(schema::<files::PathQuery>)),
        op!(post "/sandboxes/{id}/files/move", files::mv, files("Move or rename").body(Body::Json(schema::<a::MoveFileRequest>))),
        op!(post "/sandboxes/{id}/files/chmod", files::chmod, files("Change a file's mode").body(Body::Json(schema::<a::ChmodRequest>))),
        op!(get "/sandboxes/{id}/files/stat", files::stat, Doc::new("files", "A file's metadata", Reply::Json(schema::<a::FileInfo>)).query(schema::<files::PathQuery>)),
        op!(get "/sandboxes/{id}/archive", files::archive_get, Doc::new("files", "A directory (or file) as a tar or tar.gz stream; SHA-256 in the X-StacyVM-Archive-SHA256 trailer", Reply::Other("application/x-tar", "The archive")).query(schema::<files::ArchiveQuery>)),
        op!(put "/sandboxes/{id}/archive", files::archive_put, Doc::new("files", "Extract a tar or tar.gz body into a directory (confined, streamed, checksum-checked)", Reply::Json(schema::<files::ArchiveWritten>)).body(Body::Raw("application/x-tar")).query(schema::<files::ArchiveQuery>)),
        op!(get "/sandboxes/{id}/files/glob", files::glob, Doc::new("files", "Paths matching a glob", Reply::Json(schema::<Vec<String>>)).query(schema::<files::GlobQuery>)),
        op!(get "/providers", system::providers, Doc::new("providers", "Providers and their health", Reply::Json(schema::<Vec<a::ProviderHealth>>))),
        op!(post "/providers/test", system::providers_test, Doc::new("providers", "Health-check every provider now", obj)),
        op!(get "/providers/{name}", system::provider, Doc::new("providers", "One provider: capabilities, profile, settings", Reply::Json(schema::<a::ProviderDetail>))),
        op!(get "/pool/status", system::pool_status, Doc::new("providers", "Warm pool state", Reply::Json(schema::<a::PoolStatus>))),
        op!(get "/snapshots", system::snapshots, Doc::new("snapshots", "The caller's snapshots", Reply::Json(schema::<Vec<a::SnapshotSummary>>))),
        op!(get "/snapshots/{id}", system::snapshot, Doc::new("snapshots", "One snapshot", Reply::Json(schema::<a::SnapshotSummary>))),
        op!(delete "/snapshots/{id}", system::delete_snapshot, Doc::new("snapshots", "Delete a snapshot", status)),
        op!(get "/environments/specs", environments::list, Doc::new("environments", "Environment specs", Reply::Json(schema::<Vec<a::EnvironmentSpec>>)).query(schema::<registries::OwnerQuery>)),
        op!(post "/environments/specs", environments::create, Doc::new("environments", "Create an environment spec", Reply::Json(schema::<a::EnvironmentSpec>)).body(Body::Json(schema::<a::CreateEnvironmentSpec>))),
        op!(get "/environments/specs/{id}", environments::get, Doc::new("environments", "One environment spec", Reply::Json(schema::<a::EnvironmentSpec>))),
        op!(delete "/environments/specs/{id}", environments::delete, Doc::new("environments", "Delete an environment spec", status)),
        op!(put "/environments/specs/{id}/context", environments::put_context, Doc::new("environments", "Upload the build context (tar or tar.gz) the spec's Dockerfile COPYs from", Reply::Json(schema::<files::ArchiveWritten>)).body(Body::Raw("application/x-tar"))),
        op!(get "/environments/specs/{id}/suggestions", environments::suggestions, Doc::new("environments", "Packages often added to environments like this one", Reply::Json(schema::<a::SpecSuggestions>))),
        op!(get "/environments/builds", builds::list, Doc::new("environments", "Builds with their specs, newest first", Reply::Json(schema::<Vec<a::BuildEntry>>)).query(schema::<builds::ListQuery>)),
        op!(post "/environments/builds", builds::create, Doc::new("environments", "Queue a build of a spec (201)", Reply::Json(schema::<a::Build>)).body(Body::Json(schema::<a::CreateBuild>))),
        op!(get "/environments/builds/{id}", builds::get, Doc::new("environments", "One build with its log and artifacts", Reply::Json(schema::<a::Build>))),
        op!(post "/environments/builds/{id}/cancel", builds::cancel, Doc::new("environments", "Stop a queued or running build (409 once it has ended)", Reply::Json(schema::<a::Build>))),
        op!(get "/environments/builds/{id}/logs", builds::logs, Doc::new("environments", "The build's log from a byte offset; follow=1 streams until the build ends", Reply::Other("text/plain", "The log")).query(schema::<builds::LogQuery>)),
        op!(get "/environments/builds/{id}/spawn-config", builds::spawn_config, Doc::new("environments", "The image to spawn and its provider", Reply::Json(schema::<a::BuildSpawnConfig>))),
        op!(get "/environments/registry-connections", registries::list, Doc::new("environments", "Registry connections (never their secrets)", Reply::Json(schema::<Vec<a::RegistryConnection>>)).query(schema::<registries::OwnerQuery>)),
        op!(post "/environments/registry-connections", registries::create, Doc::new("environments", "Create or replace a registry connection; secret_ref names a server secret", Reply::Json(schema::<a::RegistryConnection>)).body(Body::Json(schema::<a::CreateRegistryConnection>))),
        op!(delete "/environments/registry-connections/{id}", registries::delete, Doc::new("environments", "Delete a registry connection", status)),
        op!(get "/volumes", volumes::list, Doc::new("volumes", "The caller's volumes with their usage and mounts", Reply::Json(schema::<Vec<a::Volume>>))),
        op!(post "/volumes", volumes::create, Doc::new("volumes", "Create a volume", Reply::Json(schema::<a::Volume>)).body(Body::Json(schema::<a::CreateVolumeRequest>))),
        op!(get "/volumes/{name}", volumes::get, Doc::new("volumes", "One volume (by name or id)", Reply::Json(schema::<a::Volume>))),
        op!(delete "/volumes/{name}", volumes::delete, Doc::new("volumes", "Delete a volume and its data (409 while a sandbox mounts it)", status)),
        op!(get "/volumes/{name}/archive", volumes::export, Doc::new("volumes", "A volume's files as a tar or tar.gz stream (409 while a sandbox writes to it)", Reply::Other("application/x-tar", "The archive")).query(schema::<volumes::ExportQuery>)),
        op!(put "/volumes/{name}/archive", volumes::import, Doc::new("volumes", "Extract a tar or tar.gz body into a volume (confined, streamed, checksum-checked; 409 while a sandbox writes to it)", Reply::Json(schema::<files::ArchiveWritten>)).body(Body::Raw("application/x-tar"))),
        op!(get "/templates", templates::list, Doc::new("templates", "Templates", Reply::Json(schema::<Vec<a::Template>>))),
        op!(post "/templates", templates::create, Doc::new("templates", "Create a template", Reply::Json(schema::<a::Template>)).body(Body::Json(schema::<a::TemplateInput>))),
        op!(get "/templates/{name}", templates::get, Doc::new("templates", "One template", Reply::Json(schema::<a::Template>))),
        op!(put "/templates/{name}", templates::replace, Doc::new("templates", "Replace a template", Reply::Json(schema::<a::Template>)).body(Body::Json(schema::<a::TemplateInput>))),
        op!(delete "/templates/{name}", templates::delete, Doc::new("templates", "Delete a template", status)),
        op!(post "/templates/{name}/spawn", templates::spawn, Doc::new("templates", "Spawn from a template", sandbox).body(Body::OptionalJson(schema::<a::TemplateSpawnRequest>))),
        op!(get "/quotas", quotas::list, Doc::new("quotas", "Per-owner quota overrides", Reply::Json(schema::<Vec<a::OwnerQuota>>))),
        op!(get "/quotas/summary", quotas::summary, Doc::new("quotas", "Quota defaults and overrides", Reply::Json(schema::<a::QuotaSummary>))),
        op!(get "/quotas/{owner}", quotas::get, Doc::new("quotas", "One owner's quota", Reply::Json(schema::<a::OwnerQuota>))),
        op!(put "/quotas/{owner}", quotas::put, Doc::new("quotas", "Set an owner's quota", Reply::Json(schema::<a::OwnerQuota>)).body(Body::Json(schema::<a::QuotaInput>))),
        op!(delete "/quotas/{owner}", quotas::delete, Doc::new("quotas", "Remove an owner's quota override", status)),
        op!(get "/quotas/{owner}/usage", quotas::usage, Doc::new("quotas", "An owner's usage against its quota", Reply::Json(schema::<a::QuotaUsage>))),
        op!(get "/events", system::events, Doc::new("system", "Server-sent events of the caller's sandboxes", Reply::Other("text/event-stream", "Server-sent events"))),
        op!(get "/metrics", system::metrics, Doc::new("system", "Operation metrics", obj)),
        op!(get "/metrics/prometheus", system::prometheus, Doc::new("system", "Metrics in the Prometheus text format", text("Prometheus exposition"))),
        op!(get "/diagnostics", system::diagnostics, Doc::new("system", "Diagnostics (doctor checks, config, store)", obj)),
        op!(get "/system/stats", system::system_stats, Doc::new("system", "Host CPU, memory and disk", obj)),
        // Admin aliases used by the web dashboard (api.md §12).
        op!(get "/admin/diagnostics", system::diagnostics, Doc::new("admin", "Diagnostics (alias)", obj)),
        op!(get "/admin/metrics", system::metrics, Doc::new("admin", "Operation metrics (alias)", obj)),
        op!(get "/admin/metrics/prometheus", system::prometheus, Doc::new("admin", "Prometheus metrics (alias)", text("Prometheus exposition"))),
        op!(get "/admin/providers", system::providers, Doc::new("admin", "Providers (alias)", Reply::Json(schema::<Vec<a::ProviderHealth>>))),
        op!(post "/admin/providers/test", system::providers_test, Doc::new("admin", "Health-check every provider (alias)", obj)),
        op!(get "/admin/providers/{name}", system::provider, Doc::new("admin", "One provider (alias)", Reply::Json(schema::<a::ProviderDetail>))),
        op!(get "/admin/quotas", quotas::list, Doc::new("admin", "Quota overrides (alias)", Reply::Json(schema::<Vec<a::OwnerQuota>>))),
        op!(get "/admin/quotas/summary", quotas::summary, Doc::new("admin", "Quota summary (alias)", Reply::Json(schema::<a::QuotaSummary>))),
        op!(get "/admin/quotas/{owner}", quotas::get, Doc::new("admin", "One owner's quota (alias)", Reply::Json(schema::<a::OwnerQuota>))),
        op!(put "/admin/quotas/{owner}", quotas::put, Doc::new("admin", "Set an owner's quota (alias)", Reply::Json(schema::<a::OwnerQuota>)).body(Body::Json(schema::<a::QuotaInput>))),
        op!(delete "/admin/quotas/{owner}", quotas::delete, Doc::new("admin", "Remove a quota override (alias)", status)),
        op!(get "/admin/quotas/{owner}/usage", quotas::usage, Doc::new("admin", "An owner's usage (alias)", Reply::Json(schema::<a::QuotaUsage>))),
        op!(get "/admin/audit", audit::admin_audit, Doc::new("audit", "Request audit (JSON or CSV)", obj).query(schema::<crate::openapi::queries::AdminAudit>)),
        op!(get "/admin/op-audit", audit::op_audit, Doc::new("audit", "Sandbox operation audit (JSON or CSV)", obj).query(schema::<crate::openapi::queries::OpAudit>)),
        op!(get "/admin/tenants", tenants::list, Doc::new("tenants", "Tenants", obj)),
        op!(post "/admin/tenants", tenants::create, Doc::new("tenants", "Create a tenant", obj).body(Body::Json(schema::<tenants::TenantBody>))),
        op!(get "/admin/tenants/{tenant}", tenants::get, Doc::new("tenants", "One tenant", obj)),
        op!(put "/admin/tenants/{tenant}", tenants::update, Doc::new("tenants", "Update a tenant", obj).body(Body::Json(schema::<tenants::TenantBody>))),
        op!(delete "/admin/tenants/{tenant}", tenants::delete, Doc::new("tenants", "Delete a tenant", obj)),
        op!(get "/admin/tenants/{tenant}/members", tenants::members, Doc::new("tenants", "A tenant's members", obj)),
        op!(put "/admin/tenants/{tenant}/members/{user}", tenants::put_member, Doc::new("tenants", "Add a member or change its role", obj).body(Body::Json(schema::<tenants::MemberBody>))),
        op!(delete "/admin/tenants/{tenant}/members/{user}", tenants::delete_member, Doc::new("tenants", "Remove a member", obj)),
        op!(get "/admin/tenants/{tenant}/audit", tenants::audit, Doc::new("tenants", "A tenant's audit", obj).query(schema::<crate::openapi::queries::TenantAudit>)),
        op!(get "/admin/tenants/{tenant}/policies", tenants::policies, Doc::new("tenants", "A tenant's policies", obj)),
        op!(post "/admin/tenants/{tenant}/policies", tenants::create_policy, Doc::new("tenants", "Add a tenant policy", obj).body(Body::Json(schema::<tenants::PolicyBody>))),
        op!(delete "/admin/tenants/{tenant}/policies/{policy}", tenants::delete_policy, Doc::new("tenants", "Remove a tenant policy", obj)),
        op!(get "/admin/policies", tenants::global_policies, Doc::new("tenants", "Server-wide policies", obj)),
        op!(post "/admin/policies", tenants::create_global_policy, Doc::new("tenants", "Add a server-wide policy", obj).body(Body::Json(schema::<tenants::PolicyBody>))),
        op!(delete "/admin/policies/{policy}", tenants::delete_global_policy, Doc::new("tenants", "Remove a server-wide policy", obj)),
        op!(get "/workers", workers::list, Doc::new("workers", "Workers and control planes", Reply::Json(schema::<Vec<a::Worker>>))),
        op!(get "/workers/{worker}", workers::get, Doc::new("workers", "One worker", Reply::Json(schema::<a::Worker>))),
        op!(get "/admin/workers", workers::list, Doc::new("workers", "Workers (alias)", Reply::Json(schema::<Vec<a::Worker>>))),
        op!(get "/admin/workers/{worker}", workers::get, Doc::new("workers", "One worker (alias)", Reply::Json(schema::<a::Worker>))),
        op!(delete "/admin/workers/{worker}", workers::delete, Doc::new("workers", "Forget a worker (its leases expire)", obj)),
        op!(post "/admin/workers/{worker}/heartbeat", workers::admin_heartbeat, Doc::new("workers", "Record a heartbeat for a worker", Reply::Json(schema::<a::Worker>)).body(Body::OptionalJson(schema::<a::WorkerHeartbeat>))),
        op!(post "/admin/workers/{worker}/leases/{resource}/renew", workers::admin_renew, Doc::new("workers", "Renew a worker's lease", Reply::Json(schema::<a::LeaseResponse>)).body(Body::Json(schema::<a::LeaseRenewRequest>))),
        op!(post "/admin/worker-tokens", workers::issue_token, Doc::new("workers", "Issue a signed worker token", Reply::Json(schema::<a::WorkerTokenResponse>)).body(Body::Json(schema::<a::WorkerTokenRequest>))),
        op!(post "/worker/{worker}/heartbeat", workers::heartbeat, Doc::new("worker", "A worker's heartbeat (worker credentials)", Reply::Json(schema::<a::Worker>)).body(Body::OptionalJson(schema::<a::WorkerHeartbeat>))),
        op!(post "/worker/{worker}/leases/{resource}/renew", workers::renew, Doc::new("worker", "A worker renews its lease (worker credentials)", Reply::Json(schema::<a::LeaseResponse>)).body(Body::Json(schema::<a::LeaseRenewRequest>))),
    ]
}

/// `GET /openapi.json`.
async fn openapi_json() -> axum::response::Response {
    crate::json::json_response(axum::http::StatusCode::OK, &*OPENAPI)
}

/// `GET /docs`.
async fn openapi_page() -> axum::response::Html<String> {
    axum::response::Html(crate::openapi::page(&OPENAPI))
}

/// The document, built once.
static OPENAPI: std::sync::LazyLock<serde_json::Value> =
    std::sync::LazyLock::new(|| crate::openapi::document(&operations()));

/// The caller of a request, as the authorization layer resolved it.
pub struct Who(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authed>() {
            Some(a) => Ok(Who(a.caller.clone())),
            None => Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "caller identity missing",
            )),
        }
    }
}
