//! Which endpoints the service is willing to call.
//!
//! The service calls URLs that clients supply, so an operator can restrict them:
//! an allow list of hosts and CIDRs (`VERVE_CALLBACK_ALLOW`), and a switch that
//! refuses loopback, private, link-local and other non-public addresses
//! (`VERVE_CALLBACK_DENY_PRIVATE`). What can be decided from the URL alone is
//! decided when the request arrives (the client gets `400 failed`); what depends
//! on DNS is decided on the addresses the name resolves to, right before the call,
//! so a name cannot be used to smuggle a call to a refused address.

use std::fmt;
use std::net::IpAddr;

/// The operator's rules for callback targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallbackPolicy {
    hosts: Vec<String>,
    nets: Vec<Net>,
    deny_private: bool,
}

/// An address block, such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotAllowed,
    Private(IpAddr),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAllowed => f.write_str("host not in VERVE_CALLBACK_ALLOW"),
            Refusal::Private(ip) => write!(
                f,
                "{ip} is not a public address (VERVE_CALLBACK_DENY_PRIVATE)"
            ),
        }
    }
}

impl CallbackPolicy {
    /// Parses a comma-separated list of hosts and CIDRs; empty allows every host.
    pub fn parse(allow: &str, deny_private: bool) -> Result<CallbackPolicy, String> {
        let mut policy = CallbackPolicy {
            deny_private,
            ..Default::default()
        };
        for item in allow.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some((addr, prefix)) = item.split_once('/') {
                let addr: IpAddr = addr
                    .trim_matches(['[', ']'])
                    .parse()
                    .map_err(|_| format!("'{item}' is not a CIDR"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = prefix.parse().ok().filter(|p| *p <= max);
                let prefix =
                    prefix.ok_or_else(|| format!("'{item}': prefix must be 0 to {max}"))?;
                policy.nets.push(Net { addr, prefix });
            } else if let Ok(addr) = item.trim_matches(['[', ']']).parse::<IpAddr>() {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                policy.nets.push(Net { addr, prefix });
            } else if item
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                policy
                    .hosts
                    .push(item.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!("'{item}' is neither a host name nor a CIDR"));
            }
        }
        Ok(policy)
    }

    fn restricts_hosts(&self) -> bool {
        !self.hosts.is_empty() || !self.nets.is_empty()
    }

    /// Decides what can be decided from the host alone. `Ok` may still be refused
    /// later, by [`CallbackPolicy::check_resolved`], once the name is resolved.
    pub fn check_host(&self, host: &str) -> Result<(), Refusal> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip, self.restricts_hosts());
        }
        let name = host.trim_end_matches('.');
        if self.deny_private
            && (name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost"))
        {
            return Err(Refusal::Private(IpAddr::from([127, 0, 0, 1])));
        }
        let named = self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
        if self.restricts_hosts() && !named && self.nets.is_empty() {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// Keeps the resolved addresses of `host` that may be called; refuses when none
    /// is left. A host allowed by name may resolve anywhere the private rule allows.
    pub fn check_resolved(&self, host: &str, addrs: &mut Vec<IpAddr>) -> Result<(), Refusal> {
        let name = host.trim_end_matches('.');
        let by_name = self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
        let need_net = self.restricts_hosts() && !by_name;
        let mut first_refusal = None;
        addrs.retain(|&ip| match self.check_ip(ip, need_net) {
            Ok(()) => true,
            Err(refusal) => {
                first_refusal.get_or_insert(refusal);
                false
            }
        });
        match first_refusal {
            Some(refusal) if addrs.is_empty() => Err(refusal),
            _ => Ok(()),
        }
    }

    fn check_ip(&self, ip: IpAddr, need_net: bool) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if need_net && !self.nets.iter().any(|n| n.contains(ip)) {
            return Err(Refusal::NotAllowed);
        }
        if self.deny_private && !is_public(ip) {
            return Err(Refusal::Private(ip));
        }
        Ok(())
    }
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (canonical(self.addr), ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an ordinary public unicast address.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
                || (a == 198 && (b == 18 || b == 19))) // benchmarking
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80) // link-local
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_empty_policy_allows_everything() {
        let p = CallbackPolicy::parse("", false).unwrap();
        assert_eq!(p.check_host("127.0.0.1"), Ok(()));
        assert_eq!(p.check_host("example.com"), Ok(()));
        let mut addrs = vec![ip("10.0.0.1")];
        assert_eq!(p.check_resolved("example.com", &mut addrs), Ok(()));
        assert_eq!(addrs, vec![ip("10.0.0.1")]);
    }

    #[test]
    fn deny_private_refuses_non_public_literals_and_resolutions() {
        let p = CallbackPolicy::parse("", true).unwrap();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "[::1]",
            "[fe80::1]",
            "[fd00::1]",
            "[::ffff:10.0.0.1]",
            "100.64.0.1",
        ] {
            assert!(
                matches!(p.check_host(refused), Err(Refusal::Private(_))),
                "{refused}"
            );
        }
        assert!(p.check_host("localhost").is_err());
        assert!(p.check_host("api.localhost.").is_err());
        assert_eq!(p.check_host("8.8.8.8"), Ok(()));
        assert_eq!(p.check_host("[2001:db8::1]"), Ok(()));
        assert_eq!(p.check_host("example.com"), Ok(()), "decided after DNS");

        let mut addrs = vec![ip("127.0.0.1"), ip("93.184.216.34")];
        assert_eq!(p.check_resolved("example.com", &mut addrs), Ok(()));
        assert_eq!(addrs, vec![ip("93.184.216.34")]);
        let mut addrs = vec![ip("127.0.0.1")];
        assert_eq!(
            p.check_resolved("sneaky.example", &mut addrs),
            Err(Refusal::Private(ip("127.0.0.1")))
        );
    }

    #[test]
    fn the_allow_list_takes_hosts_and_cidrs() {
        let p = CallbackPolicy::parse(
            "hooks.example.com, 10.0.0.0/8 ,192.0.2.7,[2001:db8::]/32",
            false,
        )
        .unwrap();
        assert_eq!(p.check_host("HOOKS.example.com"), Ok(()));
        assert_eq!(p.check_host("10.200.0.1"), Ok(()));
        assert_eq!(p.check_host("192.0.2.7"), Ok(()));
        assert_eq!(p.check_host("192.0.2.8"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("11.0.0.1"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("[2001:db8:1::5]"), Ok(()));
        // A name not on the list may still resolve into an allowed block.
        assert_eq!(p.check_host("other.example.com"), Ok(()));
        let mut addrs = vec![ip("8.8.8.8")];
        assert_eq!(
            p.check_resolved("other.example.com", &mut addrs),
            Err(Refusal::NotAllowed)
        );
        let mut addrs = vec![ip("8.8.8.8"), ip("10.0.0.9")];
        assert_eq!(p.check_resolved("other.example.com", &mut addrs), Ok(()));
        assert_eq!(addrs, vec![ip("10.0.0.9")]);
        // A host allowed by name may resolve anywhere.
        let mut addrs = vec![ip("8.8.8.8")];
        assert_eq!(p.check_resolved("hooks.example.com", &mut addrs), Ok(()));
    }

    #[test]
    fn a_host_only_allow_list_refuses_other_names_at_once() {
        let p = CallbackPolicy::parse("hooks.example.com", false).unwrap();
        assert_eq!(p.check_host("evil.example.com"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("127.0.0.1"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn both_rules_apply_together() {
        let p = CallbackPolicy::parse("10.0.0.0/8", true).unwrap();
        assert!(matches!(p.check_host("10.0.0.1"), Err(Refusal::Private(_))));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(CallbackPolicy::parse("10.0.0.0/33", false).is_err());
        assert!(CallbackPolicy::parse("nonsense/8", false).is_err());
        assert!(CallbackPolicy::parse("http://x", false).is_err());
        assert!(CallbackPolicy::parse("a b", false).is_err());
    }
}
