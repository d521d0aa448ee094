//! `stacyvm web-ui`: the dashboard of a remote server on this machine's
//! loopback (docs/dashboard.md).
//!
//! The page's files are the ones embedded in this binary; everything else
//! (`/api/`, the sign-in session at `/ui/session`, `/docs`, WebSockets) is
//! relayed to `--server` as is, so the server decides every sign-in and
//! every call exactly as for its own `/ui/`. The relay listens on
//! 127.0.0.1 only. A browser request that comes from this relay's own
//! page gets the server's origin (so the server's same-origin checks for
//! WebSockets hold); one from any other site keeps its foreign `Origin`
//! and is refused by the server as it would be there. Requests must name
//! the relay by its loopback address (`Host`): a site that points its own
//! name at 127.0.0.1 (DNS rebinding) is refused, since the relay would
//! otherwise carry it to the server under the server's own host name.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

/// Headers of one hop only (RFC 9110 §7.6.1), never relayed.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client-address headers a browser must not choose: the server may
/// trust them from the relay's address (a proxy on the same host).
const CLIENT_ADDRESS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

struct Relay {
    /// The server's base URL (no path).
    upstream: reqwest::Url,
    /// `scheme://host[:port]` of the server, as browsers would send it.
    upstream_origin: String,
    /// This relay's own origins.
    own: [String; 2],
    /// The `Host` values browsers send for this relay.
    hosts: [String; 3],
    http: reqwest::Client,
}

/// The server's base URL from `--server` (a trailing `/api/v1` is
/// dropped: the dashboard needs the server's root).
fn base_url(server: &str) -> Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(server.trim())
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("--server {server:?}: an http:// or https:// URL of a StacyVM server");
    }
    url.set_path("/");
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

fn origin_of(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

/// The headers sent upstream: hop-by-hop ones dropped, `Host` the
/// server's, the relay's own `Origin` turned into the server's.
fn upstream_headers(relay: &Relay, incoming: &HeaderMap, websocket: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in incoming {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name) || CLIENT_ADDRESS.contains(&name) || k == header::HOST {
            continue;
        }
        if k == header::ORIGIN && relay.own.iter().any(|o| v.as_bytes() == o.as_bytes()) {
            if let Ok(o) = HeaderValue::from_str(&relay.upstream_origin) {
                out.append(header::ORIGIN, o);
            }
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    if websocket {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    out
}

fn downstream(status: StatusCode, headers: &reqwest::header::HeaderMap, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            r.headers_mut().append(k.clone(), v.clone());
        }
    }
    r
}

fn bad_gateway(relay: &Relay, e: &reqwest::Error) -> Response {
    let msg = format!(
        "cannot reach the server at {}: {}",
        relay.upstream,
        stacyvm_client::root_cause(e)
    );
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(serde_json::json!({"code": "BAD_GATEWAY", "message": msg})),
    )
        .into_response()
}

fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Whether a request names this relay (`Host`), not some other name
/// that resolves to loopback.
fn addressed_to_relay(relay: &Relay, h: &HeaderMap) -> bool {
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|host| {
            relay
                .hosts
                .iter()
                .any(|ours| host.eq_ignore_ascii_case(ours))
        })
}

async fn guard(
    State(relay): State<Arc<Relay>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if !addressed_to_relay(&relay, req.headers()) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this is stacyvm web-ui: open it as http://127.0.0.1:PORT/ or http://localhost:PORT/\n",
        )
            .into_response();
    }
    next.run(req).await
}

async fn forward(State(relay): State<Arc<Relay>>, mut req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(url) = relay.upstream.join(path.trim_start_matches('/')) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let websocket = is_websocket(req.headers());
    let headers = upstream_headers(&relay, req.headers(), websocket);
    let method = req.method().clone();
    let on_upgrade = websocket
        .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let sent = relay
        .http
        .request(method, url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return bad_gateway(&relay, &e),
    };
    let status = resp.status();
    let resp_headers = resp.headers().clone();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = on_upgrade else {
            return StatusCode::BAD_GATEWAY.into_response();
        };
        tokio::spawn(async move {
            let (Ok(client), Ok(mut server)) = (client_side.await, resp.upgrade().await) else {
                return;
            };
            let mut client = hyper_util::rt::TokioIo::new(client);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        let mut r = downstream(status, &resp_headers, Body::empty());
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    downstream(status, &resp_headers, Body::from_stream(stream))
}

/// Serves the dashboard of `server` on 127.0.0.1:`port` until Ctrl-C.
pub async fn run(server: &str, port: u16, open: bool) -> Result<std::process::ExitCode> {
    use stacyvm_server::ui;
    let upstream = base_url(server)?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .build()
        .context("building the HTTP client")?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| {
            format!("listening on 127.0.0.1:{port} (is another web-ui running? try --port)")
        })?;
    let port = listener.local_addr()?.port();
    let relay = Arc::new(Relay {
        upstream_origin: origin_of(&upstream),
        own: [
            format!("http://127.0.0.1:{port}"),
            format!("http://localhost:{port}"),
        ],
        hosts: [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ],
        upstream,
        http,
    });
    // Is the server there? Say so now rather than on the first click.
    match relay
        .http
        .get(relay.upstream.join("api/v1/health")?)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => eprintln!(
            "warning: {} answered /api/v1/health with HTTP {}; is it a StacyVM server?",
            relay.upstream,
            r.status().as_u16()
        ),
        Err(e) => eprintln!(
            "warning: cannot reach the server at {}: {}; the dashboard will say so until it can",
            relay.upstream,
            stacyvm_client::root_cause(&e)
        ),
    }
    let app = ui::files()
        .fallback(forward)
        .layer(axum::middleware::from_fn_with_state(relay.clone(), guard))
        .with_state(relay.clone());
    let local = format!("http://127.0.0.1:{port}/");
    println!(
        "The dashboard of {} is at {local} (Ctrl-C stops it).",
        relay.upstream
    );
    if open {
        open_browser(&local);
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the dashboard")?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tries the desktop's browser; silence when there is none (a server).
fn open_browser(url: &str) {
    for opener in ["xdg-open", "open"] {
        let spawned = std::process::Command::new(opener)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_ok() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_is_the_servers_root() {
        let u = base_url("http://10.0.0.1:7423/api/v1").expect("url");
        assert_eq!(u.as_str(), "http://10.0.0.1:7423/");
        assert!(base_url("ftp://x").is_err());
        assert!(base_url("not a url").is_err());
    }

    #[test]
    fn only_the_relays_own_origin_becomes_the_servers() {
        let relay = Relay {
            upstream: base_url("https://svm.example:8443").expect("url"),
            upstream_origin: "https://svm.example:8443".into(),
            own: [
                "http://127.0.0.1:5749".into(),
                "http://localhost:5749".into(),
            ],
            hosts: [
                "127.0.0.1:5749".into(),
                "localhost:5749".into(),
                "[::1]:5749".into(),
            ],
            http: reqwest::Client::new(),
        };
        let host = |h: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static(h));
            addressed_to_relay(&relay, &m)
        };
        assert!(host("127.0.0.1:5749") && host("LOCALHOST:5749"));
        assert!(!host("evil.example:5749"), "a rebound name is refused");
        assert!(!host("127.0.0.1:5750"));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5749"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("x-stacyvm-csrf", HeaderValue::from_static("t"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:5749"),
        );
        let out = upstream_headers(&relay, &h, false);
        assert_eq!(out[header::ORIGIN], "https://svm.example:8443");
        assert!(out.get(header::HOST).is_none() && out.get(header::CONNECTION).is_none());
        assert_eq!(out["x-stacyvm-csrf"], "t");
        assert!(
            out.get("x-forwarded-for").is_none(),
            "a browser does not choose its address"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        let out = upstream_headers(&relay, &h, true);
        assert_eq!(
            out[header::ORIGIN],
            "http://evil.example",
            "a foreign origin stays"
        );
        assert_eq!(out[header::UPGRADE], "websocket");
    }
}
