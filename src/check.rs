//! `protomesh check`: the effective configuration and every method's policy,
//! with the source that set each field.

use std::fmt::Write;

use crate::config::{Config, ContractMode, DefaultAuthorization};
use crate::contract::{Contracts, Idempotency};
use crate::identity::Identity;
use crate::policy::method::{MethodPolicy, Sourced};

pub fn report(config: &Config, identity: &Identity, contracts: &Contracts) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "identity  {}", identity.id);
    let _ = writeln!(out, "runtime   {} worker thread(s)", config.worker_threads);
    let _ = writeln!(out, "outbound  listen {}", config.outbound.listen);
    for upstream in &config.outbound.upstreams {
        let _ = writeln!(
            out,
            "  {} -> {} (must present {})",
            upstream.services.join(", "),
            upstream.endpoints.join(", "),
            upstream.identity
        );
    }
    match &config.inbound {
        None => out.push_str("inbound   disabled\n"),
        Some(inbound) => {
            let _ = writeln!(
                out,
                "inbound   listen {} -> app {}; default authorization {}; {} rule(s)",
                inbound.listen,
                inbound.app,
                match inbound.authorization.default {
                    DefaultAuthorization::AllAuthenticated => "all-authenticated",
                    DefaultAuthorization::Deny => "deny",
                },
                inbound.authorization.rules.len()
            );
        }
    }
    let services = contracts.services();
    let methods: usize = services.values().map(Vec::len).sum();
    let _ = writeln!(
        out,
        "contracts {}: {methods} method(s) in {} service(s)",
        match config.contracts.mode {
            ContractMode::Strict => "strict",
            ContractMode::Permissive => "permissive",
        },
        services.len()
    );
    for (service, methods) in services {
        let routed = config.outbound.upstreams.iter().find(|u| u.services.iter().any(|s| s == service));
        let route =
            routed.map_or_else(|| "no outbound route".to_string(), |u| format!("-> {}", u.endpoints.join(", ")));
        let _ = writeln!(out, "\n{service}  [{}]  {route}", methods[0].file);
        for method in methods {
            let idempotency = match method.idempotency {
                Idempotency::Unknown => "",
                Idempotency::NoSideEffects => "  no-side-effects",
                Idempotency::Idempotent => "  idempotent",
            };
            let _ = writeln!(out, "  {:<24} {}{idempotency}", method.method, method.shape);
            let policy = MethodPolicy::resolve(&method.service, &method.method, Some(method), &config.policy);
            field(&mut out, "timeout", policy.timeout.as_ref(), |d| format!("{d:?}"));
            field(&mut out, "idle_timeout", policy.idle_timeout.as_ref(), |d| format!("{d:?}"));
            field(&mut out, "stream_timeout", policy.stream_timeout.as_ref(), |d| format!("{d:?}"));
            field(&mut out, "retry", policy.retry.as_ref(), |r| {
                let codes: Vec<_> = r.retryable_codes.iter().map(|c| c.name()).collect();
                format!(
                    "{} attempts on {}, backoff {:?}..{:?} x{}",
                    r.max_attempts,
                    codes.join(", "),
                    r.initial_backoff,
                    r.max_backoff,
                    r.backoff_multiplier
                )
            });
            field(&mut out, "concurrency", policy.concurrency.as_ref(), |c| {
                format!("{} in flight, queue {} for {:?}", c.max_in_flight, c.max_queue, c.queue_timeout)
            });
            field(&mut out, "allowed_callers", method.contract.allowed_callers.as_ref(), |callers| {
                callers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            });
        }
    }
    out
}

fn field<T>(out: &mut String, name: &str, value: Option<&Sourced<T>>, show: impl Fn(&T) -> String) {
    if let Some(Sourced { value, source }) = value {
        let _ = writeln!(out, "      {name:<16} {:<40} from {source}", show(value));
    }
}
