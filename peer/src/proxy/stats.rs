//! Counters of the proxy's answers, by route and status class, for `/metrics`
//! (`shoal_proxy_requests_total`): how many blob requests the swarm answered, how many went to the
//! upstream, and how many failed; and how many upstream connections were opened to pin to a
//! client connection (`shoal_proxy_pinned_connections_total`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Labels of one proxy answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `blob` (served through the swarm), `passthrough` (forwarded upstream), `invalid`
    /// (no upstream named) or `refused` (an upstream outside allowed_origins: 403).
    pub route: &'static str,
    /// The status class: `2xx`, `3xx`, `4xx` or `5xx`.
    pub status: &'static str,
}

/// The proxy's request counters; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    /// Answers by route and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Upstream connections opened to be pinned to a client connection (pinned.rs).
    pub pinned_connections: Counter,
}

impl ProxyStats {
    /// Counts one answer.
    pub fn record(&self, route: &'static str, status: http::StatusCode) {
        let status = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_route_and_class() {
        let s = ProxyStats::default();
        s.record("blob", http::StatusCode::PARTIAL_CONTENT);
        s.record("blob", http::StatusCode::OK);
        s.record("passthrough", http::StatusCode::UNAUTHORIZED);
        let get = |route, status| {
            s.requests
                .get_or_create(&RequestLabels { route, status })
                .get()
        };
        assert_eq!(get("blob", "2xx"), 2);
        assert_eq!(get("passthrough", "4xx"), 1);
        assert_eq!(get("blob", "5xx"), 0);
    }
}
