//! Where an allowed origin may send a request on (a redirect, an upload location, a token
//! realm): anywhere except loopback (or unspecified) and link-local addresses, unless that host
//! and port are listed themselves. IP literals are checked before any connection; DNS names are
//! resolved and checked first ([`AllowedOrigins::check_target`]), and again by [`GuardedDns`],
//! the resolver of every HTTP client under a list, so a name that resolves elsewhere the second
//! time (DNS rebinding) still never reaches those addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

use super::{AllowedOrigins, Authority, Refusal, RefusalReason};

/// The class of address a request may not reach unless listed, if `ip` is one.
pub(crate) fn forbidden(ip: IpAddr) -> Option<RefusalReason> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        // 0.0.0.0/8 and :: reach this host on Linux.
        IpAddr::V4(a) if a.is_loopback() || a.octets()[0] == 0 => Some(RefusalReason::Loopback),
        IpAddr::V4(a) if a.is_link_local() => Some(RefusalReason::LinkLocal),
        IpAddr::V6(a) if a.is_loopback() || a.is_unspecified() => Some(RefusalReason::Loopback),
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => Some(RefusalReason::LinkLocal),
        _ => None,
    }
}

fn kind(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::LinkLocal => "a link-local address",
        _ => "a loopback address",
    }
}

impl AllowedOrigins {
    /// Whether a request from an allowed origin may go on to `url`; `from` says who sent it
    /// there (`registry H redirected GET blob B`). A DNS name is resolved (within `timeout`) and
    /// refused if any of its addresses is loopback or link-local; a failed lookup is left to the
    /// request itself (which goes through [`GuardedDns`]).
    pub async fn check_target(
        &self,
        url: &Url,
        from: &str,
        timeout: Duration,
    ) -> Result<(), Refusal> {
        self.check_target_literal(url, from)?;
        let Some(a) = Authority::of_url(url) else {
            return Ok(());
        };
        if a.host.parse::<IpAddr>().is_ok() || self.lists_authority(&a) {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let looked = tokio::time::timeout(timeout, tokio::net::lookup_host((a.host(), port))).await;
        let Ok(Ok(addrs)) = looked else {
            return Ok(());
        };
        for addr in addrs {
            if let Some(reason) = forbidden(addr.ip()) {
                let what = format!(
                    "{from} {a}, which resolves to {} ({}): refused",
                    addr.ip(),
                    kind(reason)
                );
                return Err(self.refuse(reason, what, &a.to_string()));
            }
        }
        Ok(())
    }

    /// The part of [`Self::check_target`] that needs no lookup: a URL whose host is a loopback
    /// or link-local IP literal, not listed with its port, is refused. For redirect policies
    /// that cannot wait (names are then checked by [`GuardedDns`]).
    pub fn check_target_literal(&self, url: &Url, from: &str) -> Result<(), Refusal> {
        let Some(a) = Authority::of_url(url) else {
            let what = format!("{from} {url}, which names no host: refused");
            return Err(self.refuse(RefusalReason::NotAllowed, what, "HOST[:PORT]"));
        };
        let Ok(ip) = a.host.parse::<IpAddr>() else {
            return Ok(());
        };
        match forbidden(ip) {
            Some(reason) if !self.lists_authority(&a) => {
                let what = format!("{from} {a}, {}: refused", kind(reason));
                Err(self.refuse(reason, what, &a.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// The DNS resolver for HTTP clients working under this list.
    pub fn resolver(self: &Arc<Self>) -> Arc<GuardedDns> {
        Arc::new(GuardedDns {
            allowed: Arc::clone(self),
        })
    }
}

/// A resolver that drops loopback and link-local addresses of every name not listed (listed
/// hosts, the registries themselves, resolve as they are). A name left with no address fails,
/// saying why.
#[derive(Debug)]
pub struct GuardedDns {
    allowed: Arc<AllowedOrigins>,
}

impl reqwest::dns::Resolve for GuardedDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = Arc::clone(&self.allowed);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if allowed.lists_host(&host) {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let kept: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match forbidden(a.ip()) {
                    Some(r) => {
                        refused.get_or_insert((r, a.ip()));
                        false
                    }
                    None => true,
                })
                .collect();
            match (kept.is_empty(), refused) {
                (true, Some((reason, ip))) => {
                    let what = format!(
                        "{host} resolves to {ip} ({}), which is not listed",
                        kind(reason)
                    );
                    Err(Box::new(allowed.refuse(reason, what, &host)) as Box<_>)
                }
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::ListOwner;
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        let v: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        AllowedOrigins::parse(&v, ListOwner::Peer).unwrap()
    }

    #[test]
    fn address_classes() {
        let f = |s: &str| forbidden(s.parse().unwrap());
        for lo in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(f(lo), Some(RefusalReason::Loopback), "{lo}");
        }
        for ll in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.1.1",
        ] {
            assert_eq!(f(ll), Some(RefusalReason::LinkLocal), "{ll}");
        }
        for ok in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "2001:db8::1",
            "fec0::1",
        ] {
            assert_eq!(f(ok), None, "{ok}");
        }
    }

    #[tokio::test]
    async fn targets_on_loopback_or_link_local_need_their_own_entry() {
        let l = list(&["127.0.0.1:5000", "s3://127.0.0.1:9000/blobs"]);
        let t = Duration::from_secs(5);
        let from = "registry 127.0.0.1:5000 redirected GET blob to";
        let url = |s: &str| Url::parse(s).unwrap();
        let r = l
            .check_target(&url("http://169.254.169.254/latest/meta-data"), from, t)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RefusalReason::LinkLocal);
        assert!(
            r.message.contains("169.254.169.254, a link-local address"),
            "{r}"
        );
        assert!(
            r.message
                .contains("add \"169.254.169.254\" to allowed_origins"),
            "{r}"
        );
        let r = l
            .check_target(&url("http://127.0.0.1:6000/x"), from, t)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RefusalReason::Loopback);
        let r = l
            .check_target(&url("http://[fe80::1]:80/x"), from, t)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RefusalReason::LinkLocal);
        // A DNS name that resolves to loopback.
        let r = l
            .check_target(&url("http://localhost:7000/x"), from, t)
            .await
            .unwrap_err();
        assert_eq!(r.reason, RefusalReason::Loopback);
        assert!(
            r.message.contains("localhost:7000, which resolves to"),
            "{r}"
        );
        // Listed: the registry itself and the S3 endpoint, by host and port.
        l.check_target(&url("http://127.0.0.1:5000/v2/x"), from, t)
            .await
            .unwrap();
        l.check_target(&url("http://127.0.0.1:9000/blobs/x"), from, t)
            .await
            .unwrap();
        // Anything else is left alone.
        l.check_target(&url("https://10.1.2.3/x"), from, t)
            .await
            .unwrap();
        let counts = l.refusals();
        assert_eq!(counts[1], (RefusalReason::Loopback, 2));
        assert_eq!(counts[2], (RefusalReason::LinkLocal, 2));
    }

    #[tokio::test]
    async fn the_resolver_drops_loopback_for_names_not_listed() {
        use reqwest::dns::Resolve;
        let l = Arc::new(list(&["localhost:5000"]));
        let open = Arc::new(list(&[]));
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let listed: Vec<_> = l
            .resolver()
            .resolve(name("localhost"))
            .await
            .unwrap()
            .collect();
        assert!(!listed.is_empty());
        let err = match open.resolver().resolve(name("localhost")).await {
            Ok(a) => panic!("resolved to {:?}", a.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("localhost resolves to"), "{err}");
        assert!(err.contains("allowed_origins"), "{err}");
    }
}
