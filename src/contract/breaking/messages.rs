//! Messages paired by full name: their fields, oneofs, reserved and extension
//! ranges, required fields and JSON format.

use std::collections::BTreeSet;

use prost_reflect::{MessageDescriptor, Syntax, Value};

use super::ranges::{no_longer_covered, uncovered};
use super::{At, Report, Rule, Side};

/// The largest field number.
const MAX_FIELD: i64 = 536_870_911;

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (_, was, now) in Side::pairs(&old.messages, &new.messages) {
        fields_kept(was, now, report);
        ranges_kept(was, now, report);
        oneofs_kept(was, now, report);
        same_required_fields(was, now, report);
        if json_format_allowed(was) && !json_format_allowed(now) {
            let message =
                format!("message {}: JSON format support changed from ALLOW to LEGACY_BEST_EFFORT", now.full_name());
            report.add(Rule::MessageSameJsonFormat, here(now), message);
        }
        let accessor = |m: &MessageDescriptor| {
            m.descriptor_proto().options.as_ref().is_some_and(|o| o.no_standard_descriptor_accessor())
        };
        if !accessor(was) && accessor(now) {
            let message =
                format!("message {}: option no_standard_descriptor_accessor changed to true", now.full_name());
            report.add(Rule::MessageNoRemoveStandardDescriptorAccessor, here(now), message);
        }
    }
}

fn here(message: &MessageDescriptor) -> At {
    At::Element(message.parent_file(), message.path().to_vec())
}

fn fields_kept(was: &MessageDescriptor, now: &MessageDescriptor, report: &mut Report<'_>) {
    let reserved_numbers: Vec<(i64, i64)> =
        now.reserved_ranges().map(|r| (i64::from(r.start), i64::from(r.end) - 1)).collect();
    let reserved_names: BTreeSet<&str> = now.reserved_names().collect();
    for field in was.fields().filter(|f| now.get_field(f.number()).is_none()) {
        let number = i64::from(field.number());
        let what = format!("field {} {:?} of message {} was deleted", field.number(), field.name(), now.full_name());
        report.add(Rule::FieldNoDelete, here(now), what.clone());
        if !uncovered((number, number), &reserved_numbers).is_empty() {
            report.add(
                Rule::FieldNoDeleteUnlessNumberReserved,
                here(now),
                format!("{what} without reserving its number"),
            );
        }
        if !reserved_names.contains(field.name()) {
            report.add(Rule::FieldNoDeleteUnlessNameReserved, here(now), format!("{what} without reserving its name"));
        }
    }
}

fn ranges_kept(was: &MessageDescriptor, now: &MessageDescriptor, report: &mut Report<'_>) {
    let inclusive = |ranges: &mut dyn Iterator<Item = std::ops::Range<u32>>| -> Vec<(i64, i64)> {
        ranges.map(|r| (i64::from(r.start), i64::from(r.end) - 1)).collect()
    };
    let kinds = [
        (
            Rule::ReservedMessageNoDelete,
            "reserved",
            inclusive(&mut was.reserved_ranges()),
            inclusive(&mut now.reserved_ranges()),
        ),
        (
            Rule::ExtensionMessageNoDelete,
            "extension",
            inclusive(&mut was.extension_ranges()),
            inclusive(&mut now.extension_ranges()),
        ),
    ];
    for (rule, kind, before, after) in kinds {
        for lost in no_longer_covered(&before, &after, MAX_FIELD) {
            report.add(
                rule,
                here(now),
                format!("message {}: {kind} numbers {lost} are no longer {kind}", now.full_name()),
            );
        }
    }
    let names: BTreeSet<&str> = now.reserved_names().collect();
    for name in was.reserved_names().filter(|name| !names.contains(name)) {
        let message = format!("message {}: reserved name {name:?} was deleted", now.full_name());
        report.add(Rule::ReservedMessageNoDelete, here(now), message);
    }
}

fn oneofs_kept(was: &MessageDescriptor, now: &MessageDescriptor, report: &mut Report<'_>) {
    let kept: BTreeSet<String> = now.oneofs().map(|o| o.name().to_string()).collect();
    for oneof in was.oneofs().filter(|o| !o.is_synthetic() && !kept.contains(o.name())) {
        report.add(
            Rule::OneofNoDelete,
            here(now),
            format!("oneof {:?} of message {} was deleted", oneof.name(), now.full_name()),
        );
    }
}

fn same_required_fields(was: &MessageDescriptor, now: &MessageDescriptor, report: &mut Report<'_>) {
    let required = |m: &MessageDescriptor| -> BTreeSet<u32> {
        m.fields().filter(|f| f.is_required()).map(|f| f.number()).collect()
    };
    let (before, after) = (required(was), required(now));
    let changes =
        before.difference(&after).map(|n| (n, "deleted")).chain(after.difference(&before).map(|n| (n, "added")));
    for (number, change) in changes {
        let message = format!(
            "message {}: required field {number} was {change}; every sender must set a required field, so both sides must agree on it",
            now.full_name()
        );
        report.add(Rule::MessageSameRequiredFields, here(now), message);
    }
}

/// Whether the message's JSON mapping is the standard one (`ALLOW`): proto3,
/// unless it keeps the legacy field-name conflicts; proto2 gets `LEGACY_BEST_EFFORT`.
pub(super) fn json_format_allowed(message: &MessageDescriptor) -> bool {
    message.parent_file().syntax() == Syntax::Proto3 && !legacy_json(&message.options())
}

/// `deprecated_legacy_json_field_conflicts`, in a message's or an enum's options.
pub(super) fn legacy_json(options: &prost_reflect::DynamicMessage) -> bool {
    options
        .get_field_by_name("deprecated_legacy_json_field_conflicts")
        .is_some_and(|value| matches!(value.as_ref(), Value::Bool(true)))
}
