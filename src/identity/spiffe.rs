//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`, the workload identity carried in
//! the URI SAN of every mesh certificate, parsed as the SPIFFE ID standard
//! says: a lowercase trust domain of letters, digits, `-`, `.` and `_`; path
//! segments of letters, digits, `-`, `.` and `_`, none empty, `.` or `..`;
//! at most 2048 bytes.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeId(Arc<str>);

impl SpiffeId {
    pub fn parse(text: &str) -> Result<SpiffeId, String> {
        let invalid =
            |why: &str| format!("`{text}` is not a SPIFFE ID ({why}); expected spiffe://<trust-domain>/<path>");
        if text.len() > 2048 {
            return Err(format!("a SPIFFE ID of {} bytes is longer than the 2048 allowed", text.len()));
        }
        let rest = text.strip_prefix("spiffe://").ok_or_else(|| invalid("it must start with spiffe://"))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain.is_empty()
            || !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(invalid("the trust domain must be non-empty lowercase letters, digits, '-', '.', '_'"));
        }
        if rest.contains('/') {
            for segment in path.split('/') {
                if segment.is_empty() {
                    return Err(invalid("the path has an empty segment"));
                }
                if segment == "." || segment == ".." {
                    return Err(invalid("the path has a `.` or `..` segment"));
                }
                if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                    return Err(invalid("a path segment may hold only letters, digits, '-', '.', '_'"));
                }
            }
        }
        Ok(SpiffeId(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part between `spiffe://` and the path.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(domain, _)| domain)
    }
}

/// Whom a server must prove to be: one workload, or any workload of a trust
/// domain (a call to an original destination, whose workload is not known).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedPeer {
    Id(SpiffeId),
    TrustDomain(Arc<str>),
}

impl ExpectedPeer {
    pub fn accepts(&self, presented: &SpiffeId) -> bool {
        match self {
            ExpectedPeer::Id(id) => id == presented,
            ExpectedPeer::TrustDomain(domain) => presented.trust_domain() == &**domain,
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedPeer::Id(id) => write!(f, "{id}"),
            ExpectedPeer::TrustDomain(domain) => write!(f, "an identity in trust domain {domain}"),
        }
    }
}

/// A peer presented a valid certificate for another workload, or one that
/// proves no identity (and why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMismatch {
    pub expected: ExpectedPeer,
    pub presented: Result<SpiffeId, String>,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.presented {
            Ok(presented) => write!(f, "peer presented identity {presented}, expected {}", self.expected),
            Err(why) => write!(f, "peer's certificate proves no SPIFFE ID ({why}), expected {}", self.expected),
        }
    }
}

impl std::error::Error for IdentityMismatch {}

impl TryFrom<String> for SpiffeId {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        SpiffeId::parse(&text)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_trust_domain_accepts_its_own_workloads_only() {
        let ours = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(ours.trust_domain(), "cluster.local");
        assert_eq!(SpiffeId::parse("spiffe://cluster.local").unwrap().trust_domain(), "cluster.local");
        let domain = ExpectedPeer::TrustDomain("cluster.local".into());
        assert!(domain.accepts(&ours));
        assert!(!domain.accepts(&SpiffeId::parse("spiffe://cluster.local.evil/ns/shop/sa/orders").unwrap()));
        let exactly = ExpectedPeer::Id(ours.clone());
        assert!(exactly.accepts(&ours));
        assert!(!exactly.accepts(&SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/other").unwrap()));
    }

    use super::*;

    #[test]
    fn accepts_workload_ids() {
        for id in ["spiffe://cluster.local/ns/shop/sa/checkout", "spiffe://example.org", "spiffe://td-1/a"] {
            assert_eq!(SpiffeId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn rejects_malformed_ids_saying_why() {
        assert!(SpiffeId::parse("https://x/y").unwrap_err().contains("spiffe://"));
        assert!(SpiffeId::parse("spiffe:///a").unwrap_err().contains("trust domain"));
        assert!(SpiffeId::parse("spiffe://Cluster/a").unwrap_err().contains("trust domain"));
        assert!(SpiffeId::parse("spiffe://td/a//b").unwrap_err().contains("empty segment"));
        assert!(SpiffeId::parse("spiffe://td/a/").unwrap_err().contains("empty segment"));
        assert!(SpiffeId::parse("spiffe://td/a?b").unwrap_err().contains("only letters"));
        assert!(SpiffeId::parse("spiffe://td/ns/../sa/admin").unwrap_err().contains("`..` segment"));
        assert!(SpiffeId::parse("spiffe://td/ns/./x").unwrap_err().contains("`.` or `..`"));
        assert!(SpiffeId::parse("spiffe://td/a%2Fb").unwrap_err().contains("only letters"));
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2048))).unwrap_err().contains("2048"));
        assert!(SpiffeId::parse("spiffe://td/ns/shop/sa/check.out-1_x").is_ok());
    }

    #[test]
    fn a_mismatch_names_both_identities_or_why_the_peer_has_none() {
        let expected = SpiffeId::parse("spiffe://td/ns/shop/sa/inventory").unwrap();
        let other = IdentityMismatch {
            expected: ExpectedPeer::Id(expected.clone()),
            presented: SpiffeId::parse("spiffe://td/ns/x/sa/y"),
        };
        assert_eq!(
            other.to_string(),
            "peer presented identity spiffe://td/ns/x/sa/y, expected spiffe://td/ns/shop/sa/inventory"
        );
        let none = IdentityMismatch {
            expected: ExpectedPeer::Id(expected),
            presented: Err("2 URI SANs; an X.509-SVID has exactly one".into()),
        };
        assert_eq!(
            none.to_string(),
            "peer's certificate proves no SPIFFE ID (2 URI SANs; an X.509-SVID has exactly one), \
             expected spiffe://td/ns/shop/sa/inventory"
        );
    }
}
