//! The preview proxy: HTTP (1.1 and 2 from clients), WebSocket and any
//! other upgrade, and server-sent events, streamed both ways to a port
//! inside a sandbox (docs/preview.md).
//!
//! Two addresses reach `port` of sandbox `id`:
//! - `{port}-{id}.{domain}` by `Host`, for `server.preview_domain` and
//!   `preview.extra_domains` (any case, any `:port` suffix);
//! - `/preview/{id}/{port}/…` on the API's own address, for setups without
//!   wildcard DNS. Pages served this way share the API's origin, so they
//!   get a `Content-Security-Policy: sandbox` (an opaque origin: no access
//!   to the API's cookies or storage); the host form has no such limit.
//!
//! Every request is admitted by [`Previews::admit`]: the port must be
//! exposed; token-mode ports need a token (header
//! `X-StacyVM-Preview-Token`, query `stacyvm_token`, or the cookie a
//! query token is traded for). The token header and cookie never reach
//! the sandbox. Upstream connections come from the manager (local
//! sandboxes through their network namespace or agent, remote ones
//! through their worker) and are pooled per sandbox and port.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stacyvm_core::manager::Manager;
use stacyvm_core::provider::PortStream;
use stacyvm_core::services::previews::Admit;
use stacyvm_core::{Error, ErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::AppState;

pub mod tunnel;

/// Header a client may carry its preview token in.
pub const TOKEN_HEADER: &str = "x-stacyvm-preview-token";
/// Query parameter a link may carry its preview token in.
pub const TOKEN_QUERY: &str = "stacyvm_token";
/// Cookie a query token is traded for.
pub const TOKEN_COOKIE: &str = "stacyvm_preview_token";
/// Path prefix of the path form.
pub const PATH_PREFIX: &str = "/preview/";

/// Where a request is going.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    id: String,
    port: u16,
    /// The path form's prefix (`/preview/{id}/{port}`), stripped before
    /// forwarding; `None` for the host form.
    prefix: Option<String>,
}

/// The `{port}-{id}` of a `Host` under one of `domains`.
fn host_target(host: &str, domains: &[String]) -> Option<Target> {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host.as_str(),
    };
    let name = name.trim_end_matches('.');
    for d in domains {
        let d = d.trim().trim_matches('.').to_ascii_lowercase();
        if d.is_empty() {
            continue;
        }
        let Some(label) = name.strip_suffix(&d).and_then(|l| l.strip_suffix('.')) else {
            continue;
        };
        let (port, id) = label.split_once('-')?;
        if label.contains('.') || port.is_empty() || port.len() > 5 {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        return stacyvm_core::paths::is_sandbox_id(id).then(|| Target {
            id: id.to_string(),
            port,
            prefix: None,
        });
    }
    None
}

/// The target of a `/preview/{id}/{port}[/…]` path, and whether the path
/// stops right after the port (then the client is sent to `…/`, so
/// relative links resolve under the prefix).
fn path_target(path: &str) -> Option<(Target, bool)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let id = parts.next()?;
    let port: u16 = parts.next()?.parse().ok().filter(|p| *p > 0)?;
    if !stacyvm_core::paths::is_sandbox_id(id) {
        return None;
    }
    let bare = parts.next().is_none();
    Some((
        Target {
            id: id.to_string(),
            port,
            prefix: Some(format!("/preview/{id}/{port}")),
        },
        bare,
    ))
}

/// Middleware: preview requests are proxied, everything else goes on.
pub async fn dispatch(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !st.cfg.preview.enabled {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(t) = host
        .as_deref()
        .and_then(|h| host_target(h, &st.previews.domains))
    {
        // E2B's envd port under a shared domain stays E2B's.
        let e2b = &st.cfg.server.e2b_domain;
        let envd = t.port == 49983
            && !e2b.is_empty()
            && host
                .as_deref()
                .and_then(|h| host_target(h, std::slice::from_ref(e2b)))
                .is_some();
        if !envd {
            return proxy(st, t, req).await;
        }
    }
    if let Some((t, bare)) = path_target(req.uri().path()) {
        if bare {
            let mut to = format!("{}/", req.uri().path());
            if let Some(q) = req.uri().query() {
                to.push('?');
                to.push_str(q);
            }
            return redirect(&to, None);
        }
        return proxy(st, t, req).await;
    }
    next.run(req).await
}

fn redirect(to: &str, cookie: Option<HeaderValue>) -> Response {
    let mut r = Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(c) = cookie {
        r = r.header(header::SET_COOKIE, c);
    }
    r.body(Body::empty()).unwrap_or_default()
}

/// A plain-text error of the proxy (the client is a browser or a tool,
/// not an API client: no JSON envelope needed, but the status is exact).
fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, format!("stacyvm preview: {message}\n")).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse_error(e: &Error) -> Response {
    match e.kind() {
        ErrorKind::Forbidden => {
            let mut r = refuse(StatusCode::UNAUTHORIZED, e.detail());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("StacyVM-Preview-Token"),
            );
            r
        }
        ErrorKind::NotFound | ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed => {
            refuse(StatusCode::NOT_FOUND, e.detail())
        }
        ErrorKind::StoreUnavailable | ErrorKind::ProviderUnavailable => {
            refuse(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable")
        }
        _ => {
            tracing::warn!(error = %e, "preview admission failed");
            refuse(StatusCode::BAD_GATEWAY, "the preview could not be reached")
        }
    }
}

/// The token a request carries, and whether it came in the query.
fn token_of(req: &Request) -> (Option<String>, bool) {
    if let Some(t) = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return (Some(t.trim().to_string()), false);
    }
    if let Some(q) = req.uri().query() {
        if let Some((_, v)) = form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == TOKEN_QUERY) {
            return (Some(v.into_owned()), true);
        }
    }
    for v in req.headers().get_all(header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for c in s.split(';') {
            if let Some((k, v)) = c.trim().split_once('=') {
                if k == TOKEN_COOKIE {
                    return (Some(v.to_string()), false);
                }
            }
        }
    }
    (None, false)
}

/// A redirect target that stays on this host: `//evil.example/x` would be
/// read by browsers as another host, so leading slashes collapse to one.
fn same_site_path(path: &str) -> String {
    format!("/{}", path.trim_start_matches(['/', '\\']))
}

/// The query without `stacyvm_token`.
fn query_without_token(q: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k != TOKEN_QUERY))
        .finish()
}

/// The Cookie header without ours (the sandbox never sees the token).
fn strip_cookie(h: &mut HeaderMap) {
    let ours = format!("{TOKEN_COOKIE}=");
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';').map(|c| c.trim().to_string()))
        .filter(|c| !c.is_empty() && !c.starts_with(&ours))
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward; an
/// upgrade keeps `Connection` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && h.contains_key(header::UPGRADE)
}

async fn proxy(st: AppState, t: Target, mut req: Request) -> Response {
    let (token, in_query) = token_of(&req);
    let admitted = st
        .manager
        .previews()
        .admit(&t.id, t.port, token.as_deref())
        .await;
    let admit = match admitted {
        Ok(a) => a,
        Err(e) => {
            // Guessing ids, ports or tokens spends the address's
            // failed-authentication budget (`rate_limit.failed_auth_per_minute`),
            // the same one the API's bad credentials spend.
            if matches!(
                e.kind(),
                ErrorKind::Forbidden
                    | ErrorKind::NotFound
                    | ErrorKind::SandboxNotFound
                    | ErrorKind::SandboxDestroyed
            ) && st.failed_auth.enabled()
            {
                let peer = req
                    .extensions()
                    .get::<ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0.ip());
                let addr = crate::middleware::remote_addr(
                    req.headers(),
                    peer,
                    &st.cfg.server.trusted_proxies,
                );
                let key = st.failed_auth.key("", "", &addr);
                if let crate::ratelimit::Decision::Limited {
                    retry_after_secs, ..
                } = st.failed_auth.check(&key)
                {
                    let mut r = refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many refused preview requests from this address; retry later",
                    );
                    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    return r;
                }
            }
            return refuse_error(&e);
        }
    };
    let cookie_path = t
        .prefix
        .clone()
        .map_or_else(|| "/".to_string(), |p| format!("{p}/"));
    if in_query && admit == Admit::Token {
        // Trade the link's token for a cookie and drop it from the URL
        // (out of the app's logs, history and Referer headers).
        let q = query_without_token(req.uri().query().unwrap_or(""));
        let path = same_site_path(req.uri().path());
        let to = if q.is_empty() {
            path
        } else {
            format!("{path}?{q}")
        };
        let secure = if st.cfg.preview.scheme == "https" {
            "; Secure"
        } else {
            ""
        };
        let cookie = HeaderValue::from_str(&format!(
            "{TOKEN_COOKIE}={}; Path={cookie_path}; HttpOnly; SameSite=Lax{secure}",
            token.unwrap_or_default()
        ))
        .ok();
        return redirect(&to, cookie);
    }
    // Preview traffic is activity (idle timeouts); an open tunnel or a
    // streamed response holds the sandbox busy until it ends.
    st.manager.preview_activity(&t.id);
    let busy = st.manager.preview_busy(&t.id);
    let upgrade = is_upgrade(req.headers());
    let inbound = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_addr = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // The upstream request: origin form, HTTP/1.1, our credentials gone.
    let path = req.uri().path();
    let path = match &t.prefix {
        Some(p) => path.strip_prefix(p.as_str()).unwrap_or(path),
        None => path,
    };
    let path = if path.is_empty() { "/" } else { path };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let Ok(uri) = format!("http://{}:{}{pq}", t.id, t.port).parse::<Uri>() else {
        return refuse(StatusCode::BAD_REQUEST, "malformed request target");
    };
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    strip_hop_by_hop(h, upgrade);
    h.remove(TOKEN_HEADER);
    strip_cookie(h);
    if let Some(host) = original_host {
        h.insert(header::HOST, host.clone());
        h.insert("x-forwarded-host", host);
    }
    if let Some(ip) = client_addr.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert("x-forwarded-for", ip);
    }
    if let Ok(v) = HeaderValue::from_str(&st.cfg.preview.scheme) {
        h.insert("x-forwarded-proto", v);
    }
    if let Some(p) = &t.prefix {
        if let Ok(v) = HeaderValue::from_str(p) {
            h.insert("x-forwarded-prefix", v);
        }
    }
    let started = std::time::Instant::now();
    let mut resp = match st.previews.client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            st.manager
                .metrics()
                .observe("preview", "", started.elapsed(), Some("upstream"));
            return upstream_error(&t, &e);
        }
    };
    st.manager
        .metrics()
        .observe("preview", "", started.elapsed(), None);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(inbound) = inbound {
            let outbound = hyper::upgrade::on(&mut resp);
            let busy = st.manager.preview_busy(&t.id);
            tokio::spawn(async move {
                let _busy = busy;
                let (Ok(a), Ok(b)) = (inbound.await, outbound.await) else {
                    return;
                };
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(
        &mut parts.headers,
        parts.status == StatusCode::SWITCHING_PROTOCOLS,
    );
    if t.prefix.is_some() {
        // Same origin as the API: the page gets an opaque origin.
        parts.headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads",
            ),
        );
    }
    match busy {
        Some(busy) => Response::from_parts(
            parts,
            Body::new(http_body_util::BodyExt::map_frame(body, move |f| {
                let _ = &busy;
                f
            })),
        ),
        None => Response::from_parts(parts, Body::new(body)),
    }
}

fn upstream_error(t: &Target, e: &hyper_util::client::legacy::Error) -> Response {
    use std::error::Error as _;
    // The connector's error (ours) says what went wrong; hyper's own
    // errors are about the sandbox's server.
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(core) = s.downcast_ref::<Error>() {
            return match core.kind() {
                ErrorKind::NotFound => refuse(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "nothing accepts connections on port {} in sandbox {}",
                        t.port, t.id
                    ),
                ),
                ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed => {
                    refuse(StatusCode::NOT_FOUND, core.detail())
                }
                _ => refuse_error(core),
            };
        }
        src = s.source();
    }
    tracing::debug!(error = %e, sandbox_id = %t.id, port = t.port, "preview upstream failed");
    refuse(
        StatusCode::BAD_GATEWAY,
        "the sandbox's server closed the connection or answered with something that is not HTTP",
    )
}

/// A connection to a sandbox port, as hyper's client wants it.
pub struct PortConn(PortStream);

impl Connection for PortConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for PortConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Opens upstream connections: the URI's host is the sandbox id, its
/// port the sandbox port (so the client's pool keys by both).
#[derive(Clone)]
pub struct Connector {
    manager: std::sync::Weak<Manager>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<PortConn>;
    type Error = Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let manager = self.manager.clone();
        Box::pin(async move {
            let m = manager
                .upgrade()
                .ok_or_else(|| Error::unavailable("the server is stopping"))?;
            let id = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            let s = m.connect_port(&id, port).await?;
            Ok(TokioIo::new(PortConn(s)))
        })
    }
}

/// The proxy's shared upstream client.
#[derive(Clone)]
pub struct PreviewClient {
    client: Client<Connector, Body>,
    /// The domains the host form answers for (read once from the config:
    /// every request of the server is matched against them).
    domains: Vec<String>,
}

impl std::fmt::Debug for PreviewClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreviewClient")
    }
}

impl PreviewClient {
    pub fn new(manager: &std::sync::Arc<Manager>) -> Self {
        let connector = Connector {
            manager: std::sync::Arc::downgrade(manager),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .set_host(false)
            .build(connector);
        let cfg = manager.config();
        let mut domains = vec![cfg.server.preview_domain.clone()];
        domains.extend(cfg.preview.extra_domains.iter().cloned());
        PreviewClient { client, domains }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn host_names_are_matched_in_any_case_with_any_port() {
        let doms = d(&["preview.example.com", "localhost"]);
        let t = host_target("3000-sb-1a2b3c4d.localhost:8080", &doms).expect("target");
        assert_eq!((t.id.as_str(), t.port), ("sb-1a2b3c4d", 3000));
        let t = host_target("8080-SB-1A2B3C4D.Preview.Example.COM.", &doms);
        // Ids are lowercase hex; the name is lowered before matching.
        assert_eq!(t.map(|t| t.port), Some(8080));
        for bad in [
            "localhost:8080",
            "3000-sb-1a2b3c4d.evil.com",
            "3000-sb-1a2b3c4d.localhost.evil.com",
            "x.3000-sb-1a2b3c4d.localhost",
            "0-sb-1a2b3c4d.localhost",
            "70000-sb-1a2b3c4d.localhost",
            "3000-notanid.localhost",
            "3000-.localhost",
            "-sb-1a2b3c4d.localhost",
            "3000-sb-1a2b3c4dlocalhost",
            "",
        ] {
            assert_eq!(host_target(bad, &doms), None, "{bad}");
        }
        assert_eq!(host_target("3000-sb-1a2b3c4d.localhost", &d(&[""])), None);
    }

    #[test]
    fn path_form_needs_an_id_and_a_port() {
        let (t, bare) = path_target("/preview/sb-1a2b3c4d/3000/app/x").expect("target");
        assert_eq!((t.id.as_str(), t.port, bare), ("sb-1a2b3c4d", 3000, false));
        assert_eq!(t.prefix.as_deref(), Some("/preview/sb-1a2b3c4d/3000"));
        let (_, bare) = path_target("/preview/sb-1a2b3c4d/3000").expect("target");
        assert!(bare);
        for bad in [
            "/preview/sb-1a2b3c4d",
            "/preview/sb-1a2b3c4d/0/",
            "/preview/sb-1a2b3c4d/x/",
            "/preview/../3000/",
            "/preview//3000/",
            "/api/v1/preview/sb-1a2b3c4d/3000/",
        ] {
            assert_eq!(path_target(bad), None, "{bad}");
        }
    }

    #[test]
    fn our_cookie_and_query_token_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; stacyvm_preview_token=svp_x; b=2"),
        );
        strip_cookie(&mut h);
        assert_eq!(h.get(header::COOKIE).expect("cookie"), "a=1; b=2");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("stacyvm_preview_token=svp_x"),
        );
        strip_cookie(&mut h);
        assert!(h.get(header::COOKIE).is_none());
        assert_eq!(
            query_without_token("a=1&stacyvm_token=svp_x&b=2"),
            "a=1&b=2"
        );
        assert_eq!(query_without_token("stacyvm_token=svp_x"), "");
        // The token-for-cookie redirect never leaves the host.
        assert_eq!(same_site_path("//evil.example/x"), "/evil.example/x");
        assert_eq!(same_site_path("/\\evil.example"), "/evil.example");
        assert_eq!(same_site_path("/page"), "/page");
    }

    #[test]
    fn hop_by_hop_headers_stay_here() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-app", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-app").expect("x-app"), "1");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).expect("upgrade"), "websocket");
    }
}
