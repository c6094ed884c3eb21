//! A JSON call's request message: the HTTP body where the route puts it,
//! the path's variables, and the query parameters for every field neither
//! binds, read with the proto3 JSON mapping.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json};

use super::routes::{Body, Route, field_path};
use super::template::Binding;

/// Why a request could not be read; the caller answers INVALID_ARGUMENT.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// The request message `route` makes of a path's `bindings`, a `query`
/// string and a `body`.
pub fn request_message(
    route: &Route,
    bindings: &[Binding],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, BadRequest> {
    let bad = |why: String| BadRequest(why);
    let mut message = match &route.body {
        Body::None if !body.iter().all(u8::is_ascii_whitespace) => {
            return Err(bad(format!(
                "{} takes no body: its google.api.http rule names no `body`; send the fields as query parameters",
                route.template
            )));
        }
        Body::None => DynamicMessage::new(route.request.clone()),
        Body::All => from_json_body(&route.request, body, None)?,
        Body::Field(field) => from_json_body(&route.request, body, Some(field))?,
    };
    let mut bound = Map::new();
    for binding in bindings {
        let leaf = field_path(&route.request, &binding.field).map_err(bad)?;
        insert(&mut bound, &binding.field, scalar(&leaf, &binding.value), &binding.field.join("."))?;
    }
    let mut queried: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let path: Vec<String> = name.split('.').map(str::to_string).collect();
        match queried.iter_mut().find(|(known, _)| *known == path) {
            Some((_, values)) => values.push(value.into_owned()),
            None => queried.push((path, vec![value.into_owned()])),
        }
    }
    for (path, values) in queried {
        let name = path.join(".");
        let refuse = |why: &str| bad(format!("query parameter `{name}`: {why}"));
        if route.body == Body::All {
            return Err(refuse("the body is the whole request (`body: \"*\"`), so the query sets nothing"));
        }
        let leaf = field_path(&route.request, &path).map_err(|why| refuse(&why))?;
        let top = route.request.get_field_by_name(&path[0]).or_else(|| route.request.get_field_by_json_name(&path[0]));
        if let (Body::Field(body), Some(top)) = (&route.body, top)
            && *body == top
        {
            return Err(refuse("the body sets that field"));
        }
        if route.template.fields().any(|field| field == path.as_slice()) {
            return Err(refuse("the path sets that field"));
        }
        if leaf.is_map() || (matches!(leaf.kind(), Kind::Message(_)) && !is_well_known_value(&leaf)) {
            return Err(refuse("names a message; set its fields, as `field.subfield=value`"));
        }
        let value = match (leaf.is_list(), values.as_slice()) {
            (true, _) => Json::Array(values.iter().map(|value| scalar(&leaf, value)).collect()),
            (false, [one]) => scalar(&leaf, one),
            (false, _) => return Err(refuse("given more than once for a field that is not repeated")),
        };
        insert(&mut bound, &path, value, &name)?;
    }
    if !bound.is_empty() {
        // The path and the query win over the body: merged after it.
        let fields = DynamicMessage::deserialize(route.request.clone(), Json::Object(bound))
            .map_err(|e| bad(format!("the path or query: {e}")))?;
        message.merge(fields.encode_to_vec().as_slice()).map_err(|e| bad(format!("the path or query: {e}")))?;
    }
    Ok(message)
}

/// The body as the whole message, or as `field` of it.
fn from_json_body(
    request: &MessageDescriptor,
    body: &[u8],
    field: Option<&FieldDescriptor>,
) -> Result<DynamicMessage, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(request.clone()));
    }
    let what = field.map_or_else(|| request.full_name().to_string(), |field| format!("its field `{}`", field.name()));
    let bad = |e: serde_json::Error| BadRequest(format!("the body is not the JSON of {what}: {e}"));
    match field {
        None => {
            let mut json = serde_json::Deserializer::from_slice(body);
            let message = DynamicMessage::deserialize(request.clone(), &mut json).map_err(bad)?;
            json.end().map_err(bad)?;
            Ok(message)
        }
        Some(field) => {
            let value: Json = serde_json::from_slice(body).map_err(bad)?;
            let wrapped = Json::Object(Map::from_iter([(field.name().to_string(), value)]));
            DynamicMessage::deserialize(request.clone(), wrapped).map_err(bad)
        }
    }
}

/// Puts `value` at `path` in `object`, making the messages on the way.
fn insert(object: &mut Map<String, Json>, path: &[String], value: Json, name: &str) -> Result<(), BadRequest> {
    let (last, parents) = path.split_last().expect("a field path has a field");
    let mut current = object;
    for parent in parents {
        let next = current.entry(parent.clone()).or_insert_with(|| Json::Object(Map::new()));
        current = next
            .as_object_mut()
            .ok_or_else(|| BadRequest(format!("`{name}` goes through `{parent}`, which is set as a value")))?;
    }
    if current.insert(last.clone(), value).is_some() {
        return Err(BadRequest(format!("`{name}` is set twice")));
    }
    Ok(())
}

/// A path or query value as the JSON the field's kind reads: proto3 JSON
/// takes numbers, enums and well-known types as strings, but a bool only
/// as `true` or `false`, and an enum's number only as a number.
fn scalar(field: &FieldDescriptor, value: &str) -> Json {
    let is_bool = match field.kind() {
        Kind::Bool => true,
        Kind::Message(message) => message.full_name() == "google.protobuf.BoolValue",
        _ => false,
    };
    match value {
        "true" | "false" if is_bool => Json::Bool(value == "true"),
        number if matches!(field.kind(), Kind::Enum(_)) && number.parse::<i32>().is_ok() => {
            Json::from(number.parse::<i32>().expect("checked"))
        }
        _ => Json::String(value.to_string()),
    }
}

/// Well-known types whose JSON is a single value (a timestamp, a duration,
/// a wrapped scalar, a field mask), which a query parameter can carry.
fn is_well_known_value(field: &FieldDescriptor) -> bool {
    let Kind::Message(message) = field.kind() else { return false };
    let name = message.full_name();
    name.starts_with("google.protobuf.")
        && (name.ends_with("Value") && !matches!(name, "google.protobuf.Value" | "google.protobuf.ListValue")
            || matches!(name, "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"))
}
