//! Timeouts on lack of progress, not on total time: a transfer fails when no byte has arrived
//! for `idle`, however long it has been running. A slow parent or origin that keeps sending is
//! left alone; a stalled or black-holed one is noticed after `idle`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// When bytes last arrived, shared by a reader and its watchdog.
#[derive(Clone, Debug)]
pub(crate) struct Stamp {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Stamp {
    /// A stamp that counts "now" as progress.
    pub fn new() -> Self {
        Stamp {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records progress now.
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the last progress.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

/// Runs `fut` until it ends, or `None` once `stamp` has seen no progress for `idle`.
pub(crate) async fn until_idle<F: std::future::Future>(
    fut: F,
    stamp: &Stamp,
    idle: Duration,
) -> Option<F::Output> {
    tokio::pin!(fut);
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep(tick) => {
                if stamp.idle() >= idle {
                    return None;
                }
            }
        }
    }
}

/// An `AsyncRead` that touches a [`Stamp`] whenever bytes arrive.
pub(crate) struct Progress<R> {
    inner: R,
    stamp: Stamp,
}

impl<R> Progress<R> {
    pub fn new(inner: R, stamp: Stamp) -> Self {
        Progress { inner, stamp }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Progress<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.stamp.touch();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// 64 KiB sent in 16 slow steps: 8 x the idle limit in total, but never idle that long.
    #[tokio::test]
    async fn a_slow_sender_that_keeps_sending_is_not_a_stall() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let idle = Duration::from_millis(200);
        tokio::spawn(async move {
            for _ in 0..16 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.write_all(&[7u8; 4096]).await;
            }
        });
        let stamp = Stamp::new();
        let mut r = Progress::new(rx, stamp.clone());
        let mut buf = vec![0u8; 16 * 4096];
        let got = until_idle(r.read_exact(&mut buf), &stamp, idle).await;
        assert!(matches!(got, Some(Ok(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_sender_that_stops_is_a_stall_after_the_idle_limit() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let idle = Duration::from_millis(200);
        let stamp = Stamp::new();
        let mut r = Progress::new(rx, stamp.clone());
        tx.write_all(&[1u8; 100])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let mut buf = vec![0u8; 1000];
        let got = until_idle(r.read_exact(&mut buf), &stamp, idle).await;
        assert!(got.is_none());
        let took = started.elapsed();
        assert!(took >= idle && took < idle * 4, "{took:?}");
        drop(tx);
    }
}
