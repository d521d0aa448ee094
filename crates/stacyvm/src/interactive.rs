//! `stacyvm exec -i/-t` and `stacyvm shell`: an exec over the WebSocket
//! with stdin piped (binary messages), output as raw bytes, and with `-t` a
//! pseudo-terminal: the local terminal in raw mode (restored on every way
//! out), resized on SIGWINCH, and the remote exit code as ours.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use stacyvm_api::{ExecRequest, TtySize};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Conn;

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

fn terminal_size() -> TtySize {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(w) if w.ws_row > 0 && w.ws_col > 0 => TtySize {
            rows: w.ws_row,
            cols: w.ws_col,
        },
        _ => TtySize { rows: 24, cols: 80 },
    }
}

/// Local stdin in chunks, read by a thread of its own: a blocking read
/// must not keep the runtime from shutting down once the command ends.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// `ws(s)://…/api/v1/sandboxes/{id}/exec/ws` for the server URL.
fn ws_url(base: &str, id: &str) -> Result<String> {
    let base = base.trim_end_matches('/');
    let rest = if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else {
        bail!("the server URL must start with http:// or https://, got {base:?}")
    };
    Ok(format!("{rest}/api/v1/sandboxes/{id}/exec/ws"))
}

/// Runs `req` in sandbox `id` with stdin attached; with `tty`, on a pty.
pub async fn run(conn: &Conn, id: &str, mut req: ExecRequest, tty: bool) -> Result<ExitCode> {
    if tty && !std::io::stdin().is_terminal() {
        bail!("the input device is not a terminal: drop -t, or run from a terminal");
    }
    req.interactive = true;
    req.binary = true;
    req.stream = false;
    if tty {
        req.tty = Some(terminal_size());
        if let Ok(term) = std::env::var("TERM") {
            req.env.entry("TERM".into()).or_insert(term);
        }
    }
    let mut request = ws_url(&conn.url, id)?
        .into_client_request()
        .context("building the WebSocket request")?;
    if let Some(k) = &conn.api_key {
        request.headers_mut().insert(
            "X-API-Key",
            HeaderValue::from_str(k).context("the API key is not a valid header value")?,
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| connect_error(&conn.url, e))?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(serde_json::to_string(&req)?.into()))
        .await
        .context("sending the exec request")?;

    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let mut stdin = stdin_reader();
    let mut stdin_open = true;
    let mut interrupts = 0u32;
    let mut winch = signal(SignalKind::window_change()).context("watching SIGWINCH")?;
    let mut sigint = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut code: Option<i32> = None;
    let mut failure: Option<String> = None;
    loop {
        tokio::select! {
            chunk = stdin.recv(), if stdin_open => {
                match chunk {
                    None => {
                        stdin_open = false;
                        let _ = tx.send(Message::Text(r#"{"type":"stdin_close"}"#.into())).await;
                    }
                    Some(data) => {
                        if tx.send(Message::Binary(data.into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            _ = winch.recv() => {
                let s = terminal_size();
                let msg = serde_json::json!({"type": "resize", "rows": s.rows, "cols": s.cols});
                let _ = tx.send(Message::Text(msg.to_string().into())).await;
            }
            // Without a pty, ^C and SIGTERM go to the remote command (a
            // pty gets ^C as a byte, in raw mode).
            _ = sigint.recv() => {
                interrupts += 1;
                if interrupts > 1 {
                    failure = Some("interrupted twice: disconnected (the server stops the command)".into());
                    break;
                }
                let _ = tx.send(Message::Text(r#"{"type":"signal","signal":2}"#.into())).await;
            }
            _ = sigterm.recv() => {
                let _ = tx.send(Message::Text(r#"{"type":"signal","signal":15}"#.into())).await;
            }
            msg = rx.next() => {
                let Some(msg) = msg else { break };
                match msg {
                    Ok(Message::Binary(b)) => {
                        let (tag, data) = b.split_first().unwrap_or((&1, &[]));
                        if *tag == 2 {
                            let _ = err.write_all(data);
                            let _ = err.flush();
                        } else {
                            let _ = out.write_all(data);
                            let _ = out.flush();
                        }
                    }
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["type"] == "done" {
                            code = v["exit_code"].as_i64().map(|c| c as i32);
                        } else if let Some(e) = v["error"].as_str() {
                            failure = Some(e.to_string());
                        } else if let Some(d) = v["data"].as_str() {
                            // A failure while running arrives as text on stderr.
                            let _ = err.write_all(d.as_bytes());
                        }
                    }
                    Ok(Message::Close(_)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        failure = Some(format!("the connection broke: {e}"));
                        break;
                    }
                }
            }
        }
    }
    drop(raw);
    let _ = out.flush();
    if let Some(f) = failure {
        bail!("{f}");
    }
    Ok(match code {
        Some(c) => crate::cli::exit_code(c),
        None => ExitCode::from(1),
    })
}

/// One line for a failed connect: unreachable, or the server's refusal.
fn connect_error(url: &str, e: tokio_tungstenite::tungstenite::Error) -> anyhow::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(io) => anyhow!(
            "{}",
            stacyvm_client::unreachable(url, &stacyvm_client::root_cause(&io))
        ),
        E::Http(resp) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            anyhow!("HTTP {}: {}", status.as_u16(), msg.trim())
        }
        other => anyhow!("cannot open the exec WebSocket at {url}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_follow_the_server_scheme() {
        assert_eq!(
            ws_url("http://127.0.0.1:7423/", "sb-1").expect("url"),
            "ws://127.0.0.1:7423/api/v1/sandboxes/sb-1/exec/ws"
        );
        assert_eq!(
            ws_url("https://h.example", "sb-1").expect("url"),
            "wss://h.example/api/v1/sandboxes/sb-1/exec/ws"
        );
        assert!(ws_url("ftp://h", "sb-1").is_err());
    }
}
