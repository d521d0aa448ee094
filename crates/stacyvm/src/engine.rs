//! A minimal Docker Engine API client for `doctor`: one GET over the
//! engine's unix socket, JSON back. The docker provider has its own full
//! client; doctor only needs `/version` and `/info` and must work even when
//! that provider is not built in.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// GETs `path` from the engine at `socket` within `timeout`.
pub async fn get_json(
    socket: &Path,
    path: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    match tokio::time::timeout(timeout, get(socket, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
    }
}

async fn get(socket: &Path, path: &str) -> Result<serde_json::Value, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection task lives only as long as this request.
    let driver = tokio::spawn(conn);
    let result = async {
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading GET {path}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {path}: invalid JSON: {e}"))
    }
    .await;
    driver.abort();
    result
}
