//! Request validation on whatever a caller sends: the input is a stream of
//! gRPC messages for a request type with rules of every kind (strings,
//! patterns and formats, numbers, lists, maps, nested messages, a oneof,
//! well-known types, CEL), cut into frames after every byte 0xff, and
//! checked as the sidecar checks a client stream. Each message passes or is
//! refused with a status the policy names; nothing panics, and what passes
//! is exactly the messages before the first refused, each whole.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use protomesh::contract::{Contracts, ContractsConfig};
use protomesh::grpc::Code;
use protomesh::policy::{MethodPolicy, PolicyConfig};
use protomesh::policy::validate::RequestRules;

const CONTRACT: &str = r#"
syntax = "proto3";
package fuzz.v1;
import "buf/validate/validate.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/timestamp.proto";
service Orders { rpc Place(stream Order) returns (Order); }
message Order {
  string id = 1 [(buf.validate.field).string = {min_len: 1, max_len: 32, pattern: "^[a-z0-9-]+$"}];
  string email = 2 [(buf.validate.field).string.email = true];
  string site = 3 [(buf.validate.field).string.uri = true];
  string host = 4 [(buf.validate.field).string.hostname = true];
  string ip = 5 [(buf.validate.field).string.ip = true];
  bytes token = 6 [(buf.validate.field).bytes = {min_len: 4, max_len: 64}];
  repeated Line lines = 7 [(buf.validate.field).repeated = {min_items: 1, max_items: 8, unique: false}];
  map<string, int64> counts = 8 [(buf.validate.field).map = {max_pairs: 4, keys: {string: {min_len: 1}}, values: {int64: {gte: 0}}}];
  oneof payment {
    option (buf.validate.oneof).required = true;
    string card = 9 [(buf.validate.field).string.len = 16];
    uint32 voucher = 10 [(buf.validate.field).uint32.gt = 0];
  }
  google.protobuf.Duration hold = 11 [(buf.validate.field).duration = {lte: {seconds: 3600}}];
  google.protobuf.Timestamp at = 12 [(buf.validate.field).timestamp.gt = {seconds: 0}];
  double total = 13 [(buf.validate.field).double = {gte: 0, finite: true}];
  repeated string tags = 14 [(buf.validate.field).repeated = {unique: true, items: {string: {max_len: 8}}}];
  option (buf.validate.message).cel = {
    id: "lines_total" message: "total is the sum of the lines"
    expression: "this.lines.map(l, l.cents).all(c, c >= 0) && size(this.id) + size(this.tags) < 100"
  };
}
message Line {
  string sku = 1 [(buf.validate.field).string.pattern = "^[A-Z][0-9]{1,6}$"];
  int64 cents = 2 [(buf.validate.field).int64 = {gte: 0, lt: 100000000}];
  Line bundle = 3;
}
"#;

fn rules() -> &'static Arc<RequestRules> {
    static RULES: OnceLock<(tempfile::TempDir, Arc<RequestRules>)> = OnceLock::new();
    &RULES
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("fuzz.proto"), CONTRACT).unwrap();
            let config = ContractsConfig {
                protos: vec!["fuzz.proto".into()],
                include: vec![dir.path().to_path_buf()],
                ..Default::default()
            };
            let contracts = Contracts::load(&config).unwrap();
            let policy = PolicyConfig {
                defaults: serde_json::from_value(serde_json::json!({"validate": true, "max_message_size": 4096}))
                    .unwrap(),
                ..Default::default()
            };
            let method = contracts.method("/fuzz.v1.Orders/Place").expect("the contract's method");
            let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), &policy);
            let rules = effective.request_rules(&contracts, method, &Default::default()).unwrap();
            (dir, rules.expect("the method has rules"))
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let mut checking = rules().checking(None).unwrap();
    let mut passed = Vec::new();
    let mut refused = None;
    for frame in data.split_inclusive(|&b| b == 0xff) {
        if let Err(error) = checking.take(frame) {
            let code = error.code();
            assert!(
                matches!(code, Code::InvalidArgument | Code::ResourceExhausted | Code::Internal),
                "{code:?}: {error}"
            );
            assert!(error.to_string().starts_with("request message "), "{error}");
            refused = Some(error);
            break;
        }
        passed.extend_from_slice(&checking.take_passed().unwrap_or_default());
    }
    if refused.is_none() {
        passed.extend_from_slice(&checking.rest());
        assert_eq!(passed, data, "a stream that passes goes on unchanged");
    } else {
        passed.extend_from_slice(&checking.take_passed().unwrap_or_default());
        assert!(data.starts_with(&passed), "what passed is the stream's start");
    }
});
