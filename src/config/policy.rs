//! Per-account sending policy: which senders an account may use (so a misconfigured device
//! is refused locally instead of getting the mailbox throttled by the provider for repeated
//! SendAsDenied), and which source addresses may send as the account without logging in.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Account, ConfigError, err};

/// The narrowest network a no-auth entry may name is unlimited; the widest is a /8 (IPv4) or
/// a /32 (IPv6). Anything broader is close to an open relay and certainly a typo.
const WIDEST_V4_PREFIX: u8 = 8;
const WIDEST_V6_PREFIX: u8 = 32;

/// What an account may do beyond authenticating.
#[derive(Debug, Clone, Default)]
pub struct AccountPolicy {
    /// Envelope senders (and `From:` addresses when `check_from_header`) this account may
    /// use; `None` leaves the decision to the provider.
    pub allowed_senders: Option<Vec<SenderPattern>>,
    /// Also check the message's `From:` header against `allowed_senders`.
    pub check_from_header: bool,
    /// Clients from these networks send as this account without AUTH.
    pub no_auth_sources: Vec<IpNet>,
}

/// One `allowed_senders` entry: an address, or `@domain` for every address in a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    Address(String),
    Domain(String),
}

impl SenderPattern {
    fn matches(&self, address: &str) -> bool {
        match self {
            SenderPattern::Address(a) => a.eq_ignore_ascii_case(address),
            SenderPattern::Domain(d) => address
                .rsplit_once('@')
                .is_some_and(|(_, domain)| domain.eq_ignore_ascii_case(d)),
        }
    }
}

impl AccountPolicy {
    /// Whether `address` (a MAIL FROM path or a `From:` address) may be used. The null
    /// sender `<>` is allowed only if the list is not set.
    pub fn sender_allowed(&self, address: &str) -> bool {
        match &self.allowed_senders {
            None => true,
            Some(patterns) => !address.is_empty() && patterns.iter().any(|p| p.matches(address)),
        }
    }

    pub fn no_auth_source(&self, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        self.no_auth_sources.iter().any(|net| net.contains(&peer))
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compared as the IPv4 they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub(super) fn check_account_policy(
    key: &dyn Fn(&str) -> String,
    allowed_senders: Option<Vec<String>>,
    check_from_header: Option<bool>,
    no_auth_sources: Option<Vec<String>>,
) -> Result<AccountPolicy, ConfigError> {
    let allowed_senders = match allowed_senders {
        None => None,
        Some(list) => {
            let mut patterns = Vec::with_capacity(list.len());
            for (i, entry) in list.iter().enumerate() {
                patterns.push(sender_pattern(entry).ok_or_else(|| {
                    err(
                        format!("{}[{i}]", key("allowed_senders")),
                        "expected an address (printer@contoso.com) or a whole domain \
                         (@contoso.com)",
                    )
                })?);
            }
            if patterns.is_empty() {
                return Err(err(
                    key("allowed_senders"),
                    "is empty, which would refuse every message; remove it to allow any sender",
                ));
            }
            Some(patterns)
        }
    };
    let check_from_header = check_from_header.unwrap_or(false);
    if check_from_header && allowed_senders.is_none() {
        return Err(err(
            key("check_from_header"),
            "needs allowed_senders to check the From: header against",
        ));
    }
    let mut sources = Vec::new();
    for (i, text) in no_auth_sources.unwrap_or_default().iter().enumerate() {
        let entry_key = format!("{}[{i}]", key("no_auth_sources"));
        let net = parse_net(text).ok_or_else(|| {
            err(
                &entry_key,
                "expected an IP address (192.168.1.20) or network (192.168.1.0/24)",
            )
        })?;
        let too_wide = match net {
            IpNet::V4(n) => n.prefix_len() < WIDEST_V4_PREFIX,
            IpNet::V6(n) => n.prefix_len() < WIDEST_V6_PREFIX,
        };
        if too_wide {
            return Err(err(
                &entry_key,
                "is too wide a network (at most a /8 for IPv4, /32 for IPv6): the bridge must \
                 never become an open relay",
            ));
        }
        sources.push(net);
    }
    Ok(AccountPolicy {
        allowed_senders,
        check_from_header,
        no_auth_sources: sources,
    })
}

/// No source address may be mapped to two accounts.
pub(super) fn check_sources_unique(
    i: usize,
    account: &Account,
    earlier: &[Account],
) -> Result<(), ConfigError> {
    for net in &account.policy.no_auth_sources {
        let clash = earlier.iter().find(|other| {
            other
                .policy
                .no_auth_sources
                .iter()
                .any(|o| o.contains(net) || net.contains(o))
        });
        if let Some(other) = clash {
            return Err(err(
                format!("accounts[{i}].no_auth_sources"),
                format!("overlaps the no_auth_sources of account {}", other.name),
            ));
        }
    }
    Ok(())
}

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        // 192.168.1.5/24 is almost certainly meant as the network; refuse the ambiguity.
        return (net.trunc() == net).then(|| canonical_net(net));
    }
    text.parse::<IpAddr>()
        .ok()
        .map(|ip| canonical_net(IpNet::from(ip)))
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

fn sender_pattern(text: &str) -> Option<SenderPattern> {
    let text = text.trim();
    if text.is_empty()
        || text
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'<')
    {
        return None;
    }
    match text.strip_prefix('@') {
        Some(domain) if !domain.is_empty() && !domain.contains('@') => {
            Some(SenderPattern::Domain(domain.to_lowercase()))
        }
        Some(_) => None,
        None => {
            let (local, domain) = text.rsplit_once('@')?;
            (!local.is_empty() && !domain.is_empty())
                .then(|| SenderPattern::Address(text.to_lowercase()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(senders: &[&str], sources: &[&str]) -> Result<AccountPolicy, ConfigError> {
        let key = |f: &str| format!("accounts[0].{f}");
        check_account_policy(
            &key,
            Some(senders.iter().map(|s| s.to_string()).collect()),
            None,
            Some(sources.iter().map(|s| s.to_string()).collect()),
        )
    }

    #[test]
    fn allowed_senders_table() {
        let p = policy(&["Printer@Contoso.com", "@scans.contoso.com"], &[]).unwrap();
        let cases = [
            ("printer@contoso.com", true),
            ("PRINTER@contoso.COM", true),
            ("a@scans.contoso.com", true),
            ("a@SCANS.contoso.com", true),
            ("boss@contoso.com", false),
            ("a@evil.scans.contoso.com", false),
            ("printer@contoso.com.evil", false),
            ("", false),
            ("no-at-sign", false),
        ];
        for (address, want) in cases {
            assert_eq!(p.sender_allowed(address), want, "{address}");
        }
        assert!(
            AccountPolicy::default().sender_allowed(""),
            "no list: anything"
        );
        for bad in ["", "@", "a@", "@a@b", "a b@c", "<a@b>", "nobody"] {
            let e = policy(&[bad], &[]).unwrap_err();
            assert_eq!(e.key, "accounts[0].allowed_senders[0]", "{bad:?}");
        }
        assert_eq!(
            policy(&[], &[]).unwrap_err().key,
            "accounts[0].allowed_senders"
        );
    }

    #[test]
    fn no_auth_sources_table() {
        let p = policy(&["a@b.c"], &["192.168.1.20", "10.1.0.0/16", "fd00::/64"]).unwrap();
        let cases = [
            ("192.168.1.20", true),
            ("::ffff:192.168.1.20", true),
            ("192.168.1.21", false),
            ("10.1.200.3", true),
            ("10.2.0.1", false),
            ("fd00::5", true),
            ("fd00:0:0:1::5", false),
            ("127.0.0.1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(p.no_auth_source(ip.parse().unwrap()), want, "{ip}");
        }
        for bad in [
            "0.0.0.0/0",
            "10.0.0.0/7",
            "::/0",
            "2001::/16",
            "192.168.1.5/24",
            "x",
        ] {
            let e = policy(&["a@b.c"], &[bad]).unwrap_err();
            assert_eq!(e.key, "accounts[0].no_auth_sources[0]", "{bad}");
        }
        let p = policy(&["a@b.c"], &["::ffff:192.168.7.0/120"]).unwrap();
        assert!(p.no_auth_source("192.168.7.9".parse().unwrap()));
    }
}
