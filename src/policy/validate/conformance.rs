//! protovalidate's conformance cases, run against the validator the sidecar
//! uses. `tests/validate/import_cases.py` imports them from protovalidate's
//! repository into `cases.json`, beside the cases' `.proto` files; each case
//! names its message by its Go type and fields, which are mapped here onto
//! the contracts' descriptors. A case passes as protovalidate's harness
//! judges by default: the same verdict, and for violations the same field
//! paths, rule paths, rule ids and map-key marks. The cases that fail are
//! listed in `expected_failures.txt`, so that a change either way is seen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value as Proto};
use protox::file::{ChainFileResolver, GoogleFileResolver, IncludeFileResolver};
use serde_json::Value;

use super::tests::BuiltInRules;
use super::*;

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/validate");
const PACKAGE: &str = "buf.validate.conformance.cases";

/// Every case file that compiles, and those that do not (editions, which
/// the contracts' compiler does not take).
fn pool() -> (DescriptorPool, Vec<String>) {
    let root = Path::new(CASES).join("proto");
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pending = vec![root.join("buf/validate/conformance/cases")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "proto") {
                files.push(path.strip_prefix(&root).unwrap().to_path_buf());
            }
        }
    }
    files.sort();
    let mut chain = ChainFileResolver::new();
    chain.add(IncludeFileResolver::new(root.clone()));
    chain.add(BuiltInRules);
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true);
    let mut refused = Vec::new();
    for file in files {
        if let Err(error) = compiler.open_file(&file) {
            refused.push(format!("{} ({error})", file.display()));
        }
    }
    (compiler.descriptor_pool(), refused)
}

/// Messages by their Go name as the cases write it: `cases.Outer_Inner`.
fn go_names(pool: &DescriptorPool) -> HashMap<String, MessageDescriptor> {
    let mut names = HashMap::new();
    for message in pool.all_messages() {
        let package = message.package_name();
        let Some(alias) = package.strip_prefix(PACKAGE) else { continue };
        let alias = alias.rsplit('.').next().filter(|a| !a.is_empty()).unwrap_or("cases");
        let nested = message.full_name()[package.len() + 1..].replace('.', "_");
        names.insert(format!("{alias}.{nested}"), message);
    }
    names
}

/// The field a Go key names: protoc-gen-go's CamelCase, compared without case.
fn field_named(message: &MessageDescriptor, go: &str) -> Option<FieldDescriptor> {
    let go = go.to_lowercase();
    message.fields().find(|field| field.name().replace('_', "").to_lowercase() == go)
}

fn build(message: &MessageDescriptor, value: &Value) -> Result<DynamicMessage, String> {
    let mut built = DynamicMessage::new(message.clone());
    let fields = value["fields"].as_object().ok_or("no fields")?;
    for (key, value) in fields {
        let (field, value) = match field_named(message, key) {
            Some(field) => (field, value),
            // A oneof: `O: &Oneof_X{X: value}`, or `&Oneof_X{}` for X's zero value.
            None => match value["fields"].as_object().and_then(|f| f.iter().next()) {
                Some((inner, value)) => (field_named(message, inner).ok_or(inner.clone())?, value),
                None => {
                    let go_type = value["@type"].as_str().unwrap_or_default();
                    let field = go_type.rsplit('_').next().and_then(|name| field_named(message, name));
                    let field = field.ok_or(format!("oneof {go_type}"))?;
                    let zero = field.default_value();
                    built.set_field(&field, zero);
                    continue;
                }
            },
        };
        if value.is_null() {
            continue;
        }
        built.set_field(&field, field_value(&field, value)?);
    }
    Ok(built)
}

fn field_value(field: &FieldDescriptor, value: &Value) -> Result<Proto, String> {
    if field.is_map() {
        let entry = field.kind();
        let entry = entry.as_message().ok_or("map")?;
        let (key_field, value_field) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut map = HashMap::new();
        for pair in value["@map"].as_array().ok_or("map pairs")? {
            let key = match single(&key_field.kind(), &pair[0])? {
                Proto::String(s) => MapKey::String(s),
                Proto::Bool(b) => MapKey::Bool(b),
                Proto::I32(n) => MapKey::I32(n),
                Proto::I64(n) => MapKey::I64(n),
                Proto::U32(n) => MapKey::U32(n),
                Proto::U64(n) => MapKey::U64(n),
                other => return Err(format!("map key {other:?}")),
            };
            map.insert(key, single(&value_field.kind(), &pair[1])?);
        }
        return Ok(Proto::Map(map));
    }
    if field.is_list() {
        let items = value.as_array().ok_or("list")?;
        return Ok(Proto::List(items.iter().map(|item| single(&field.kind(), item)).collect::<Result<_, _>>()?));
    }
    single(&field.kind(), value)
}

fn single(kind: &Kind, value: &Value) -> Result<Proto, String> {
    let float = || -> Result<f64, String> {
        match value.get("@float").and_then(Value::as_str) {
            Some("inf") => Ok(f64::INFINITY),
            Some("-inf") => Ok(f64::NEG_INFINITY),
            Some(_) => Ok(f64::NAN),
            None => value.as_f64().ok_or(format!("number {value}")),
        }
    };
    let int = || value.as_i64().ok_or(format!("integer {value}"));
    let uint = || value.as_u64().ok_or(format!("unsigned {value}"));
    Ok(match kind {
        Kind::Double => Proto::F64(float()?),
        Kind::Float => Proto::F32(float()? as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Proto::I32(int()? as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Proto::I64(int()?),
        Kind::Uint32 | Kind::Fixed32 => Proto::U32(uint()? as u32),
        Kind::Uint64 | Kind::Fixed64 => Proto::U64(uint()?),
        Kind::Bool => Proto::Bool(value.as_bool().ok_or("bool")?),
        Kind::String => Proto::String(value.as_str().ok_or("string")?.to_string()),
        Kind::Bytes => {
            let encoded = value["@bytes"].as_str().or(value.as_str()).ok_or("bytes")?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_else(|_| encoded.into());
            Proto::Bytes(bytes.into())
        }
        Kind::Enum(descriptor) => match value {
            Value::Number(n) => Proto::EnumNumber(n.as_i64().ok_or("enum number")? as i32),
            _ => {
                let go = value["@enum"].as_str().ok_or("enum")?;
                let found = descriptor.values().find(|v| go == v.name() || go.ends_with(&format!("_{}", v.name())));
                Proto::EnumNumber(found.ok_or(format!("enum value {go}"))?.number())
            }
        },
        Kind::Message(descriptor) => Proto::Message(build(descriptor, value)?),
    })
}

/// A violation as the harness compares it.
type Seen = (String, String, String, bool);

enum Outcome {
    Valid,
    Violations(BTreeSet<Seen>),
    Compilation,
    Runtime,
}

fn run(validator: &Validator, message: &DynamicMessage) -> Outcome {
    match validator.validate(message) {
        Ok(()) => Outcome::Valid,
        Err(RuleError::Validation(error)) => Outcome::Violations(
            error
                .violations()
                .iter()
                .map(|v| (v.field_path(), v.rule_path(), v.rule_id().to_string(), v.for_key().unwrap_or(false)))
                .collect(),
        ),
        Err(RuleError::Compilation(_)) => Outcome::Compilation,
        Err(_) => Outcome::Runtime,
    }
}

fn passes(expected: &Value, outcome: &Outcome) -> bool {
    if let Some(valid) = expected["valid"].as_bool() {
        return matches!((valid, outcome), (true, Outcome::Valid) | (false, Outcome::Violations(_)));
    }
    if expected["compilation_error"].as_bool() == Some(true) {
        // Without --strict_error, a runtime error passes for a compilation error.
        return matches!(outcome, Outcome::Compilation | Outcome::Runtime);
    }
    if expected["runtime_error"].as_bool() == Some(true) {
        return matches!(outcome, Outcome::Runtime);
    }
    let Outcome::Violations(seen) = outcome else { return false };
    let want: BTreeSet<Seen> = expected["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let text = |name: &str| v[name].as_str().unwrap_or_default().to_string();
            (text("field"), text("rule"), text("rule_id"), v["for_key"].as_bool().unwrap_or(false))
        })
        .collect();
    want == *seen
}

#[test]
fn protovalidate_conformance_cases() {
    let (pool, refused) = pool();
    let messages = go_names(&pool);
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(format!("{CASES}/cases.json")).unwrap()).expect("cases.json");
    let expected_failures: BTreeSet<String> = std::fs::read_to_string(format!("{CASES}/expected_failures.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    let validators = Validators::new(&pool);
    let validator = validators.validator();
    let mut by_suite: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut not_applicable, mut failed) = (0, BTreeSet::new());
    for case in &cases {
        let suite = case["suite"].as_str().unwrap();
        let name = format!("{suite}/{}", case["case"].as_str().unwrap());
        let go_type = case["message"]["@type"].as_str().unwrap();
        // Types from files the compiler refused (editions) do not apply.
        let Some(descriptor) = messages.get(go_type) else {
            not_applicable += 1;
            continue;
        };
        let counts = by_suite.entry(suite).or_default();
        counts.1 += 1;
        let passed = match build(descriptor, &case["message"]) {
            Ok(message) => passes(&case["expected"], &run(validator, &message)),
            Err(_) => false,
        };
        if passed {
            counts.0 += 1;
        } else {
            failed.insert(name);
        }
    }
    let (passed, run): (usize, usize) = by_suite.values().fold((0, 0), |(p, r), (sp, sr)| (p + sp, r + sr));
    println!("protovalidate conformance: {passed} of {run} cases pass ({:.1}%)", 100.0 * passed as f64 / run as f64);
    println!("  {not_applicable} cases of {} refused file(s) do not apply: {}", refused.len(), refused.join(", "));
    for (suite, (p, r)) in &by_suite {
        if p != r {
            println!("  {suite}: {p} of {r}");
        }
    }
    let newly_failing: Vec<_> = failed.difference(&expected_failures).collect();
    let now_passing: Vec<_> = expected_failures.difference(&failed).collect();
    assert!(newly_failing.is_empty(), "cases that fail and are not expected to: {newly_failing:#?}");
    assert!(now_passing.is_empty(), "cases that pass now; remove them from expected_failures.txt: {now_passing:#?}");
}
