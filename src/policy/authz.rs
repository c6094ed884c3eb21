//! Inbound authorization: which caller identities may call which methods.
//!
//! A method is governed by every rule whose method patterns match it (config
//! rules, and the contract's `allowed_callers` options). If any rule governs
//! it, the caller must match one of those rules; otherwise the default applies.
//! The governing rules are found once per method when the routes are built;
//! [`Authorize`] checks the caller of each call against them.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::Request;
use serde::Deserialize;
use tower::Service;

use crate::call::{CallService, Caller, PolicyError, ProxyError};
use crate::grpc::Code;
use crate::identity::SpiffeId;

/// `inbound.authorization` in the config.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// What applies to a method no rule (and no `allowed_callers` option) names.
    #[serde(default)]
    pub default: DefaultAuthorization,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

impl AuthorizationConfig {
    /// Each error is (field path, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, rule) in self.rules.iter().enumerate() {
            let at = |field: &str| format!("inbound.authorization.rules[{i}].{field}");
            if rule.methods.is_empty() {
                return Err((at("methods"), "list at least one pattern, e.g. \"shop.v1.Inventory/*\"".into()));
            }
            if rule.callers.is_empty() {
                return Err((at("callers"), "list at least one SPIFFE ID pattern, or \"*\"".into()));
            }
        }
        Ok(())
    }

    /// The configured rules, shared by every method they govern.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        self.rules
            .iter()
            .map(|r| Arc::new(Rule { name: r.name.clone(), methods: r.methods.clone(), callers: r.callers.clone() }))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAuthorization {
    /// Any caller with a certificate from the trust bundle.
    #[default]
    AllAuthenticated,
    Deny,
}

impl DefaultAuthorization {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultAuthorization::AllAuthenticated => "all-authenticated",
            DefaultAuthorization::Deny => "deny",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    pub name: String,
    /// `pkg.Service/Method`, `pkg.Service/*` or `*`.
    pub methods: Vec<MethodPattern>,
    /// SPIFFE IDs: exact, a prefix ending in `/*`, or `*` for any authenticated caller.
    pub callers: Vec<CallerPattern>,
}

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

impl fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MethodPattern::Any => f.write_str("*"),
            MethodPattern::Service(service) => write!(f, "{service}/*"),
            MethodPattern::Method { service, method } => write!(f, "{service}/{method}"),
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
    /// Open to callers without a certificate (`inbound.web.methods`).
    unauthenticated: bool,
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
        MethodAuthz { governing, default, unauthenticated: false }
    }

    /// Opens the method to callers without a certificate.
    pub fn open_to_unauthenticated(mut self, open: bool) -> MethodAuthz {
        self.unauthenticated = open;
        self
    }

    /// `Err` carries a message naming the policy that denied the call.
    pub fn check(&self, caller: Option<&SpiffeId>) -> Result<(), Denial> {
        let Some(caller) = caller else {
            return if self.unauthenticated { Ok(()) } else { Err(Denial::Unauthenticated) };
        };
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

/// The caller may not call the method.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    pub caller: Option<SpiffeId>,
    pub path: String,
    pub denial: Denial,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.caller {
            Some(caller) => write!(f, "caller {caller} may not call {}: {}", self.path, self.denial),
            None => write!(f, "a caller without a certificate may not call {}: {}", self.path, self.denial),
        }
    }
}

impl std::error::Error for Denied {}

impl PolicyError for Denied {
    fn code(&self) -> Code {
        Code::PermissionDenied
    }

    fn reason(&self) -> &'static str {
        "denied"
    }
}

/// Checks the call's [`Caller`] against the method's governing rules; a call
/// without a caller is unauthenticated.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    authz: Arc<MethodAuthz>,
}

impl<S> Authorize<S> {
    pub fn new(authz: Arc<MethodAuthz>, inner: S) -> Self {
        Authorize { inner, authz }
    }
}

impl<S, B> Service<Request<B>> for Authorize<S>
where
    S: CallService<B>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<Ready<Result<S::Response, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(caller) = request.extensions().get::<Caller>() else {
            let why = "no verified caller came with the call".into();
            return Either::Left(ready(Err(ProxyError::NoCallerIdentity { why })));
        };
        match self.authz.check(caller.id.as_ref()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(denial) => {
                let denied = Denied { caller: caller.id.clone(), path: request.uri().path().to_string(), denial };
                Either::Left(ready(Err(denied.into())))
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denial {
    DefaultDeny,
    NoRuleAllows(Vec<String>),
    /// Callers without a certificate (gRPC-Web's) reach only the methods opened to them.
    Unauthenticated,
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
            Denial::Unauthenticated => f.write_str("inbound.web.methods does not list it"),
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
        assert_eq!(get.check(Some(&id("spiffe://td/checkout"))), Ok(()));
        assert_eq!(
            get.check(Some(&id("spiffe://td/ns/ops/sa/admin"))),
            Err(Denial::NoRuleAllows(vec!["checkout-reads".into()]))
        );
        let reset = MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "shop.Inventory", "Reset", None);
        assert_eq!(reset.check(Some(&id("spiffe://td/ns/ops/sa/admin"))), Ok(()));
        let other = MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "shop.Pricing", "Quote", None);
        assert_eq!(other.check(Some(&id("spiffe://td/checkout"))), Err(Denial::DefaultDeny));
        let open = MethodAuthz::resolve(&rules, DefaultAuthorization::AllAuthenticated, "shop.Pricing", "Quote", None);
        assert_eq!(open.check(Some(&id("spiffe://td/anyone"))), Ok(()));
    }

    #[test]
    fn a_caller_without_a_certificate_reaches_only_what_is_opened_to_it() {
        let authz = MethodAuthz::resolve(&[], DefaultAuthorization::AllAuthenticated, "s.S", "M", None);
        assert_eq!(authz.check(None), Err(Denial::Unauthenticated), "not even under the default");
        let opened = authz.open_to_unauthenticated(true);
        assert_eq!(opened.check(None), Ok(()));
        let denied = Denied { caller: None, path: "/s.S/M".into(), denial: Denial::Unauthenticated };
        assert_eq!(
            denied.to_string(),
            "a caller without a certificate may not call /s.S/M: inbound.web.methods does not list it"
        );
    }

    #[test]
    fn a_contract_rule_governs_its_method() {
        let contract = rule("contract", &["*"], &["spiffe://td/checkout"]);
        let authz = MethodAuthz::resolve(&[], DefaultAuthorization::AllAuthenticated, "s.S", "M", Some(contract));
        assert!(authz.check(Some(&id("spiffe://td/checkout"))).is_ok());
        let denial = authz.check(Some(&id("spiffe://td/other"))).unwrap_err();
        assert_eq!(denial.to_string(), "not allowed by authorization rule \"contract\"");
    }

    #[tokio::test]
    async fn the_layer_lets_allowed_callers_through_and_names_the_rule_to_others() {
        use tower::ServiceExt;
        let rules = [rule("readers", &["s.S/*"], &["spiffe://td/reader"])];
        let authz = Arc::new(MethodAuthz::resolve(&rules, DefaultAuthorization::Deny, "s.S", "Get", None));
        let ok =
            tower::service_fn(|_: Request<()>| async { Ok(http::Response::new(crate::call::ResponseBody::empty())) });
        let layer = Authorize::new(authz, ok);
        let call = |caller: Option<&str>| {
            let mut request = Request::builder().uri("/s.S/Get").body(()).unwrap();
            if let Some(caller) = caller {
                request
                    .extensions_mut()
                    .insert(Caller { id: Some(id(caller)), address: "10.0.0.1:1234".parse().unwrap() });
            }
            request
        };
        assert!(layer.clone().oneshot(call(Some("spiffe://td/reader"))).await.is_ok());
        let denied = layer.clone().oneshot(call(Some("spiffe://td/writer"))).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.to_string(),
            "caller spiffe://td/writer may not call /s.S/Get: not allowed by authorization rule \"readers\""
        );
        let anonymous = layer.oneshot(call(None)).await.unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);
    }
}
