//! An origin that fails: the error that reaches the client names the origin and what it
//! answered, and an origin that answers nothing at all fails within the idle limit instead of
//! hanging. The origins here are tiny HTTP servers on loopback that misbehave on purpose.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_api::Client as ApiClient;
use shoal_proto::{Digest, OriginRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A blob digest nobody has (the fake origins below claim to).
fn blob() -> Digest {
    Digest::from_bytes([0x5a; 32])
}

/// An origin that accepts connections and never answers (a black-holed registry).
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s); // kept open, never read or written
        }
    });
    (format!("docker://{addr}/faulty/app"), task)
}

/// An origin that answers HEAD with a 3 MiB blob and every GET with `status`.
async fn failing_get(status: u16) -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let reply = if head.starts_with(b"HEAD") {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nDocker-Content-Digest: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                            3 << 20,
                            blob()
                        )
                    } else {
                        format!("HTTP/1.1 {status} Boom\r\nContent-Length: 4\r\n\r\nboom")
                    };
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("docker://{addr}/faulty/app"), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_origin_fails_within_the_idle_limit_and_is_named() {
    let Some(c) = common::cluster(false).await else {
        return;
    };
    let (reference, _origin) = black_hole().await;
    let mut cfg = c.config("lonely", false);
    cfg.allowed_origins.push(common::host_of(&reference));
    cfg.dht = false;
    cfg.origin_idle_timeout_ms = 1_000;
    let peer = c.start(cfg).await;
    let started = Instant::now();
    let origin = OriginRef {
        reference: reference.clone(),
        authorization: None,
    };
    let err = peer
        .downloader()
        .open(blob(), Some(origin))
        .await
        .expect_err("an origin that answers nothing cannot give the blob's size");
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(took < Duration::from_secs(6), "took {took:?}: {msg}");
    assert!(msg.contains(&reference), "{msg}");
    assert!(msg.contains("sent nothing"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_error_reaches_the_client_with_the_origin_and_its_status() {
    let Some(c) = common::cluster(false).await else {
        return;
    };
    let (reference, _origin) = failing_get(403).await;
    let mut cfg = c.config("unlucky", false);
    cfg.allowed_origins.push(common::host_of(&reference));
    cfg.dht = false;
    let socket = cfg.api_socket.clone();
    let _peer = c.start(cfg).await;
    let client = ApiClient::new(&socket);
    // What `shoal get` does: stream the blob through the local API.
    let outcome = match client.blob(&blob()).source(reference.clone()).send().await {
        Err(e) => e.to_string(),
        Ok(resp) => {
            let mut body = resp.body;
            let mut failure = None;
            while let Some(chunk) = body.next().await {
                if let Err(e) = chunk {
                    failure = Some(e.to_string());
                    break;
                }
            }
            failure.expect("the origin never served the blob, so the body cannot end well")
        }
    };
    assert!(outcome.contains(&reference), "{outcome}");
    assert!(outcome.contains("403"), "{outcome}");
    assert!(!outcome.contains("body broke"), "{outcome}");
}

/// A piece table handed over through the local API client: a range is then served from the
/// covering pieces (the blob is not imported whole first), and a table that disagrees with the
/// one taken is refused with a 409 that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_table_offered_through_the_client_serves_ranges_and_a_different_one_is_refused() {
    let Some(c) = common::cluster(false).await else {
        return;
    };
    let (blob, data) = c.push_blob(4 << 20, 7).await;
    let cfg = c.config("offer", false);
    let socket = cfg.api_socket.clone();
    let _peer = c.start(cfg).await;
    let api = ApiClient::new(&socket);
    let origin = c.origin().reference;
    let table: Vec<[u8; 32]> = data
        .chunks(1 << 20)
        .map(|p| *blake3::hash(p).as_bytes())
        .collect();
    api.blob(&blob)
        .source(origin.clone())
        .offer_pieces(1 << 20, &table)
        .await
        .unwrap();
    let start = (2 << 20) + 100;
    let got = api
        .blob(&blob)
        .source(origin.clone())
        .range(start..start + 1000)
        .read()
        .await
        .unwrap();
    assert_eq!(&got[..], &data[start as usize..start as usize + 1000]);
    let task = api.task(&blob).await.unwrap().expect("a task for the blob");
    assert!(
        !task.complete && task.held < 4,
        "the range fetched covering pieces, not the whole blob: {task:?}"
    );
    let mut other = table.clone();
    other[1][0] ^= 1;
    let e = api
        .blob(&blob)
        .source(origin)
        .offer_pieces(1 << 20, &other)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let empty = api
        .blob(&blob)
        .offer_pieces(1 << 20, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(e, shoal_api::ApiError::Status { .. })
            && matches!(empty, shoal_api::ApiError::BadRequest(_)),
        "{empty}"
    );
}
