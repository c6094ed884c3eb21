//! Services paired by full name, and their methods by name: a method kept,
//! with its request and response types, streaming and idempotency.

use prost_reflect::MethodDescriptor;

use super::{At, Report, Rule, Side};

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (name, was, now) in Side::pairs(&old.services, &new.services) {
        for method in was.methods() {
            let Some(kept) = now.methods().find(|m| m.name() == method.name()) else {
                let at = At::Element(now.parent_file(), now.path().to_vec());
                report.add(Rule::RpcNoDelete, at, format!("method /{name}/{} was deleted", method.name()));
                continue;
            };
            same_method(&method, &kept, report);
        }
    }
}

fn same_method(was: &MethodDescriptor, now: &MethodDescriptor, report: &mut Report<'_>) {
    let path = format!("/{}/{}", now.parent_service().full_name(), now.name());
    let streaming = |streams: bool| if streams { "streaming" } else { "unary" };
    let changes = [
        (
            Rule::RpcSameRequestType,
            "request type",
            was.input().full_name().to_string(),
            now.input().full_name().to_string(),
        ),
        (
            Rule::RpcSameResponseType,
            "response type",
            was.output().full_name().to_string(),
            now.output().full_name().to_string(),
        ),
        (
            Rule::RpcSameClientStreaming,
            "client side",
            streaming(was.is_client_streaming()).into(),
            streaming(now.is_client_streaming()).into(),
        ),
        (
            Rule::RpcSameServerStreaming,
            "server side",
            streaming(was.is_server_streaming()).into(),
            streaming(now.is_server_streaming()).into(),
        ),
        (Rule::RpcSameIdempotencyLevel, "idempotency_level", idempotency(was), idempotency(now)),
    ];
    for (rule, what, from, to) in changes {
        if from != to {
            let at = At::Element(now.parent_file(), now.path().to_vec());
            report.add(rule, at, format!("method {path}: {what} changed from {from} to {to}"));
        }
    }
}

fn idempotency(method: &MethodDescriptor) -> String {
    let level = method.method_descriptor_proto().options.as_ref().map(|o| o.idempotency_level());
    level.unwrap_or_default().as_str_name().to_string()
}
