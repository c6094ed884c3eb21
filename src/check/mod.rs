//! `protomesh check`: the effective configuration and every method's policy,
//! with the source that set each field; `breaking.rs`, `check --breaking`.

pub mod breaking;

use std::fmt::Write;

use crate::app::Inputs;
use crate::effective;
use crate::proxy::inbound::InboundRoutes;
use crate::transcode::JsonRoutes;

pub fn report(inputs: &Inputs) -> String {
    let Inputs { config, contracts, credentials, .. } = inputs;
    let mut out = String::new();
    let _ = writeln!(out, "identity  {}", credentials.id);
    let _ = writeln!(out, "runtime   {} worker thread(s)", config.worker_threads);
    let _ = writeln!(out, "outbound  listen {}", config.outbound.listen);
    for upstream in &config.outbound.upstreams {
        let _ = writeln!(
            out,
            "  {} -> {} (must present {})",
            upstream.services.join(", "),
            upstream.endpoints.join(", "),
            upstream.identity.as_ref().map_or("each its pod's service account".to_string(), ToString::to_string)
        );
        if let Some(check) = &upstream.health_check {
            let service = if check.service.is_empty() { "the whole server" } else { check.service.as_str() };
            let _ = writeln!(
                out,
                "    health checked every {:?} (timeout {:?}) for {service}: out after {} failed, back after {} SERVING",
                check.interval, check.timeout, check.unhealthy_threshold, check.healthy_threshold
            );
        }
    }
    let original = &config.outbound.original_destination;
    if original.enabled {
        let domain = original.trust_domain.as_deref().unwrap_or_else(|| credentials.id.trust_domain());
        let plaintext: Vec<String> = original.plaintext_networks.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  captured calls no upstream routes -> their original destination (mTLS, any identity in {domain}; plaintext to [{}])",
            plaintext.join(", ")
        );
    }
    match &config.inbound {
        None => out.push_str("inbound   disabled\n"),
        Some(inbound) => {
            let _ = writeln!(
                out,
                "inbound   listen {} -> app {}; mTLS {}; default authorization {}; {} rule(s); health checks answered by {}",
                inbound.listen,
                inbound.app.map_or_else(|| "127.0.0.1:<captured port>".to_string(), |app| app.to_string()),
                inbound.mtls.mode.as_str(),
                inbound.authorization.default.as_str(),
                inbound.authorization.rules.len(),
                inbound.health.describe()
            );
            if let Some(web) = &inbound.web {
                let methods: Vec<String> = web.methods.iter().map(ToString::to_string).collect();
                let origins = if web.allowed_origins.is_empty() {
                    "same origin only".into()
                } else {
                    web.allowed_origins.join(", ")
                };
                let listen = web.listen.map(|listen| format!("listen {listen}"));
                let ports = (!web.ports.is_empty()).then(|| {
                    let ports: Vec<String> = web.ports.iter().map(ToString::to_string).collect();
                    format!("captured ports [{}]", ports.join(", "))
                });
                let _ = writeln!(
                    out,
                    "  web {} (gRPC-Web, JSON {}): callers without a certificate may call [{}]; origins: {origins}",
                    listen.into_iter().chain(ports).collect::<Vec<_>>().join(", "),
                    web.json.as_str(),
                    methods.join(", ")
                );
                // Inputs::read built these once already: they compile.
                let json = InboundRoutes::json_routes(inbound, &config.policy, contracts).ok().flatten();
                for route in json.iter().flat_map(JsonRoutes::iter) {
                    let verb = route.verb.as_ref().map_or("*", http::Method::as_str);
                    let _ = writeln!(out, "    JSON {verb} {} -> {}", route.template, route.method.path);
                }
            }
        }
    }
    let services = effective::describe(contracts, &config.policy);
    let methods: usize = services.iter().map(|(_, methods)| methods.len()).sum();
    let mode = config.contracts.mode.as_str();
    let _ = writeln!(out, "contracts {mode}: {methods} method(s) in {} service(s)", services.len());
    for (service, methods) in services {
        let routed = config.outbound.upstreams.iter().find(|u| u.services.contains(&service));
        let route =
            routed.map_or_else(|| "no outbound route".to_string(), |u| format!("-> {}", u.endpoints.join(", ")));
        let _ = writeln!(out, "\n{service}  [{}]  {route}", methods[0].file);
        for method in methods {
            out.push_str(&method.to_text());
        }
    }
    out
}
