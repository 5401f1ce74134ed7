//! Upload rate limit: a token bucket shared by every upload of the peer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket of bytes; `rate` 0 means unlimited.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A bucket refilled at `rate` bytes per second, holding at most one second of bytes.
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent (the bucket may go negative: a large piece borrows
    /// from the future, and the next sender waits for it).
    pub async fn take(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let now = Instant::now();
            let rate = self.rate as f64;
            let refill = now.duration_since(st.1).as_secs_f64() * rate;
            st.0 = (st.0 + refill).min(rate);
            st.1 = now;
            st.0 -= bytes as f64;
            if st.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-st.0 / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_the_rate() {
        let limiter = RateLimiter::new(1 << 20);
        let start = Instant::now();
        // One second of burst, then 1 MiB more must take about a second.
        limiter.take(1 << 20).await;
        limiter.take(1 << 20).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let unlimited = RateLimiter::new(0);
        let start = Instant::now();
        unlimited.take(u64::MAX).await;
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}
