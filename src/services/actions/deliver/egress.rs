//! Which addresses a webhook may reach when private targets are not allowed
//! (`CJ_ACTIONS_ALLOW_PRIVATE_TARGETS`): a rule must not be a way into the platform's own network
//! (SSRF), whether it names an internal address or a DNS name that resolves to one.

use std::net::{IpAddr, SocketAddr};

/// How a refusal ends, so the operator learns the switch.
const HINT: &str = "private targets are refused; CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true allows them";

/// The IANA special-purpose ranges a webhook may not reach (RFC 6890 and the IPv4 and IPv6
/// Special-Purpose Address Registries, as of 2026): everything not globally reachable, plus the
/// transition mechanisms that embed an IPv4 address a gateway would connect to (NAT64, 6to4,
/// Teredo), so a private IPv4 cannot be reached through its IPv6 spelling. Written out because
/// `Ipv4Addr::is_global`/`Ipv6Addr::is_global` are still unstable and no well-kept crate tracks
/// the registries.
const V4_REFUSED: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network"
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (carrier-grade NAT)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local (cloud metadata)
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
    ([192, 88, 99, 0], 24),  // 6to4 relay anycast (deprecated)
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
    ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved (and 255.255.255.255, broadcast)
];

const V6_REFUSED: &[(u128, u8)] = &[
    (0, 96), // unspecified, loopback, IPv4-compatible (deprecated)
    (0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96), // NAT64 well-known prefix
    (0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48), // NAT64 local use
    (0x0100_0000_0000_0000_0000_0000_0000_0000, 64), // discard-only
    (0x2001_0000_0000_0000_0000_0000_0000_0000, 23), // IETF protocol assignments (Teredo, ORCHID…)
    (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32), // documentation
    (0x2002_0000_0000_0000_0000_0000_0000_0000, 16), // 6to4
    (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20), // documentation
    (0x5f00_0000_0000_0000_0000_0000_0000_0000, 16), // segment routing SIDs
    (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7), // unique local
    (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10), // link-local
    (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10), // site-local (deprecated)
    (0xff00_0000_0000_0000_0000_0000_0000_0000, 8), // multicast
];

fn in_v4(ip: u32, (net, len): ([u8; 4], u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    ip & mask == u32::from_be_bytes(net) & mask
}

fn in_v6(ip: u128, (net, len): (u128, u8)) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    ip & mask == net & mask
}

/// Whether an address is one a webhook may reach when private targets are not allowed: none
/// of the special-purpose ranges above; an IPv4-mapped IPv6 address is judged as its IPv4.
pub(super) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !V4_REFUSED.iter().any(|r| in_v4(u32::from(v4), *r)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => !V6_REFUSED.iter().any(|r| in_v6(u128::from(v6), *r)),
        },
    }
}

/// Why a URL whose host is an IP literal may not be called, if it may not. A literal is
/// connected to without resolving, so [`PublicOnly`] never sees it.
pub(super) fn refused_literal(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let ip = url
        .host_str()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())?;
    (!is_public(ip)).then(|| format!("{ip} is not a public address ({HINT})"))
}

/// Resolves webhook hosts and drops private addresses, so a rule can neither name an internal
/// service nor reach one through a DNS name that resolves to it (the check is on the addresses
/// actually connected to).
pub(super) struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address ({HINT})").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            // Transition mechanisms that embed an IPv4 address, and special-purpose ranges.
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "3fff::1",
            "100::1",
            "::127.0.0.1",
            "fec0::1",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.0.0.8",
            "192.88.99.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "100.128.0.1",
            "198.20.0.1",
            "223.255.255.1",
            "2606:4700::1111",
            "2a00:1450:4001::1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ip_literals_are_checked_without_resolving() {
        let why = refused_literal("http://[::1]:8080/hook").unwrap();
        assert_eq!(
            why,
            "::1 is not a public address (private targets are refused; \
             CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true allows them)"
        );
        assert!(refused_literal("http://127.0.0.1/hook").is_some());
        assert_eq!(refused_literal("https://1.1.1.1/hook"), None);
        assert_eq!(refused_literal("https://example.com/hook"), None);
    }
}
