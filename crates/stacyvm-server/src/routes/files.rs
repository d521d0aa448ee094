//! `/sandboxes/{id}/files…`: the eight file routes.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use base64::Engine;
use serde::Deserialize;
use stacyvm_api::{ChmodRequest, FileInfo, MoveFileRequest, StatusResponse, WriteFileRequest};

use super::Who;
use crate::error::{ApiError, ApiResult};
use crate::json::{Body2, Json};
use crate::AppState;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathQuery {
    /// Absolute path in the sandbox (required).
    #[schemars(required)]
    path: Option<String>,
    /// `true` deletes a directory with its contents (`DELETE` only).
    recursive: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct UploadQuery {
    /// Absolute path in the sandbox (required).
    #[schemars(required)]
    path: Option<String>,
    /// Octal permission bits, e.g. `0755` (default `0644`).
    mode: Option<String>,
}

/// Extension: `PUT /files?path=…&mode=…` with the raw file as the body
/// (no JSON or base64 encoding; binary-safe). The body streams to the
/// sandbox with backpressure (a few chunks in memory at a time), up to
/// `limits.max_file_bytes`.
pub async fn upload(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> ApiResult<Json<StatusResponse>> {
    let path = required(q.path)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let write = st
        .manager
        .write_file_stream(&id, &path, rx, q.mode.as_deref().unwrap_or(""), &who);
    match stacyvm_core::provider::feed(body.into_data_stream(), tx, u64::MAX, write).await {
        Ok(_) => Ok(Json::ok(StatusResponse::new("written"))),
        Err(stacyvm_core::provider::Feed::Write(e)) => Err(e.into()),
        Err(stacyvm_core::provider::Feed::Body(m)) => Err(ApiError::bad_request(m)),
        Err(stacyvm_core::provider::Feed::TooLarge(m)) => Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            m,
        )),
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GlobQuery {
    /// Absolute glob pattern, e.g. `/workspace/**/*.py` (required).
    #[schemars(required)]
    pattern: Option<String>,
}

fn required(p: Option<String>) -> ApiResult<String> {
    match p {
        Some(p) if !p.trim().is_empty() => Ok(p),
        _ => Err(ApiError::bad_request("path query parameter required")),
    }
}

pub async fn write(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<WriteFileRequest>,
) -> ApiResult<Json<StatusResponse>> {
    let data = match req.encoding.as_str() {
        "" | "utf-8" | "utf8" | "text" => req.content.into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(req.content.as_bytes())
            .map_err(|e| {
                ApiError::bad_request(format!("invalid input: content is not valid base64: {e}"))
            })?,
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid input: unsupported encoding {other:?} (allowed: utf-8, base64)"
            )))
        }
    };
    st.manager
        .write_file(&id, &req.path, data, &req.mode, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("written")))
}

pub async fn read(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let path = required(q.path)?;
    let file = st.manager.read_file_stream(&id, &path, &who).await?;
    let size = file.size;
    // Streamed with backpressure: the agent sends as fast as the client reads.
    let mut resp = Response::new(stream_body(file.chunks));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // The size when the read started: a file that changes meanwhile ends
    // the response early (the client sees a short body), never silently.
    // (/proc files report 0 and are sent chunked.)
    if size > 0 {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

pub async fn delete(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<StatusResponse>> {
    let path = required(q.path)?;
    let recursive = q.recursive.as_deref() == Some("true");
    st.manager.delete_file(&id, &path, recursive, &who).await?;
    Ok(Json::ok(StatusResponse::new("deleted")))
}

pub async fn list(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Vec<FileInfo>>> {
    let path = q.path.unwrap_or_default();
    Ok(Json::ok(st.manager.list_files(&id, &path, &who).await?))
}

pub async fn mv(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<MoveFileRequest>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager
        .move_file(&id, &req.old_path, &req.new_path, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("moved")))
}

pub async fn chmod(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<ChmodRequest>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager
        .chmod_file(&id, &req.path, &req.mode, &who)
        .await?;
    Ok(Json::ok(StatusResponse::new("chmod applied")))
}

pub async fn stat(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<FileInfo>> {
    let path = required(q.path)?;
    Ok(Json::ok(st.manager.stat_file(&id, &path, &who).await?))
}

pub async fn glob(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<GlobQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let pattern = match q.pattern {
        Some(p) if !p.trim().is_empty() => p,
        _ => return Err(ApiError::bad_request("pattern query parameter required")),
    };
    Ok(Json::ok(st.manager.glob_files(&id, &pattern, &who).await?))
}

// ----- archives ----------------------------------------------------------

/// The response trailer (and request header) carrying an archive's SHA-256.
pub const ARCHIVE_SHA256: &str = "x-stacyvm-archive-sha256";

/// The largest archive request body: content plus tar framing.
pub fn archive_body_limit(l: &stacyvm_core::config::LimitsConfig) -> u64 {
    l.max_archive_bytes
        .saturating_add(l.max_archive_entries.saturating_mul(1536))
        .saturating_add(10240)
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ArchiveQuery {
    /// Absolute path in the sandbox (required): what to pack (`GET`), or
    /// the directory to extract into (`PUT`, created if missing).
    #[schemars(required)]
    path: Option<String>,
    /// `GET`: `tar` (default) or `tar.gz`. `PUT` detects gzip by itself.
    format: Option<String>,
}

/// `GET /sandboxes/{id}/archive?path=…[&format=tar.gz]`: a directory (its
/// contents) or a file as a tar stream, symlinks stored as links. The
/// SHA-256 of the bytes sent follows as the trailer
/// `X-StacyVM-Archive-SHA256` (HTTP/2, or HTTP/1.1 with `TE: trailers`).
pub async fn archive_get(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<ArchiveQuery>,
) -> ApiResult<Response> {
    let path = required(q.path)?;
    let gzip = archive_format(q.format.as_deref())?;
    let stream = st.manager.archive_read(&id, &path, &who).await?;
    Ok(tar_response(stream.chunks, gzip))
}

/// `format`: `tar` (default) or `tar.gz`; whether to gzip.
pub(crate) fn archive_format(format: Option<&str>) -> ApiResult<bool> {
    match format.unwrap_or("tar") {
        "tar" | "" => Ok(false),
        "tar.gz" | "tgz" | "gzip" => Ok(true),
        other => Err(ApiError::bad_request(format!(
            "invalid input: unsupported archive format {other:?} (allowed: tar, tar.gz)"
        ))),
    }
}

/// A tar stream as the response (gzipped when asked), its SHA-256 in the
/// trailer.
pub(crate) fn tar_response(
    chunks: tokio::sync::mpsc::Receiver<stacyvm_core::Result<Vec<u8>>>,
    gzip: bool,
) -> Response {
    let body = TarBody::new(chunks, gzip);
    let mut resp = Response::new(Body::new(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if gzip {
            "application/gzip"
        } else {
            "application/x-tar"
        }),
    );
    h.insert(header::TRAILER, HeaderValue::from_static(ARCHIVE_SHA256));
    resp
}

/// A tar stream from the sandbox, optionally gzipped, with its SHA-256 as
/// a trailer.
struct TarBody {
    chunks: tokio::sync::mpsc::Receiver<stacyvm_core::Result<Vec<u8>>>,
    gz: Option<flate2::write::GzEncoder<Vec<u8>>>,
    hasher: Option<sha2::Sha256>,
}

impl TarBody {
    fn new(chunks: tokio::sync::mpsc::Receiver<stacyvm_core::Result<Vec<u8>>>, gzip: bool) -> Self {
        TarBody {
            chunks,
            gz: gzip
                .then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())),
            hasher: Some(sha2::Digest::new()),
        }
    }

    fn emit(&mut self, data: Vec<u8>) -> bytes::Bytes {
        if let Some(h) = &mut self.hasher {
            sha2::Digest::update(h, &data);
        }
        bytes::Bytes::from(data)
    }
}

impl http_body::Body for TarBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        use std::io::Write as _;
        use std::task::Poll;
        loop {
            if self.hasher.is_none() {
                return Poll::Ready(None);
            }
            match self.chunks.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    // A broken stream must not look complete: the body
                    // errors (the connection is cut, no trailer).
                    self.hasher = None;
                    return Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))));
                }
                Poll::Ready(Some(Ok(data))) => {
                    let out = match &mut self.gz {
                        Some(gz) => {
                            gz.write_all(&data)?;
                            std::mem::take(gz.get_mut())
                        }
                        None => data,
                    };
                    if out.is_empty() {
                        continue;
                    }
                    let b = self.emit(out);
                    return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
                }
                Poll::Ready(None) => {
                    if let Some(gz) = self.gz.take() {
                        let rest = gz.finish()?;
                        if !rest.is_empty() {
                            let b = self.emit(rest);
                            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
                        }
                    }
                    let Some(h) = self.hasher.take() else {
                        return Poll::Ready(None);
                    };
                    let sum = hex::encode(sha2::Digest::finalize(h));
                    let mut trailers = axum::http::HeaderMap::new();
                    if let Ok(v) = HeaderValue::from_str(&sum) {
                        trailers.insert(ARCHIVE_SHA256, v);
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
                }
            }
        }
    }
}

/// The request body of an archive upload as plain tar: gzip (by its magic
/// bytes) is inflated, and the SHA-256 of the bytes as sent is checked
/// against `expect` at the end, before the upload may complete.
struct Intake<S> {
    body: S,
    hasher: sha2::Sha256,
    gz: Option<flate2::write::GzDecoder<Vec<u8>>>,
    head: Vec<u8>,
    decided: bool,
    expect: Option<String>,
    done: bool,
}

impl<S> Intake<S>
where
    S: futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin,
{
    fn inflate(&mut self, data: Vec<u8>) -> Result<Vec<u8>, String> {
        use std::io::Write as _;
        match &mut self.gz {
            Some(d) => {
                d.write_all(&data)
                    .map_err(|e| format!("invalid input: the gzip stream is broken: {e}"))?;
                Ok(std::mem::take(d.get_mut()))
            }
            None => Ok(data),
        }
    }

    async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        use futures::StreamExt;
        loop {
            if self.done {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    sha2::Digest::update(&mut self.hasher, &chunk);
                    let data = if self.decided {
                        chunk.to_vec()
                    } else {
                        self.head.extend_from_slice(&chunk);
                        if self.head.len() < 2 {
                            continue;
                        }
                        self.decided = true;
                        if self.head.starts_with(&[0x1f, 0x8b]) {
                            self.gz = Some(flate2::write::GzDecoder::new(Vec::new()));
                        }
                        std::mem::take(&mut self.head)
                    };
                    match self.inflate(data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Some(Ok(out)),
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(format!("the request body ended early: {e}")));
                }
                None => {
                    self.done = true;
                    let head = std::mem::take(&mut self.head);
                    let mut rest = match self.inflate(head) {
                        Ok(r) => r,
                        Err(e) => return Some(Err(e)),
                    };
                    if let Some(d) = self.gz.take() {
                        match d.finish() {
                            Ok(more) => rest.extend_from_slice(&more),
                            Err(e) => {
                                return Some(Err(format!(
                                    "invalid input: the gzip stream is cut short: {e}"
                                )))
                            }
                        }
                    }
                    let sum = hex::encode(sha2::Digest::finalize(self.hasher.clone()));
                    if let Some(want) = &self.expect {
                        if !want.eq_ignore_ascii_case(&sum) {
                            return Some(Err(format!(
                                "invalid input: the archive's SHA-256 is {sum}, not {want} \
                                 ({ARCHIVE_SHA256}); nothing was extracted"
                            )));
                        }
                    }
                    return (!rest.is_empty()).then_some(Ok(rest));
                }
            }
        }
    }
}

/// A response body fed by `chunks` (an error ends it early: the client
/// sees a short body, never a silent one).
pub(crate) fn stream_body(
    chunks: tokio::sync::mpsc::Receiver<stacyvm_core::Result<Vec<u8>>>,
) -> Body {
    let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks);
    Body::from_stream(futures::StreamExt::map(chunks, |c| {
        c.map(bytes::Bytes::from)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }))
}

/// What `PUT /archive` answers.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct ArchiveWritten {
    pub status: String,
    pub path: String,
    pub entries: u64,
    /// Bytes of file content extracted.
    pub bytes: u64,
    /// SHA-256 of the request body as received.
    pub sha256: String,
}

/// `PUT /sandboxes/{id}/archive?path=DIR`: extracts the tar (or tar.gz)
/// body into `DIR`, streamed. With `X-StacyVM-Archive-SHA256` the body's
/// checksum is verified before anything is kept.
pub async fn archive_put(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<ArchiveQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<ArchiveWritten>> {
    let path = required(q.path)?;
    let (report, sum) = intake_archive(&headers, body, |rx| {
        st.manager.archive_write(&id, &path, rx, &who)
    })
    .await?;
    Ok(Json::ok(ArchiveWritten {
        status: "extracted".into(),
        path: path.clone(),
        entries: report.entries,
        bytes: report.bytes,
        sha256: sum,
    }))
}

/// Feeds a tar (or tar.gz) request body, checksum-checked against the
/// `X-StacyVM-Archive-SHA256` header when given, to `write`; the report
/// and the body's SHA-256.
pub(crate) async fn intake_archive<F, Fut>(
    headers: &axum::http::HeaderMap,
    body: Body,
    write: F,
) -> ApiResult<(stacyvm_core::provider::ArchiveReport, String)>
where
    F: FnOnce(tokio::sync::mpsc::Receiver<Vec<u8>>) -> Fut,
    Fut: std::future::Future<Output = stacyvm_core::Result<stacyvm_core::provider::ArchiveReport>>,
{
    let expect = match headers.get(ARCHIVE_SHA256).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(v.to_string())
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "invalid input: {ARCHIVE_SHA256} must be 64 hex digits"
            )))
        }
    };
    let mut intake = Intake {
        body: body.into_data_stream(),
        hasher: sha2::Digest::new(),
        gz: None,
        head: Vec::new(),
        decided: false,
        expect,
        done: false,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let write = write(rx);
    let pump = async move {
        while let Some(chunk) = intake.next().await {
            let chunk = chunk?;
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        // Only now, checksum verified, may the write see the end.
        drop(tx);
        let sum = hex::encode(sha2::Digest::finalize(intake.hasher.clone()));
        Ok::<String, String>(sum)
    };
    let mut pump = std::pin::pin!(pump);
    let mut write = std::pin::pin!(write);
    let (report, sum) = tokio::select! {
        fed = &mut pump => match fed {
            Ok(sum) => (write.await?, sum),
            // Returning drops the unfinished write: the agent removes what
            // it extracted.
            Err(e) => return Err(ApiError::bad_request(e)),
        },
        // The write ended first: the sandbox refused the archive.
        written = &mut write => {
            let report = written?;
            let sum = pump.await.unwrap_or_default();
            (report, sum)
        }
    };
    Ok((report, sum))
}
