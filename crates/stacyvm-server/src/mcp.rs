//! The MCP (Model Context Protocol) server: tools to create, list and
//! destroy sandboxes, run commands (output streamed as progress
//! notifications) and read, write and list files.
//!
//! Every tool is a call of `/api/v1`, so MCP has exactly the API's rules:
//! authentication, roles, tenants, quotas, policies, rate limits and
//! audit. Two transports:
//! - streamable HTTP at `/mcp` on the server ([`service`]): the request
//!   is authenticated like the API, and each tool call goes through the
//!   server's own router in process, with the caller's credentials;
//!   `tools/list` shows only the tools the caller's role may use;
//! - stdio (`stacyvm mcp`, [`serve_stdio`]): a client of a server's REST
//!   API with a key, for MCP hosts that start a local command.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, Method, Request};
use base64::Engine;
use futures::stream::BoxStream;
use futures::StreamExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::{Perm, Role};
use crate::AppState;

/// Most bytes of command output or file content a tool returns.
const MAX_TEXT: usize = 1024 * 1024;
/// Longest progress message (one output chunk).
const MAX_PROGRESS: usize = 4096;

/// One reply of `/api/v1`: status and a streamed body.
pub struct Reply {
    pub status: u16,
    pub body: BoxStream<'static, Result<Bytes, String>>,
}

impl Reply {
    /// The whole body, at most `max` bytes.
    async fn bytes(mut self, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(chunk) = self.body.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > max {
                return Err(format!("the reply is larger than {max} bytes"));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    async fn json(self) -> Result<Value, String> {
        let b = self.bytes(16 * 1024 * 1024).await?;
        serde_json::from_slice(&b).map_err(|e| format!("the server's reply is not JSON: {e}"))
    }
}

/// A way to call `/api/v1` as some caller.
#[async_trait]
pub trait Api: Send + Sync {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply, String>;
}

/// Calls through the server's own router, in process, with the
/// credentials of the MCP request.
struct InProcess {
    router: axum::Router,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
}

/// Headers carried from an MCP request onto its tool calls.
const FORWARDED: [&str; 6] = [
    "x-api-key",
    "x-admin-api-key",
    "authorization",
    "x-user-id",
    "x-tenant-id",
    "x-forwarded-for",
];

#[async_trait]
impl Api for InProcess {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply, String> {
        use tower::ServiceExt;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header("host", "localhost");
        for name in FORWARDED {
            if let Some(v) = self.headers.get(name) {
                req = req.header(name, v);
            }
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).map_err(|e| e.to_string())?;
        // The client address, for rate limits and audit.
        if let Some(ci) = self
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        {
            req.extensions_mut().insert(*ci);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .into_data_stream()
            .map(|c| c.map_err(|e| e.to_string()))
            .boxed();
        Ok(Reply { status, body })
    }
}

/// Calls a server's REST API over HTTP (the stdio transport).
pub struct Remote {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(url: &str, key: Option<String>) -> Self {
        Remote {
            base: format!("{}/api/v1", url.trim_end_matches('/')),
            key,
            http: reqwest::Client::new(),
        }
    }
}

#[async_trait]
impl Api for Remote {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply, String> {
        let m =
            reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
        let mut rb = self.http.request(m, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            rb = rb.header("X-API-Key", k);
        }
        if let Some(v) = body {
            rb = rb.json(&v);
        }
        let r = rb
            .send()
            .await
            .map_err(|e| format!("the StacyVM server at {} is unreachable: {e}", self.base))?;
        let status = r.status().as_u16();
        let body = r
            .bytes_stream()
            .map(|c| c.map_err(|e| e.to_string()))
            .boxed();
        Ok(Reply { status, body })
    }
}

/// Where tool calls go.
#[derive(Clone)]
enum Backend {
    /// In this server (`/mcp`): through its router, built on first use.
    Server(AppState, Arc<OnceLock<axum::Router>>),
    /// A server's REST API (`stacyvm mcp`).
    Remote(Arc<dyn Api>),
}

/// The MCP server of one session (HTTP) or process (stdio).
#[derive(Clone)]
pub struct Mcp {
    backend: Backend,
}

// ---- tools ------------------------------------------------------------------------

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    /// Image (provider specific; the native provider's default is `host`).
    #[serde(default)]
    image: Option<String>,
    /// A stored template to start from.
    #[serde(default)]
    template: Option<String>,
    /// Provider (default: the server's).
    #[serde(default)]
    provider: Option<String>,
    /// Time to live, e.g. `30m` (default: the server's).
    #[serde(default)]
    ttl: Option<String>,
    /// Labels to find the sandbox by.
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SandboxArgs {
    /// The sandbox id (`sb-…`).
    sandbox_id: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    /// The sandbox id (`sb-…`).
    sandbox_id: String,
    /// A shell command (`/bin/sh -c`).
    command: String,
    /// Working directory (default `/workspace`, or the user's home).
    #[serde(default)]
    workdir: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    /// Timeout, e.g. `2m` (default: the server's).
    #[serde(default)]
    timeout: Option<String>,
    /// Run as this account of the sandbox (default root).
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    /// The sandbox id (`sb-…`).
    sandbox_id: String,
    /// Absolute path.
    path: String,
    /// `base64` for binary files; default text (UTF-8).
    #[serde(default)]
    encoding: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    /// The sandbox id (`sb-…`).
    sandbox_id: String,
    /// Absolute path; parent directories are created.
    path: String,
    /// The content (text, or base64 with `encoding: base64`).
    content: String,
    /// `base64` when `content` is base64.
    #[serde(default)]
    encoding: Option<String>,
    /// Octal mode, e.g. `0755` (default `0644`).
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    /// The sandbox id (`sb-…`).
    sandbox_id: String,
    /// Absolute path of a directory.
    path: String,
}

/// A tool: name, description, the scope it needs, its argument schema.
struct ToolDef {
    name: &'static str,
    description: &'static str,
    perm: Perm,
    schema: fn() -> Value,
}

fn schema_of<T: JsonSchema>() -> Value {
    let mut v = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    v
}

const TOOLS: &[ToolDef] = &[
    ToolDef {
        name: "create_sandbox",
        description: "Create a sandbox (an isolated Linux environment) and return it; use its id with the other tools.",
        perm: Perm::Write,
        schema: schema_of::<CreateArgs>,
    },
    ToolDef {
        name: "list_sandboxes",
        description: "List the sandboxes this caller can see.",
        perm: Perm::Read,
        schema: schema_of::<NoArgs>,
    },
    ToolDef {
        name: "exec",
        description: "Run a shell command in a sandbox and return its output and exit code. Output is streamed as progress notifications while it runs.",
        perm: Perm::Write,
        schema: schema_of::<ExecArgs>,
    },
    ToolDef {
        name: "read_file",
        description: "Read a file of a sandbox (text, or base64 with encoding=base64; at most 1 MiB).",
        perm: Perm::Read,
        schema: schema_of::<ReadArgs>,
    },
    ToolDef {
        name: "write_file",
        description: "Write a file in a sandbox, creating parent directories.",
        perm: Perm::Write,
        schema: schema_of::<WriteArgs>,
    },
    ToolDef {
        name: "list_files",
        description: "List a directory of a sandbox.",
        perm: Perm::Read,
        schema: schema_of::<ListArgs>,
    },
    ToolDef {
        name: "destroy_sandbox",
        description: "Destroy a sandbox and everything in it.",
        perm: Perm::Write,
        schema: schema_of::<SandboxArgs>,
    },
];

/// The names of every tool (for docs and tests).
pub fn tool_names() -> Vec<&'static str> {
    TOOLS.iter().map(|t| t.name).collect()
}

fn text(s: impl Into<String>) -> ContentBlock {
    ContentBlock::text(s.into())
}

/// A tool failure the model should see.
fn failed(msg: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![text(msg)])
}

fn args<T: DeserializeOwned>(a: Option<Map<String, Value>>) -> Result<T, String> {
    serde_json::from_value(Value::Object(a.unwrap_or_default()))
        .map_err(|e| format!("invalid arguments: {e}"))
}

/// An API error reply as a tool failure: `HTTP 404 NOT_FOUND: message`.
async fn api_failure(r: Reply) -> String {
    let status = r.status;
    let body = r.json().await.unwrap_or(Value::Null);
    format!(
        "HTTP {status} {}: {}",
        body["code"].as_str().unwrap_or("ERROR"),
        body["message"].as_str().unwrap_or("request failed")
    )
}

/// A path segment carried in a URL: sandbox ids never need escaping, and
/// anything else is refused rather than sent somewhere unexpected.
fn id_segment(id: &str) -> Result<&str, String> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(id)
    } else {
        Err(format!("invalid sandbox id {id:?}"))
    }
}

/// `s` escaped for a query string value.
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Mcp {
    /// The MCP server of `/mcp` on this server.
    pub fn for_server(state: AppState, router: Arc<OnceLock<axum::Router>>) -> Self {
        Mcp {
            backend: Backend::Server(state, router),
        }
    }

    /// An MCP server calling a server's REST API.
    pub fn remote(api: Arc<dyn Api>) -> Self {
        Mcp {
            backend: Backend::Remote(api),
        }
    }

    /// The API as the caller of this request, and the caller's role when
    /// known (HTTP; over stdio the server enforces it on each call).
    fn api(
        &self,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<(Arc<dyn Api>, Option<Role>), McpError> {
        match &self.backend {
            Backend::Remote(api) => Ok((api.clone(), None)),
            Backend::Server(state, router) => {
                let parts = ctx
                    .extensions
                    .get::<axum::http::request::Parts>()
                    .ok_or_else(|| {
                        McpError::internal_error("the MCP request carries no HTTP request", None)
                    })?;
                let role = parts
                    .extensions
                    .get::<crate::tenancy::Authed>()
                    .map(|a| a.role);
                let router = router.get_or_init(|| crate::router(state.clone())).clone();
                let mut headers = HeaderMap::new();
                for name in FORWARDED {
                    if let Some(v) = parts.headers.get(name) {
                        headers.insert(HeaderName::from_static(name), v.clone());
                    }
                }
                Ok((
                    Arc::new(InProcess {
                        router,
                        headers,
                        extensions: parts.extensions.clone(),
                    }),
                    role,
                ))
            }
        }
    }

    async fn call(
        &self,
        name: &str,
        a: Option<Map<String, Value>>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let Some(tool) = TOOLS.iter().find(|t| t.name == name) else {
            return Err(McpError::invalid_params(
                format!("no tool named {name:?}"),
                None,
            ));
        };
        let (api, role) = self.api(ctx)?;
        if let Some(role) = role {
            if !tool.perm.allows(role) {
                return Ok(failed(format!(
                    "role {} lacks scope {} required for {name}",
                    role.name(),
                    tool.perm.name()
                )));
            }
        }
        let res = match name {
            "create_sandbox" => self.create(api.as_ref(), a).await,
            "list_sandboxes" => self.list(api.as_ref(), a).await,
            "exec" => self.exec(api.as_ref(), a, ctx).await,
            "read_file" => self.read(api.as_ref(), a).await,
            "write_file" => self.write(api.as_ref(), a).await,
            "list_files" => self.list_files(api.as_ref(), a).await,
            "destroy_sandbox" => self.destroy(api.as_ref(), a).await,
            _ => Err("unknown tool".to_string()),
        };
        Ok(res.unwrap_or_else(failed))
    }

    async fn json_call(
        &self,
        api: &dyn Api,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let r = api.send(method, path, body).await?;
        if r.status >= 300 {
            return Err(api_failure(r).await);
        }
        r.json().await
    }

    async fn create(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let a: CreateArgs = args(a)?;
        let mut body = json!({});
        for (k, v) in [
            ("image", a.image),
            ("template", a.template),
            ("provider", a.provider),
            ("ttl", a.ttl),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        if let Some(m) = a.metadata {
            body["metadata"] = json!(m);
        }
        let v = self
            .json_call(api, Method::POST, "/sandboxes", Some(body))
            .await?;
        Ok(structured(v))
    }

    async fn list(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let _: NoArgs = args(a)?;
        let v = self.json_call(api, Method::GET, "/sandboxes", None).await?;
        Ok(structured(json!({ "sandboxes": v })))
    }

    async fn destroy(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let a: SandboxArgs = args(a)?;
        let id = id_segment(&a.sandbox_id)?;
        let v = self
            .json_call(api, Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await?;
        Ok(structured(v))
    }

    async fn write(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let a: WriteArgs = args(a)?;
        let id = id_segment(&a.sandbox_id)?;
        let mut body = json!({"path": a.path, "content": a.content});
        if let Some(e) = a.encoding {
            body["encoding"] = json!(e);
        }
        if let Some(m) = a.mode {
            body["mode"] = json!(m);
        }
        let v = self
            .json_call(
                api,
                Method::POST,
                &format!("/sandboxes/{id}/files"),
                Some(body),
            )
            .await?;
        Ok(structured(v))
    }

    async fn list_files(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let a: ListArgs = args(a)?;
        let id = id_segment(&a.sandbox_id)?;
        let v = self
            .json_call(
                api,
                Method::GET,
                &format!("/sandboxes/{id}/files/list?path={}", query_value(&a.path)),
                None,
            )
            .await?;
        Ok(structured(json!({ "entries": v })))
    }

    async fn read(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
    ) -> Result<CallToolResult, String> {
        let a: ReadArgs = args(a)?;
        let id = id_segment(&a.sandbox_id)?;
        let base64 = match a.encoding.as_deref() {
            None | Some("" | "utf-8" | "utf8" | "text") => false,
            Some("base64") => true,
            Some(other) => return Err(format!("encoding {other:?}: expected text or base64")),
        };
        let r = api
            .send(
                Method::GET,
                &format!("/sandboxes/{id}/files?path={}", query_value(&a.path)),
                None,
            )
            .await?;
        if r.status >= 300 {
            return Err(api_failure(r).await);
        }
        let bytes = r
            .bytes(MAX_TEXT)
            .await
            .map_err(|e| format!("{e}; read larger files with the REST API"))?;
        if base64 {
            return Ok(CallToolResult::success(vec![text(
                base64::engine::general_purpose::STANDARD.encode(&bytes),
            )]));
        }
        match String::from_utf8(bytes) {
            Ok(s) => Ok(CallToolResult::success(vec![text(s)])),
            Err(e) => Err(format!(
                "{} is not UTF-8 text ({} bytes); read it with encoding=base64",
                a.path,
                e.as_bytes().len()
            )),
        }
    }

    async fn exec(
        &self,
        api: &dyn Api,
        a: Option<Map<String, Value>>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let a: ExecArgs = args(a)?;
        let id = id_segment(&a.sandbox_id)?;
        let mut body = json!({"command": a.command, "stream": true, "report_exit": true});
        for (k, v) in [
            ("workdir", a.workdir),
            ("timeout", a.timeout),
            ("user", a.user),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        if let Some(env) = a.env {
            body["env"] = json!(env);
        }
        let r = api
            .send(Method::POST, &format!("/sandboxes/{id}/exec"), Some(body))
            .await?;
        if r.status >= 300 {
            return Err(api_failure(r).await);
        }
        let token = ctx.meta.get_progress_token();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut truncated = false;
        let mut exit: Option<Value> = None;
        let mut line = Vec::new();
        let mut chunks = 0u64;
        let mut body = r.body;
        loop {
            // A cancelled call drops the stream: the command is killed.
            let chunk = tokio::select! {
                c = body.next() => c,
                () = ctx.ct.cancelled() => return Err("cancelled; the command was killed".into()),
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk?;
            for b in chunk {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                let rec: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                line.clear();
                if rec["type"] == "exit" {
                    exit = Some(rec);
                    continue;
                }
                let data = rec["data"].as_str().unwrap_or_default();
                let out = if rec["stream"] == "stderr" {
                    &mut stderr
                } else {
                    &mut stdout
                };
                if out.len() + data.len() <= MAX_TEXT {
                    out.push_str(data);
                } else {
                    truncated = true;
                }
                chunks += 1;
                if let Some(t) = &token {
                    let msg: String = data.chars().take(MAX_PROGRESS).collect();
                    let _ = ctx
                        .peer
                        .notify_progress(
                            ProgressNotificationParam::new(t.clone(), chunks as f64)
                                .with_message(msg),
                        )
                        .await;
                }
            }
        }
        let Some(exit) = exit else {
            return Err(format!(
                "the command ended without an exit status: {}",
                stderr.trim()
            ));
        };
        let code = exit["exit_code"].as_i64().unwrap_or(-1);
        let mut summary = format!("exit code {code}\n");
        if !stdout.is_empty() {
            summary.push_str(&format!("--- stdout\n{stdout}"));
        }
        if !stderr.is_empty() {
            summary.push_str(&format!("--- stderr\n{stderr}"));
        }
        if truncated {
            summary.push_str("\n(output beyond 1 MiB per stream was left out)");
        }
        let data = json!({
            "exit_code": code,
            "stdout": stdout,
            "stderr": stderr,
            "duration": exit["duration"],
            "truncated": truncated,
        });
        let mut res = CallToolResult::success(vec![text(summary)]);
        res.structured_content = Some(data);
        Ok(res)
    }
}

/// A JSON result, as text (for every client) and structured content.
fn structured(v: Value) -> CallToolResult {
    let mut res = CallToolResult::success(vec![text(
        serde_json::to_string_pretty(&v).unwrap_or_default(),
    )]);
    res.structured_content = Some(v);
    res
}

impl ServerHandler for Mcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("stacyvm", crate::VERSION))
            .with_instructions(
                "StacyVM sandboxes: create one, run commands and move files in it, destroy it when done.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let (_, role) = self.api(&ctx)?;
        let tools = TOOLS
            .iter()
            .filter(|t| role.is_none_or(|r| t.perm.allows(r)))
            .map(|t| {
                let schema = match (t.schema)() {
                    Value::Object(o) => o,
                    _ => Map::new(),
                };
                Tool::new(Cow::Borrowed(t.name), Cow::Borrowed(t.description), schema)
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let res = self.call(&request.name, request.arguments, &ctx).await?;
        Ok(res.into())
    }
}

/// The streamable-HTTP MCP service of `/mcp` (stateless: no session is
/// kept between requests, so there is nothing to exhaust). `router` is
/// filled with the server's router on first use; `shutdown` ends open
/// streams when the server stops.
pub fn service(
    state: AppState,
    router: Arc<OnceLock<axum::Router>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> rmcp::transport::StreamableHttpService<
    Mcp,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        // The server's own Host guard runs first (DNS rebinding).
        .disable_allowed_hosts()
        .with_cancellation_token(shutdown);
    StreamableHttpService::new(
        move || Ok(Mcp::for_server(state.clone(), router.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// Serves MCP on stdin/stdout against a server's REST API until the
/// client goes away.
pub async fn serve_stdio(api: Arc<dyn Api>) -> Result<(), String> {
    use rmcp::ServiceExt;
    let running = Mcp::remote(api)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP on stdio: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| format!("MCP on stdio: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_cannot_reach_other_routes() {
        for bad in [
            "",
            "../admin",
            "sb-1/../../x",
            "sb-1?x=1",
            "sb 1",
            "sb-1#",
            &"a".repeat(65),
        ] {
            assert!(id_segment(bad).is_err(), "{bad:?}");
        }
        assert_eq!(id_segment("sb-1a2b3c4d"), Ok("sb-1a2b3c4d"));
        // A path stays one query value, whatever it holds.
        assert_eq!(
            query_value("/w/a b&path=/etc#x%\0"),
            "/w/a%20b%26path%3D/etc%23x%25%00"
        );
    }

    #[test]
    fn every_tool_has_an_object_schema_and_a_scope() {
        assert_eq!(TOOLS.len(), tool_names().len());
        for t in TOOLS {
            let s = (t.schema)();
            assert_eq!(s["type"], "object", "{}: {s}", t.name);
            assert!(matches!(t.perm, Perm::Read | Perm::Write), "{}", t.name);
        }
    }
}
