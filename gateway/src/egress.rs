//! Egress (specs/operation.md, "Limits and egress"): each upstream has its own reqwest client
//! ([`Egress`]) whose resolver ([`GuardedResolver`]) drops every loopback, private, link-local
//! or otherwise non-public address ([`refused_range`]) unless the upstream is `local`, and
//! fails the lookup when nothing is left. reqwest connects only to the addresses the resolver
//! returned, so the address checked is the address connected to (no second lookup to rebind).
//! No redirect is followed and no proxy is taken from the environment. The did:web resolver
//! uses the same address rule.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::{Config, Upstream};

/// An HTTP client could not be built (its TLS setup failed). Carries no URL.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the upstream HTTP client: {0}")]
pub struct ClientError(#[source] reqwest::Error);

/// A shared HTTP client: no redirects, no proxy from the environment, and a resolver that
/// refuses every non-public address ([`GuardedResolver::public_only`]): suitable for any
/// upstream that is not `local` (an IP-literal `local` upstream works too, since literals are
/// checked by [`crate::upstream::send`] against the upstream's own setting).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, ClientError> {
    client_with(timeout, GuardedResolver::public_only())
}

/// The HTTP client for one upstream: as [`http_client`], with the upstream's own timeout
/// (`timeout_secs`, else `default_timeout`) and a resolver that allows non-public addresses
/// only if the upstream is `local`.
pub fn http_client_for(
    upstream: &Upstream,
    default_timeout: Duration,
) -> Result<reqwest::Client, ClientError> {
    let timeout = upstream.timeout().unwrap_or(default_timeout);
    let resolver = if upstream.local() {
        GuardedResolver::allow_local()
    } else {
        GuardedResolver::public_only()
    };
    client_with(timeout, resolver)
}

fn client_with(
    timeout: Duration,
    resolver: GuardedResolver,
) -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // sent once: reqwest's default policy re-sends a request an HTTP/2 or HTTP/3 server
        // refused (never here: built without either, but it cloned every request, credential
        // header included, to be able to); with HTTP/2 enabled later this stays "never"
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .no_proxy()
        .dns_resolver(resolver)
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .build()
        .map_err(|e| ClientError(e.without_url()))
}

/// One HTTP client per configured upstream (each with its own resolver policy, timeout and
/// connection pool).
#[derive(Debug, Clone)]
pub struct Egress {
    clients: HashMap<String, reqwest::Client>,
    fallback: reqwest::Client,
}

impl Egress {
    /// Builds the clients for every upstream of `config`.
    pub fn new(config: &Config) -> Result<Self, ClientError> {
        let timeout = config.upstream_timeout();
        let mut clients = HashMap::new();
        for up in config.upstreams() {
            // with duplicate names the first upstream wins, as in `Config::upstream`
            if !clients.contains_key(up.name()) {
                clients.insert(up.name().to_string(), http_client_for(up, timeout)?);
            }
        }
        Ok(Self {
            clients,
            fallback: http_client(timeout)?,
        })
    }

    /// The client for `upstream` (a public-only client for a name not configured).
    pub fn client(&self, upstream: &str) -> &reqwest::Client {
        self.clients.get(upstream).unwrap_or(&self.fallback)
    }
}

/// Why an address is not a public unicast address an upstream may be reached at, or `None`
/// when it is one. IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses are judged by the IPv4 address they carry;
/// IPv4-translated (`::ffff:0:0:0/96`) and NAT64 local-use (`64:ff9b:1::/48`) addresses are
/// refused whatever they carry.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => "unspecified",
        (0, _, _) => "this-network (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (10, _, _) => "private (10.0.0.0/8)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (100, 64..=127, _) => "shared CGNAT (100.64.0.0/10)",
        (169, 254, _) => "link-local",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // IPv4-mapped ::ffff:0:0/96
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    // IPv4-compatible ::a.b.c.d (deprecated)
    if seg[..6] == [0; 6] {
        return Some(refused_v4(embedded(seg[6], seg[7])).unwrap_or("IPv4-compatible"));
    }
    // IPv4-translated ::ffff:0:a.b.c.d (SIIT, RFC 2765): an address a translator maps into
    // an IPv4 network of its own choosing, never a public destination of this gateway
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some("IPv4-translated (::ffff:0:0:0/96)");
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): a translator of the local network
    if seg[..3] == [0x64, 0xff9b, 1] {
        return Some("NAT64 local-use (64:ff9b:1::/48)");
    }
    // NAT64 well-known prefix 64:ff9b::/96
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refused_v4(embedded(seg[6], seg[7]));
    }
    // 6to4 2002::/16 carries an IPv4 address in bits 16..48
    if seg[0] == 0x2002 {
        return refused_v4(embedded(seg[1], seg[2]));
    }
    Some(match seg[0] {
        s if s & 0xfe00 == 0xfc00 => "unique-local (fc00::/7)",
        s if s & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        s if s & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        s if s & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

/// The egress resolver: looks the name up with the system resolver (`tokio::net::lookup_host`)
/// and keeps only the addresses the upstream may be reached at; a lookup left with none fails
/// with an error naming the refused addresses.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    allow_local: bool,
}

impl GuardedResolver {
    /// Refuses every address [`refused_range`] names.
    pub fn public_only() -> Self {
        Self { allow_local: false }
    }

    /// Allows every address (an upstream marked `local`).
    pub fn allow_local() -> Self {
        Self { allow_local: true }
    }

    /// Keeps the addresses allowed; `Err` names the ones refused when none is left.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        if self.allow_local {
            return Ok(addrs);
        }
        let (kept, refused): (Vec<_>, Vec<_>) = addrs
            .into_iter()
            .partition(|a| refused_range(a.ip()).is_none());
        if kept.is_empty() {
            if refused.is_empty() {
                return Err(format!("{host} resolves to no address"));
            }
            let named: Vec<String> = refused
                .iter()
                .map(|a| {
                    format!(
                        "{} ({})",
                        a.ip(),
                        refused_range(a.ip()).unwrap_or("refused")
                    )
                })
                .collect();
            return Err(format!(
                "{host} resolves only to refused addresses: {} (the upstream is not marked local)",
                named.join(", ")
            ));
        }
        if !refused.is_empty() {
            tracing::warn!(host, refused = ?refused, "dropped non-public addresses of an upstream host");
        }
        Ok(kept)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = *self;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect();
            let kept = this.filter(&host, found)?;
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> Option<&'static str> {
        refused_range(text.parse().expect("an IP address"))
    }

    #[test]
    fn embedded_and_translated_ranges() {
        // judged by the IPv4 address they carry
        assert_eq!(refused("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(refused("64:ff9b::10.0.0.1"), Some("private (10.0.0.0/8)"));
        assert_eq!(refused("2002:a9fe:0101::1"), Some("link-local"));
        assert_eq!(refused("64:ff9b::8.8.8.8"), None);
        assert_eq!(refused("::ffff:8.8.8.8"), None);
        // regression (issue 18): the NAT64 local-use prefix and IPv4-translated addresses
        // reached private networks through a translator; refused whatever they carry
        assert_eq!(
            refused("64:ff9b:1::8.8.8.8"),
            Some("NAT64 local-use (64:ff9b:1::/48)")
        );
        assert_eq!(
            refused("64:ff9b:1:ffff::1"),
            Some("NAT64 local-use (64:ff9b:1::/48)")
        );
        assert_eq!(
            refused("::ffff:0:8.8.8.8"),
            Some("IPv4-translated (::ffff:0:0:0/96)")
        );
        assert_eq!(
            refused("::ffff:0:10.0.0.1"),
            Some("IPv4-translated (::ffff:0:0:0/96)")
        );
        // neighbours stay public
        assert_eq!(refused("64:ff9b:2::1"), None);
        assert_eq!(refused("2001:4860:4860::8888"), None);
    }
}
