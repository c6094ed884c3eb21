//! Enums paired by full name: their values, names, reserved numbers and
//! names, and whether they are open and JSON-mapped.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{EnumDescriptor, Syntax};

use super::messages::legacy_json;
use super::ranges::{no_longer_covered, uncovered};
use super::{At, Report, Rule, Side};

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (_, was, now) in Side::pairs(&old.enums, &new.enums) {
        values_kept(was, now, report);
        reserved_kept(was, now, report);
        let closed = |e: &EnumDescriptor| e.parent_file().syntax() == Syntax::Proto2;
        if closed(was) != closed(now) {
            let state = |closed| if closed { "closed" } else { "open" };
            let message =
                format!("enum {} changed from {} to {}", now.full_name(), state(closed(was)), state(closed(now)));
            report.add(Rule::EnumSameType, here(now), message);
        }
        let allowed = |e: &EnumDescriptor| e.parent_file().syntax() == Syntax::Proto3 && !legacy_json(&e.options());
        if allowed(was) && !allowed(now) {
            let message =
                format!("enum {}: JSON format support changed from ALLOW to LEGACY_BEST_EFFORT", now.full_name());
            report.add(Rule::EnumSameJsonFormat, here(now), message);
        }
    }
}

fn here(enumeration: &EnumDescriptor) -> At {
    At::Element(enumeration.parent_file(), enumeration.path().to_vec())
}

/// Each number's names (more than one with `allow_alias`).
fn names(enumeration: &EnumDescriptor) -> BTreeMap<i32, BTreeSet<String>> {
    let mut names: BTreeMap<i32, BTreeSet<String>> = BTreeMap::new();
    for value in enumeration.values() {
        names.entry(value.number()).or_default().insert(value.name().to_string());
    }
    names
}

fn values_kept(was: &EnumDescriptor, now: &EnumDescriptor, report: &mut Report<'_>) {
    let (before, after) = (names(was), names(now));
    let reserved_numbers: Vec<(i64, i64)> =
        now.reserved_ranges().map(|r| (i64::from(*r.start()), i64::from(*r.end()))).collect();
    let reserved_names: BTreeSet<&str> = now.reserved_names().collect();
    let enum_name = now.full_name();
    for (number, names) in &before {
        let Some(kept) = after.get(number) else {
            let listed = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
            let what = format!("value {number} ({listed}) of enum {enum_name} was deleted");
            report.add(Rule::EnumValueNoDelete, here(now), what.clone());
            let number = i64::from(*number);
            if !uncovered((number, number), &reserved_numbers).is_empty() {
                report.add(
                    Rule::EnumValueNoDeleteUnlessNumberReserved,
                    here(now),
                    format!("{what} without reserving its number"),
                );
            }
            if !names.iter().all(|name| reserved_names.contains(name.as_str())) {
                report.add(
                    Rule::EnumValueNoDeleteUnlessNameReserved,
                    here(now),
                    format!("{what} without reserving its name"),
                );
            }
            continue;
        };
        if !names.is_subset(kept) {
            let list = |names: &BTreeSet<String>| names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
            let message =
                format!("value {number} of enum {enum_name} changed name from {} to {}", list(names), list(kept));
            report.add(Rule::EnumValueSameName, here(now), message);
        }
    }
}

fn reserved_kept(was: &EnumDescriptor, now: &EnumDescriptor, report: &mut Report<'_>) {
    let inclusive = |e: &EnumDescriptor| -> Vec<(i64, i64)> {
        e.reserved_ranges().map(|r| (i64::from(*r.start()), i64::from(*r.end()))).collect()
    };
    for lost in no_longer_covered(&inclusive(was), &inclusive(now), i64::from(i32::MAX)) {
        let message = format!("enum {}: reserved numbers {lost} are no longer reserved", now.full_name());
        report.add(Rule::ReservedEnumNoDelete, here(now), message);
    }
    let names: BTreeSet<&str> = now.reserved_names().collect();
    for name in was.reserved_names().filter(|name| !names.contains(name)) {
        let message = format!("enum {}: reserved name {name:?} was deleted", now.full_name());
        report.add(Rule::ReservedEnumNoDelete, here(now), message);
    }
}
