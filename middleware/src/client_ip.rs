//! Who is the client: the TCP peer, or the client a trusted proxy says it forwarded.
//!
//! The server inserts [`PeerAddr`] per connection (hyper does not hand it over). This layer
//! turns it into [`ClientIp`], which the rate limiter, connection limits and logs key on.
//! Invariant: forwarding headers are believed only when the TCP peer itself is inside one of
//! the configured trusted CIDRs; from anyone else they are ignored, because any client can
//! write them. A malformed forwarding header never fails the request: the peer is used.
//!
//! With several proxies in a row, the chain is read from the right (the hop nearest to us),
//! skipping hops that are themselves trusted proxies; the first untrusted address is the
//! client. If every hop is trusted, the leftmost one is the best we know.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderMap, HeaderName};
use http::Request;
use ipnet::IpNet;
use tower::{Layer, Service};

/// The TCP peer of the connection a request came in on; inserted by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client this request is attributed to, after trusted-proxy resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Inserts [`ClientIp`] into every request.
#[derive(Clone, Debug)]
pub struct ClientIpLayer {
    trusted: Arc<[IpNet]>,
}

impl ClientIpLayer {
    /// `trusted_proxies`: the CIDRs whose forwarding headers are believed (may be empty).
    pub fn new(trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            trusted: trusted_proxies.into(),
        }
    }

    /// The client for a request from `peer` with these headers (what the service inserts).
    pub fn resolve(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
        resolve(&self.trusted, peer, headers)
    }
}

impl<S> Layer<S> for ClientIpLayer {
    type Service = ClientIpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientIpService {
            inner,
            trusted: self.trusted.clone(),
        }
    }
}

/// Service of [`ClientIpLayer`].
#[derive(Clone, Debug)]
pub struct ClientIpService<S> {
    inner: S,
    trusted: Arc<[IpNet]>,
}

impl<S, B> Service<Request<B>> for ClientIpService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let client = resolve(&self.trusted, peer, req.headers());
        // The request span (opened by the request-id layer, outside us) could only record the
        // peer; fill in the real client now. A no-op when the current span has no such field.
        tracing::Span::current().record("client_ip", tracing::field::display(client));
        req.extensions_mut().insert(ClientIp(client));
        self.inner.call(req)
    }
}

fn resolve(trusted: &[IpNet], peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
    // Missing PeerAddr is a wiring bug in the server, not the client's fault: attribute the
    // request to 0.0.0.0 (one shared bucket) rather than panicking.
    let Some(peer) = peer.map(|ip| ip.to_canonical()) else {
        return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    };
    if !is_trusted(trusted, peer) {
        return peer;
    }
    // nginx, the documented front, writes X-Forwarded-For; it passes a client's `Forwarded`
    // through untouched, so preferring `Forwarded` would let clients pick their own address.
    let chain = if headers.contains_key(X_FORWARDED_FOR) {
        forwarded_for_chain(headers)
    } else if headers.contains_key(FORWARDED) {
        forwarded_chain(headers).map(|c| c.into_iter().map(Some).collect())
    } else {
        return peer;
    };
    match chain {
        Some(chain) if !chain.is_empty() => pick_client(trusted, &chain, peer),
        _ => peer,
    }
}

/// The key per-client limits count under: an IPv4 address as is (IPv4-mapped IPv6 too), an
/// IPv6 address cut to its first `v6_prefix_len` bits (clamped to 1..=128). A host is
/// usually given a whole /64, so keying on the full address would give it 2^64 quotas.
pub fn limit_key(ip: IpAddr, v6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let len = u32::from(v6_prefix_len.clamp(1, 128));
            let mask = u128::MAX << (128 - len);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// Right to left, skip trusted hops; the first untrusted address is the client; all
/// trusted -> the leftmost. An entry that is not an address (`unknown`, garbage) met on the
/// way ends the walk: it was written by the trusted hop to its right, which did not know
/// its client, and everything left of it is whatever the client sent (`spoof, unknown`
/// must not make `spoof` the key). The client is then keyed on that nearest trusted hop
/// (or the peer). Malformed entries left of the client's entry are never read at all.
fn pick_client(trusted: &[IpNet], chain: &[Option<IpAddr>], peer: IpAddr) -> IpAddr {
    let mut nearest = peer;
    for entry in chain.iter().rev() {
        match entry {
            None => return nearest,
            Some(ip) if is_trusted(trusted, *ip) => nearest = *ip,
            Some(ip) => return *ip,
        }
    }
    nearest
}

/// Every `X-Forwarded-For` header, in order, as one list: an address, or None for an entry
/// that is not one (garbage, `unknown`, an empty element). A malformed entry no longer
/// voids the whole chain (that
/// attributed every such request to the proxy, one shared bucket that one client's bad
/// header could exhaust for everybody behind it): [`pick_client`] only stops at one it
/// meets before the client's own entry. A header value that is not visible ASCII counts as
/// one malformed entry.
fn forwarded_for_chain(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut chain = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let Ok(value) = value.to_str() else {
            chain.push(None);
            continue;
        };
        chain.extend(value.split(',').map(|entry| parse_node(entry.trim())));
    }
    Some(chain)
}

/// The `for=` of every RFC 7239 element, in order. `None` if a `for=` is not an address
/// (including `unknown` and obfuscated `_ids`: we cannot key on those).
fn forwarded_chain(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all(FORWARDED) {
        let value = value.to_str().ok()?;
        for element in split_unquoted(value, ',') {
            for pair in split_unquoted(element, ';') {
                let (key, val) = pair.split_once('=')?;
                if key.trim().eq_ignore_ascii_case("for") {
                    chain.push(parse_node(unquote(val.trim())?)?);
                }
            }
        }
    }
    Some(chain)
}

/// Splits on `sep` outside double quotes (a quoted `for="[::1]:80"` may not contain one, but
/// other parameters' quoted strings may).
fn split_unquoted(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}

fn unquote(s: &str) -> Option<&str> {
    match s.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(s),
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    let ip = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        IpAddr::V6(inner.parse().ok()?)
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else {
        let (host, port) = s.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(host.parse().ok()?)
    };
    Some(ip.to_canonical())
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn resolve_with(trusted: &[&str], peer: &str, headers: &[(&str, &str)]) -> IpAddr {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        ClientIpLayer::new(nets(trusted)).resolve(Some(ip(peer)), &map)
    }

    #[test]
    fn untrusted_peer_is_the_client_and_its_headers_are_ignored() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "203.0.113.9",
            &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")],
        );
        assert_eq!(got, ip("203.0.113.9"));
        // No trusted proxies at all: same.
        let got = resolve_with(&[], "203.0.113.9", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_without_headers_is_the_client() {
        assert_eq!(
            resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[]),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn xff_from_trusted_peer() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[("x-forwarded-for", "198.51.100.7")],
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn xff_walks_from_the_right_skipping_trusted_hops() {
        // The client spoofed 6.6.6.6 on the left; the real client is the rightmost untrusted.
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")],
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn xff_all_trusted_takes_leftmost() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[("x-forwarded-for", "10.9.9.9, 10.1.1.1")],
        );
        assert_eq!(got, ip("10.9.9.9"));
    }

    #[test]
    fn xff_multiple_headers_form_one_chain() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[
                ("x-forwarded-for", "198.51.100.7"),
                ("x-forwarded-for", "10.1.1.1"),
            ],
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn xff_with_ports_and_v6() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[("x-forwarded-for", "[2001:db8::1]:443, 10.0.0.3:8080")],
        );
        assert_eq!(got, ip("2001:db8::1"));
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[("x-forwarded-for", "2001:db8::2")],
        );
        assert_eq!(got, ip("2001:db8::2"));
    }

    #[test]
    fn malformed_xff_falls_back_to_peer() {
        // Nothing usable in the chain at all: the peer.
        for bad in [
            "not-an-ip",
            "",
            " , ",
            "1.2.3.4:notaport",
            "[::1",
            "unknown, _hidden",
        ] {
            let got = resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[("x-forwarded-for", bad)]);
            assert_eq!(got, ip("10.0.0.2"), "header {bad:?}");
        }
    }

    #[test]
    fn one_malformed_xff_entry_is_skipped_not_the_whole_chain() {
        // Issue 10: a malformed entry anywhere used to send the whole chain to the proxy.
        // Left of the client's entry it is never read.
        for (header, want) in [
            ("garbage, 198.51.100.7", "198.51.100.7"),
            ("spoof,, 198.51.100.7", "198.51.100.7"),
            ("203.0.113.1, unknown, 198.51.100.7", "198.51.100.7"),
            ("_hidden, 198.51.100.7, 10.0.0.9", "198.51.100.7"),
        ] {
            let got = resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[("x-forwarded-for", header)]);
            assert_eq!(got, ip(want), "header {header:?}");
        }
    }

    #[test]
    fn a_malformed_entry_written_by_a_trusted_hop_ends_the_walk() {
        // Found by the red-team pass: skipping it let `spoof, unknown` key on `spoof`, an
        // address the client wrote itself. The nearest trusted hop is the key instead.
        for (header, want) in [
            ("203.0.113.66, unknown", "10.0.0.2"),
            ("203.0.113.66, garbage", "10.0.0.2"),
            ("203.0.113.66, unknown, 10.0.0.9", "10.0.0.9"),
            ("198.51.100.7, 1.2.3.4:notaport, 10.0.0.9", "10.0.0.9"),
            ("203.0.113.66,,", "10.0.0.2"),
            ("198.51.100.7, , 10.0.0.3", "10.0.0.3"),
        ] {
            let got = resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[("x-forwarded-for", header)]);
            assert_eq!(got, ip(want), "header {header:?}");
        }
    }

    #[test]
    fn limit_key_cuts_ipv6_to_the_prefix() {
        let a = limit_key(ip("2001:db8:1:2:aaaa::1"), 64);
        let b = limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64);
        assert_eq!(a, b);
        assert_eq!(a, ip("2001:db8:1:2::"));
        assert_ne!(a, limit_key(ip("2001:db8:1:3::1"), 64));
        assert_eq!(limit_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(limit_key(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        assert_eq!(limit_key(ip("2001:db8::1"), 0), ip("::"));
        // IPv4 and IPv4-mapped IPv6: always the full address.
        assert_eq!(limit_key(ip("198.51.100.7"), 64), ip("198.51.100.7"));
        assert_eq!(limit_key(ip("::ffff:198.51.100.7"), 64), ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_header_forms() {
        let cases = [
            ("for=198.51.100.7", "198.51.100.7"),
            ("For=\"198.51.100.7:4711\";proto=https", "198.51.100.7"),
            ("for=\"[2001:db8:cafe::17]:4711\"", "2001:db8:cafe::17"),
            ("for=\"[2001:db8:cafe::17]\"", "2001:db8:cafe::17"),
            (
                "for=6.6.6.6, for=198.51.100.7;by=10.0.0.2, for=10.0.0.9",
                "198.51.100.7",
            ),
            ("proto=https;for=198.51.100.7;host=\"a,b\"", "198.51.100.7"),
        ];
        for (header, want) in cases {
            let got = resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[("forwarded", header)]);
            assert_eq!(got, ip(want), "header {header:?}");
        }
    }

    #[test]
    fn malformed_forwarded_falls_back_to_peer() {
        for bad in [
            "for=unknown",
            "for=_hidden",
            "for=\"[::1]:80",
            "garbage",
            "for=1.2.3.4:x",
        ] {
            let got = resolve_with(&["10.0.0.0/8"], "10.0.0.2", &[("forwarded", bad)]);
            assert_eq!(got, ip("10.0.0.2"), "header {bad:?}");
        }
    }

    #[test]
    fn xff_is_preferred_over_forwarded() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "10.0.0.2",
            &[
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-for", "198.51.100.7"),
            ],
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn v4_mapped_peer_matches_v4_cidr() {
        let got = resolve_with(
            &["10.0.0.0/8"],
            "::ffff:10.0.0.2",
            &[("x-forwarded-for", "198.51.100.7")],
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[tokio::test]
    async fn service_inserts_client_ip_and_survives_missing_peer() {
        let svc = ClientIpLayer::new(nets(&["127.0.0.0/8"])).layer(service_fn(
            |req: Request<()>| async move {
                Ok::<_, Infallible>(req.extensions().get::<ClientIp>().copied())
            },
        ));

        let mut req = Request::new(());
        req.extensions_mut()
            .insert(PeerAddr("127.0.0.1:5000".parse().unwrap()));
        req.headers_mut()
            .insert(X_FORWARDED_FOR, "198.51.100.7".parse().unwrap());
        let got = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(got, Some(ClientIp(ip("198.51.100.7"))));

        let got = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(got, Some(ClientIp(ip("0.0.0.0"))));
    }
}
