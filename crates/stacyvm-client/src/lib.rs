//! A small async client for the StacyVM REST API, used by the CLI and the
//! bench tool.

use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use stacyvm_api::{
    ErrorBody, ExecRequest, ExecResponse, FileInfo, Sandbox, SpawnRequest, WriteFileRequest,
};

/// A client error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("HTTP {status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The server could not be reached: one line, the innermost cause.
    #[error("{}", unreachable(url, reason))]
    Connect { url: String, reason: String },
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// "cannot reach the server at URL: REASON; is `stacyvm serve` running?"
pub fn unreachable(url: &str, reason: &str) -> String {
    format!("cannot reach the server at {url}: {reason}; is `stacyvm serve` running?")
}

/// The innermost cause of an error, lower-cased, without `(os error N)`:
/// "connection refused", "dns error: …".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = last.source() {
        last = next;
    }
    let text = last.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "unknown error".into(),
    }
}

/// An output line of a streamed exec.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Stdout(String),
    Stderr(String),
    Exit(i32),
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    api_key: Option<String>,
    user_id: Option<String>,
}

impl Client {
    /// A client for `base_url` (e.g. `http://127.0.0.1:7423`).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()?;
        Ok(Client {
            base: base_url.trim_end_matches('/').to_string(),
            http,
            api_key,
            user_id: None,
        })
    }

    /// Sends `X-User-ID` on every request.
    #[must_use]
    pub fn with_user(mut self, user: Option<String>) -> Self {
        self.user_id = user;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        if let Some(k) = &self.api_key {
            r = r.header("X-API-Key", k);
        }
        if let Some(u) = &self.user_id {
            r = r.header("X-User-ID", u);
        }
        r
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Connect {
                    url: self.base.clone(),
                    reason: root_cause(&e),
                }
            } else {
                ClientError::Http(e)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.code,
                message: b.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: status.canonical_reason().unwrap_or("ERROR").to_string(),
                message: text.trim().to_string(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(self.req(Method::GET, path)).await
    }

    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.json(self.req(method, path).json(body)).await
    }

    pub async fn health(&self) -> Result<serde_json::Value> {
        self.get_json("/health").await
    }

    pub async fn spawn(&self, req: &SpawnRequest) -> Result<Sandbox> {
        self.send_json(Method::POST, "/sandboxes", req).await
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox> {
        self.get_json(&format!("/sandboxes/{id}")).await
    }

    pub async fn list(&self) -> Result<Vec<Sandbox>> {
        self.get_json("/sandboxes").await
    }

    /// `GET /sandboxes/{id}/network`: the egress policy and its denials.
    pub async fn network(&self, id: &str) -> Result<stacyvm_api::NetworkStatus> {
        self.get_json(&format!("/sandboxes/{id}/network")).await
    }

    /// `PUT /sandboxes/{id}/network`: replaces the egress policy.
    pub async fn set_network(
        &self,
        id: &str,
        policy: &stacyvm_api::NetworkPolicy,
    ) -> Result<stacyvm_api::NetworkStatus> {
        self.send_json(Method::PUT, &format!("/sandboxes/{id}/network"), policy)
            .await
    }

    pub async fn destroy(&self, id: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &format!("/sandboxes/{id}")))
            .await
            .map(|_| ())
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResponse> {
        self.send_json(Method::POST, &format!("/sandboxes/{id}/exec"), req)
            .await
    }

    /// Streams an exec; `on_item` gets output as it arrives and the exit code last.
    /// A connection that drops mid-stream is resumed from the last offset
    /// received (`GET /sandboxes/{id}/execs/{exec_id}/stream`), so nothing is
    /// repeated or lost while the server keeps the exec (`exec.resume_window`).
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
        mut on_item: impl FnMut(StreamItem),
    ) -> Result<Option<i32>> {
        let mut body = req.clone();
        body.stream = true;
        body.report_exit = true;
        let mut resp = self
            .send(
                self.req(Method::POST, &format!("/sandboxes/{id}/exec"))
                    .json(&body),
            )
            .await?;
        let exec_id = resp
            .headers()
            .get("x-stacyvm-exec-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut offset = 0u64;
        let mut exit = None;
        let mut resumes = 0u32;
        loop {
            match read_ndjson(resp, &mut offset, &mut exit, &mut on_item).await {
                Ok(()) => return Ok(exit),
                Err(e) => {
                    // Only a dropped connection of a known exec is resumed.
                    let (Some(exec_id), ClientError::Http(_)) = (&exec_id, &e) else {
                        return Err(e);
                    };
                    resumes += 1;
                    if resumes > 5 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(resumes))).await;
                    resp = self
                        .send(
                            self.req(
                                Method::GET,
                                &format!("/sandboxes/{id}/execs/{exec_id}/stream"),
                            )
                            .query(&[("offset", offset)]),
                        )
                        .await?;
                }
            }
        }
    }

    /// `PUT /sandboxes/{id}/archive?path=`: extracts a tar (or tar.gz)
    /// body of `len` bytes whose SHA-256 is `sha256` (checked by the
    /// server before anything is kept); answers the server's report.
    pub async fn archive_put(
        &self,
        id: &str,
        path: &str,
        body: reqwest::Body,
        len: u64,
        sha256: &str,
    ) -> Result<serde_json::Value> {
        let resp = self
            .send(
                self.req(Method::PUT, &format!("/sandboxes/{id}/archive"))
                    .query(&[("path", path)])
                    .header("content-type", "application/x-tar")
                    .header("content-length", len)
                    .header("x-stacyvm-archive-sha256", sha256)
                    .body(body),
            )
            .await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /sandboxes/{id}/archive?path=`: the tar stream of a directory
    /// or file, as the open response.
    pub async fn archive_get(&self, id: &str, path: &str) -> Result<reqwest::Response> {
        self.send(
            self.req(Method::GET, &format!("/sandboxes/{id}/archive"))
                .query(&[("path", path)]),
        )
        .await
    }

    /// `GET /environments/builds/{id}/logs`: the build's log from byte
    /// `offset`, streamed until the build ends with `follow`.
    pub async fn build_logs(
        &self,
        id: &str,
        offset: u64,
        follow: bool,
    ) -> Result<reqwest::Response> {
        self.send(
            self.req(Method::GET, &format!("/environments/builds/{id}/logs"))
                .query(&[
                    ("offset", offset.to_string()),
                    ("follow", if follow { "1" } else { "0" }.to_string()),
                ]),
        )
        .await
    }

    /// `DELETE` of `path`; the server's JSON answer.
    pub async fn delete_json(&self, path: &str) -> Result<serde_json::Value> {
        self.json(self.req(Method::DELETE, path)).await
    }

    /// `GET /volumes/{name}/archive`: the volume's files as tar (or
    /// tar.gz), as the open response.
    pub async fn volume_archive_get(&self, name: &str, gzip: bool) -> Result<reqwest::Response> {
        self.send(
            self.req(Method::GET, &format!("/volumes/{name}/archive"))
                .query(&[("format", if gzip { "tar.gz" } else { "tar" })]),
        )
        .await
    }

    /// `PUT /volumes/{name}/archive`: extracts a tar (or tar.gz) body of
    /// `len` bytes whose SHA-256 is `sha256` into the volume.
    pub async fn spec_context_put(
        &self,
        spec_id: &str,
        body: reqwest::Body,
        len: u64,
        sha256: &str,
    ) -> Result<serde_json::Value> {
        self.tar_put(
            &format!("/environments/specs/{spec_id}/context"),
            body,
            len,
            sha256,
        )
        .await
    }

    async fn tar_put(
        &self,
        path: &str,
        body: reqwest::Body,
        len: u64,
        sha256: &str,
    ) -> Result<serde_json::Value> {
        let resp = self
            .send(
                self.req(Method::PUT, path)
                    .header("content-type", "application/x-tar")
                    .header("content-length", len)
                    .header("x-stacyvm-archive-sha256", sha256)
                    .body(body),
            )
            .await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn volume_archive_put(
        &self,
        name: &str,
        body: reqwest::Body,
        len: u64,
        sha256: &str,
    ) -> Result<serde_json::Value> {
        self.tar_put(&format!("/volumes/{name}/archive"), body, len, sha256)
            .await
    }

    pub async fn write_file(&self, id: &str, path: &str, content: &str) -> Result<()> {
        let body = WriteFileRequest {
            path: path.to_string(),
            content: content.to_string(),
            ..Default::default()
        };
        self.send(
            self.req(Method::POST, &format!("/sandboxes/{id}/files"))
                .json(&body),
        )
        .await
        .map(|_| ())
    }

    pub async fn read_file(&self, id: &str, path: &str) -> Result<bytes::Bytes> {
        let resp = self
            .send(
                self.req(Method::GET, &format!("/sandboxes/{id}/files"))
                    .query(&[("path", path)]),
            )
            .await?;
        Ok(resp.bytes().await?)
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileInfo>> {
        self.json(
            self.req(Method::GET, &format!("/sandboxes/{id}/files/list"))
                .query(&[("path", path)]),
        )
        .await
    }

    pub async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        let v: Option<Vec<String>> = self
            .json(
                self.req(Method::GET, &format!("/sandboxes/{id}/logs"))
                    .query(&[("lines", lines)]),
            )
            .await?;
        Ok(v.unwrap_or_default())
    }

    /// True when the server answers `/live`.
    pub async fn is_live(&self) -> bool {
        matches!(self.http.get(format!("{}/api/v1/live", self.base)).send().await, Ok(r) if r.status() == StatusCode::OK)
    }
}

/// Reads one NDJSON exec response, tracking the resume offset. An
/// incomplete last line (the connection dropped inside it) is discarded:
/// its bytes come again from the offset.
async fn read_ndjson(
    resp: reqwest::Response,
    offset: &mut u64,
    exit: &mut Option<i32>,
    on_item: &mut impl FnMut(StreamItem),
) -> Result<()> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut handle_line = |line: &[u8]| {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        if let Some(o) = v.get("offset").and_then(serde_json::Value::as_u64) {
            *offset = o;
        }
        match v.get("type").and_then(|t| t.as_str()) {
            Some("exit") => {
                *exit = v
                    .get("exit_code")
                    .and_then(serde_json::Value::as_i64)
                    .map(|c| c as i32);
                if let Some(c) = *exit {
                    on_item(StreamItem::Exit(c));
                }
                return;
            }
            Some(_) => return,
            None => {}
        }
        let data = v
            .get("data")
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .to_string();
        match v.get("stream").and_then(|s| s.as_str()) {
            Some("stderr") => on_item(StreamItem::Stderr(data)),
            _ => on_item(StreamItem::Stdout(data)),
        }
    };
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            handle_line(&line[..line.len() - 1]);
        }
    }
    if !buf.is_empty() {
        handle_line(&buf);
    }
    Ok(())
}
