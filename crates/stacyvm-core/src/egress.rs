//! Egress policies: where a `bridge` sandbox may connect.
//!
//! Three layers decide, from the outside in:
//! 1. the operator's: the built-in blocked ranges (private, link-local and
//!    metadata, see [`crate::cidr::BLOCKED_EGRESS_V4`]) and the provider's
//!    `egress_deny`, enforced by the provider whatever else says;
//! 2. policies of `resource_type: egress` (global or the tenant's): `deny`
//!    rules name CIDRs no sandbox of the tenant reaches, even when its own
//!    policy allows them; `allow` rules, when there are any, put the
//!    tenant in allowlist mode: its sandboxes reach only what those rules
//!    name, and a sandbox policy may only pick from them. A template's
//!    `allowed_hosts` is one more such allowlist for the sandboxes spawned
//!    from it;
//! 3. the sandbox's own [`NetworkPolicy`] (E2B's shape): `allow_out` beats
//!    `deny_out`, what neither names is allowed.
//!
//! The result is an [`EgressRules`], which providers enforce: CIDR rules
//! in the kernel, domain rules by handing denied TCP connections to an
//! egress proxy that reads the HTTP Host or TLS SNI name, resolves it
//! itself and dials only those addresses.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use stacyvm_api::NetworkPolicy;

use crate::cidr::Cidr;
use crate::error::{Error, Result};
use crate::store::PolicyRecord;

/// Every IPv4 destination (E2B's `ALL_TRAFFIC`).
pub const ALL_TRAFFIC: &str = "0.0.0.0/0";
/// Hidden sandbox metadata holding the sandbox's own policy (JSON).
pub const METADATA_KEY: &str = "stacyvm.sys.egress";
/// Entries per list.
pub const MAX_ENTRIES: usize = 256;
/// Resolvers per policy.
pub const MAX_DNS_SERVERS: usize = 10;

/// A domain rule: `api.example.com` (that name only) or `*.example.com`
/// (its subdomains at any depth, not the apex). Lowercase, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Domain(String);

impl Domain {
    pub fn parse(s: &str) -> std::result::Result<Domain, String> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(format!(
                "{s:?} is not an IPv4 address, CIDR block or domain (like api.example.com or *.example.com)"
            ));
        }
        if name.parse::<IpAddr>().is_ok() || name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("{s:?} is not a domain"));
        }
        Ok(Domain(if wild {
            format!("*.{name}")
        } else {
            name.to_string()
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `host` (a Host header or SNI name: any case, maybe a
    /// trailing dot) is this domain.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => host.eq_ignore_ascii_case(&self.0),
        }
    }

    /// Whether every name this rule matches is matched by `other`.
    fn within(&self, other: &Domain) -> bool {
        match (self.0.strip_prefix("*."), other.0.strip_prefix("*.")) {
            (_, None) => self == other,
            (Some(mine), Some(_)) => self == other || other.matches(mine),
            (None, Some(_)) => other.matches(&self.0),
        }
    }
}

/// One list entry: an IPv4 block or a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Cidr(Cidr),
    Domain(Domain),
}

impl Entry {
    pub fn parse(s: &str) -> std::result::Result<Entry, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("an empty entry".into());
        }
        let looks_ip = t.contains(':')
            || t.bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        if looks_ip {
            let c: Cidr = t.parse().map_err(|e| format!("{e}"))?;
            if !c.is_ipv4() {
                return Err(format!(
                    "{t}: sandboxes have no IPv6 network, list IPv4 addresses and blocks only"
                ));
            }
            return Ok(Entry::Cidr(c));
        }
        Domain::parse(t).map(Entry::Domain)
    }

    fn within(&self, cap: &Entry) -> bool {
        match (self, cap) {
            (Entry::Cidr(c), Entry::Cidr(cap)) => {
                cap.prefix() <= c.prefix() && cap.contains(c.addr())
            }
            (Entry::Domain(d), Entry::Domain(cap)) => d.within(cap),
            _ => false,
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Cidr(c) => write!(f, "{c}"),
            Entry::Domain(d) => f.write_str(d.as_str()),
        }
    }
}

/// What a provider enforces for one sandbox (on top of its operator's
/// limits, which it always applies).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    /// Reachable even when `deny` covers them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    /// Names reachable through the egress proxy even when `deny` covers
    /// their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    /// Dropped unless allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,
    /// Resolvers reachable on port 53 while `domains` are in force, and
    /// what the proxy resolves with; `None`: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<Ipv4Addr>>,
    /// Dropped whatever `allow` and `domains` say (tenant `deny` rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enforced: Vec<Cidr>,
}

impl EgressRules {
    /// Whether denied TCP connections go to the egress proxy.
    pub fn proxied(&self) -> bool {
        !self.domains.is_empty() && !self.deny.is_empty()
    }

    /// Whether a Host/SNI name is allowed.
    pub fn allows_name(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d.matches(host))
    }

    /// Whether the proxy may dial `ip` for an allowed name (the tenant's
    /// hard denies still hold; the operator's are checked by the caller).
    pub fn may_dial(&self, ip: Ipv4Addr) -> bool {
        !self.enforced.iter().any(|c| c.contains(IpAddr::V4(ip)))
    }

    /// Whether a connection to `ip` passes the CIDR rules alone.
    pub fn allows_addr(&self, ip: Ipv4Addr) -> bool {
        let has = |l: &[Cidr]| l.iter().any(|c| c.contains(IpAddr::V4(ip)));
        !has(&self.enforced) && (has(&self.allow) || !has(&self.deny))
    }

    /// Nothing to enforce beyond the operator's limits.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.enforced.is_empty()
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("network.{field}: {why}"))
}

fn entries(field: &str, list: &[String]) -> Result<Vec<Entry>> {
    if list.len() > MAX_ENTRIES {
        return Err(bad(field, format!("at most {MAX_ENTRIES} entries")));
    }
    let mut out: Vec<Entry> = Vec::new();
    for s in list {
        let e = Entry::parse(s).map_err(|why| bad(field, why))?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// A checked policy: entries parsed, `deny_all` folded into `deny_out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub allow: Vec<Entry>,
    pub deny: Vec<Cidr>,
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl Parsed {
    /// The normal form callers see and the store keeps.
    pub fn to_policy(&self) -> NetworkPolicy {
        NetworkPolicy {
            deny_all: false,
            allow_out: self.allow.iter().map(ToString::to_string).collect(),
            deny_out: self.deny.iter().map(ToString::to_string).collect(),
            dns_servers: self
                .dns
                .as_ref()
                .map(|l| l.iter().map(ToString::to_string).collect()),
        }
    }
}

/// Checks a policy: a 400 naming the field and entry for anything wrong.
pub fn parse(p: &NetworkPolicy) -> Result<Parsed> {
    let allow = entries("allow_out", &p.allow_out)?;
    let mut deny = Vec::new();
    for e in entries("deny_out", &p.deny_out)? {
        match e {
            Entry::Cidr(c) => deny.push(c),
            Entry::Domain(d) => {
                return Err(bad(
                    "deny_out",
                    format!(
                        "{}: deny rules take addresses and CIDR blocks; to limit domains, deny {ALL_TRAFFIC} and allow the domains you want",
                        d.as_str()
                    ),
                ))
            }
        }
    }
    if p.deny_all {
        let all: Cidr = ALL_TRAFFIC
            .parse()
            .map_err(|e| Error::internal(format!("{e}")))?;
        if !deny.contains(&all) {
            deny.push(all);
        }
    }
    let dns = match &p.dns_servers {
        None => None,
        Some(list) => {
            if list.len() > MAX_DNS_SERVERS {
                return Err(bad("dns_servers", format!("at most {MAX_DNS_SERVERS}")));
            }
            let mut out = Vec::new();
            for s in list {
                let ip: Ipv4Addr = s
                    .trim()
                    .parse()
                    .map_err(|_| bad("dns_servers", format!("{s:?} is not an IPv4 address")))?;
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
            Some(out)
        }
    };
    Ok(Parsed { allow, deny, dns })
}

/// What the operator and tenant impose on a sandbox's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Tenant (and global) `deny` rules.
    pub enforced: Vec<Cidr>,
    /// Allowlists (tenant `allow` rules, a template's `allowed_hosts`):
    /// each one must cover every allowed entry.
    pub allowlists: Vec<(String, Vec<Entry>)>,
}

impl Limits {
    /// From the `egress` policies that apply to a caller and the
    /// template's `allowed_hosts`.
    pub fn new(policies: &[PolicyRecord], allowed_hosts: &[String]) -> Result<Limits> {
        let mut limits = Limits::default();
        let mut tenant_allow = Vec::new();
        for p in policies.iter().filter(|p| p.resource_type == "egress") {
            let e = Entry::parse(&p.pattern)
                .map_err(|why| Error::internal(format!("egress policy {}: {why}", p.id)))?;
            match (p.effect.as_str(), e) {
                ("deny", Entry::Cidr(c)) => limits.enforced.push(c),
                ("allow", e) => tenant_allow.push(e),
                _ => {}
            }
        }
        if !tenant_allow.is_empty() {
            limits
                .allowlists
                .push(("the tenant's egress policy".into(), tenant_allow));
        }
        if !allowed_hosts.is_empty() {
            let list = entries("allowed_hosts", allowed_hosts)?;
            limits
                .allowlists
                .push(("the template's allowed_hosts".into(), list));
        }
        Ok(limits)
    }

    fn is_empty(&self) -> bool {
        self.enforced.is_empty() && self.allowlists.is_empty()
    }
}

/// Validates a template's `allowed_hosts`.
pub fn check_allowed_hosts(list: &[String]) -> Result<()> {
    entries("allowed_hosts", list).map(|_| ())
}

/// Validates the pattern of an `egress` policy rule.
pub fn check_policy_pattern(effect: &str, pattern: &str) -> Result<()> {
    match Entry::parse(pattern) {
        Err(why) => Err(Error::invalid(format!("egress pattern: {why}"))),
        Ok(Entry::Domain(_)) if effect == "deny" => Err(Error::invalid(
            "egress deny rules take addresses and CIDR blocks; to limit domains, add allow rules (a tenant with allow rules reaches only what they name)",
        )),
        Ok(_) => Ok(()),
    }
}

/// The rules a provider enforces for `policy` under `limits`; `None` when
/// there is nothing beyond the operator's defaults. An allowed entry or
/// resolver outside an allowlist is a 403 naming both.
pub fn effective(policy: Option<&Parsed>, limits: &Limits) -> Result<Option<EgressRules>> {
    if policy.is_none() && limits.is_empty() {
        return Ok(None);
    }
    let empty = Parsed {
        allow: Vec::new(),
        deny: Vec::new(),
        dns: None,
    };
    let p = policy.unwrap_or(&empty);
    for (what, list) in &limits.allowlists {
        for e in &p.allow {
            if !list.iter().any(|cap| e.within(cap)) {
                return Err(Error::forbidden(format!(
                    "network.allow_out: {e} is outside what {what} allows ({})",
                    join(list)
                )));
            }
        }
        for ip in p.dns.iter().flatten() {
            let e = Entry::Cidr(Cidr::from(*ip));
            if !list.iter().any(|cap| e.within(cap)) {
                return Err(Error::forbidden(format!(
                    "network.dns_servers: {ip} is outside what {what} allows ({})",
                    join(list)
                )));
            }
        }
    }
    let mut allow = p.allow.clone();
    let mut deny = p.deny.clone();
    if let Some((_, innermost)) = limits.allowlists.last() {
        if allow.is_empty() {
            // The narrowest list, minus what an outer one does not cover.
            allow = innermost
                .iter()
                .filter(|e| {
                    limits
                        .allowlists
                        .iter()
                        .all(|(_, l)| l.iter().any(|cap| e.within(cap)))
                })
                .cloned()
                .collect();
        }
        deny = vec![ALL_TRAFFIC
            .parse()
            .map_err(|e| Error::internal(format!("{e}")))?];
    }
    let mut rules = EgressRules {
        enforced: limits.enforced.clone(),
        deny,
        dns: p.dns.clone(),
        ..EgressRules::default()
    };
    for e in allow {
        match e {
            Entry::Cidr(c) => rules.allow.push(c),
            Entry::Domain(d) => rules.domains.push(d),
        }
    }
    Ok(Some(rules))
}

fn join(list: &[Entry]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            ..NetworkPolicy::default()
        }
    }

    fn rule(effect: &str, pattern: &str) -> PolicyRecord {
        PolicyRecord {
            id: "pol-1".into(),
            tenant_id: "t".into(),
            resource_type: "egress".into(),
            effect: effect.into(),
            pattern: pattern.into(),
            priority: 0,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn domains_match_names_not_lookalikes() {
        let d = Domain::parse("API.Example.com.").expect("valid");
        assert_eq!(d.as_str(), "api.example.com");
        assert!(d.matches("api.example.com"));
        assert!(d.matches("API.EXAMPLE.COM."));
        assert!(!d.matches("xapi.example.com"));
        assert!(!d.matches("api.example.com.evil.net"));
        let w = Domain::parse("*.example.com").expect("valid");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"), "not the apex");
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches(".example.com"));
        for bad in [
            "*",
            "*.",
            "",
            "a..b",
            "-a.com",
            "a b.com",
            "exa/mple.com",
            "*.*.com",
            "1.2.3",
        ] {
            assert!(Domain::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn entries_parse_and_refuse_ipv6() {
        assert_eq!(
            Entry::parse("8.8.8.8").expect("valid"),
            Entry::Cidr("8.8.8.8/32".parse().expect("valid"))
        );
        assert!(matches!(
            Entry::parse("pypi.org").expect("valid"),
            Entry::Domain(_)
        ));
        for bad in [
            "::1",
            "fd00::/8",
            "10.0.0.1/33",
            "10.0.0.1/8",
            "999.1.1.1",
            " ",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parse_folds_deny_all_and_refuses_domain_denies() {
        let mut p = pol(&["pypi.org", "1.1.1.1"], &[]);
        p.deny_all = true;
        let parsed = parse(&p).expect("valid");
        assert_eq!(parsed.to_policy().deny_out, ["0.0.0.0/0"]);
        assert_eq!(parsed.to_policy().allow_out, ["pypi.org", "1.1.1.1/32"]);
        let e = parse(&pol(&[], &["evil.com"])).expect_err("must fail");
        assert!(e.to_string().contains("deny_out"), "{e}");
        let many: Vec<String> = (0..300)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let e = parse(&NetworkPolicy {
            allow_out: many,
            ..NetworkPolicy::default()
        })
        .expect_err("must fail");
        assert!(e.to_string().contains("at most"), "{e}");
        let e = parse(&NetworkPolicy {
            dns_servers: Some(vec!["dns.google".into()]),
            ..NetworkPolicy::default()
        })
        .expect_err("must fail");
        assert!(e.to_string().contains("dns_servers"), "{e}");
    }

    #[test]
    fn allow_beats_deny_and_enforced_beats_allow() {
        let parsed = parse(&pol(&["1.1.1.0/24"], &["0.0.0.0/0"])).expect("valid");
        let limits = Limits::new(&[rule("deny", "1.1.1.1")], &[]).expect("valid");
        let r = effective(Some(&parsed), &limits)
            .expect("valid")
            .expect("valid");
        assert!(r.allows_addr("1.1.1.2".parse().expect("valid")));
        assert!(
            !r.allows_addr("1.1.1.1".parse().expect("valid")),
            "tenant deny wins"
        );
        assert!(!r.allows_addr("8.8.8.8".parse().expect("valid")));
        assert!(effective(None, &Limits::default())
            .expect("valid")
            .is_none());
    }

    #[test]
    fn allowlists_bound_what_a_sandbox_may_allow() {
        let limits = Limits::new(
            &[rule("allow", "*.example.com"), rule("allow", "10.1.0.0/16")],
            &[],
        )
        .expect("valid");
        // No policy: the tenant's list, everything else denied.
        let r = effective(None, &limits).expect("valid").expect("valid");
        assert_eq!(r.deny, vec!["0.0.0.0/0".parse().expect("valid")]);
        assert!(r.allows_name("a.example.com") && !r.allows_name("pypi.org"));
        assert!(r.allows_addr("10.1.2.3".parse().expect("valid")));
        // A narrower policy is fine; a wider one is a 403.
        let ok = parse(&pol(&["api.example.com", "10.1.2.0/24"], &[])).expect("valid");
        let r = effective(Some(&ok), &limits)
            .expect("valid")
            .expect("valid");
        assert!(!r.allows_addr("10.1.3.1".parse().expect("valid")));
        for wide in ["example.com", "pypi.org", "10.0.0.0/8", "*.com"] {
            let p = parse(&pol(&[wide], &[])).expect("valid");
            let e = effective(Some(&p), &limits).expect_err("must fail");
            assert_eq!(e.kind(), crate::error::ErrorKind::Forbidden, "{wide}: {e}");
        }
        // A template's list narrows the tenant's.
        let both = Limits::new(
            &[rule("allow", "*.example.com")],
            &["api.example.com".into(), "pypi.org".into()],
        )
        .expect("valid");
        let r = effective(None, &both).expect("valid").expect("valid");
        assert_eq!(
            r.domains,
            vec![Domain::parse("api.example.com").expect("valid")]
        );
    }

    #[test]
    fn policy_patterns_are_checked() {
        assert!(check_policy_pattern("deny", "10.0.0.0/8").is_ok());
        assert!(check_policy_pattern("allow", "*.example.com").is_ok());
        assert!(check_policy_pattern("deny", "example.com").is_err());
        assert!(check_policy_pattern("allow", "not a thing").is_err());
    }
}
