//! The peer's side of the scheduler protocol, one client per scheduler (scheduler_ring.rs
//! chooses among them per blob): one QUIC connection, registered with RegisterHost,
//! kept alive with heartbeats, re-dialled with backoff when it breaks; one stream per request;
//! pushes from the scheduler (FetchFromOrigin, PiecesUpdate) handed to the peer as events.
//!
//! When the scheduler is unreachable every request fails at once (no waiting): the downloader
//! then goes on with the parents it has or with the origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::{
    ErrorCode, ErrorReply, Heartbeat, PushReply, RegisterHost, SchedulerPush, SchedulerReply,
    SchedulerRequest,
};
use tokio::sync::mpsc;

use crate::error::PeerError;
use crate::transport::{Link, Transport};

/// First delay before re-dialling a lost scheduler; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between dials.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the scheduler connection tells the rest of the peer.
#[derive(Debug)]
pub(crate) enum SchedEvent {
    /// (Re)registered: announce every task again (the scheduler's state is soft).
    Registered,
    /// The scheduler pushed a message (already accepted).
    Push(SchedulerPush),
    /// A registered connection was lost: its blobs now belong to other schedulers, which are
    /// told about every task again.
    Lost,
}

/// Where the load figures of heartbeats come from.
pub(crate) type LoadFn = Arc<dyn Fn() -> Heartbeat + Send + Sync>;

/// Whether this host takes a push on (`Ok`) or refuses it, with the reason the scheduler is
/// told (a non-seed ordered to the origin, an origin outside allowed_origins: seed.rs).
pub(crate) type PushGate = Arc<dyn Fn(&SchedulerPush) -> Result<(), ErrorReply> + Send + Sync>;

/// What the host tells its schedulers: heartbeat figures, and which pushes it takes.
#[derive(Clone)]
pub(crate) struct HostHooks {
    /// Heartbeat figures.
    pub load: LoadFn,
    /// Pushes taken or refused.
    pub gate: PushGate,
}

/// A handle on the scheduler connection; cheap to share.
pub(crate) struct SchedulerClient {
    transport: Arc<Transport>,
    addr: SocketAddr,
    name: String,
    timeout: Duration,
    registration: RegisterHost,
    link: Mutex<Option<Link>>,
    events: mpsc::UnboundedSender<SchedEvent>,
    hooks: HostHooks,
    stopped: AtomicBool,
}

impl std::fmt::Debug for SchedulerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerClient")
            .field("addr", &self.addr)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl SchedulerClient {
    /// A client for the scheduler at `addr` (certificate name `name`) that reports to
    /// `events`; call [`Self::spawn`].
    pub fn new(
        transport: Arc<Transport>,
        addr: SocketAddr,
        name: String,
        timeout: Duration,
        registration: RegisterHost,
        hooks: HostHooks,
        events: mpsc::UnboundedSender<SchedEvent>,
    ) -> Arc<Self> {
        Arc::new(SchedulerClient {
            transport,
            addr,
            name,
            timeout,
            registration,
            link: Mutex::new(None),
            events,
            hooks,
            stopped: AtomicBool::new(false),
        })
    }

    /// The protocol version negotiated on the current connection (0 when not connected).
    pub fn version(&self) -> u8 {
        self.current().map_or(0, |l| l.codec.version())
    }

    /// Whether a registered connection is up now.
    pub fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Link> {
        let guard = self.link.lock().ok()?;
        guard
            .as_ref()
            .filter(|l| l.conn.close_reason().is_none())
            .cloned()
    }

    /// Sends one request and reads its reply; fails at once when not connected.
    pub async fn request(&self, req: &SchedulerRequest) -> Result<SchedulerReply, PeerError> {
        let link = self
            .current()
            .ok_or_else(|| PeerError::Scheduler(format!("not connected to {}", self.addr)))?;
        let reply = self.call(&link, req).await?;
        if let SchedulerReply::Error(e) = &reply {
            if e.code == ErrorCode::UnknownHost {
                // The scheduler restarted or expired us: register again, then retry once.
                self.register(&link).await?;
                let _ = self.events.send(SchedEvent::Registered);
                return self.call(&link, req).await;
            }
        }
        Ok(reply)
    }

    async fn call(&self, link: &Link, req: &SchedulerRequest) -> Result<SchedulerReply, PeerError> {
        let fail = |e: String| PeerError::Scheduler(format!("{} at {}: {e}", self.name, self.addr));
        let exchange = async {
            let (mut send, mut recv) =
                link.conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
            link.codec
                .write(&mut send, req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = send.finish();
            link.codec
                .read::<_, SchedulerReply>(&mut recv)
                .await
                .map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
    }

    async fn register(&self, link: &Link) -> Result<Duration, PeerError> {
        match self
            .call(
                link,
                &SchedulerRequest::RegisterHost(self.registration.clone()),
            )
            .await?
        {
            SchedulerReply::Registered(r) => Ok(Duration::from_millis(u64::from(
                r.heartbeat_interval_ms.max(100),
            ))),
            SchedulerReply::Error(e) => Err(PeerError::Scheduler(format!(
                "registration refused: {}",
                e.message
            ))),
            other => Err(PeerError::Scheduler(format!(
                "unexpected answer to RegisterHost: {other:?}"
            ))),
        }
    }

    /// Keeps a registered connection up until [`Self::stop`]: dial, register, heartbeat, and
    /// re-dial with exponential backoff after any failure.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = MIN_BACKOFF;
            while !this.stopped.load(Ordering::Relaxed) {
                match this.session().await {
                    Ok(()) => backoff = MIN_BACKOFF,
                    Err(e) => {
                        tracing::warn!(scheduler = %this.addr, error = %e, "scheduler connection failed; retrying")
                    }
                }
                if let Ok(mut l) = this.link.lock() {
                    *l = None;
                }
                if this.stopped.load(Ordering::Relaxed) {
                    break;
                }
                let jitter =
                    Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }

    async fn session(&self) -> Result<(), PeerError> {
        let link = self.transport.scheduler(self.addr, &self.name).await?;
        let interval = self.register(&link).await?;
        if let Ok(mut l) = self.link.lock() {
            *l = Some(link.clone());
        }
        tracing::info!(scheduler = %self.addr, "registered with the scheduler");
        let _ = self.events.send(SchedEvent::Registered);
        let pushes = tokio::spawn(accept_pushes(
            link.clone(),
            self.events.clone(),
            Arc::clone(&self.hooks.gate),
        ));
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        let result = loop {
            if self.stopped.load(Ordering::Relaxed) {
                break Ok(());
            }
            tokio::select! {
                reason = link.conn.closed() => break Err(PeerError::Scheduler(format!("connection closed: {reason}"))),
                _ = tick.tick() => {
                    let hb = SchedulerRequest::Heartbeat((self.hooks.load)());
                    if let Err(e) = self.request(&hb).await {
                        link.conn.close(shoal_proto::close_code::CANCELLED.into(), b"heartbeat failed");
                        break Err(e);
                    }
                }
            }
        };
        pushes.abort();
        if let Ok(mut l) = self.link.lock() {
            *l = None;
        }
        let _ = self.events.send(SchedEvent::Lost);
        result
    }

    /// Stops re-dialling and closes the connection without a goodbye (the scheduler was
    /// dropped from the list).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(link) = self.current() {
            link.conn
                .close(shoal_proto::close_code::OK.into(), b"removed");
        }
    }

    /// Tells the scheduler this host leaves (best effort) and stops re-dialling.
    pub async fn leave(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(link) = self.current() {
            let _ = self.call(&link, &SchedulerRequest::LeaveHost).await;
            link.conn
                .close(shoal_proto::close_code::OK.into(), b"leave");
        }
    }
}

/// Reads the scheduler's pushes: one message per stream, answered Accepted or Refused as `gate`
/// says, then (accepted) handed on as an event.
async fn accept_pushes(link: Link, events: mpsc::UnboundedSender<SchedEvent>, gate: PushGate) {
    while let Ok((mut send, mut recv)) = link.conn.accept_bi().await {
        let (events, gate) = (events.clone(), Arc::clone(&gate));
        let codec = link.codec;
        tokio::spawn(async move {
            let push = match codec.read::<_, SchedulerPush>(&mut recv).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "bad push from the scheduler");
                    let _ = send.reset(e.close_code().into());
                    return;
                }
            };
            let reply = match gate(&push) {
                Ok(()) => PushReply::Accepted,
                Err(why) => {
                    tracing::warn!(reason = %why.message, "push from the scheduler refused");
                    PushReply::Refused(why)
                }
            };
            let accepted = reply == PushReply::Accepted;
            let _ = codec.write(&mut send, &reply).await;
            let _ = send.finish();
            if accepted {
                let _ = events.send(SchedEvent::Push(push));
            }
        });
    }
}
