//! Fields paired by number in paired messages, and extensions by extendee
//! and number: type, cardinality, name, JSON name, oneof, default, and the
//! options that change generated code.

use prost_reflect::prost_types::field_options::{CType, JsType};
use prost_reflect::{
    Cardinality, EnumDescriptor, ExtensionDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor, Syntax,
    Value,
};

use super::{At, Report, Rule, Side};

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (_, was, now) in Side::pairs(&old.messages, &new.messages) {
        for field in was.fields() {
            if let Some(kept) = now.get_field(field.number()) {
                compare(&Field::Member(field), &Field::Member(kept), report);
            }
        }
    }
    for (_, was, now) in Side::pairs(&old.extensions, &new.extensions) {
        compare(&Field::Extension(was.clone()), &Field::Extension(now.clone()), report);
    }
}

/// A message's own field or an extension of it: alike for these rules.
enum Field {
    Member(FieldDescriptor),
    Extension(ExtensionDescriptor),
}

macro_rules! either {
    ($self:ident.$method:ident()) => {
        match $self {
            Field::Member(field) => field.$method(),
            Field::Extension(extension) => extension.$method(),
        }
    };
}

impl Field {
    fn number(&self) -> u32 {
        either!(self.number())
    }
    fn kind(&self) -> Kind {
        either!(self.kind())
    }
    fn is_group(&self) -> bool {
        either!(self.is_group())
    }
    fn is_list(&self) -> bool {
        either!(self.is_list())
    }
    fn is_map(&self) -> bool {
        either!(self.is_map())
    }
    fn default_value(&self) -> Value {
        either!(self.default_value())
    }
    fn file(&self) -> FileDescriptor {
        either!(self.parent_file())
    }
    fn proto(&self) -> &prost_reflect::prost_types::FieldDescriptorProto {
        either!(self.field_descriptor_proto())
    }

    /// A field's own name; an extension's full name.
    fn name(&self) -> &str {
        match self {
            Field::Member(field) => field.name(),
            Field::Extension(extension) => extension.full_name(),
        }
    }

    /// The message the field belongs to: an extension's extendee.
    fn message(&self) -> MessageDescriptor {
        match self {
            Field::Member(field) => field.parent_message().clone(),
            Field::Extension(extension) => extension.containing_message(),
        }
    }

    fn cardinality(&self) -> &'static str {
        let (cardinality, presence) = match self {
            Field::Member(field) => (field.cardinality(), field.supports_presence()),
            Field::Extension(extension) => (extension.cardinality(), extension.supports_presence()),
        };
        match cardinality {
            _ if self.is_map() => "map",
            Cardinality::Repeated => "repeated",
            Cardinality::Required => "required",
            Cardinality::Optional if presence => "optional with explicit presence",
            Cardinality::Optional => "optional with implicit presence",
        }
    }

    /// The oneof it is in, unless that is the synthetic one of a proto3 `optional`.
    fn oneof(&self) -> Option<String> {
        match self {
            Field::Member(field) => {
                field.containing_oneof().filter(|o| !o.is_synthetic()).map(|o| o.name().to_string())
            }
            Field::Extension(_) => None,
        }
    }

    fn at(&self) -> At {
        match self {
            Field::Member(field) => At::Element(field.parent_file(), field.path().to_vec()),
            Field::Extension(extension) => At::Element(extension.parent_file(), extension.path().to_vec()),
        }
    }

    /// `field 1 "id" of message shop.v1.Stock`.
    fn describe(&self) -> String {
        let kind = if matches!(self, Field::Extension(_)) { "extension" } else { "field" };
        format!("{kind} {} {:?} of message {}", self.number(), self.name(), self.message().full_name())
    }

    fn type_name(&self) -> String {
        match self.kind() {
            Kind::Message(message) if self.is_group() => format!("group {}", message.full_name()),
            Kind::Message(message) => message.full_name().to_string(),
            Kind::Enum(enumeration) => enumeration.full_name().to_string(),
            scalar => format!("{scalar:?}").to_lowercase(),
        }
    }

    fn is_string(&self) -> bool {
        self.kind() == Kind::String
    }
}

fn compare(was: &Field, now: &Field, report: &mut Report<'_>) {
    let describe = now.describe();
    if was.name() != now.name() {
        report.add(Rule::FieldSameName, now.at(), format!("{describe}: name changed from {:?}", was.name()));
    }
    if let (Field::Member(a), Field::Member(b)) = (was, now)
        && a.json_name() != b.json_name()
    {
        let message = format!("{describe}: JSON name changed from {:?} to {:?}", a.json_name(), b.json_name());
        report.add(Rule::FieldSameJsonName, now.at(), message);
    }
    types(was, now, report);
    cardinalities(was, now, report);
    if matches!(was, Field::Member(_)) && was.oneof() != now.oneof() {
        let place =
            |oneof: Option<String>| oneof.map_or("outside any oneof".to_string(), |o| format!("in oneof {o:?}"));
        let message = format!("{describe} moved from {} to {}", place(was.oneof()), place(now.oneof()));
        report.add(Rule::FieldSameOneof, now.at(), message);
    }
    defaults(was, now, report);
    generated_code_options(was, now, report);
}

fn types(was: &Field, now: &Field, report: &mut Report<'_>) {
    let (from, to) = (was.type_name(), now.type_name());
    if from == to {
        return;
    }
    let message = format!("{} changed type from {from} to {to}", now.describe());
    report.add(Rule::FieldSameType, now.at(), message.clone());
    let (a, b) = (was.kind(), now.kind());
    let same_enum = || match (&a, &b) {
        (Kind::Enum(a), Kind::Enum(b)) => enum_is_kept(a, b),
        _ => false,
    };
    let (wire_a, wire_b) = (wire_group(was), wire_group(now));
    let string_to_bytes = a == Kind::String && b == Kind::Bytes;
    if (wire_a != wire_b && !string_to_bytes) || (wire_a == wire_b && wire_a >= 9 && !same_enum()) {
        let note = if a == Kind::Bytes && b == Kind::String { "; bytes need not hold valid UTF-8" } else { "" };
        report.add(
            Rule::FieldWireCompatibleType,
            now.at(),
            format!("{message}, which the binary encoding reads differently{note}"),
        );
    }
    let (json_a, json_b) = (wire_json_group(was), wire_json_group(now));
    if json_a != json_b || (json_a >= 12 && !same_enum()) {
        report.add(
            Rule::FieldWireJsonCompatibleType,
            now.at(),
            format!("{message}, which the binary or the JSON encoding reads differently"),
        );
    }
}

/// An enum changed for one of the same name that keeps every value, as buf allows.
fn enum_is_kept(was: &EnumDescriptor, now: &EnumDescriptor) -> bool {
    was.name() == now.name()
        && was.values().all(|v| now.get_value_by_name(v.name()).is_some_and(|n| n.number() == v.number()))
}

/// Types the binary encoding reads alike (proto3's "updating a message type").
fn wire_group(field: &Field) -> u8 {
    match field.kind() {
        Kind::Int32 | Kind::Int64 | Kind::Uint32 | Kind::Uint64 | Kind::Bool => 1,
        Kind::Sint32 | Kind::Sint64 => 2,
        Kind::String => 3,
        Kind::Bytes => 4,
        Kind::Fixed32 | Kind::Sfixed32 => 5,
        Kind::Fixed64 | Kind::Sfixed64 => 6,
        Kind::Double => 7,
        Kind::Float => 8,
        Kind::Message(_) if field.is_group() => 9,
        Kind::Message(_) => 10,
        Kind::Enum(_) => 11,
    }
}

/// Types both the binary and the JSON encodings read alike: JSON writes
/// 64-bit integers as strings, so they part from 32-bit ones.
fn wire_json_group(field: &Field) -> u8 {
    match field.kind() {
        Kind::Int32 | Kind::Uint32 => 1,
        Kind::Int64 | Kind::Uint64 => 2,
        Kind::Fixed32 | Kind::Sfixed32 => 3,
        Kind::Fixed64 | Kind::Sfixed64 => 4,
        Kind::Bool => 5,
        Kind::Sint32 => 6,
        Kind::Sint64 => 7,
        Kind::String => 8,
        Kind::Bytes => 9,
        Kind::Double => 10,
        Kind::Float => 11,
        Kind::Message(_) if field.is_group() => 12,
        Kind::Message(_) => 13,
        Kind::Enum(_) => 14,
    }
}

fn cardinalities(was: &Field, now: &Field, report: &mut Report<'_>) {
    if was.message().is_map_entry() && now.message().is_map_entry() {
        return;
    }
    let (from, to) = (was.cardinality(), now.cardinality());
    if from == to {
        return;
    }
    let message = format!("{} changed cardinality from {from} to {to}", now.describe());
    report.add(Rule::FieldSameCardinality, now.at(), message.clone());
    // Explicit and implicit presence read alike; maps are repeated entries on the wire, not in JSON.
    let group = |c: &str, json: bool| match c {
        "required" => 2,
        "repeated" => 3,
        "map" if json => 4,
        "map" => 3,
        _ => 1,
    };
    if group(from, false) != group(to, false) {
        report.add(Rule::FieldWireCompatibleCardinality, now.at(), message.clone());
    }
    if group(from, true) != group(to, true) {
        report.add(Rule::FieldWireJsonCompatibleCardinality, now.at(), message);
    }
}

/// The default a field states (proto2), or its zero value, compared as a value: `1` and `1.0` are one default.
#[derive(Debug)]
enum Stated {
    Text(Vec<u8>),
    Integer(i128),
    Float(f64),
}

fn default_of(field: &Field) -> Option<Stated> {
    if field.is_list() || field.is_map() || matches!(field.kind(), Kind::Message(_)) {
        return None;
    }
    Some(match field.default_value() {
        Value::String(s) => Stated::Text(s.into_bytes()),
        Value::Bytes(b) => Stated::Text(b.to_vec()),
        Value::Bool(b) => Stated::Integer(i128::from(b)),
        Value::I32(n) | Value::EnumNumber(n) => Stated::Integer(n.into()),
        Value::I64(n) => Stated::Integer(n.into()),
        Value::U32(n) => Stated::Integer(n.into()),
        Value::U64(n) => Stated::Integer(n.into()),
        Value::F32(f) => Stated::Float(f.into()),
        Value::F64(f) => Stated::Float(f),
        Value::Message(_) | Value::List(_) | Value::Map(_) => return None,
    })
}

impl Stated {
    fn is_zero(&self) -> bool {
        match self {
            Stated::Text(t) => t.is_empty(),
            Stated::Integer(n) => *n == 0,
            Stated::Float(f) => *f == 0.0 && f.is_sign_positive(),
        }
    }

    fn same(&self, other: &Stated, floats: bool) -> bool {
        // An integer default past 2^53 compared with a float's is rounded, as buf's big.Float is not; no
        // field changes from such a default to a float one.
        let float = |n: &i128| *n as f64;
        match (self, other) {
            (Stated::Text(a), Stated::Text(b)) => a == b,
            (Stated::Text(_), _) | (_, Stated::Text(_)) => false,
            (Stated::Integer(a), Stated::Integer(b)) => a == b,
            (Stated::Float(a), Stated::Float(b)) if a.is_nan() || b.is_nan() => a.is_nan() && b.is_nan(),
            // float and double: equal if they are as a float
            (Stated::Float(a), Stated::Float(b)) if floats => (*a as f32) == (*b as f32),
            (Stated::Float(a), Stated::Float(b)) => a == b,
            (Stated::Integer(n), Stated::Float(f)) | (Stated::Float(f), Stated::Integer(n)) => float(n) == *f,
        }
    }
}

fn defaults(was: &Field, now: &Field, report: &mut Report<'_>) {
    let (Some(from), Some(to)) = (default_of(was), default_of(now)) else { return };
    if from.is_zero() && to.is_zero() {
        return;
    }
    let float_and_double =
        matches!((was.kind(), now.kind()), (Kind::Float, Kind::Double) | (Kind::Double, Kind::Float));
    if !from.same(&to, float_and_double) {
        let show = |field: &Field| field.proto().default_value.clone().unwrap_or_else(|| "its zero value".into());
        let message = format!("{} changed default from {} to {}", now.describe(), show(was), show(now));
        report.add(Rule::FieldSameDefault, now.at(), message);
    }
}

/// Options and syntax that change what code generators emit for a field.
fn generated_code_options(was: &Field, now: &Field, report: &mut Report<'_>) {
    let describe = now.describe();
    if was.is_string() && now.is_string() {
        let (from, to) = (utf8_validation(&was.file()), utf8_validation(&now.file()));
        if from != to {
            report.add(
                Rule::FieldSameUtf8Validation,
                now.at(),
                format!("{describe}: UTF-8 validation changed from {from} to {to}"),
            );
        }
        let (from, to) = (java_utf8_validation(&was.file()), java_utf8_validation(&now.file()));
        if from != to {
            let message = format!("{describe}: Java UTF-8 validation changed from {from} to {to}");
            report.add(Rule::FieldSameJavaUtf8Validation, now.at(), message);
        }
    }
    let text = |f: &Field| matches!(f.kind(), Kind::String | Kind::Bytes);
    if text(was) && text(now) && !(was.message().is_map_entry() && now.message().is_map_entry()) {
        let ctype = |f: &Field| f.proto().options.as_ref().map_or(CType::String, |o| o.ctype());
        let (from, to) = (ctype(was), ctype(now));
        if from != to && !(from == CType::StringPiece && to == CType::String) {
            let message =
                format!("{describe}: C++ string type changed from {} to {}", from.as_str_name(), to.as_str_name());
            report.add(Rule::FieldSameCppStringType, now.at(), message);
        }
    }
    let wide =
        |f: &Field| matches!(f.kind(), Kind::Int64 | Kind::Sint64 | Kind::Uint64 | Kind::Fixed64 | Kind::Sfixed64);
    if wide(was) && wide(now) {
        let jstype = |f: &Field| f.proto().options.as_ref().map_or(JsType::JsNormal, |o| o.jstype());
        let (from, to) = (jstype(was), jstype(now));
        if from != to {
            let message =
                format!("{describe}: option jstype changed from {} to {}", from.as_str_name(), to.as_str_name());
            report.add(Rule::FieldSameJstype, now.at(), message);
        }
    }
}

/// proto3 strings must be valid UTF-8; proto2 strings are not checked.
fn utf8_validation(file: &FileDescriptor) -> &'static str {
    if file.syntax() == Syntax::Proto3 { "VERIFY" } else { "NONE" }
}

/// As above, unless the file asks Java to check with `java_string_check_utf8`.
fn java_utf8_validation(file: &FileDescriptor) -> &'static str {
    let checked = file.file_descriptor_proto().options.as_ref().is_some_and(|o| o.java_string_check_utf8());
    if checked { "VERIFY" } else { utf8_validation(file) }
}
