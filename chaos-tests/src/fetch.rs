//! `http_get`: one plain HTTP/1.1 GET from inside a host (or the test's own namespace), keeping
//! what arrived even when the body breaks off, so tests can see truncation as it happened.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::netns::Netns;
use crate::{ChaosError, Result};

/// What a GET returned.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body bytes received (up to a break, if any).
    pub body: Vec<u8>,
    /// `None` when the body ended cleanly; the error when it broke off.
    pub body_error: Option<String>,
}

/// GETs `path` from `addr`, connecting from inside `from` when given; bounded by `timeout`.
pub async fn http_get(
    from: Option<&Netns>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let fut = get(from, addr, path, timeout);
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        ChaosError::Setup(format!(
            "GET http://{addr}{path}: no full answer within {timeout:?}"
        ))
    })?
}

async fn get(
    from: Option<&Netns>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let std_stream = match from {
        Some(ns) => {
            let ns = ns.clone();
            tokio::task::spawn_blocking(move || ns.tcp_connect(addr, timeout))
                .await
                .map_err(|e| ChaosError::Setup(format!("connect task: {e}")))??
        }
        None => std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
            ChaosError::Io {
                what: format!("connecting to {addr}"),
                source,
            }
        })?,
    };
    let io_err = |what: &str| {
        let what = format!("{what} ({addr})");
        move |source| ChaosError::Io { what, source }
    };
    std_stream
        .set_nonblocking(true)
        .map_err(io_err("non-blocking socket"))?;
    let stream = tokio::net::TcpStream::from_std(std_stream).map_err(io_err("tokio socket"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ChaosError::Setup(format!("HTTP handshake with {addr}: {e}")))?;
    let conn_task = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| ChaosError::Setup(format!("request {path}: {e}")))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| ChaosError::Setup(format!("GET http://{addr}{path}: {e}")))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    out.extend_from_slice(d);
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    conn_task.abort();
    Ok(HttpReply {
        status,
        headers,
        body: out,
        body_error,
    })
}
