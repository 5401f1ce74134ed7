//! `Relay`: an HTTP relay in front of a real server that injects faults (5xx answers, bodies cut
//! mid-stream) and can redirect blob GETs to a second listener reached under another host name,
//! like a registry that sends clients to blob storage with a pre-signed URL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

use crate::http::{self, Body, Server};
use crate::TestkitError;

/// Faults to inject; change them at any time.
#[derive(Debug, Default)]
pub struct RelayFaults {
    /// Answer the next N requests of any kind with 503.
    pub fail_next_requests: AtomicUsize,
    /// Answer the next N blob GETs with 503.
    pub fail_next_blob_gets: AtomicUsize,
    /// Cut the body of the next N blob GETs after `cut_after` bytes (connection aborted).
    pub cut_next_blob_bodies: AtomicUsize,
    /// Bytes sent before a cut.
    pub cut_after: AtomicU64,
    /// Answer blob GETs with 307 to the storage listener at `localhost:<port>`.
    pub redirect_blobs: AtomicBool,
    /// With `redirect_blobs`: send them to this base URL instead (`http://127.0.0.1:<port>`
    /// reaches the storage listener too; `http://169.254.169.254` reaches nothing here).
    pub redirect_base: Mutex<Option<String>>,
    /// While set, blob GET bodies stop after `hold_after` bytes until it is cleared (an origin
    /// import kept in progress for as long as a test needs).
    pub hold_blob_bodies: AtomicBool,
    /// Bytes of each blob body sent before a hold.
    pub hold_after: AtomicU64,
}

/// What the relay saw and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Requests on the main listener.
    pub requests: usize,
    /// 503 answers injected.
    pub injected_failures: usize,
    /// Bodies cut.
    pub cut_bodies: usize,
    /// Redirects sent.
    pub redirects: usize,
    /// Requests on the storage listener.
    pub storage_requests: usize,
    /// Storage requests that carried an Authorization header (should stay 0).
    pub storage_requests_with_auth: usize,
}

#[derive(Default)]
struct Shared {
    faults: RelayFaults,
    stats: Mutex<RelayStats>,
    /// Redirect id -> (upstream path and query, Authorization of the original request).
    stash: Mutex<HashMap<u64, (String, Option<String>)>>,
    next_id: AtomicU64,
    storage_port: AtomicU64,
}

/// A running relay; stopped on drop.
pub struct Relay {
    shared: Arc<Shared>,
    main: Server,
    storage: Server,
}

impl Relay {
    /// Starts a relay in front of `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> Result<Relay, TestkitError> {
        let shared = Arc::new(Shared::default());
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| TestkitError::Setup(format!("relay client: {e}")))?;
        let up = upstream.trim_end_matches('/').to_string();

        let (s, h, u) = (shared.clone(), http.clone(), up.clone());
        let main: http::Handler = Arc::new(move |req| {
            let (s, h, u) = (s.clone(), h.clone(), u.clone());
            Box::pin(async move { relay_main(s, h, u, req).await })
        });
        let (s, h, u) = (shared.clone(), http.clone(), up.clone());
        let storage: http::Handler = Arc::new(move |req| {
            let (s, h, u) = (s.clone(), h.clone(), u.clone());
            Box::pin(async move { relay_storage(s, h, u, req).await })
        });
        let main = http::serve(main)
            .await
            .map_err(|e| TestkitError::Setup(format!("relay listen: {e}")))?;
        let storage = http::serve(storage)
            .await
            .map_err(|e| TestkitError::Setup(format!("relay listen: {e}")))?;
        shared
            .storage_port
            .store(u64::from(storage.addr.port()), Ordering::SeqCst);
        Ok(Relay {
            shared,
            main,
            storage,
        })
    }

    /// `127.0.0.1:PORT` of the main listener (use it as the registry host).
    pub fn host(&self) -> String {
        self.main.addr.to_string()
    }

    /// Port of the storage listener.
    pub fn storage_port(&self) -> u16 {
        self.storage.addr.port()
    }

    /// The fault switches.
    pub fn faults(&self) -> &RelayFaults {
        &self.shared.faults
    }

    /// Counters so far.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn bump(s: &Shared, f: impl FnOnce(&mut RelayStats)) {
    if let Ok(mut st) = s.stats.lock() {
        f(&mut st);
    }
}

async fn relay_main(
    s: Arc<Shared>,
    h: reqwest::Client,
    up: String,
    req: Request<Incoming>,
) -> Response<Body> {
    bump(&s, |st| st.requests += 1);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let is_blob_get = req.method() == hyper::Method::GET
        && path.contains("/blobs/")
        && !path.contains("/uploads/");
    if take_one(&s.faults.fail_next_requests)
        || (is_blob_get && take_one(&s.faults.fail_next_blob_gets))
    {
        bump(&s, |st| st.injected_failures += 1);
        return http::text(503, "injected failure");
    }
    if is_blob_get && s.faults.redirect_blobs.load(Ordering::SeqCst) {
        let id = s.next_id.fetch_add(1, Ordering::SeqCst);
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Ok(mut m) = s.stash.lock() {
            m.insert(id, (path, auth));
        }
        bump(&s, |st| st.redirects += 1);
        let port = s.storage_port.load(Ordering::SeqCst);
        let base = s
            .faults
            .redirect_base
            .lock()
            .ok()
            .and_then(|b| b.clone())
            .unwrap_or_else(|| format!("http://localhost:{port}"));
        let mut r = http::text(307, "");
        if let Ok(v) = format!("{base}/storage/{id}?signature=testkit").parse() {
            r.headers_mut().insert("location", v);
        }
        return r;
    }
    let cut = is_blob_get && take_one(&s.faults.cut_next_blob_bodies);
    if cut {
        bump(&s, |st| st.cut_bodies += 1);
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return http::text(400, format!("relay: request body: {e}")),
    };
    let mut rb = h.request(method, format!("{up}{path}")).body(body);
    for (k, v) in headers.iter() {
        if !is_hop_by_hop(k.as_str()) {
            rb = rb.header(k, v);
        }
    }
    let cut_after = if cut {
        Some(s.faults.cut_after.load(Ordering::SeqCst))
    } else {
        None
    };
    let hold = is_blob_get.then(|| Arc::clone(&s));
    forward(rb, cut_after, hold).await
}

async fn relay_storage(
    s: Arc<Shared>,
    h: reqwest::Client,
    up: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let has_auth = req.headers().contains_key("authorization");
    bump(&s, |st| {
        st.storage_requests += 1;
        if has_auth {
            st.storage_requests_with_auth += 1;
        }
    });
    let id: Option<u64> = req
        .uri()
        .path()
        .strip_prefix("/storage/")
        .and_then(|i| i.parse().ok());
    let stashed = id.and_then(|id| s.stash.lock().ok().and_then(|m| m.get(&id).cloned()));
    let Some((path, auth)) = stashed else {
        return http::text(404, "unknown storage object");
    };
    let mut rb = h.get(format!("{up}{path}"));
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    if let Some(r) = req.headers().get("range") {
        rb = rb.header("range", r);
    }
    forward(rb, None, None).await
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

/// Relays the upstream's answer; cuts the body after `cut_after` bytes, and holds it while
/// `hold` (the relay's state, for blob GETs) says so.
async fn forward(
    rb: reqwest::RequestBuilder,
    cut_after: Option<u64>,
    hold: Option<Arc<Shared>>,
) -> Response<Body> {
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return http::text(502, format!("relay: upstream: {e}")),
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if !is_hop_by_hop(k.as_str()) {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let stream = resp.bytes_stream().then(move |r| {
        let (sent, hold) = (Arc::clone(&sent), hold.clone());
        async move {
            let chunk = r.map_err(std::io::Error::other)?;
            let held = || {
                hold.as_ref().is_some_and(|s| {
                    s.faults.hold_blob_bodies.load(Ordering::SeqCst)
                        && sent.load(Ordering::SeqCst) >= s.faults.hold_after.load(Ordering::SeqCst)
                })
            };
            while held() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let before = sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if cut_after.is_some_and(|limit| before + chunk.len() as u64 > limit) {
                return Err(std::io::Error::other("relay: injected cut"));
            }
            Ok::<_, std::io::Error>(Frame::data(chunk))
        }
    });
    let body: Body = BodyExt::boxed(StreamBody::new(stream));
    out.body(body)
        .unwrap_or_else(|_| http::text(502, "relay: bad upstream headers"))
}
