//! A JSON call's answer: the response message (or the field the route
//! names) in the proto3 JSON mapping, or a failed call's status as a JSON
//! `google.rpc.Status` under the HTTP status gRPC's mapping gives.

use std::sync::LazyLock;

use base64::Engine;
use http::StatusCode;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, SerializeOptions};
use serde_json::{Map, Value as Json};

use super::routes::Route;
use crate::grpc::{Code, RpcStatus};

/// The HTTP status for a gRPC status, as grpc-gateway and Envoy's
/// transcoder map it (`google.rpc.Code`'s documented HTTP mapping).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The response as JSON: the whole message, or the route's `response_body`
/// field of it. It fails only for an `Any` whose type the contracts lack.
pub fn response_json(route: &Route, message: &DynamicMessage) -> Result<Vec<u8>, String> {
    let cannot = |error: serde_json::Error| format!("the response cannot be written as JSON: {error}");
    let Some(field) = &route.response_body else {
        return serde_json::to_vec(message).map_err(cannot);
    };
    // The field's JSON as the whole message's JSON has it; an unset field
    // is written as its default, since the body cannot be absent.
    let options = SerializeOptions::new().skip_default_fields(message.has_field(field));
    let mut only = DynamicMessage::new(message.descriptor());
    only.set_field(field, message.get_field(field).into_owned());
    let whole = only.serialize_with_options(serde_json::value::Serializer, &options).map_err(cannot)?;
    let json = whole.get(field.json_name()).cloned().unwrap_or(Json::Null);
    Ok(serde_json::to_vec(&json).expect("a JSON value serializes"))
}

/// A status as JSON `google.rpc.Status`: its code, its message and the
/// details of `grpc-status-details-bin` (`details`), each written with the
/// first of `pools` that knows its type, or left out.
pub fn status_json(code: Code, message: &str, details: Option<&[u8]>, pools: &[&DescriptorPool]) -> Vec<u8> {
    let mut status = Map::new();
    status.insert("code".into(), Json::from(code as i32));
    status.insert("message".into(), Json::from(message));
    let decoded = details.and_then(|value| {
        let value = value.strip_suffix(b"==").or_else(|| value.strip_suffix(b"=")).unwrap_or(value);
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(value).ok()?;
        RpcStatus::decode(bytes.as_slice()).ok()
    });
    let details: Vec<Json> = decoded.map_or_else(Vec::new, |status| {
        status.details.iter().filter_map(|any| detail_json(&any.type_url, &any.value, pools)).collect()
    });
    if !details.is_empty() {
        status.insert("details".into(), Json::Array(details));
    }
    serde_json::to_vec(&Json::Object(status)).expect("a JSON value serializes")
}

/// One detail as proto3 JSON writes an `Any`: `@type`, then its fields.
fn detail_json(type_url: &str, value: &[u8], pools: &[&DescriptorPool]) -> Option<Json> {
    let name = type_url.rsplit('/').next()?;
    let built_in = [&*ERROR_DETAILS];
    let descriptor = pools.iter().copied().chain(built_in).find_map(|pool| pool.get_message_by_name(name))?;
    let message = DynamicMessage::decode(descriptor, value).ok()?;
    let Json::Object(fields) = serde_json::to_value(&message).ok()? else { return None };
    let mut detail = Map::from_iter([("@type".to_string(), Json::from(type_url))]);
    detail.extend(fields);
    Some(Json::Object(detail))
}

/// `google.rpc.BadRequest`, which the sidecar's own refusals carry, and
/// `buf.validate.Violations`, so that both are written even when no
/// contract imports them. The message and field names and numbers are those
/// of the published `google/rpc/error_details.proto`.
static ERROR_DETAILS: LazyLock<DescriptorPool> = LazyLock::new(|| {
    const SOURCE: &str = r#"
        syntax = "proto3";
        package google.rpc;
        message BadRequest {
          message FieldViolation {
            string field = 1;
            string description = 2;
            string reason = 3;
          }
          repeated FieldViolation field_violations = 1;
        }
    "#;
    let mut pool = prost_protovalidate::types::DESCRIPTOR_POOL.clone();
    let mut compiler = protox::Compiler::with_file_resolver(Single(SOURCE));
    compiler.open_file(Single::NAME).expect("the source compiles");
    pool.add_file_descriptor_set(compiler.file_descriptor_set()).expect("no clash with buf.validate");
    pool
});

/// Resolves the one file above.
struct Single(&'static str);

impl Single {
    const NAME: &str = "protomesh/error_details.proto";
}

impl protox::file::FileResolver for Single {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match name == Single::NAME {
            true => protox::file::File::from_source(name, self.0),
            false => Err(protox::Error::file_not_found(name)),
        }
    }
}
