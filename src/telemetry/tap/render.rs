//! A tapped call as its tap shows it: JSON, with each message decoded from
//! the method's types in the contracts, and what must not be shown
//! redacted: fields marked `debug_redact` or `(protomesh.v1.redact)`, as
//! well as the credentials in metadata (`capture.rs`).

use prost_reflect::{DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, Value as Field};
use serde_json::{Map, Value, json};

use super::{Copied, TapFilter, Tapped};

/// When a call started: RFC 3339, to the millisecond, in UTC.
const STARTED: &[time::format_description::BorrowedFormatItem<'_>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Shown in place of a redacted value.
pub const REDACTED: &str = "[REDACTED]";

/// The protomesh option that redacts a field, for code generators that know
/// no `debug_redact`.
const REDACT_OPTION: &str = "protomesh.v1.redact";

/// Headers whose values are credentials: `authorization`, cookies, API keys,
/// and any whose name speaks of a token, secret, password or session.
fn sensitive(name: &str) -> bool {
    matches!(name, "authorization" | "proxy-authorization" | "cookie" | "set-cookie")
        || ["token", "secret", "password", "passwd", "credential", "api-key", "apikey", "session"]
            .iter()
            .any(|word| name.contains(word))
}

/// The event for one tap: `types` are the method's request and response
/// messages (`None`: no contract declares it, and messages show their size
/// only); `lost` what the tap lost since its last event (to its rate, to a
/// reader behind).
pub fn render(
    event: &Tapped,
    types: Option<(MessageDescriptor, MessageDescriptor)>,
    filter: &TapFilter,
    lost: (u64, u64),
) -> Value {
    let started = time::OffsetDateTime::from(event.started).format(STARTED).unwrap_or_default();
    let (request_type, response_type) = types.unzip();
    // The copy kept what the most generous tap asked for; this tap sees what it asked for.
    let shown = |copied: &[Copied], skipped: u32, message: Option<&MessageDescriptor>| {
        let kept = copied.len().min(filter.max_messages);
        let past = u32::try_from(copied.len() - kept).unwrap_or(u32::MAX);
        (messages(&copied[..kept], message, filter.max_bytes), skipped.saturating_add(past))
    };
    let (requests, requests_skipped) = shown(&event.requests, event.requests_skipped, request_type.as_ref());
    let (responses, responses_skipped) = shown(&event.responses, event.responses_skipped, response_type.as_ref());
    json!({
        "direction": event.direction.as_str(),
        "method": event.path,
        "caller": event.caller.as_ref().map(|id| id.as_str()),
        "peer": event.peer,
        "started": started,
        "duration_ms": event.duration.as_secs_f64() * 1e3,
        "headers_ms": event.headers_after.map(|d| d.as_secs_f64() * 1e3),
        "status": event.status.name(),
        "status_message": event.status_message,
        "request_metadata": metadata(&event.request_metadata),
        "response_metadata": metadata(&event.response_metadata),
        "trailers": metadata(&event.trailers),
        "requests": requests,
        "requests_skipped": requests_skipped,
        "responses": responses,
        "responses_skipped": responses_skipped,
        "lost": {"rate": lost.0, "slow_reader": lost.1},
    })
}

/// Headers by name, credentials [`REDACTED`]; a name sent more than once
/// has its values joined by `, `.
fn metadata(headers: &http::HeaderMap) -> Value {
    let mut object = Map::new();
    for (name, value) in headers {
        let shown = if sensitive(name.as_str()) { REDACTED.into() } else { String::from_utf8_lossy(value.as_bytes()) };
        match object.get_mut(name.as_str()) {
            Some(Value::String(values)) => {
                values.push_str(", ");
                values.push_str(&shown);
            }
            _ => {
                object.insert(name.as_str().to_string(), Value::String(shown.into_owned()));
            }
        }
    }
    Value::Object(object)
}

fn messages(copied: &[Copied], message: Option<&MessageDescriptor>, max_bytes: usize) -> Vec<Value> {
    copied.iter().map(|copy| one(copy, message, max_bytes)).collect()
}

fn one(copy: &Copied, message: Option<&MessageDescriptor>, max_bytes: usize) -> Value {
    let size = copy.size;
    let bytes = match (&copy.bytes, message) {
        _ if copy.compressed => return json!({"size": size, "compressed": true}),
        (Some(bytes), Some(_)) if bytes.len() <= max_bytes => bytes,
        (_, None) => return json!({"size": size, "undecoded": "no contract declares the method"}),
        _ => return json!({"size": size, "truncated": true}),
    };
    let message = message.expect("matched above");
    match DynamicMessage::decode(message.clone(), bytes.as_ref()) {
        Ok(decoded) => match serde_json::to_value(&decoded) {
            Ok(mut json) => {
                redact(&mut json, message);
                json!({"size": size, "json": json})
            }
            Err(error) => json!({"size": size, "error": error.to_string()}),
        },
        Err(error) => json!({"size": size, "error": format!("not a {}: {error}", message.full_name())}),
    }
}

/// Replaces the value of every redacted field, at any depth, with [`REDACTED`].
fn redact(json: &mut Value, message: &MessageDescriptor) {
    // The well-known types have JSON forms of their own, and nothing to redact.
    if message.package_name() == "google.protobuf" {
        return;
    }
    let Value::Object(object) = json else { return };
    let option = message.parent_pool().get_extension_by_name(REDACT_OPTION);
    for field in message.fields() {
        let Some(value) = object.get_mut(field.json_name()) else { continue };
        if redacted(&field, option.as_ref()) {
            *value = Value::String(REDACTED.into());
            continue;
        }
        let Kind::Message(inner) = field.kind() else { continue };
        if field.is_map() {
            if let (Kind::Message(values), Value::Object(entries)) = (inner.map_entry_value_field().kind(), value) {
                entries.values_mut().for_each(|entry| redact(entry, &values));
            }
        } else if let Value::Array(items) = value {
            items.iter_mut().for_each(|item| redact(item, &inner));
        } else {
            redact(value, &inner);
        }
    }
}

fn redacted(field: &FieldDescriptor, option: Option<&ExtensionDescriptor>) -> bool {
    let options = field.options();
    let debug_redact =
        options.get_field_by_name("debug_redact").is_some_and(|v| matches!(v.as_ref(), Field::Bool(true)));
    let ours = option.is_some_and(|ext| {
        options.has_extension(ext) && matches!(options.get_extension(ext).as_ref(), Field::Bool(true))
    });
    debug_redact || ours
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;
    use prost::Message as _;

    use super::*;
    use crate::call::Direction;
    use crate::grpc::Code;

    const CONTRACT: &str = r#"syntax = "proto3"; package p;
import "protomesh/v1/options.proto";
message Card { string number = 1 [debug_redact = true]; string holder = 2; }
message Order {
  string id = 1;
  Card card = 2;
  repeated Card cards = 3;
  map<string, Card> by_name = 4;
  string note = 5 [(protomesh.v1.redact) = true];
}
service S { rpc Put(Order) returns (Order); }
"#;

    fn order_type() -> MessageDescriptor {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.proto"), CONTRACT).unwrap();
        let config = crate::contract::ContractsConfig {
            protos: vec!["p.proto".into()],
            include: vec![dir.path().into()],
            ..Default::default()
        };
        let contracts = crate::contract::Contracts::load(&config).unwrap();
        contracts.method_types("/p.S/Put").unwrap().0
    }

    fn event(requests: Vec<Copied>) -> Tapped {
        Tapped {
            direction: Direction::Inbound,
            path: "/p.S/Put".into(),
            caller: None,
            peer: None,
            started: SystemTime::UNIX_EPOCH,
            headers_after: None,
            duration: Duration::from_millis(2),
            status: Code::Ok,
            status_message: String::new(),
            request_metadata: http::HeaderMap::new(),
            response_metadata: http::HeaderMap::new(),
            trailers: http::HeaderMap::new(),
            requests,
            responses: vec![],
            requests_skipped: 0,
            responses_skipped: 0,
            _held: Default::default(),
        }
    }

    #[test]
    fn redacted_fields_are_hidden_at_any_depth_and_messages_past_the_caps_are_not_decoded() {
        let order = order_type();
        let card = |number: &str| {
            let mut card = DynamicMessage::new(order.parent_pool().get_message_by_name("p.Card").unwrap());
            card.set_field_by_name("number", Field::String(number.into()));
            card.set_field_by_name("holder", Field::String("Ada".into()));
            Field::Message(card)
        };
        let mut message = DynamicMessage::new(order.clone());
        message.set_field_by_name("id", Field::String("o1".into()));
        message.set_field_by_name("card", card("4111"));
        message.set_field_by_name("cards", Field::List(vec![card("4222")]));
        let mut by_name = std::collections::HashMap::new();
        by_name.insert(prost_reflect::MapKey::String("main".into()), card("4333"));
        message.set_field_by_name("by_name", Field::Map(by_name));
        message.set_field_by_name("note", Field::String("leave at door".into()));
        let bytes = Bytes::from(message.encode_to_vec());
        let size = u32::try_from(bytes.len()).unwrap();
        let copies = vec![
            Copied { size, compressed: false, bytes: Some(bytes.clone()) },
            Copied { size, compressed: true, bytes: Some(bytes) },
            Copied { size: 9000, compressed: false, bytes: None },
        ];
        let filter = TapFilter { max_messages: 2, ..TapFilter::default() };
        let shown = render(&event(copies), Some((order.clone(), order)), &filter, (1, 2));
        let redacted = serde_json::json!({"number": REDACTED, "holder": "Ada"});
        assert_eq!(
            shown["requests"][0]["json"],
            serde_json::json!({
                "id": "o1", "card": redacted, "cards": [redacted], "byName": {"main": redacted}, "note": REDACTED,
            })
        );
        assert_eq!(shown["requests"][1], serde_json::json!({"size": size, "compressed": true}));
        assert_eq!(shown["requests_skipped"], 1, "past this tap's --messages");
        assert_eq!(shown["lost"], serde_json::json!({"rate": 1, "slow_reader": 2}));

        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        headers.insert("x-session-id", "s1".parse().unwrap());
        headers.append("x-tag", "a".parse().unwrap());
        headers.append("x-tag", "b".parse().unwrap());
        assert_eq!(
            metadata(&headers),
            serde_json::json!({"authorization": REDACTED, "x-session-id": REDACTED, "x-tag": "a, b"})
        );

        let unknown = render(
            &event(vec![Copied { size: 3, compressed: false, bytes: Some(Bytes::from_static(b"abc")) }]),
            None,
            &filter,
            (0, 0),
        );
        assert_eq!(unknown["requests"][0]["undecoded"], "no contract declares the method");
        let garbled = Copied { size: 2, compressed: false, bytes: Some(Bytes::from_static(b"\xff\xff")) };
        let order = order_type();
        let shown = render(&event(vec![garbled]), Some((order.clone(), order)), &filter, (0, 0));
        assert!(shown["requests"][0]["error"].as_str().unwrap().starts_with("not a p.Order"), "{shown}");
    }
}
