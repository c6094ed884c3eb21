//! The rules one by one are cross-checked against buf by
//! `tests/mesh/breaking.rs`; these test what the sidecar's reload makes of
//! them, and where findings point.

use std::path::Path;

use super::*;
use crate::contract::ContractsConfig;

fn contracts(source: &str) -> Contracts {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.proto"), source).unwrap();
    let config = ContractsConfig {
        protos: vec![Path::new("s.proto").into()],
        include: vec![dir.path().into()],
        ..Default::default()
    };
    Contracts::load(&config).unwrap()
}

fn reload_breaks(old: &str, new: &str) -> Vec<String> {
    breaking_changes(&contracts(old), &contracts(new)).iter().map(ToString::to_string).collect()
}

const BASE: &str = r#"syntax = "proto3"; package p;
message A { int32 n = 1; }
message B {}
service S { rpc Get(A) returns (B); rpc Watch(A) returns (stream B); }
service T { rpc Ping(A) returns (A); }
"#;

#[test]
fn additions_and_moves_within_a_package_do_not_stop_a_reload() {
    let added = BASE
        .replace("service T {", "service U { rpc New(A) returns (B); } service T { rpc More(A) returns (B);")
        .replace("int32 n = 1;", "int32 n = 1; string added = 2;");
    assert_eq!(reload_breaks(BASE, &added), Vec::<String>::new());
    let options = BASE.replace("package p;", "package p; option go_package = \"example.com/p\";");
    assert_eq!(reload_breaks(BASE, &options), Vec::<String>::new(), "generated code's options are no caller's concern");
}

#[test]
fn a_reload_names_what_callers_of_the_running_contracts_would_meet() {
    let changed = r#"syntax = "proto3"; package p;
message A { int64 n = 1; }
message B {}
service S { rpc Get(A) returns (A); rpc Watch(stream A) returns (stream B); }
"#;
    assert_eq!(
        reload_breaks(BASE, changed),
        [
            "s.proto: service T was deleted from package \"p\" (PACKAGE_SERVICE_NO_DELETE)",
            "s.proto:2:13: field 1 \"n\" of message p.A changed type from int32 to int64, which the binary or the JSON \
             encoding reads differently (FIELD_WIRE_JSON_COMPATIBLE_TYPE)",
            "s.proto:4:13: method /p.S/Get: response type changed from p.B to p.A (RPC_SAME_RESPONSE_TYPE)",
            "s.proto:4:37: method /p.S/Watch: client side changed from unary to streaming (RPC_SAME_CLIENT_STREAMING)",
        ]
    );
    let fewer = BASE.replace("rpc Watch(A) returns (stream B); ", "");
    assert_eq!(reload_breaks(BASE, &fewer), ["s.proto:4:1: method /p.S/Watch was deleted (RPC_NO_DELETE)"]);
    let elsewhere = BASE.replace("package p;", "package q;");
    assert_eq!(
        reload_breaks(BASE, &elsewhere),
        [
            "s.proto: package changed from \"p\" to \"q\" (FILE_SAME_PACKAGE)",
            "s.proto: package \"p\" was deleted (PACKAGE_NO_DELETE)",
        ]
    );
}

#[test]
fn the_reload_rules_are_wire_json_and_the_deletions_callers_meet_as_unimplemented() {
    let rules = reload_rules();
    assert!(Rule::of(&[Category::WireJson]).iter().all(|rule| rules.contains(rule)));
    assert!(rules.contains(&Rule::RpcNoDelete) && rules.contains(&Rule::PackageServiceNoDelete));
    assert!(!rules.contains(&Rule::FileNoDelete), "contracts may move between files");
}

#[test]
fn nested_names_are_relative_to_the_package() {
    assert_eq!(nested_name("p.v1.Outer.Inner", "p.v1"), "Outer.Inner");
    assert_eq!(nested_name("Outer", ""), "Outer");
}
