//! Property tests of the SSRF guard: on generated addresses, written in every textual form a
//! URL host may take, the guard's verdict agrees with a reference — the C library's resolver
//! (`getaddrinfo` on a numeric host) for what address the text means, and a CIDR table of the
//! special-purpose registries for whether that address may be reached.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

use proptest::prelude::*;
use url::{Host, Url};

use super::{UrlPolicy, classify};

/// IPv4 ranges the policy refuses (IANA IPv4 special-purpose registry, minus the globally
/// reachable entries, plus multicast and reserved space).
const V4_BLOCKED: &[(u32, u8)] = &[
    (0x0000_0000, 8),  // "this network"
    (0x0a00_0000, 8),  // private
    (0x6440_0000, 10), // CGNAT
    (0x7f00_0000, 8),  // loopback
    (0xa9fe_0000, 16), // link-local
    (0xac10_0000, 12), // private
    (0xc000_0000, 24), // IETF protocol assignments
    (0xc000_0200, 24), // TEST-NET-1
    (0xc0a8_0000, 16), // private
    (0xc612_0000, 15), // benchmarking
    (0xc633_6400, 24), // TEST-NET-2
    (0xcb00_7100, 24), // TEST-NET-3
    (0xe000_0000, 4),  // multicast
    (0xf000_0000, 4),  // reserved, broadcast
];

fn in_v4(ip: u32, (net, len): (u32, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    ip & mask == net
}

fn reference_v4_blocked(ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    V4_BLOCKED.iter().any(|&r| in_v4(ip, r))
}

fn in_v6(ip: u128, net: u128, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    ip & mask == net
}

/// IPv6: forms that embed an IPv4 host are judged by that host; then the special ranges; and
/// anything outside global unicast 2000::/3 is refused.
fn reference_v6_blocked(ip: Ipv6Addr) -> bool {
    let v = u128::from(ip);
    let low32 = Ipv4Addr::from(v as u32);
    if in_v6(v, 0xffff << 32, 96) {
        return reference_v4_blocked(low32); // ::ffff:a.b.c.d
    }
    if v <= 1 {
        return true; // :: and ::1
    }
    if in_v6(v, 0, 96) {
        return reference_v4_blocked(low32); // ::a.b.c.d (deprecated compatible form)
    }
    if in_v6(v, 0x0064_ff9b << 96, 96) {
        return reference_v4_blocked(low32); // NAT64
    }
    if in_v6(v, 0x2002 << 112, 16) {
        return reference_v4_blocked(Ipv4Addr::from((v >> 80) as u32)); // 6to4
    }
    let special: &[(u128, u8)] = &[
        (0xfc00 << 112, 7),      // unique-local
        (0xfe80 << 112, 10),     // link-local
        (0xfec0 << 112, 10),     // site-local
        (0xff00 << 112, 8),      // multicast
        (0x2001_0db8 << 96, 32), // documentation
        (0x0100 << 112, 64),     // discard-only
    ];
    special.iter().any(|&(n, l)| in_v6(v, n, l)) || !in_v6(v, 0x2000 << 112, 3)
}

fn reference_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => reference_v4_blocked(v4),
        IpAddr::V6(v6) => reference_v6_blocked(v6),
    }
}

/// What the system resolver makes of a numeric host (no DNS query: every generated host is an
/// address in some notation).
fn system_resolve(host: &str) -> Option<IpAddr> {
    (host, 0u16).to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// An address near the edges of the interesting ranges, or anywhere.
fn any_v4() -> impl Strategy<Value = Ipv4Addr> {
    let near_range =
        (0..V4_BLOCKED.len(), any::<u32>(), any::<bool>()).prop_map(|(i, r, below)| {
            let (net, len) = V4_BLOCKED[i];
            let size = 1u64 << (32 - len);
            // Inside the range, or within 256 addresses just outside either end.
            let off = if below {
                (net as u64 + size + (r as u64 % 256)) as u32
            } else {
                net.wrapping_add((r as u64 % size) as u32)
            };
            Ipv4Addr::from(off)
        });
    prop_oneof![near_range, any::<u32>().prop_map(Ipv4Addr::from)]
}

fn any_v6() -> impl Strategy<Value = Ipv6Addr> {
    // (prefix, length): the random rest fills the bits after the prefix.
    let ranges: Vec<(u128, u8)> = vec![
        (0, 96),                 // ::a.b.c.d, and :: / ::1 at its bottom
        (0, 127),                // :: and ::1 themselves
        (0xffff << 32, 96),      // IPv4-mapped
        (0x0064_ff9b << 96, 96), // NAT64
        (0x0064_ff9b_0001 << 80, 48),
        (0x2002 << 112, 16), // 6to4
        (0xfc00 << 112, 7),
        (0xfe80 << 112, 10),
        (0xfec0 << 112, 10),
        (0xff00 << 112, 8),
        (0x2001_0db8 << 96, 32),
        (0x0100 << 112, 64),
        (0x2000 << 112, 3), // global unicast
        (0x4000 << 112, 2), // outside it
    ];
    let structured = (proptest::sample::select(ranges), any::<u128>())
        .prop_map(|((net, len), r)| Ipv6Addr::from(net | (r & (u128::MAX >> len))));
    prop_oneof![structured, any::<u128>().prop_map(Ipv6Addr::from)]
}

/// The ways a URL host can spell one IPv4 address (WHATWG and inet_aton agree on all of them):
/// dotted decimal, one 32-bit number, hex or octal parts, and the short a.b.c / a.b forms.
fn spellings_v4(ip: Ipv4Addr) -> Vec<String> {
    let [a, b, c, d] = ip.octets();
    let n = u32::from(ip);
    vec![
        format!("{a}.{b}.{c}.{d}"),
        format!("{n}"),
        format!("0x{n:x}"),
        format!("0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}"),
        format!("0{a:o}.0{b:o}.0{c:o}.0{d:o}"),
        format!("{a}.{b}.{}", (c as u32) << 8 | d as u32),
        format!("{a}.{}", n & 0x00ff_ffff),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn ipv4_hosts_in_every_spelling_agree_with_the_system_resolver_and_the_cidr_table(ip in any_v4()) {
        let policy = UrlPolicy { allow_private: false };
        for host in spellings_v4(ip) {
            let url = Url::parse(&format!("http://{host}/x.png")).unwrap();
            // The URL parser and the system resolver read the same address from the text.
            prop_assert_eq!(url.host(), Some(Host::Ipv4(ip)), "{}", host);
            prop_assert_eq!(system_resolve(&host), Some(IpAddr::V4(ip)), "{}", host);
            let refused = policy.check_url(&url).is_err();
            prop_assert_eq!(refused, reference_blocked(IpAddr::V4(ip)), "{} ({})", host, ip);
        }
    }

    #[test]
    fn ipv6_hosts_agree_with_the_system_resolver_and_the_cidr_table(ip in any_v6()) {
        let policy = UrlPolicy { allow_private: false };
        let url = Url::parse(&format!("http://[{ip}]:8080/x.png")).unwrap();
        prop_assert_eq!(url.host(), Some(Host::Ipv6(ip)));
        prop_assert_eq!(system_resolve(&ip.to_string()), Some(IpAddr::V6(ip)));
        let refused = policy.check_url(&url).is_err();
        prop_assert_eq!(refused, reference_blocked(IpAddr::V6(ip)), "{}", ip);
        // The classifier the DNS resolver applies agrees too.
        prop_assert_eq!(classify(IpAddr::V6(ip)).is_some(), reference_blocked(IpAddr::V6(ip)));
    }

    #[test]
    fn any_url_text_is_refused_or_allowed_without_panicking(s in ".{0,80}") {
        let policy = UrlPolicy { allow_private: false };
        if let Ok(url) = Url::parse(&s) {
            let verdict = policy.check_url(&url);
            // Nothing but http(s) with a host gets through.
            if verdict.is_ok() {
                prop_assert!(matches!(url.scheme(), "http" | "https"));
                prop_assert!(url.host().is_some());
            }
        }
    }
}
