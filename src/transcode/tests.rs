//! The mapping checked on the examples `google/api/http.proto` documents
//! (each `Messaging` variant below is one of them, with the HTTP request and
//! the request message the document gives), then on what they leave out:
//! query parameters of every kind, response bodies, errors and statuses.

use http::Method;
use prost_reflect::DynamicMessage;
use serde_json::{Value as Json, json};

use super::*;
use crate::contract::{Contracts, ContractsConfig};
use crate::grpc::Code;

const CONTRACT: &str = r#"
syntax = "proto3";
package doc.v1;
import "google/api/annotations.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// The examples of http.proto, one service each where they differ.
service Messaging {
  rpc GetMessage(GetMessageRequest) returns (Message) {
    option (google.api.http) = {
      get: "/v1/messages/{message_id}/{sub.subfield}"
      additional_bindings { get: "/v1/messages/{message_id}" }
      additional_bindings { get: "/v1/users/{user_id}/messages/{message_id}" }
    };
  }
  rpc UpdateMessage(UpdateMessageRequest) returns (Message) {
    option (google.api.http) = { patch: "/v1/messages/{message_id}" body: "message" };
  }
  rpc UpdateWhole(Message) returns (Message) {
    option (google.api.http) = { put: "/v1/messages/{message_id}" body: "*" };
  }
  rpc GetResource(ResourceRequest) returns (Message) {
    option (google.api.http) = { get: "/v1/{name=resources/*}" response_body: "text" };
  }
  rpc Cancel(ResourceRequest) returns (Message) {
    option (google.api.http) = { custom: { kind: "*" path: "/v1/{name=operations/**}:cancel" } };
  }
  rpc Search(SearchRequest) returns (SearchReply) {
    option (google.api.http) = { get: "/v1/search" };
  }
  rpc Plain(Message) returns (Message);
  rpc Upload(stream Message) returns (Message) {
    option (google.api.http) = { post: "/v1/upload" body: "*" };
  }
}

message GetMessageRequest {
  message SubMessage { string subfield = 1; }
  string message_id = 1;
  int64 revision = 2;
  SubMessage sub = 3;
  string user_id = 4;
}
message Message {
  string message_id = 1;
  string text = 2;
}
message UpdateMessageRequest {
  string message_id = 1;
  Message message = 2;
}
message ResourceRequest { string name = 1; }
enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }
message SearchRequest {
  repeated string tags = 1;
  bool exact = 2;
  Color color = 3;
  double score = 4;
  uint64 limit = 5;
  google.protobuf.Timestamp after = 6;
  google.protobuf.BoolValue archived = 7;
  bytes token = 8;
  GetMessageRequest.SubMessage sub = 9;
}
message SearchReply { repeated Message found = 1; }
"#;

fn contracts() -> Contracts {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doc.proto"), CONTRACT).unwrap();
    let config =
        ContractsConfig { protos: vec!["doc.proto".into()], include: vec![dir.path().into()], ..Default::default() };
    Contracts::load(&config).unwrap()
}

fn routes(default_routes: bool) -> (Contracts, JsonRoutes) {
    let contracts = contracts();
    let routes = JsonRoutes::build(&contracts, |_| true, default_routes, |_| 1 << 20).unwrap();
    (contracts, routes)
}

/// The method a request reaches, and its request message as JSON.
fn call(routes: &JsonRoutes, method: Method, uri: &str, body: &str) -> Result<(String, Json), String> {
    let (path, query) = uri.split_once('?').map_or((uri, None), |(path, query)| (path, Some(query)));
    let Found::Route(route, bindings) = routes.find(&method, path) else { return Err("no route".into()) };
    let message = request_message(&route, &bindings, query, body.as_bytes()).map_err(|e| e.0)?;
    Ok((route.method.method.clone(), serde_json::to_value(&message).unwrap()))
}

#[test]
fn the_documented_examples_map_as_documented() {
    let (_, routes) = routes(false);
    let get = |uri| call(&routes, Method::GET, uri, "").unwrap();
    // `GET /v1/messages/123456/foo` | `GetMessage(message_id: "123456" sub: SubMessage(subfield: "foo"))`
    assert_eq!(
        get("/v1/messages/123456/foo"),
        ("GetMessage".into(), json!({"messageId": "123456", "sub": {"subfield": "foo"}}))
    );
    // `GET /v1/messages/123456?revision=2&sub.subfield=foo`
    assert_eq!(
        get("/v1/messages/123456?revision=2&sub.subfield=foo"),
        ("GetMessage".into(), json!({"messageId": "123456", "revision": "2", "sub": {"subfield": "foo"}}))
    );
    // additional_bindings: `GET /v1/users/me/messages/123456`
    assert_eq!(
        get("/v1/users/me/messages/123456"),
        ("GetMessage".into(), json!({"messageId": "123456", "userId": "me"}))
    );
    // `PATCH /v1/messages/123456 { "text": "Hi!" }` with `body: "message"`
    assert_eq!(
        call(&routes, Method::PATCH, "/v1/messages/123456", r#"{"text": "Hi!"}"#).unwrap(),
        ("UpdateMessage".into(), json!({"messageId": "123456", "message": {"text": "Hi!"}}))
    );
    // `PUT /v1/messages/123456 { "text": "Hi!" }` with `body: "*"`
    assert_eq!(
        call(&routes, Method::PUT, "/v1/messages/123456", r#"{"text": "Hi!"}"#).unwrap(),
        ("UpdateWhole".into(), json!({"messageId": "123456", "text": "Hi!"}))
    );
    // `GET /v1/{name=resources/*}`: the variable takes the literal with it.
    assert_eq!(get("/v1/resources/42"), ("GetResource".into(), json!({"name": "resources/42"})));
    assert_eq!(
        get("/v1/messages/42:x"),
        ("GetMessage".into(), json!({"messageId": "42:x"})),
        "no verb: the colon is the value's"
    );
}

#[test]
fn templates_with_variables_of_many_segments_verbs_and_any_method() {
    let (_, routes) = routes(false);
    assert_eq!(
        call(&routes, Method::POST, "/v1/operations/a/b:cancel", "").unwrap(),
        ("Cancel".into(), json!({"name": "operations/a/b"}))
    );
    assert_eq!(
        call(&routes, Method::DELETE, "/v1/operations/x:cancel", "").unwrap().0,
        "Cancel",
        "custom `*`: any method"
    );
    match routes.find(&Method::DELETE, "/v1/messages/1") {
        Found::OtherMethods(methods) => assert_eq!(methods, ["GET", "PATCH", "PUT"]),
        _ => panic!("the path is known, for other methods"),
    }
    assert!(matches!(routes.find(&Method::GET, "/v2/nothing"), Found::Nothing));
    assert!(matches!(routes.find(&Method::POST, "/doc.v1.Messaging/Plain"), Found::Nothing), "no default routes");
    let (_, with_defaults) = self::routes(true);
    assert_eq!(
        call(&with_defaults, Method::POST, "/doc.v1.Messaging/Plain", r#"{"messageId": "1"}"#).unwrap(),
        ("Plain".into(), json!({"messageId": "1"}))
    );
}

#[test]
fn query_parameters_follow_each_fields_kind() {
    let (_, routes) = routes(false);
    let uri = "/v1/search?tags=a&tags=b%20c&exact=true&color=GREEN&score=1.5&limit=18446744073709551615\
               &after=2026-12-07T00:00:00Z&archived=false&token=aGk&sub.subfield=x";
    let (_, message) = call(&routes, Method::GET, uri, "").unwrap();
    assert_eq!(
        message,
        json!({"tags": ["a", "b c"], "exact": true, "color": "GREEN", "score": 1.5, "limit": "18446744073709551615",
               "after": "2026-12-07T00:00:00Z", "archived": false, "token": "aGk=", "sub": {"subfield": "x"}})
    );
    assert_eq!(
        call(&routes, Method::GET, "/v1/search?color=1", "").unwrap().1,
        json!({"color": "RED"}),
        "an enum's number"
    );
    let refused = |uri: &str| call(&routes, Method::GET, uri, "").unwrap_err();
    assert!(refused("/v1/search?nope=1").contains("query parameter `nope`: doc.v1.SearchRequest has no field `nope`"));
    assert!(refused("/v1/search?exact=maybe").contains("the path or query"));
    assert!(refused("/v1/search?limit=-1").contains("the path or query"));
    assert!(refused("/v1/search?sub=x").contains("names a message; set its fields"));
    assert!(refused("/v1/search?exact=true&exact=false").contains("more than once"));
    assert!(refused("/v1/messages/1?message_id=2").contains("the path sets that field"));
    let whole_body = call(&routes, Method::PUT, "/v1/messages/1?text=x", "{}").unwrap_err();
    assert!(whole_body.contains("the query sets nothing"), "{whole_body}");
    let body_field = call(&routes, Method::PATCH, "/v1/messages/1?message.text=x", "{}").unwrap_err();
    assert!(body_field.contains("the body sets that field"), "{body_field}");
}

#[test]
fn a_body_that_is_not_the_requests_json_is_refused_saying_where() {
    let (_, routes) = routes(false);
    let put = |body: &str| call(&routes, Method::PUT, "/v1/messages/1", body).unwrap_err();
    let error = put(r#"{"text": "Hi!""#);
    assert!(error.starts_with("the body is not the JSON of doc.v1.Message: EOF while parsing"), "{error}");
    assert!(put(r#"{"text": 5}"#).contains("line 1 column"), "the place of a wrong type");
    let unknown = put(r#"{"unknown": 1}"#);
    assert!(
        unknown.contains("unrecognized field name `unknown`") || unknown.contains("unrecognized field name 'unknown'"),
        "{unknown}"
    );
    assert!(put(r#"{} {}"#).contains("trailing characters"));
    let error = call(&routes, Method::PATCH, "/v1/messages/1", "[1]").unwrap_err();
    assert!(error.starts_with("the body is not the JSON of its field `message`"), "{error}");
    let error = call(&routes, Method::GET, "/v1/messages/1", "{}").unwrap_err();
    assert!(error.contains("takes no body"), "{error}");
    assert_eq!(
        call(&routes, Method::PUT, "/v1/messages/1", " ").unwrap().1,
        json!({"messageId": "1"}),
        "an empty body"
    );
    assert_eq!(
        call(&routes, Method::PUT, "/v1/messages/1", r#"{"messageId": "2"}"#).unwrap().1,
        json!({"messageId": "1"}),
        "the path wins over the body"
    );
}

#[test]
fn responses_are_the_message_or_the_field_response_body_names() {
    let (contracts, routes) = routes(false);
    let Found::Route(whole, _) = routes.find(&Method::PUT, "/v1/messages/1") else { panic!() };
    let Found::Route(text, _) = routes.find(&Method::GET, "/v1/resources/1") else { panic!() };
    let message = |json: Json| {
        DynamicMessage::deserialize(contracts.descriptors().get_message_by_name("doc.v1.Message").unwrap(), json)
            .unwrap()
    };
    let hi = message(json!({"messageId": "1", "text": "Hi!"}));
    assert_eq!(response_json(&whole, &hi).unwrap(), br#"{"messageId":"1","text":"Hi!"}"#);
    assert_eq!(response_json(&text, &hi).unwrap(), br#""Hi!""#);
    assert_eq!(response_json(&text, &message(json!({}))).unwrap(), br#""""#, "unset: its default");
}

#[test]
fn statuses_map_to_http_and_carry_their_details_as_json() {
    assert_eq!(http_status(Code::InvalidArgument), 400);
    assert_eq!(http_status(Code::Unauthenticated), 401);
    assert_eq!(http_status(Code::PermissionDenied), 403);
    assert_eq!(http_status(Code::NotFound), 404);
    assert_eq!(http_status(Code::ResourceExhausted), 429);
    assert_eq!(http_status(Code::Cancelled), 499);
    assert_eq!(http_status(Code::Unimplemented), 501);
    assert_eq!(http_status(Code::Unavailable), 503);
    assert_eq!(http_status(Code::DeadlineExceeded), 504);
    let bad_request = prost_types::Any {
        type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
        value: vec![0x0a, 0x07, 0x0a, 0x01, b'a', 0x12, 0x02, b'n', b'o'],
    };
    let unknown = prost_types::Any { type_url: "type.googleapis.com/x.Unknown".into(), value: vec![1] };
    let header = crate::grpc::status_details(Code::InvalidArgument, "bad", vec![bad_request, unknown]);
    let json: Json =
        serde_json::from_slice(&status_json(Code::InvalidArgument, "bad", Some(header.as_bytes()), &[])).unwrap();
    assert_eq!(
        json,
        json!({"code": 3, "message": "bad", "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "a", "description": "no"}]}
        ]}),
        "a detail of an unknown type is left out"
    );
}

#[test]
fn bindings_that_do_not_fit_the_types_fail_the_load_naming_the_method() {
    let dir = tempfile::tempdir().unwrap();
    let contract = |rule: &str| {
        format!(
            r#"syntax = "proto3"; package bad.v1; import "google/api/annotations.proto";
            message R {{ string id = 1; repeated string ids = 2; R inner = 3; }}
            service S {{ rpc M(R) returns (R) {{ option (google.api.http) = {{ {rule} }}; }}
                         rpc N(R) returns (R) {{ option (google.api.http) = {{ get: "/v1/same" }}; }} }}"#
        )
    };
    let error = |rule: &str| {
        std::fs::write(dir.path().join("bad.proto"), contract(rule)).unwrap();
        let config = ContractsConfig {
            protos: vec!["bad.proto".into()],
            include: vec![dir.path().into()],
            ..Default::default()
        };
        let contracts = Contracts::load(&config).unwrap();
        JsonRoutes::build(&contracts, |_| true, false, |_| 1).err().expect("refused")
    };
    let missing = error(r#"get: "/v1/{nope}""#);
    assert_eq!(
        missing,
        "bad.proto: method /bad.v1.S/M: google.api.http `GET /v1/{nope}`: bad.v1.R has no field `nope`"
    );
    assert!(error(r#"get: "/v1/{ids}""#).contains("binds `ids`, which is a repeated field"));
    assert!(error(r#"get: "/v1/{inner}""#).contains("binds `inner`, which is a message (bad.v1.R)"));
    assert!(error(r#"post: "/v1/x" body: "nope""#).contains("body: bad.v1.R has no field `nope`"));
    assert!(error(r#"get: "/v1/x" response_body: "nope""#).contains("response_body: bad.v1.R has no field `nope`"));
    assert!(error(r##"get: "/v1/{id""##).contains("not closed"));
    let clash = error(r#"get: "/v1/same""#);
    assert!(
        clash.contains(
            "method /bad.v1.S/N: google.api.http `GET /v1/same` matches the paths of /bad.v1.S/M's `/v1/same`"
        ),
        "{clash}"
    );
    let shadowing = error(r#"get: "/v1/{id=same}""#);
    assert!(shadowing.contains("matches the paths of /bad.v1.S/M's `/v1/{id=same}`"), "{shadowing}");
}

#[test]
fn only_the_opened_methods_have_routes() {
    let contracts = contracts();
    let routes = JsonRoutes::build(&contracts, |info| info.method == "Search", true, |_| 1).unwrap();
    let paths: Vec<&str> = routes.iter().map(|route| route.template.as_str()).collect();
    assert_eq!(paths, ["/v1/search", "/doc.v1.Messaging/Search"]);
}
