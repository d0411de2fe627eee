//! Which addresses a webhook may reach when private targets are not allowed
//! (`CJ_ACTIONS_ALLOW_PRIVATE_TARGETS`): a rule must not be a way into the platform's own network
//! (SSRF), whether it names an internal address or a DNS name that resolves to one.

use std::net::{IpAddr, SocketAddr};

/// How a refusal ends, so the operator learns the switch.
const HINT: &str = "private targets are refused; CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true allows them";

/// Whether an address is one a webhook may reach when private targets are not allowed: not
/// loopback, private, link-local (cloud metadata), shared, unspecified or multicast.
pub(super) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
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
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
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
