//! Server-side request forgery guard: which addresses a user-supplied URL may reach.
//!
//! The classifier is a pure function so it can be tested without connecting anywhere. The
//! guard is applied in the HTTP client's DNS resolver (so the checked address is the one
//! connected to: no DNS rebinding) and to IP-literal hosts before each request and redirect hop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use url::{Host, Url};

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Loopback,
    Private,
    LinkLocal,
    UniqueLocal,
    Unspecified,
    /// Multicast, broadcast, documentation, benchmarking, CGNAT, reserved and other
    /// non-global ranges.
    NonGlobal,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Blocked::Loopback => "loopback",
            Blocked::Private => "private",
            Blocked::LinkLocal => "link-local",
            Blocked::UniqueLocal => "unique-local",
            Blocked::Unspecified => "unspecified",
            Blocked::NonGlobal => "non-global",
        })
    }
}

/// Classifies an address: `None` if it is a public (globally routable) unicast address.
pub fn classify(ip: IpAddr) -> Option<Blocked> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Blocked> {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some(Blocked::Unspecified)
    } else if ip.is_loopback() {
        Some(Blocked::Loopback)
    } else if ip.is_private() {
        Some(Blocked::Private)
    } else if ip.is_link_local() {
        // 169.254.0.0/16, including the cloud metadata endpoint 169.254.169.254.
        Some(Blocked::LinkLocal)
    } else if ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0/24
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15
        || a >= 240
    // reserved 240/4
    {
        Some(Blocked::NonGlobal)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Blocked> {
    let seg = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and
    // 6to4 (2002::/16) addresses reach an IPv4 host: judge that host.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_unspecified() && !ip.is_loopback() {
        return classify_v4(Ipv4Addr::from(((seg[6] as u32) << 16) | seg[7] as u32));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(Ipv4Addr::from(((seg[6] as u32) << 16) | seg[7] as u32));
    }
    if seg[0] == 0x2002 {
        return classify_v4(Ipv4Addr::from(((seg[1] as u32) << 16) | seg[2] as u32));
    }
    if ip.is_unspecified() {
        Some(Blocked::Unspecified)
    } else if ip.is_loopback() {
        Some(Blocked::Loopback)
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some(Blocked::UniqueLocal) // fc00::/7
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some(Blocked::LinkLocal) // fe80::/10
    } else if seg[0] & 0xffc0 == 0xfec0 {
        Some(Blocked::Private) // deprecated site-local fec0::/10
    } else if ip.is_multicast()
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]) // discard-only 100::/64
        || seg[0] & 0xe000 != 0x2000
    // anything outside global unicast 2000::/3
    {
        Some(Blocked::NonGlobal)
    } else {
        None
    }
}

/// Why a URL may not be fetched.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlRefused {
    #[error("only http and https URLs are allowed, got '{0}'")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("refusing to connect to {addr} ({kind} address); set ALLOW_PRIVATE_URLS=true to allow")]
    Address { addr: IpAddr, kind: Blocked },
    #[error("refusing to connect to host '{0}' (local name); set ALLOW_PRIVATE_URLS=true to allow")]
    LocalName(String),
}

/// The policy every outbound request of the service follows.
#[derive(Debug, Clone, Copy)]
pub struct UrlPolicy {
    pub allow_private: bool,
}

impl UrlPolicy {
    /// Checks what can be checked without DNS: the scheme, IP-literal hosts and local names.
    /// Names are checked again, after resolution, by [`GuardedResolver`].
    pub fn check_url(&self, url: &Url) -> Result<(), UrlRefused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UrlRefused::Scheme(url.scheme().to_string()));
        }
        let host = url.host().ok_or(UrlRefused::NoHost)?;
        if self.allow_private {
            return Ok(());
        }
        match host {
            Host::Ipv4(v4) => self.check_ip(IpAddr::V4(v4)),
            Host::Ipv6(v6) => self.check_ip(IpAddr::V6(v6)),
            Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") || name.ends_with(".local") {
                    Err(UrlRefused::LocalName(name))
                } else {
                    Ok(())
                }
            }
        }
    }

    pub fn check_ip(&self, addr: IpAddr) -> Result<(), UrlRefused> {
        match classify(addr) {
            Some(kind) if !self.allow_private => Err(UrlRefused::Address { addr, kind }),
            _ => Ok(()),
        }
    }
}

/// A DNS resolver for reqwest that drops the whole name if any of its addresses is refused.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub policy: UrlPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                policy
                    .check_ip(a.ip())
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl GuardedResolver {
    pub fn shared(policy: UrlPolicy) -> Arc<Self> {
        Arc::new(Self { policy })
    }
}

/// The outbound HTTP client shared by downloads and uploads: no redirects followed by reqwest
/// (callers check each hop), no proxy, the guarded resolver, and a connect timeout of at most
/// 10 s.
pub fn guarded_client(
    timeout: std::time::Duration,
    policy: UrlPolicy,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(std::time::Duration::from_secs(10)))
        .dns_resolver(GuardedResolver::shared(policy))
        .user_agent(concat!("imagegen/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A URL without its query string and fragment, safe to log (presigned URLs carry credentials
/// in the query).
pub fn redact(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_non_public_ranges() {
        let cases = [
            ("127.0.0.1", Blocked::Loopback),
            ("127.255.0.9", Blocked::Loopback),
            ("10.1.2.3", Blocked::Private),
            ("172.16.0.1", Blocked::Private),
            ("172.31.255.255", Blocked::Private),
            ("192.168.1.1", Blocked::Private),
            ("169.254.169.254", Blocked::LinkLocal),
            ("0.0.0.0", Blocked::Unspecified),
            ("100.64.0.1", Blocked::NonGlobal),
            ("224.0.0.1", Blocked::NonGlobal),
            ("255.255.255.255", Blocked::NonGlobal),
            ("198.18.0.1", Blocked::NonGlobal),
            ("::1", Blocked::Loopback),
            ("::", Blocked::Unspecified),
            ("fd00::1", Blocked::UniqueLocal),
            ("fc12::1", Blocked::UniqueLocal),
            ("fe80::1", Blocked::LinkLocal),
            ("fec0::1", Blocked::Private),
            ("::ffff:127.0.0.1", Blocked::Loopback),
            ("::ffff:169.254.169.254", Blocked::LinkLocal),
            ("::10.0.0.1", Blocked::Private),
            ("64:ff9b::a9fe:a9fe", Blocked::LinkLocal),
            ("2002:c0a8:0101::1", Blocked::Private),
            ("2001:db8::1", Blocked::NonGlobal),
            ("ff02::1", Blocked::NonGlobal),
        ];
        for (addr, want) in cases {
            assert_eq!(classify(ip(addr)), Some(want), "{addr}");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(classify(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn url_checks_scheme_literals_and_local_names() {
        let strict = UrlPolicy {
            allow_private: false,
        };
        let check = |u: &str| strict.check_url(&Url::parse(u).unwrap());
        assert!(matches!(
            check("file:///etc/passwd"),
            Err(UrlRefused::Scheme(_))
        ));
        assert!(matches!(
            check("ftp://example.com/x"),
            Err(UrlRefused::Scheme(_))
        ));
        assert!(matches!(
            check("http://169.254.169.254/latest/meta-data/"),
            Err(UrlRefused::Address {
                kind: Blocked::LinkLocal,
                ..
            })
        ));
        assert!(matches!(
            check("http://[::1]:8080/"),
            Err(UrlRefused::Address { .. })
        ));
        // 2130706433 is 127.0.0.1 written as one number; the URL parser normalises it.
        assert!(matches!(
            check("http://2130706433/"),
            Err(UrlRefused::Address { .. })
        ));
        assert!(matches!(
            check("http://localhost/"),
            Err(UrlRefused::LocalName(_))
        ));
        assert!(matches!(
            check("http://db.local./"),
            Err(UrlRefused::LocalName(_))
        ));
        assert_eq!(check("https://example.com/a.png"), Ok(()));

        let open = UrlPolicy {
            allow_private: true,
        };
        assert_eq!(
            open.check_url(&Url::parse("http://127.0.0.1:9/x").unwrap()),
            Ok(())
        );
        assert!(
            open.check_url(&Url::parse("gopher://127.0.0.1/").unwrap())
                .is_err()
        );
    }

    #[test]
    fn redact_drops_query_and_fragment() {
        assert_eq!(
            redact("https://b.s3.x/k.png?X-Amz-Signature=abc"),
            "https://b.s3.x/k.png"
        );
        assert_eq!(redact("http://h/p#frag"), "http://h/p");
        assert_eq!(redact("http://h/p"), "http://h/p");
    }
}
