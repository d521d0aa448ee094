//! The agent link of a container without a shared socket: the engine's
//! attached exec stream of `stacyvm-agent relay`, handed straight to the
//! agent client as one byte stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::ContainerWaitResponse;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, EngineError>> + Send>>;
type Exited = Pin<Box<dyn Stream<Item = Result<ContainerWaitResponse, EngineError>> + Send>>;

/// Reads are the exec's stdout (its stderr goes to the log), writes go to
/// its stdin. The stream ends when the exec ends or the container stops:
/// a sandbox runtime that dies does not always end the exec stream (gVisor
/// tears the sandbox down when it hits its pids or memory limit and the
/// engine keeps the exec attached).
pub struct EngineStream {
    sandbox: String,
    output: Output,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    /// The container's wait stream; `None` once the engine timed the wait
    /// out (the link is then kept until the exec itself ends).
    exited: Option<Exited>,
    pending: bytes::Bytes,
    eof: bool,
}

impl EngineStream {
    pub fn new(
        sandbox: &str,
        output: Output,
        input: Pin<Box<dyn AsyncWrite + Send>>,
        exited: Exited,
    ) -> Self {
        EngineStream {
            sandbox: sandbox.to_string(),
            output,
            input,
            exited: Some(exited),
            pending: bytes::Bytes::new(),
            eof: false,
        }
    }
}

impl AsyncRead for EngineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        loop {
            if !me.pending.is_empty() {
                let n = me.pending.len().min(buf.remaining());
                buf.put_slice(&me.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(exited) = me.exited.as_mut() {
                if let Poll::Ready(item) = exited.as_mut().poll_next(cx) {
                    if let Some(Err(EngineError::RequestTimeoutError)) = item {
                        me.exited = None;
                    } else {
                        debug!(sandbox_id = %me.sandbox, "sandbox container stopped; closing its agent link");
                        me.eof = true;
                        continue;
                    }
                }
            }
            match me.output.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(LogOutput::StdOut { message }))) => me.pending = message,
                Poll::Ready(Some(Ok(LogOutput::StdErr { message }))) => {
                    warn!(sandbox_id = %me.sandbox, relay = %String::from_utf8_lossy(&message).trim(), "agent relay");
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => me.eof = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for EngineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.input.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{stream, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn out(s: &str) -> Result<LogOutput, EngineError> {
        Ok(LogOutput::StdOut {
            message: bytes::Bytes::copy_from_slice(s.as_bytes()),
        })
    }

    #[tokio::test]
    async fn stdout_is_the_stream_stderr_is_skipped_and_writes_reach_stdin() {
        let output = stream::iter(vec![
            out("hel"),
            Ok(LogOutput::StdErr {
                message: bytes::Bytes::from_static(b"noise"),
            }),
            out("lo"),
        ]);
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut s = EngineStream::new(
            "sb-test",
            Box::pin(output),
            Box::pin(ours),
            Box::pin(stream::pending()),
        );
        let mut got = String::new();
        s.read_to_string(&mut got).await.expect("test setup");
        assert_eq!(
            got, "hello",
            "stdout only, in order, then EOF when the exec ends"
        );
        s.write_all(b"ping").await.expect("test setup");
        let mut back = [0u8; 4];
        theirs.read_exact(&mut back).await.expect("test setup");
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn a_stopped_container_ends_the_stream_even_if_the_exec_stays_attached() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let exited = stream::iter(vec![Ok(ContainerWaitResponse::default())]);
        let mut s = EngineStream::new(
            "sb-test",
            Box::pin(stream::pending()),
            Box::pin(ours),
            Box::pin(exited),
        );
        let mut buf = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("EOF, not a hang")
            .expect("test setup");
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn an_engine_wait_timeout_keeps_the_link() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let exited = stream::iter(vec![Err(EngineError::RequestTimeoutError)]);
        let mut s = EngineStream::new(
            "sb-test",
            Box::pin(stream::iter(vec![out("x")]).chain(stream::pending())),
            Box::pin(ours),
            Box::pin(exited),
        );
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("test setup");
        assert_eq!(&one, b"x");
        let more =
            tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut one)).await;
        assert!(more.is_err(), "still open: a timed-out wait is not a stop");
    }
}
