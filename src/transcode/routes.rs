//! The JSON routes of one version of the contracts: every `google.api.http`
//! binding (and, when asked, `POST /pkg.Service/Method`) of the methods a
//! listener opens, checked against the request and response types at load
//! and sorted so that the first to match a request is the most specific;
//! two that match the same paths fail the load.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, Value};

use super::template::{Binding, PathTemplate};
use crate::contract::{Contracts, MethodInfo};

/// The `google.api.http` method option.
const HTTP_OPTION: &str = "google.api.http";

pub struct JsonRoutes {
    routes: Vec<Arc<Route>>,
}

/// One binding of a method to an HTTP method and path template.
pub struct Route {
    /// `None` for `custom: {kind: "*"}`: any HTTP method.
    pub verb: Option<Method>,
    pub template: PathTemplate,
    pub method: Arc<MethodInfo>,
    pub request: MessageDescriptor,
    pub response: MessageDescriptor,
    pub body: Body,
    /// The response field that is the HTTP body; the whole response if `None`.
    pub response_body: Option<FieldDescriptor>,
    /// The largest body read, in bytes.
    pub max_body: usize,
}

/// Where the HTTP body goes in the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body: the route takes only its path and query.
    None,
    /// `*`: every field the path does not bind.
    All,
    /// One top-level field.
    Field(FieldDescriptor),
}

/// What a request's method and path find.
pub enum Found {
    Route(Arc<Route>, Vec<Binding>),
    /// The path is a route's, but for these other HTTP methods.
    OtherMethods(Vec<String>),
    Nothing,
}

impl JsonRoutes {
    /// The routes of the methods `opened` lets through; with
    /// `default_routes`, every such method also answers
    /// `POST /pkg.Service/Method`. `max_body` is each method's cap on a
    /// body. Errors name the contract file, the method and the binding.
    pub fn build(
        contracts: &Contracts,
        opened: impl Fn(&MethodInfo) -> bool,
        default_routes: bool,
        max_body: impl Fn(&MethodInfo) -> usize,
    ) -> Result<JsonRoutes, String> {
        let pool = contracts.descriptors();
        let option = pool.get_extension_by_name(HTTP_OPTION);
        let mut routes = Vec::new();
        let mut methods: Vec<&Arc<MethodInfo>> = contracts.methods().filter(|info| opened(info)).collect();
        methods.sort_by(|a, b| a.path.cmp(&b.path));
        for info in methods {
            let Some(descriptor) = pool
                .get_service_by_name(&info.service)
                .and_then(|service| service.methods().find(|method| method.name() == info.method))
            else {
                continue;
            };
            let context = |binding: &str, why: String| {
                format!("{}: method {}: google.api.http {binding}: {why}", info.file, info.path)
            };
            let new_route = |verb: Option<Method>, template: &str, body: &str, response_body: &str| {
                let binding = format!("`{} {template}`", verb.as_ref().map_or("*", Method::as_str));
                Route::new(verb, template, (body, response_body), info, &descriptor, max_body(info))
                    .map_err(|why| context(&binding, why))
            };
            let rule = option.as_ref().filter(|option| descriptor.options().has_extension(option));
            if let Some(option) = rule
                && let Value::Message(rule) = descriptor.options().get_extension(option).as_ref()
            {
                for rule in std::iter::once(rule).chain(additional_bindings(rule).iter()) {
                    let Some((verb, template)) = pattern(rule).map_err(|why| context("", why))? else {
                        continue;
                    };
                    routes.push(new_route(verb, &template, &text(rule, "body"), &text(rule, "response_body"))?);
                }
            }
            if default_routes {
                routes.push(new_route(Some(Method::POST), &info.path, "*", "")?);
            }
        }
        routes.sort_by(|a, b| a.template.specificity(&b.template));
        let mut taken: HashMap<(Option<&Method>, String), &Route> = HashMap::with_capacity(routes.len());
        for route in &routes {
            if let Some(other) = taken.insert((route.verb.as_ref(), route.template.shape()), route) {
                return Err(format!(
                    "{}: method {}: google.api.http `{} {}` matches the paths of {}'s `{}`; a path may lead to one method",
                    route.method.file,
                    route.method.path,
                    route.verb.as_ref().map_or("*", Method::as_str),
                    route.template,
                    other.method.path,
                    other.template
                ));
            }
        }
        Ok(JsonRoutes { routes: routes.into_iter().map(Arc::new).collect() })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().map(Arc::as_ref)
    }

    /// The first route, most specific first, whose template matches `path`
    /// (without its query) for `method`.
    pub fn find(&self, method: &Method, path: &str) -> Found {
        let mut others = Vec::new();
        for route in &self.routes {
            let Some(bindings) = route.template.matches(path) else { continue };
            match &route.verb {
                None => return Found::Route(route.clone(), bindings),
                Some(verb) if verb == method => return Found::Route(route.clone(), bindings),
                Some(verb) => others.push(verb.to_string()),
            }
        }
        match others.is_empty() {
            true => Found::Nothing,
            false => {
                others.sort();
                others.dedup();
                Found::OtherMethods(others)
            }
        }
    }
}

impl Route {
    fn new(
        verb: Option<Method>,
        template: &str,
        (body, response_body): (&str, &str),
        info: &Arc<MethodInfo>,
        descriptor: &MethodDescriptor,
        max_body: usize,
    ) -> Result<Route, String> {
        let template = PathTemplate::parse(template)?;
        let request = descriptor.input();
        for field in template.fields() {
            let leaf = field_path(&request, field)?;
            if leaf.is_list() || leaf.is_map() || matches!(leaf.kind(), Kind::Message(_)) {
                return Err(format!(
                    "the path binds `{}`, which is a {}: a path sets only a single scalar field",
                    field.join("."),
                    kind_name(&leaf)
                ));
            }
        }
        let body = match body {
            "" => Body::None,
            "*" => Body::All,
            name => Body::Field(
                request
                    .get_field_by_name(name)
                    .ok_or_else(|| format!("body: {} has no field `{name}`", request.full_name()))?,
            ),
        };
        let response = descriptor.output();
        let response_body = match response_body {
            "" => None,
            name => Some(
                response
                    .get_field_by_name(name)
                    .ok_or_else(|| format!("response_body: {} has no field `{name}`", response.full_name()))?,
            ),
        };
        Ok(Route { verb, template, method: info.clone(), request, response, body, response_body, max_body })
    }
}

/// The fields a path names, from `message` down; every one but the last a
/// singular message.
pub fn field_path(message: &MessageDescriptor, path: &[String]) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut found = None;
    for (at, name) in path.iter().enumerate() {
        if let Some(field) = &found {
            let Kind::Message(inner) = FieldDescriptor::kind(field) else {
                return Err(format!("`{}` is not a message: it has no field `{name}`", path[..at].join(".")));
            };
            if field.is_list() || field.is_map() {
                return Err(format!("`{}` is repeated: a path cannot go through it", path[..at].join(".")));
            }
            current = inner;
        }
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field `{name}`", current.full_name()))?;
        found = Some(field);
    }
    found.ok_or_else(|| "an empty field path".to_string())
}

fn kind_name(field: &FieldDescriptor) -> String {
    match (field.is_map(), field.is_list(), field.kind()) {
        (true, _, _) => "map".into(),
        (_, true, _) => "repeated field".into(),
        (_, _, Kind::Message(message)) => format!("message ({})", message.full_name()),
        (_, _, kind) => format!("{kind:?}").to_lowercase(),
    }
}

/// A rule's HTTP method and template; `None` for a rule with no pattern.
fn pattern(rule: &DynamicMessage) -> Result<Option<(Option<Method>, String)>, String> {
    for (field, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            return Ok(Some((Some(method), text(rule, field))));
        }
    }
    let Some(custom) = rule.get_field_by_name("custom").filter(|_| rule.has_field_by_name("custom")) else {
        return Ok(None);
    };
    let Value::Message(custom) = custom.as_ref() else { return Ok(None) };
    let kind = text(custom, "kind");
    let verb = match kind.as_str() {
        "*" => None,
        kind => {
            Some(Method::from_bytes(kind.as_bytes()).map_err(|_| format!("custom: `{kind}` is not an HTTP method"))?)
        }
    };
    Ok(Some((verb, text(custom, "path"))))
}

fn text(message: &DynamicMessage, field: &str) -> String {
    message.get_field_by_name(field).and_then(|value| value.as_str().map(str::to_string)).unwrap_or_default()
}

fn additional_bindings(rule: &DynamicMessage) -> Vec<DynamicMessage> {
    let Some(bindings) = rule.get_field_by_name("additional_bindings") else { return Vec::new() };
    let Some(list) = bindings.as_list() else { return Vec::new() };
    list.iter().filter_map(|binding| binding.as_message().cloned()).collect()
}
