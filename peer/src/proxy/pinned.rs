//! An upstream connection pinned to one client connection. A pass-through GET or HEAD to a
//! plain-HTTP upstream goes out on a keep-alive connection that the client connection's own
//! task drives: the request, its answer and the reply to the client move in one task, with no
//! hand-over to a pooled connection's task and back (two more wake-ups on a loaded node;
//! docs/benchmarks.md, issue 6). Requests with a body, HTTPS upstreams, and a second stream of
//! an h2c connection while the pinned one is busy go through the shared pool instead.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The pinned connection of one client connection, if it has one (a request extension).
pub(crate) type PinSlot = tokio::sync::Mutex<Option<Pinned>>;

type Conn = Connection<TokioIo<TcpStream>, Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection to one upstream host, driven by whoever sends on it.
pub(crate) struct Pinned {
    host: String,
    sender: SendRequest<Empty<Bytes>>,
    conn: Pin<Box<Conn>>,
    /// The connection future has finished (closed): never polled or used again.
    ended: bool,
}

/// Why a pinned exchange failed. The caller answers 502 when the upstream could not be reached
/// or did not answer in time, and otherwise (a kept-alive connection gone stale) sends the
/// request through the pool.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PinError {
    #[error("{0}")]
    Connect(#[from] std::io::Error),
    #[error("the upstream connection: {0}")]
    Http(#[from] hyper::Error),
    #[error("the upstream connection closed mid-answer")]
    Closed,
    #[error("the upstream did not answer in time")]
    TimedOut,
}

/// An upstream answer read through a pinned connection.
pub(crate) enum Answer {
    /// Read whole (its body is at most the size asked for).
    Whole(Response<Bytes>),
    /// Too large to read whole: the body streams, and the connection, now driven by a task of
    /// its own, is no longer pinned.
    Streamed(Response<Incoming>),
}

/// `host[:port]` with HTTP's default port when it names none (`[v6]` included).
fn with_port(host: &str) -> String {
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_string()
    } else {
        format!("{host}:80")
    }
}

impl Pinned {
    async fn connect(host: &str, timeout: Duration) -> Result<Pinned, PinError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(with_port(host)))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        tcp.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        Ok(Pinned {
            host: host.to_string(),
            sender,
            conn: Box::pin(conn),
            ended: false,
        })
    }

    /// Runs `fut` while driving the connection; the connection ending first is an error.
    async fn driving<F: Future>(&mut self, fut: F) -> Result<F::Output, PinError> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            if self.ended {
                return Poll::Ready(Err(PinError::Closed));
            }
            match self.conn.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                // Ended: whatever `fut` still waits for will not come, unless it came just now.
                Poll::Ready(ended) => {
                    self.ended = true;
                    Poll::Ready(match fut.as_mut().poll(cx) {
                        Poll::Ready(out) => Ok(out),
                        Poll::Pending => Err(ended.err().map_or(PinError::Closed, PinError::Http)),
                    })
                }
            }
        })
        .await
    }
}

/// Sends `req` (origin-form URI, Host set) to `host` on the slot's pinned connection, opening
/// one if the slot is empty or pinned to another host, and reads an answer of up to `whole`
/// bytes whole. On an error the slot is left empty.
pub(crate) async fn exchange(
    slot: &mut Option<Pinned>,
    opened: &prometheus_client::metrics::counter::Counter,
    host: &str,
    req: Request<Empty<Bytes>>,
    whole: u64,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<Answer, PinError> {
    let mut pinned = match slot.take() {
        Some(p) if p.host == host && !p.ended && !p.sender.is_closed() => p,
        _ => {
            opened.inc();
            Pinned::connect(host, connect_timeout).await?
        }
    };
    let sent = pinned.sender.send_request(req);
    let resp = tokio::time::timeout(read_timeout, pinned.driving(sent))
        .await
        .map_err(|_| PinError::TimedOut)???;
    let small =
        resp.body().is_end_stream() || resp.body().size_hint().exact().is_some_and(|n| n <= whole);
    if !small {
        let Pinned { conn, .. } = pinned;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection of a streamed answer ended");
            }
        });
        return Ok(Answer::Streamed(resp));
    }
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(read_timeout, pinned.driving(body.collect()))
        .await
        .map_err(|_| PinError::TimedOut)???
        .to_bytes();
    if !pinned.ended {
        *slot = Some(pinned);
    }
    Ok(Answer::Whole(Response::from_parts(parts, body)))
}

#[cfg(test)]
mod tests {
    use super::with_port;

    #[test]
    fn hosts_without_a_port_get_http_s_default() {
        assert_eq!(with_port("reg.lan"), "reg.lan:80");
        assert_eq!(with_port("reg.lan:5000"), "reg.lan:5000");
        assert_eq!(with_port("[::1]"), "[::1]:80");
        assert_eq!(with_port("[::1]:5000"), "[::1]:5000");
    }
}
