//! Inbound authorization: which caller identities may call which methods.
//!
//! A method is governed by every rule whose method patterns match it (config
//! rules, and the contract's `allowed_callers` options). If any rule governs
//! it, the caller must match one of those rules; otherwise the default applies.
//! The governing rules are found once per method when the route table is built.

use std::fmt;
use std::sync::Arc;

use crate::config::DefaultAuthorization;
use crate::identity::SpiffeId;

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum MethodPattern {
    Any,
    Service(String),
    Method { service: String, method: String },
}

impl MethodPattern {
    pub fn matches(&self, service: &str, method: &str) -> bool {
        match self {
            MethodPattern::Any => true,
            MethodPattern::Service(s) => s == service,
            MethodPattern::Method { service: s, method: m } => s == service && m == method,
        }
    }
}

impl TryFrom<String> for MethodPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        if text == "*" {
            return Ok(MethodPattern::Any);
        }
        let invalid =
            || format!("`{text}` is not a method pattern; write `pkg.Service/Method`, `pkg.Service/*` or `*`");
        let (service, method) = text.split_once('/').ok_or_else(invalid)?;
        if service.is_empty() || method.is_empty() || method.contains('/') || service.contains('*') {
            return Err(invalid());
        }
        Ok(match method {
            "*" => MethodPattern::Service(service.to_string()),
            _ if method.contains('*') => return Err(invalid()),
            _ => MethodPattern::Method { service: service.to_string(), method: method.to_string() },
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum CallerPattern {
    /// Any caller with a certificate from the trust bundle.
    Any,
    /// Every ID under a path, written `spiffe://td/ns/shop/*`; stored with its trailing `/`.
    Prefix(String),
    Exact(SpiffeId),
}

impl CallerPattern {
    pub fn matches(&self, caller: &SpiffeId) -> bool {
        match self {
            CallerPattern::Any => true,
            CallerPattern::Prefix(prefix) => caller.as_str().starts_with(prefix.as_str()),
            CallerPattern::Exact(id) => id == caller,
        }
    }
}

impl fmt::Display for CallerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerPattern::Any => f.write_str("*"),
            CallerPattern::Prefix(prefix) => write!(f, "{prefix}*"),
            CallerPattern::Exact(id) => write!(f, "{id}"),
        }
    }
}

impl TryFrom<String> for CallerPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        if text == "*" {
            return Ok(CallerPattern::Any);
        }
        if let Some(prefix) = text.strip_suffix("/*") {
            SpiffeId::parse(prefix)?;
            return Ok(CallerPattern::Prefix(format!("{prefix}/")));
        }
        SpiffeId::parse(&text).map(CallerPattern::Exact)
    }
}

/// A named list of allowed callers for a set of methods.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub methods: Vec<MethodPattern>,
    pub callers: Vec<CallerPattern>,
}

/// The authorization of one method, resolved from all rules once.
#[derive(Clone, Debug)]
pub struct MethodAuthz {
    governing: Vec<Arc<Rule>>,
    default: DefaultAuthorization,
}

impl MethodAuthz {
    /// Resolves the rules that govern `service/method`; `contract_rule` is the
    /// contract's `allowed_callers`, if it sets any.
    pub fn resolve(
        rules: &[Arc<Rule>],
        default: DefaultAuthorization,
        service: &str,
        method: &str,
        contract_rule: Option<Arc<Rule>>,
    ) -> MethodAuthz {
        let governing = rules
            .iter()
            .filter(|rule| rule.methods.iter().any(|p| p.matches(service, method)))
            .cloned()
            .chain(contract_rule)
            .collect();
        MethodAuthz { governing, default }
    }

    /// `Err` carries a message naming the policy that denied the call.
    pub fn check(&self, caller: &SpiffeId) -> Result<(), Denial> {
        if self.governing.is_empty() {
            return match self.default {
                DefaultAuthorization::AllAuthenticated => Ok(()),
                DefaultAuthorization::Deny => Err(Denial::DefaultDeny),
            };
        }
        if self.governing.iter().any(|rule| rule.callers.iter().any(|c| c.matches(caller))) {
            Ok(())
        } else {
            Err(Denial::NoRuleAllows(self.governing.iter().map(|r| r.name.clone()).collect()))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denial {
    DefaultDeny,
    NoRuleAllows(Vec<String>),
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::DefaultDeny => f.write_str("no authorization rule names this method and the default is deny"),
            Denial::NoRuleAllows(names) => {
                write!(f, "not allowed by authorization rule")?;
                if names.len() > 1 {
                    f.write_str("s")?;
                }
                for (i, name) in names.iter().enumerate() {
                    write!(f, "{}\"{name}\"", if i == 0 { " " } else { ", " })?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap()
    }

    fn rule(name: &str, methods: &[&str], callers: &[&str]) -> Arc<Rule> {
        Arc::new(Rule {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string().try_into().unwrap()).collect(),
            callers: callers.iter().map(|c| c.to_string().try_into().unwrap()).collect(),
        })
    }

    #[test]
    fn parses_patterns_and_rejects_bad_ones() {
        assert_eq!(MethodPattern::try_from("*".to_string()), Ok(MethodPattern::Any));
        assert_eq!(MethodPattern::try_from("a.B/*".to_string()), Ok(MethodPattern::Service("a.B".into())));
        for bad in ["a.B", "a.B/M*", "*/M", "/M", "a.B/"] {
            assert!(MethodPattern::try_from(bad.to_string()).is_err(), "{bad}");
        }
        assert!(CallerPattern::try_from("spiffe://td/ns/*".to_string()).is_ok());
        assert!(CallerPattern::try_from("checkout".to_string()).unwrap_err().contains("SPIFFE"));
    }

    #[test]
    fn prefix_patterns_match_whole_segments() {
        let pattern = CallerPattern::try_from("spiffe://td/ns/shop/*".to_string()).unwrap();
        assert!(pattern.matches(&id("spiffe://td/ns/shop/sa/checkout")));
        assert!(!pattern.matches(&id("spiffe://td/ns/shopping/sa/x")));
    }

    #[test]
    fn governing_rules_decide_and_the_default_covers_the_rest() {
        let rules = vec![
            rule("checkout-reads", &["shop.Inventory/*"], &["spiffe://td/checkout"]),
            rule("ops", &["shop.Inventory/Reset"], &["spiffe://td/ns/ops/*"]),
        ];
        let get = MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "shop.Inventory", "Get", None);
        assert_eq!(get.check(&id("spiffe://td/checkout")), Ok(()));
        assert_eq!(
            get.check(&id("spiffe://td/ns/ops/sa/admin")),
            Err(Denial::NoRuleAllows(vec!["checkout-reads".into()]))
        );
        let reset = MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "shop.Inventory", "Reset", None);
        assert_eq!(reset.check(&id("spiffe://td/ns/ops/sa/admin")), Ok(()));
        let other = MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "shop.Pricing", "Quote", None);
        assert_eq!(other.check(&id("spiffe://td/checkout")), Err(Denial::DefaultDeny));
        let open = MethodAuthz::resolve(&rules, DefaultAuthorization::AllAuthenticated, "shop.Pricing", "Quote", None);
        assert_eq!(open.check(&id("spiffe://td/anyone")), Ok(()));
    }

    #[test]
    fn a_contract_rule_governs_its_method() {
        let contract = rule("contract", &["*"], &["spiffe://td/checkout"]);
        let authz = MethodAuthz::resolve(&[], DefaultAuthorization::AllAuthenticated, "s.S", "M", Some(contract));
        assert!(authz.check(&id("spiffe://td/checkout")).is_ok());
        let denial = authz.check(&id("spiffe://td/other")).unwrap_err();
        assert_eq!(denial.to_string(), "not allowed by authorization rule \"contract\"");
    }
}
