//! `/sandboxes` routes: lifecycle, exec (sync, NDJSON, WebSocket), logs, stats.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use stacyvm_api::{
    ExecInfo, ExecRequest, ExecResponse, ExtendRequest, ForkRequest, ForkResponse, GoDuration,
    PruneResponse, Sandbox, SnapshotSummary, SpawnRequest, StatusResponse, StreamChunk, StreamExit,
};
use stacyvm_core::execs::{Attachment, Finish, JournalItem};
use stacyvm_core::manager::{self, Caller, StreamEvent};

use super::Who;
use crate::error::ApiResult;
use crate::json::{Body2, Json, OptBody};
use crate::AppState;

pub async fn spawn(
    State(st): State<AppState>,
    Who(who): Who,
    OptBody(req): OptBody<SpawnRequest>,
) -> ApiResult<Json<Sandbox>> {
    Ok(Json::created(st.manager.spawn(req, &who).await?))
}

/// Preflight of a spawn. Global counts (all tenants' active sandboxes
/// and the server-wide cap) are for the admin and global operators only
/// (F-17); other callers see their own owner's numbers.
pub async fn admission(
    State(st): State<AppState>,
    authed: crate::tenancy::Authed,
    OptBody(req): OptBody<SpawnRequest>,
) -> ApiResult<Json<stacyvm_api::AdmissionDecision>> {
    let owner = authed.caller.owner_for(&req.owner_id)?;
    let mut d = st.manager.admission(&req, &owner).await?;
    if !authed.sees_server_wide() {
        d.active_sandboxes = 0;
        d.max_sandboxes = 0;
    }
    Ok(Json::ok(d))
}

pub async fn list(State(st): State<AppState>, Who(who): Who) -> ApiResult<Json<Vec<Sandbox>>> {
    let recs = st.manager.list(&who).await?;
    Ok(Json::ok(
        recs.iter().map(|r| st.manager.to_api(r)).collect(),
    ))
}

pub async fn prune(State(st): State<AppState>) -> ApiResult<Json<PruneResponse>> {
    Ok(Json::ok(PruneResponse {
        pruned: st.manager.prune().await?,
    }))
}

pub async fn get(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    let r = st.manager.get(&id, &who).await?;
    Ok(Json::ok(st.manager.to_api(&r)))
}

pub async fn destroy(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<StatusResponse>> {
    st.manager.destroy(&id, &who).await?;
    Ok(Json::ok(StatusResponse::new("destroyed")))
}

/// `POST /sandboxes/{id}/snapshot`: 201 with the snapshot.
pub async fn snapshot(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotSummary>> {
    Ok(Json::created(st.manager.snapshot_sandbox(&id, &who).await?))
}

/// `POST /sandboxes/{id}/fork`: 201 with the children.
pub async fn fork(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    OptBody(req): OptBody<ForkRequest>,
) -> ApiResult<Json<ForkResponse>> {
    Ok(Json::created(st.manager.fork(&id, &req, &who).await?))
}

pub async fn extend(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<ExtendRequest>,
) -> ApiResult<Json<Sandbox>> {
    Ok(Json::ok(st.manager.extend(&id, &req.ttl, &who).await?))
}

/// `GET /sandboxes/{id}/network`: the egress policy and recent denials.
pub async fn network(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<stacyvm_api::NetworkStatus>> {
    Ok(Json::ok(st.manager.network(&id, &who).await?))
}

/// `PATCH /sandboxes/{id}/network`: the fields given replace the policy's.
pub async fn patch_network(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<stacyvm_api::NetworkPatch>,
) -> ApiResult<Json<stacyvm_api::NetworkStatus>> {
    Ok(Json::ok(st.manager.patch_network(&id, req, &who).await?))
}

/// `PUT /sandboxes/{id}/network`: a whole new policy.
pub async fn put_network(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<stacyvm_api::NetworkPolicy>,
) -> ApiResult<Json<stacyvm_api::NetworkStatus>> {
    Ok(Json::ok(
        st.manager.set_network(&id, Some(req), &who).await?,
    ))
}

/// `POST /sandboxes/{id}/pause`: freezes the sandbox, stops its TTL.
pub async fn pause(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    Ok(Json::ok(st.manager.pause(&id, &who).await?))
}

/// `POST /sandboxes/{id}/resume`: thaws it; the expiry moves on by the
/// time paused. An optional body `{"ttl": "10m"}` sets a fresh time to
/// live instead.
pub async fn resume(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Sandbox>> {
    let req: ExtendRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ExtendRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| stacyvm_core::Error::invalid(format!("resume body: {e}")))?
    };
    let ttl = Some(req.ttl.as_str()).filter(|t| !t.trim().is_empty());
    Ok(Json::ok(st.manager.resume(&id, ttl, &who).await?))
}

fn to_manager_req(req: &ExecRequest) -> manager::ExecRequest {
    manager::ExecRequest {
        command: req.command.clone(),
        args: req.args.clone(),
        mode: req.mode.clone(),
        env: req.env.clone(),
        workdir: req.workdir.clone(),
        timeout: req.timeout.clone(),
        stdin: req.stdin.as_ref().map(|s| s.as_bytes().to_vec()),
        pty: req.tty.map(|t| (t.rows.max(1), t.cols.max(1))),
        user: req.user.clone(),
    }
}

pub async fn exec(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Body2(req): Body2<ExecRequest>,
) -> ApiResult<Response> {
    let mreq = to_manager_req(&req);
    if req.stream {
        let window = st.manager.config().exec.resume_window.std();
        let att = st
            .manager
            .exec_start(&id, &mreq, &who, None, window)
            .await?;
        return Ok(ndjson(att, req.report_exit));
    }
    let out = st.manager.exec(&id, &mreq, &who).await?;
    Ok(Json::ok(ExecResponse {
        exit_code: out.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        duration: GoDuration::from_std(out.duration),
    })
    .into_response())
}

/// Converts output bytes to text without splitting UTF-8 sequences across
/// chunks: an incomplete trailing sequence is carried to the next chunk.
#[derive(Default)]
struct Utf8Carry {
    pending: BTreeMap<&'static str, Vec<u8>>,
}

impl Utf8Carry {
    fn push(&mut self, stream: &'static str, data: &[u8]) -> String {
        let buf = self.pending.entry(stream).or_default();
        buf.extend_from_slice(data);
        let cut = match std::str::from_utf8(buf) {
            Ok(_) => buf.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => buf.len(),
        };
        let rest = buf.split_off(cut);
        let text = String::from_utf8_lossy(buf).into_owned();
        *buf = rest;
        text
    }

    fn pending_len(&self, stream: &'static str) -> usize {
        self.pending.get(stream).map_or(0, Vec::len)
    }

    fn flush(&mut self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(k, b)| (k, String::from_utf8_lossy(&b).into_owned()))
            .collect()
    }

    /// Flushes every stream but `keep` (whose bytes come later).
    fn flush_others(&mut self, keep: &'static str) -> Vec<(&'static str, String)> {
        let others: Vec<&'static str> = self
            .pending
            .iter()
            .filter(|(k, b)| **k != keep && !b.is_empty())
            .map(|(k, _)| *k)
            .collect();
        others
            .into_iter()
            .filter_map(|k| self.pending.remove(k).map(|b| (k, b)))
            .map(|(k, b)| (k, String::from_utf8_lossy(&b).into_owned()))
            .collect()
    }
}

fn line<T: serde::Serialize>(v: &T) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn chunk_line(stream: &str, data: String, offset: Option<u64>) -> Bytes {
    line(&StreamChunk {
        stream: stream.into(),
        data,
        offset,
    })
}

/// Turns journal items into NDJSON lines. With `extended` (the request
/// asked for `report_exit`, or this is a resumed stream) every output line
/// carries the offset after its bytes, so a client resumes exactly where it
/// stopped; without it the lines have exactly the original's shape:
/// bytes held back to complete a UTF-8 sequence are not counted until
/// their line is written, and only one stream holds such bytes at a time
/// (another stream's output flushes them first).
#[derive(Default)]
struct NdjsonEncoder {
    carry: Utf8Carry,
}

impl NdjsonEncoder {
    fn encode(&mut self, item: JournalItem, extended: bool) -> Vec<Bytes> {
        let at = |o: u64| extended.then_some(o);
        let mut out = Vec::new();
        match item {
            JournalItem::Output {
                offset,
                stream,
                data,
            } => {
                let name = stream.as_str();
                for (s, text) in self.carry.flush_others(name) {
                    out.push(chunk_line(s, text, at(offset)));
                }
                let text = self.carry.push(name, &data);
                let end = offset + data.len() as u64 - self.carry.pending_len(name) as u64;
                if !text.is_empty() {
                    out.push(chunk_line(name, text, at(end)));
                }
            }
            JournalItem::Gap { from, to } => {
                self.carry = Utf8Carry::default();
                out.push(line(&serde_json::json!({
                    "type": "gap",
                    "offset": to,
                    "lost_bytes": to - from,
                })));
            }
            JournalItem::End(finish) => {
                for (s, text) in self.carry.flush() {
                    out.push(line(&StreamChunk {
                        stream: s.into(),
                        data: text,
                        offset: None,
                    }));
                }
                match finish {
                    Finish::Exit { code, duration } => {
                        if extended {
                            out.push(line(&StreamExit {
                                kind: "exit".into(),
                                exit_code: code,
                                duration: GoDuration::from_std(duration),
                            }));
                        }
                    }
                    Finish::Failed { message, .. } => {
                        out.push(line(&StreamChunk {
                            stream: "stderr".into(),
                            data: message,
                            offset: None,
                        }));
                    }
                }
            }
        }
        out
    }
}

/// An NDJSON response that follows `att`; the exec's id is in
/// `X-StacyVM-Exec-Id`. Dropping the response (the client went away)
/// detaches the reader; the exec lives on for `exec.resume_window`.
/// `extended`: offsets on output lines and the exit record at the end.
fn ndjson(att: Attachment, extended: bool) -> Response {
    let exec_id = att.exec_id().to_string();
    let stream = futures::stream::unfold(
        (att, NdjsonEncoder::default()),
        move |(mut att, mut enc)| async move {
            let item = att.next().await?;
            let lines = enc.encode(item, extended);
            Some((
                futures::stream::iter(lines.into_iter().map(Ok::<_, std::io::Error>)),
                (att, enc),
            ))
        },
    )
    .flatten();
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(&exec_id) {
        h.insert(EXEC_ID_HEADER, v);
    }
    resp
}

/// The response header naming a streamed exec.
pub const EXEC_ID_HEADER: &str = "x-stacyvm-exec-id";

/// `GET /sandboxes/{id}/execs`: running and recent streamed execs.
pub async fn execs(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ExecInfo>>> {
    Ok(Json::ok(st.manager.execs(&id, &who).await?))
}

/// `GET /sandboxes/{id}/execs/{exec_id}`.
pub async fn exec_info(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, exec_id)): Path<(String, String)>,
) -> ApiResult<Json<ExecInfo>> {
    Ok(Json::ok(st.manager.exec_info(&id, &exec_id, &who).await?))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ResumeQuery {
    /// Output offset to read from (the `offset` of the last line
    /// received); 0 = from the start.
    offset: Option<String>,
}

/// `GET /sandboxes/{id}/execs/{exec_id}/stream?offset=N`: the exec's
/// output from `offset` as NDJSON, then the exit record.
pub async fn exec_resume(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, exec_id)): Path<(String, String)>,
    Query(q): Query<ResumeQuery>,
) -> ApiResult<Response> {
    let offset = match q.offset.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(o) => o.parse::<u64>().map_err(|_| {
            stacyvm_core::Error::invalid(format!(
                "offset must be a byte offset (a whole number >= 0), got {o:?}"
            ))
        })?,
    };
    let att = st.manager.exec_attach(&id, &exec_id, offset, &who).await?;
    Ok(ndjson(att, true))
}

/// `DELETE /sandboxes/{id}/execs/{exec_id}`: kills a running exec.
pub async fn exec_kill(
    State(st): State<AppState>,
    Who(who): Who,
    Path((id, exec_id)): Path<(String, String)>,
) -> ApiResult<Json<ExecInfo>> {
    Ok(Json::ok(st.manager.exec_kill(&id, &exec_id, &who).await?))
}

/// WebSocket exec: one JSON request message in; `{"stream","data"}`
/// messages out; then `{"type":"done","exit_code":N}` and close 1000.
pub async fn exec_ws(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    slot: Option<axum::Extension<crate::active::PermitSlot>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // A browser's Origin must be this server's own (the dashboard) or in
    // an exact CORS list (S-17); non-browser clients send none.
    let origins = &st.cfg.server.cors_allowed_origins;
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let any = origins.iter().any(|o| o == "*");
        if !any && !origins.iter().any(|o| o == origin) && !crate::ui::same_origin(&headers) {
            return Err(crate::error::ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!("websocket origin {origin:?} is not allowed"),
            ));
        }
    }
    // Auth, tenant and existence are checked before the upgrade.
    st.manager.get(&id, &who).await?;
    let ws = ws.map_err(|e| {
        crate::error::ApiError::bad_request(format!(
            "websocket upgrade required: {}",
            e.body_text()
        ))
    })?;
    // The session keeps the caller's concurrency slot until it ends.
    let permit = slot.and_then(|s| s.0.take());
    let max = usize::try_from(st.cfg.limits.ws_max_message_bytes)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(64 << 20);
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            ws_session(st, who, id, socket).await;
        }))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn ws_session(st: AppState, who: Caller, id: String, mut socket: WebSocket) {
    let first = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let req: ExecRequest = match first {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(t.as_str()) {
            Ok(r) => r,
            Err(_) => return close(&mut socket, 1007, "invalid request").await,
        },
        _ => return close(&mut socket, 1007, "invalid request").await,
    };
    let mreq = to_manager_req(&req);
    let (input_tx, input_rx) = if req.interactive || req.tty.is_some() {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mut rx = match st
        .manager
        .exec_stream_with(&id, &mreq, &who, input_rx)
        .await
    {
        Ok(rx) => rx,
        Err(e) => {
            // Server-side failures say only their kind (F-17).
            let text = crate::error::ApiError::from(e).message;
            let msg = serde_json::json!({"error": text}).to_string();
            let _ = socket.send(Message::Text(msg.into())).await;
            return close(&mut socket, 1011, "exec failed").await;
        }
    };
    let mut carry = Utf8Carry::default();
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                if req.binary {
                    if let StreamEvent::Output(c) = &ev {
                        let tag = match c.stream {
                            stacyvm_core::provider::StreamKind::Stdout => 1u8,
                            stacyvm_core::provider::StreamKind::Stderr => 2u8,
                        };
                        let mut frame = Vec::with_capacity(c.data.len() + 1);
                        frame.push(tag);
                        frame.extend_from_slice(&c.data);
                        if socket.send(Message::Binary(frame.into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
                let msgs: Vec<String> = match ev {
                    StreamEvent::Output(c) => {
                        let text = carry.push(c.stream.as_str(), &c.data);
                        if text.is_empty() { vec![] } else {
                            vec![serde_json::to_string(&StreamChunk { stream: c.stream.as_str().into(), data: text, offset: None }).unwrap_or_default()]
                        }
                    }
                    StreamEvent::Exit { code, duration } => {
                        let mut v: Vec<String> = carry.flush().into_iter().map(|(s, t)| serde_json::to_string(&StreamChunk { stream: s.into(), data: t, offset: None }).unwrap_or_default()).collect();
                        v.push(serde_json::json!({"type": "done", "exit_code": code, "duration": GoDuration::from_std(duration)}).to_string());
                        v
                    }
                    StreamEvent::Failed { message: msg, .. } => {
                        let mut v: Vec<String> = carry.flush().into_iter().map(|(s, t)| serde_json::to_string(&StreamChunk { stream: s.into(), data: t, offset: None }).unwrap_or_default()).collect();
                        v.push(serde_json::to_string(&StreamChunk { stream: "stderr".into(), data: msg, offset: None }).unwrap_or_default());
                        v.push(serde_json::json!({"type": "done"}).to_string());
                        v
                    }
                };
                for m in msgs {
                    if socket.send(Message::Text(m.into())).await.is_err() {
                        return; // client gone: dropping rx kills the command
                    }
                }
            }
            incoming = socket.recv() => {
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(t))) => {
                        if let (Some(tx), Some(msg)) = (&input_tx, parse_input(t.as_str())) {
                            let _ = tx.send(msg).await;
                        }
                    }
                    // Binary messages are raw stdin bytes.
                    Some(Ok(Message::Binary(b))) => {
                        if let Some(tx) = &input_tx {
                            if !b.is_empty() {
                                let _ = tx
                                    .send(stacyvm_core::provider::ExecInput::Stdin(b.to_vec()))
                                    .await;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    close(&mut socket, 1000, "").await;
}

/// An interactive WebSocket message: stdin data, end of stdin or a signal.
fn parse_input(text: &str) -> Option<stacyvm_core::provider::ExecInput> {
    use stacyvm_core::provider::ExecInput;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    match v.get("type")?.as_str()? {
        "stdin" => Some(ExecInput::Stdin(
            v.get("data")?.as_str()?.as_bytes().to_vec(),
        )),
        "stdin_close" => Some(ExecInput::CloseStdin),
        "resize" => {
            let rows = u16::try_from(v.get("rows")?.as_u64()?).ok()?;
            let cols = u16::try_from(v.get("cols")?.as_u64()?).ok()?;
            Some(ExecInput::Resize(rows.max(1), cols.max(1)))
        }
        "signal" => {
            let sig = v.get("signal")?.as_i64()?;
            (1..=64)
                .contains(&sig)
                .then_some(ExecInput::Signal(sig as i32))
        }
        _ => None,
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct LogsQuery {
    /// How many of the last lines (default 100).
    lines: Option<String>,
}

pub async fn logs(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let lines = q
        .lines
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
        .min(10_000);
    Ok(Json::ok(st.manager.logs(&id, lines, &who).await?))
}

pub async fn stats(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let v = match st.manager.stats(&id, &who).await? {
        Some(s) => {
            serde_json::json!({"cpu_pct": s.cpu_pct, "mem_bytes": s.mem_bytes, "mem_limit_bytes": s.mem_limit_bytes, "supported": true})
        }
        None => serde_json::json!({"supported": false}),
    };
    Ok(Json(StatusCode::OK, v).into_response())
}
