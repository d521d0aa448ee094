//! A minimal QMP (QEMU Machine Protocol) client: one connection per
//! command over the VM's `qmp.sock` (QEMU serves one client at a time).
//! Lines of JSON: the greeting, `qmp_capabilities`, then the command;
//! asynchronous events that arrive in between are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// How long one command may take, connect to reply.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest line accepted from QEMU.
const MAX_LINE: usize = 1 << 20;

/// Runs `command` with `args` and returns its `return` value.
pub async fn execute(sock: &Path, command: &str, args: Option<Value>) -> Result<Value> {
    tokio::time::timeout(TIMEOUT, run(sock, command, args))
        .await
        .map_err(|_| Error::unavailable(format!("QMP {command}: no answer within {TIMEOUT:?}")))?
}

async fn run(sock: &Path, command: &str, args: Option<Value>) -> Result<Value> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| Error::unavailable(format!("QMP: connecting to {}: {e}", sock.display())))?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let greeting = read_reply(&mut rd).await?;
    if greeting.get("QMP").is_none() {
        return Err(Error::internal(format!(
            "QMP: unexpected greeting {greeting}"
        )));
    }
    for (cmd, args) in [("qmp_capabilities", None), (command, args)] {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&req).unwrap_or_default();
        line.push(b'\n');
        wr.write_all(&line)
            .await
            .map_err(|e| Error::unavailable(format!("QMP {cmd}: {e}")))?;
        loop {
            let v = read_reply(&mut rd).await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(Error::internal(format!(
                    "QMP {cmd}: {}",
                    err.get("desc").and_then(Value::as_str).unwrap_or("error")
                )));
            }
            if let Some(r) = v.get("return") {
                if cmd == command {
                    return Ok(r.clone());
                }
                break;
            }
        }
    }
    Err(Error::internal("QMP: no reply"))
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> Result<Value> {
    let mut line = Vec::new();
    let n = (&mut *rd)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Error::unavailable(format!("QMP: reading: {e}")))?;
    if n == 0 {
        return Err(Error::unavailable("QMP: QEMU closed the connection"));
    }
    serde_json::from_slice(&line).map_err(|e| Error::internal(format!("QMP: bad reply: {e}")))
}

/// Hands QEMU `fd` under `name` (QMP `getfd`, the descriptor passed with
/// SCM_RIGHTS) and runs `command` in the same session, so the command can
/// use `fd:<name>` (e.g. a migration stream). QEMU then needs no path of
/// the server's: it may run as an unprivileged uid.
pub async fn execute_with_fd(
    sock: &Path,
    fd: std::os::fd::OwnedFd,
    name: &str,
    command: &str,
    args: Option<Value>,
) -> Result<Value> {
    let (sock, name, command) = (sock.to_path_buf(), name.to_string(), command.to_string());
    tokio::task::spawn_blocking(move || with_fd_blocking(&sock, &fd, &name, &command, args))
        .await
        .map_err(|e| Error::internal(format!("QMP task: {e}")))?
}

fn with_fd_blocking(
    sock: &Path,
    fd: &std::os::fd::OwnedFd,
    name: &str,
    command: &str,
    args: Option<Value>,
) -> Result<Value> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let err =
        |what: &str, e: &dyn std::fmt::Display| Error::unavailable(format!("QMP {what}: {e}"));
    let stream = std::os::unix::net::UnixStream::connect(sock).map_err(|e| err("connect", &e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| err("timeout", &e))?;
    let mut rd = std::io::BufReader::new(stream.try_clone().map_err(|e| err("clone", &e))?);
    let mut wr = stream;
    let read = |rd: &mut std::io::BufReader<std::os::unix::net::UnixStream>| -> Result<Value> {
        loop {
            let mut line = String::new();
            let n = rd.read_line(&mut line).map_err(|e| err("read", &e))?;
            if n == 0 {
                return Err(Error::unavailable("QMP: QEMU closed the connection"));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| Error::internal(format!("QMP: bad reply: {e}")))?;
            if v.get("event").is_some() || v.get("QMP").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(Error::internal(format!(
                    "QMP: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                )));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    };
    // Greeting, then capabilities.
    let mut greeting = String::new();
    rd.read_line(&mut greeting)
        .map_err(|e| err("greeting", &e))?;
    wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(|e| err("write", &e))?;
    read(&mut rd)?;
    // getfd with the descriptor attached to the same message.
    let getfd = format!(
        "{}\n",
        json!({"execute": "getfd", "arguments": {"fdname": name}})
    );
    let iov = [std::io::IoSlice::new(getfd.as_bytes())];
    let fds = [fd.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        wr.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| err("getfd", &e))?;
    read(&mut rd)?;
    let mut req = json!({ "execute": command });
    if let Some(a) = args {
        req["arguments"] = a;
    }
    wr.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| err("write", &e))?;
    read(&mut rd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speaks QMP the way QEMU does: greeting, capabilities, an event in
    /// between, then the reply or an error.
    async fn fake(sock: std::path::PathBuf, reply: Value) -> tokio::task::JoinHandle<Vec<String>> {
        let l = tokio::net::UnixListener::bind(&sock).expect("bind");
        tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd).lines();
            let mut seen = Vec::new();
            wr.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let caps = rd.next_line().await.expect("read").expect("line");
            seen.push(caps);
            wr.write_all(b"{\"return\": {}}\n").await.expect("w");
            let cmd = rd.next_line().await.expect("read").expect("line");
            seen.push(cmd);
            wr.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n")
                .await
                .expect("w");
            let mut r = serde_json::to_vec(&reply).expect("json");
            r.push(b'\n');
            wr.write_all(&r).await.expect("w");
            seen
        })
    }

    #[tokio::test]
    async fn command_reply_and_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("q.sock");
        let srv = fake(sock.clone(), json!({"return": {"status": "running"}})).await;
        let r = execute(&sock, "query-status", None).await.expect("ok");
        assert_eq!(r["status"], "running");
        let seen = srv.await.expect("join");
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(seen[1], r#"{"execute":"query-status"}"#);

        std::fs::remove_file(&sock).expect("rm");
        let srv = fake(
            sock.clone(),
            json!({"error": {"class": "GenericError", "desc": "no such thing"}}),
        )
        .await;
        let e = execute(&sock, "stop", Some(json!({"a": 1})))
            .await
            .expect_err("error reply");
        assert!(e.to_string().contains("no such thing"), "{e}");
        let seen = srv.await.expect("join");
        let sent: Value = serde_json::from_str(&seen[1]).expect("json");
        assert_eq!(sent, json!({"execute": "stop", "arguments": {"a": 1}}));
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = execute(&dir.path().join("none.sock"), "cont", None)
            .await
            .expect_err("no socket");
        assert_eq!(e.kind(), stacyvm_core::ErrorKind::ProviderUnavailable);
    }
}
