//! The JSON routes on whatever an HTTP client sends: the input is a method
//! byte, a path with its query, and a body, cut at the first two newlines.
//! The path finds a route of a contract with templates of every kind
//! (variables of one and many segments, `**`, verbs, nested fields, any
//! method) or none; the request message is made of the path, the query and
//! the body, or refused saying why; what is made encodes, decodes and is
//! written as JSON again.
//! The same input is also parsed as a path template and matched against
//! itself. Nothing panics.
#![no_main]

use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_reflect::DynamicMessage;
use protomesh::contract::{Contracts, ContractsConfig};
use protomesh::transcode::{Found, JsonRoutes, PathTemplate, request_message};

const CONTRACT: &str = r#"
syntax = "proto3";
package fuzz.v1;
import "google/api/annotations.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
service Shelves {
  rpc Get(Request) returns (Request) {
    option (google.api.http) = {
      get: "/v1/{name=shelves/*}"
      additional_bindings { get: "/v1/shelves/{inner.id}/books/{inner.book=**}" }
      additional_bindings { custom: { kind: "*" path: "/v1/{name=ops/**}:cancel" } }
    };
  }
  rpc Put(Request) returns (Request) {
    option (google.api.http) = { put: "/v1/shelves/{id}" body: "*" };
  }
  rpc Patch(Request) returns (Request) {
    option (google.api.http) = { patch: "/v1/shelves/{id}" body: "inner" response_body: "inner" };
  }
  rpc Post(Request) returns (Request) {
    option (google.api.http) = { post: "/v1/{name=**}:run" body: "tags" };
  }
}
enum Kind { KIND_UNSPECIFIED = 0; A = 1; B = 2; }
message Inner { string id = 1; string book = 2; repeated int64 n = 3; Kind kind = 4; }
message Request {
  string name = 1;
  int32 id = 2;
  Inner inner = 3;
  repeated string tags = 4;
  bool flag = 5;
  double score = 6;
  bytes token = 7;
  google.protobuf.Timestamp at = 8;
  google.protobuf.Int64Value count = 9;
  map<string, string> labels = 10;
  oneof choice { string left = 11; uint64 right = 12; }
}
"#;

fn routes() -> &'static JsonRoutes {
    static ROUTES: OnceLock<(tempfile::TempDir, JsonRoutes)> = OnceLock::new();
    &ROUTES
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("fuzz.proto"), CONTRACT).unwrap();
            let config = ContractsConfig {
                protos: vec!["fuzz.proto".into()],
                include: vec![dir.path().to_path_buf()],
                ..Default::default()
            };
            let contracts = Contracts::load(&config).unwrap();
            let routes = JsonRoutes::build(&contracts, |_| true, true, |_| 1 << 16).unwrap();
            (dir, routes)
        })
        .1
}

const METHODS: [Method; 5] = [Method::GET, Method::PUT, Method::POST, Method::PATCH, Method::DELETE];

fuzz_target!(|data: &[u8]| {
    let Some((&method, rest)) = data.split_first() else { return };
    let method = &METHODS[usize::from(method) % METHODS.len()];
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let uri = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    let (path, query) = uri.split_once('?').map_or((&*uri, None), |(path, query)| (path, Some(query)));
    if let Found::Route(route, bindings) = routes().find(method, path)
        && let Ok(message) = request_message(&route, &bindings, query, body)
    {
        let encoded = message.encode_to_vec();
        let decoded = DynamicMessage::decode(route.request.clone(), encoded.as_slice()).expect("it decodes");
        serde_json::to_vec(&decoded).expect("and is written as JSON again");
    }

    if let Ok(template) = PathTemplate::parse(&uri) {
        let fields = template.fields().count();
        if let Some(bindings) = template.matches(path) {
            assert_eq!(bindings.len(), fields, "each variable takes a value");
        }
    }
});
