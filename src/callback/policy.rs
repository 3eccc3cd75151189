//! Which endpoints the service is willing to call.
//!
//! The service calls URLs that clients supply, so an operator restricts them: an
//! allow list of hosts and CIDRs (`VERVE_CALLBACK_ALLOW`), and a switch, on by
//! default, that refuses every special-purpose address (loopback, private,
//! link-local, documentation, multicast, NAT64, 6to4 and the rest of IANA's
//! registries: [`SPECIAL`]) and the names that are local by definition
//! (`VERVE_CALLBACK_DENY_PRIVATE`). Both rules apply together. What can be decided
//! from the URL alone (an address literal in the standard dotted or IPv6 form,
//! `localhost`) is decided when the request arrives, and the client gets `400
//! failed`; other hosts, legacy forms such as `2130706433` or `0177.0.0.1` among
//! them (the resolver reads them as addresses), are decided on the
//! addresses the name resolves to, inside the HTTP client's resolver right before
//! the call, so a name cannot smuggle a call to a refused address, and a worker
//! never waits for DNS. Every refusal names the knob that would allow it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The operator's rules for callback targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallbackPolicy {
    allow: AllowList,
    deny_private: bool,
}

/// `VERVE_CALLBACK_ALLOW`: hosts and CIDRs; empty allows every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

/// Why a target is refused. Each message ends with the setting that allows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Neither the host nor its address is on `VERVE_CALLBACK_ALLOW`.
    NotAllowed,
    /// A special-purpose address: the address judged and the name of its block.
    Private { ip: IpAddr, block: &'static str },
    /// `localhost` or a name under it, which always means this machine (RFC 6761).
    LocalName,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAllowed => {
                f.write_str("host not in VERVE_CALLBACK_ALLOW; add it there to allow it")
            }
            Refusal::Private { ip, block } => write!(
                f,
                "{ip} is not a public address ({block}); \
                 set VERVE_CALLBACK_DENY_PRIVATE=false to allow it"
            ),
            Refusal::LocalName => f.write_str(
                "localhost names are this machine (RFC 6761); \
                 set VERVE_CALLBACK_DENY_PRIVATE=false to allow them",
            ),
        }
    }
}

impl std::str::FromStr for AllowList {
    type Err = String;

    /// Parses a comma-separated list of hosts and CIDRs.
    fn from_str(allow: &str) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for item in allow.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some((addr, prefix)) = item.split_once('/') {
                let addr: IpAddr = unbracket(addr)
                    .parse()
                    .map_err(|_| format!("'{item}' is not a CIDR"))?;
                let net = prefix.parse().ok().and_then(|p| IpNet::new(addr, p).ok());
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let net = net.ok_or_else(|| format!("'{item}': prefix must be 0 to {max}"))?;
                list.nets.push(canonical_net(net.trunc()));
            } else if let Ok(addr) = unbracket(item).parse::<IpAddr>() {
                list.nets.push(canonical_net(IpNet::from(addr)));
            } else if item
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                list.hosts
                    .push(item.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!("'{item}' is neither a host name nor a CIDR"));
            }
        }
        Ok(list)
    }
}

impl CallbackPolicy {
    pub fn new(allow: AllowList, deny_private: bool) -> Self {
        CallbackPolicy {
            allow,
            deny_private,
        }
    }

    fn restricts_hosts(&self) -> bool {
        !self.allow.hosts.is_empty() || !self.allow.nets.is_empty()
    }

    /// Decides what can be decided from the host alone, without DNS (it runs on a
    /// worker, for each request that names an endpoint). `Ok` may still be refused
    /// later, by [`CallbackPolicy::check_resolved`], once the name is resolved.
    pub fn check_host(&self, host: &str) -> Result<(), Refusal> {
        if let Ok(ip) = unbracket(host).parse::<IpAddr>() {
            return self.check_ip(ip, self.restricts_hosts());
        }
        let name = host.trim_end_matches('.');
        if self.deny_private && is_local_name(name) {
            return Err(Refusal::LocalName);
        }
        let named = self
            .allow
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name));
        if self.restricts_hosts() && !named && self.allow.nets.is_empty() {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// Keeps the resolved addresses of `host` that may be called; refuses when none
    /// is left. A host allowed by name may resolve anywhere the private rule allows.
    pub fn check_resolved(&self, host: &str, addrs: &mut Vec<IpAddr>) -> Result<(), Refusal> {
        let name = host.trim_end_matches('.');
        let by_name = self
            .allow
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name));
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
        if need_net && !self.allow.nets.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::NotAllowed);
        }
        match special_block(ip) {
            Some(block) if self.deny_private => Err(Refusal::Private { ip, block }),
            _ => Ok(()),
        }
    }
}

/// `[::1]` as `::1`: URLs and allow lists bracket IPv6 addresses.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `localhost` and every name under it resolve to this machine (RFC 6761 §6.3),
/// whatever DNS says, so they are refused without resolving. No allocation: this
/// runs on a worker for each request that names an endpoint.
fn is_local_name(name: &str) -> bool {
    const SUFFIX: &[u8] = b".localhost";
    let name = name.as_bytes();
    name.eq_ignore_ascii_case(&SUFFIX[1..])
        || (name.len() > SUFFIX.len()
            && name[name.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) reach the IPv4 address they
/// embed, so they are judged as it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An allowed IPv4-mapped block (`::ffff:10.0.0.0/104`) as the IPv4 block it
/// maps, since the addresses it is matched against are [`canonical`].
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new_assert(v4, v6.prefix_len() - 96)),
            None => net,
        },
        _ => net,
    }
}

/// The special-purpose block that holds `ip` (already [`canonical`]), if any.
fn special_block(ip: IpAddr) -> Option<&'static str> {
    SPECIAL
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|&(_, block)| block)
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix))
}

const fn v6(segments: [u16; 8], prefix: u8) -> IpNet {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(a, b, c, d, e, f, g, h),
        prefix,
    ))
}

/// Every block that is not ordinary public unicast, with the name a refusal gives
/// it. From IANA's special-purpose address registries (RFC 6890),
/// <https://www.iana.org/assignments/iana-ipv4-special-registry/> and
/// <https://www.iana.org/assignments/iana-ipv6-special-registry/>, plus what the
/// address-space registries hold instead (<https://www.iana.org/assignments/ipv4-address-space/>,
/// <https://www.iana.org/assignments/ipv6-address-space/>): multicast, IPv4's
/// reserved 240/4, IPv6's reserved ::/8 and deprecated site-local block.
///
/// Left out: the few registry entries marked globally reachable that are real
/// anycast services (AS112 192.31.196.0/24 and 192.175.48.0/24, AMT
/// 192.52.193.0/24). Refused whole although the registry marks a few addresses
/// inside them reachable: 192.0.0.0/24 and 2001::/23, whose services (PCP, TURN,
/// Teredo, ORCHID) are no webhook receivers. IPv4-mapped addresses
/// (`::ffff:0:0/96`) are not listed: they are judged as the IPv4 address they
/// embed ([`canonical`]). The other IPv6 blocks that embed an IPv4 address
/// (IPv4-compatible, NAT64, 6to4) are refused whole: the address they lead to
/// depends on a translator or relay the service cannot see.
///
/// The first block holding an address names it, so narrower blocks come before
/// the wider ones that hold them (::/8 holds ::, ::1, ::/96 and the NAT64 blocks).
#[rustfmt::skip] // one block a line reads as the registry does
const SPECIAL: [(IpNet, &str); 31] = [
    (v4(0, 0, 0, 0, 8), "\"this network\", RFC 791"),
    (v4(10, 0, 0, 0, 8), "private-use, RFC 1918"),
    (v4(100, 64, 0, 0, 10), "shared address space, RFC 6598"),
    (v4(127, 0, 0, 0, 8), "loopback, RFC 1122"),
    (v4(169, 254, 0, 0, 16), "link-local, RFC 3927"),
    (v4(172, 16, 0, 0, 12), "private-use, RFC 1918"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments, RFC 6890"),
    (v4(192, 0, 2, 0, 24), "documentation, RFC 5737"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast, RFC 7526"),
    (v4(192, 168, 0, 0, 16), "private-use, RFC 1918"),
    (v4(198, 18, 0, 0, 15), "benchmarking, RFC 2544"),
    (v4(198, 51, 100, 0, 24), "documentation, RFC 5737"),
    (v4(203, 0, 113, 0, 24), "documentation, RFC 5737"),
    (v4(224, 0, 0, 0, 4), "multicast, RFC 5771"),
    (v4(240, 0, 0, 0, 4), "reserved and limited broadcast, RFC 1112"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified, RFC 4291"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback, RFC 4291"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible, RFC 4291"),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "NAT64, RFC 6052"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64, RFC 8215"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 8), "reserved by the IETF, RFC 4291"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only, RFC 6666"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments, RFC 2928"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation, RFC 3849"),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4, RFC 3056"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation, RFC 9637"),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "SRv6 SIDs, RFC 9602"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local, RFC 4193"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local, RFC 4291"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local, RFC 3879"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast, RFC 4291"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &str, deny_private: bool) -> Result<CallbackPolicy, String> {
        Ok(CallbackPolicy::new(allow.parse()?, deny_private))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn private(ip_text: &str, block: &'static str) -> Result<(), Refusal> {
        Err(Refusal::Private {
            ip: ip(ip_text),
            block,
        })
    }

    #[test]
    fn an_empty_policy_without_the_private_rule_allows_everything() {
        let p = policy("", false).unwrap();
        assert_eq!(p.check_host("127.0.0.1"), Ok(()));
        assert_eq!(p.check_host("localhost"), Ok(()));
        assert_eq!(p.check_host("example.com"), Ok(()));
        let mut addrs = vec![ip("10.0.0.1")];
        assert_eq!(p.check_resolved("example.com", &mut addrs), Ok(()));
        assert_eq!(addrs, vec![ip("10.0.0.1")]);
    }

    /// The first and last address of every block in the table, written out by hand
    /// so that a slip in the table shows. IPv6 blocks are in URL form, as
    /// `check_host` gets them.
    #[rustfmt::skip] // one block a line, as in the table
    const BLOCK_ENDS: [(&str, &str, &str); 31] = [
        ("0.0.0.0", "0.255.255.255", "\"this network\", RFC 791"),
        ("10.0.0.0", "10.255.255.255", "private-use, RFC 1918"),
        ("100.64.0.0", "100.127.255.255", "shared address space, RFC 6598"),
        ("127.0.0.0", "127.255.255.255", "loopback, RFC 1122"),
        ("169.254.0.0", "169.254.255.255", "link-local, RFC 3927"),
        ("172.16.0.0", "172.31.255.255", "private-use, RFC 1918"),
        ("192.0.0.0", "192.0.0.255", "IETF protocol assignments, RFC 6890"),
        ("192.0.2.0", "192.0.2.255", "documentation, RFC 5737"),
        ("192.88.99.0", "192.88.99.255", "6to4 relay anycast, RFC 7526"),
        ("192.168.0.0", "192.168.255.255", "private-use, RFC 1918"),
        ("198.18.0.0", "198.19.255.255", "benchmarking, RFC 2544"),
        ("198.51.100.0", "198.51.100.255", "documentation, RFC 5737"),
        ("203.0.113.0", "203.0.113.255", "documentation, RFC 5737"),
        ("224.0.0.0", "239.255.255.255", "multicast, RFC 5771"),
        ("240.0.0.0", "255.255.255.255", "reserved and limited broadcast, RFC 1112"),
        ("[::]", "[::]", "unspecified, RFC 4291"),
        ("[::1]", "[::1]", "loopback, RFC 4291"),
        // :: and ::1 are named above; the rest of ::/96 embeds IPv4 addresses.
        ("[::0.0.0.2]", "[::255.255.255.255]", "IPv4-compatible, RFC 4291"),
        ("[64:ff9b::]", "[64:ff9b::ffff:ffff]", "NAT64, RFC 6052"),
        ("[64:ff9b:1::]", "[64:ff9b:1:ffff:ffff:ffff:ffff:ffff]", "local-use NAT64, RFC 8215"),
        // The blocks above lie inside ::/8, and so does ::ffff:0:0/96, which is
        // judged as IPv4 (see the test below).
        ("[::1:0:0]", "[ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "reserved by the IETF, RFC 4291"),
        ("[100::]", "[100::ffff:ffff:ffff:ffff]", "discard-only, RFC 6666"),
        ("[2001::]", "[2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff]", "IETF protocol assignments, RFC 2928"),
        ("[2001:db8::]", "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]", "documentation, RFC 3849"),
        ("[2002::]", "[2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "6to4, RFC 3056"),
        ("[3fff::]", "[3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff]", "documentation, RFC 9637"),
        ("[5f00::]", "[5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "SRv6 SIDs, RFC 9602"),
        ("[fc00::]", "[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "unique-local, RFC 4193"),
        ("[fe80::]", "[febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "link-local, RFC 4291"),
        ("[fec0::]", "[feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "site-local, RFC 3879"),
        ("[ff00::]", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]", "multicast, RFC 4291"),
    ];

    #[test]
    fn the_private_rule_refuses_both_ends_of_every_special_block() {
        let p = policy("", true).unwrap();
        for (first, last, block) in BLOCK_ENDS {
            for end in [first, last] {
                assert_eq!(p.check_host(end), private(unbracket(end), block), "{end}");
            }
        }
        // Every block of the table is covered above.
        assert_eq!(BLOCK_ENDS.len(), SPECIAL.len());
    }

    #[test]
    fn addresses_just_outside_the_special_blocks_are_public() {
        let p = policy("", true).unwrap();
        for public in [
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
            "8.8.8.8",
            "[2001:200::]",
            "[2001:db7:ffff:ffff:ffff:ffff:ffff:ffff]",
            "[2001:db9::]",
            "[2003::]",
            "[3fff:1000::]",
            "[2606:4700:4700::1111]",
        ] {
            assert_eq!(p.check_host(public), Ok(()), "{public}");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_the_ipv4_address() {
        let p = policy("", true).unwrap();
        assert_eq!(
            p.check_host("[::ffff:10.0.0.1]"),
            private("10.0.0.1", "private-use, RFC 1918")
        );
        assert_eq!(
            p.check_host("[::ffff:127.0.0.1]"),
            private("127.0.0.1", "loopback, RFC 1122")
        );
        assert_eq!(p.check_host("[::ffff:8.8.8.8]"), Ok(()));
        let mut addrs = vec![ip("::ffff:169.254.169.254")];
        assert_eq!(
            p.check_resolved("metadata.example", &mut addrs),
            private("169.254.169.254", "link-local, RFC 3927")
        );
    }

    #[test]
    fn the_private_rule_refuses_localhost_names_without_resolving() {
        let p = policy("", true).unwrap();
        for local in ["localhost", "LocalHost.", "api.localhost", "a.b.LOCALHOST."] {
            assert_eq!(p.check_host(local), Err(Refusal::LocalName), "{local}");
        }
        for name in [
            "example.com",
            "localhost.example.com",
            "notlocalhost",
            "xlocalhost",
        ] {
            assert_eq!(p.check_host(name), Ok(()), "{name}: decided after DNS");
        }
    }

    #[test]
    fn the_private_rule_keeps_only_public_resolved_addresses() {
        let p = policy("", true).unwrap();
        let mut addrs = vec![ip("127.0.0.1"), ip("93.184.216.34"), ip("fd00::1")];
        assert_eq!(p.check_resolved("example.com", &mut addrs), Ok(()));
        assert_eq!(addrs, vec![ip("93.184.216.34")]);
        let mut addrs = vec![ip("127.0.0.1"), ip("10.0.0.1")];
        assert_eq!(
            p.check_resolved("sneaky.example", &mut addrs),
            private("127.0.0.1", "loopback, RFC 1122")
        );
        assert_eq!(addrs, Vec::<IpAddr>::new());
    }

    #[test]
    fn refusals_name_the_setting_that_allows_them() {
        assert_eq!(
            private("10.0.0.1", "private-use, RFC 1918")
                .unwrap_err()
                .to_string(),
            "10.0.0.1 is not a public address (private-use, RFC 1918); \
             set VERVE_CALLBACK_DENY_PRIVATE=false to allow it"
        );
        assert_eq!(
            Refusal::LocalName.to_string(),
            "localhost names are this machine (RFC 6761); \
             set VERVE_CALLBACK_DENY_PRIVATE=false to allow them"
        );
        assert_eq!(
            Refusal::NotAllowed.to_string(),
            "host not in VERVE_CALLBACK_ALLOW; add it there to allow it"
        );
    }

    #[test]
    fn the_allow_list_takes_hosts_and_cidrs() {
        let p = policy(
            "hooks.example.com, 10.0.0.0/8 ,192.0.2.7,[2001:db8::]/32,[::ffff:172.16.0.0]/108",
            false,
        )
        .unwrap();
        assert_eq!(p.check_host("HOOKS.example.com"), Ok(()));
        assert_eq!(p.check_host("10.200.0.1"), Ok(()));
        assert_eq!(p.check_host("192.0.2.7"), Ok(()));
        assert_eq!(p.check_host("192.0.2.8"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("11.0.0.1"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("[2001:db8:1::5]"), Ok(()));
        assert_eq!(p.check_host("[2001:db9::]"), Err(Refusal::NotAllowed));
        // A mapped block is the IPv4 block it maps, either way it is written.
        assert_eq!(p.check_host("172.31.255.255"), Ok(()));
        assert_eq!(p.check_host("[::ffff:172.16.0.1]"), Ok(()));
        assert_eq!(p.check_host("[::ffff:10.0.0.1]"), Ok(()));
        assert_eq!(p.check_host("172.32.0.0"), Err(Refusal::NotAllowed));
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
    fn a_cidr_with_host_bits_set_allows_its_whole_block() {
        let p = policy("10.1.2.3/16", false).unwrap();
        assert_eq!(p.check_host("10.1.0.0"), Ok(()));
        assert_eq!(p.check_host("10.1.255.255"), Ok(()));
        assert_eq!(p.check_host("10.2.0.0"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn a_host_only_allow_list_refuses_other_names_at_once() {
        let p = policy("hooks.example.com", false).unwrap();
        assert_eq!(p.check_host("evil.example.com"), Err(Refusal::NotAllowed));
        assert_eq!(p.check_host("127.0.0.1"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn both_rules_apply_together() {
        // Listing a private block does not lift the private rule: a private
        // receiver needs VERVE_CALLBACK_DENY_PRIVATE=false.
        let p = policy("10.0.0.0/8,hooks.internal", true).unwrap();
        assert_eq!(
            p.check_host("10.0.0.1"),
            private("10.0.0.1", "private-use, RFC 1918")
        );
        let mut addrs = vec![ip("10.0.0.1")];
        assert_eq!(
            p.check_resolved("hooks.internal", &mut addrs),
            private("10.0.0.1", "private-use, RFC 1918")
        );
        assert_eq!(p.check_host("8.8.8.8"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(
            policy("10.0.0.0/33", false),
            Err("'10.0.0.0/33': prefix must be 0 to 32".to_owned())
        );
        assert_eq!(
            policy("[::1]/129", false),
            Err("'[::1]/129': prefix must be 0 to 128".to_owned())
        );
        assert_eq!(
            policy("nonsense/8", false),
            Err("'nonsense/8' is not a CIDR".to_owned())
        );
        assert_eq!(
            policy("http://x", false),
            Err("'http://x' is not a CIDR".to_owned())
        );
        assert_eq!(
            policy("a b", false),
            Err("'a b' is neither a host name nor a CIDR".to_owned())
        );
    }
}
