//! Breaking changes between two versions of the contracts, by buf's rules and
//! categories (`FILE`, `PACKAGE`, `WIRE_JSON`, `WIRE`): what
//! `protomesh check --breaking` lists for a change under review, and what a
//! reload names, and refuses under `contracts.breaking_changes: refuse`.
//!
//! The comparison reads descriptors, as buf does, so sources, descriptor sets
//! and a reload's two versions compare alike. Elements pair by full name
//! (a field by its number in the paired message, an extension by its
//! extendee and number); the per-file rules pair files by name. Files that
//! come with protomesh (`google/protobuf/*`, the options) are not compared.

mod enums;
mod fields;
mod files;
mod messages;
mod ranges;
pub mod rules;
mod services;

use std::collections::BTreeMap;
use std::fmt;

use prost_reflect::{DescriptorPool, EnumDescriptor, ExtensionDescriptor, FileDescriptor, MessageDescriptor};
use prost_reflect::{ServiceDescriptor, Syntax};

pub use rules::{Category, Rule};

use super::{Contracts, is_built_in};

/// One breaking change: the rule it breaks, where, and what changed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The file as the new contracts name it (the old name for a deleted file).
    pub file: String,
    /// 1-based, where the new file's source says (descriptor sets may not).
    pub line_column: Option<(u32, u32)>,
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_column {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {} ({})", self.file, self.message, self.rule),
            None => write!(f, "{}: {} ({})", self.file, self.message, self.rule),
        }
    }
}

/// What `new` breaks of `old` by `rules`, sorted by file and place.
pub fn compare(old: &DescriptorPool, new: &DescriptorPool, rules: &[Rule]) -> Vec<Finding> {
    let (old, new) = (Side::of(old), Side::of(new));
    let mut report = Report { rules, findings: Vec::new() };
    files::check(&old, &new, &mut report);
    messages::check(&old, &new, &mut report);
    fields::check(&old, &new, &mut report);
    enums::check(&old, &new, &mut report);
    services::check(&old, &new, &mut report);
    let mut findings = report.findings;
    findings.sort();
    findings.dedup();
    findings
}

/// The rules a reload checks: `WIRE_JSON`, what callers built against the
/// running contracts need to keep reading and writing their messages, in
/// binary and in JSON; and a method, service or package taken away, which
/// those callers would meet as UNIMPLEMENTED.
pub fn reload_rules() -> Vec<Rule> {
    let mut rules = Rule::of(&[Category::WireJson]);
    rules.extend([Rule::RpcNoDelete, Rule::PackageServiceNoDelete, Rule::PackageNoDelete]);
    rules
}

/// What the contracts `new` break of the running `old`, by [`reload_rules`].
pub fn breaking_changes(old: &Contracts, new: &Contracts) -> Vec<Finding> {
    compare(old.descriptors(), new.descriptors(), &reload_rules())
}

/// The compared files of one version, and their elements by full name.
struct Side {
    files: BTreeMap<String, FileDescriptor>,
    messages: BTreeMap<String, MessageDescriptor>,
    enums: BTreeMap<String, EnumDescriptor>,
    services: BTreeMap<String, ServiceDescriptor>,
    /// By extendee and field number.
    extensions: BTreeMap<(String, u32), ExtensionDescriptor>,
}

impl Side {
    fn of(pool: &DescriptorPool) -> Side {
        let compared = |file: &FileDescriptor| !is_built_in(file.name());
        let files = pool.files().filter(compared).map(|file| (file.name().to_string(), file)).collect();
        let messages = pool.all_messages().filter(|m| compared(&m.parent_file()));
        let enums = pool.all_enums().filter(|e| compared(&e.parent_file()));
        let services = pool.services().filter(|s| compared(&s.parent_file()));
        let extensions = pool.all_extensions().filter(|e| compared(&e.parent_file()));
        Side {
            files,
            messages: messages.map(|m| (m.full_name().to_string(), m)).collect(),
            enums: enums.map(|e| (e.full_name().to_string(), e)).collect(),
            services: services.map(|s| (s.full_name().to_string(), s)).collect(),
            extensions: extensions.map(|e| ((e.containing_message().full_name().to_string(), e.number()), e)).collect(),
        }
    }

    /// Elements that both sides have, by key.
    fn pairs<'a, K: Ord, V>(
        old: &'a BTreeMap<K, V>,
        new: &'a BTreeMap<K, V>,
    ) -> impl Iterator<Item = (&'a K, &'a V, &'a V)> {
        old.iter().filter_map(move |(key, was)| new.get(key).map(|now| (key, was, now)))
    }
}

/// Where a finding points: an element of a file (its path in the file's
/// descriptor, as source info keys it), or a file as a whole.
enum At {
    Element(FileDescriptor, Vec<i32>),
    File(String),
}

struct Report<'a> {
    rules: &'a [Rule],
    findings: Vec<Finding>,
}

impl Report<'_> {
    fn wants(&self, rule: Rule) -> bool {
        self.rules.contains(&rule)
    }

    fn add(&mut self, rule: Rule, at: At, message: String) {
        if !self.wants(rule) {
            return;
        }
        let (file, line_column) = match at {
            At::Element(file, path) => (file.name().to_string(), line_column(&file, &path)),
            At::File(name) => (name, None),
        };
        self.findings.push(Finding { file, line_column, rule, message });
    }
}

/// Where the source info places the element at `path`, 1-based.
pub(super) fn line_column(file: &FileDescriptor, path: &[i32]) -> Option<(u32, u32)> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|location| location.path == path)?;
    let (line, column) = (*location.span.first()?, *location.span.get(1)?);
    Some((u32::try_from(line).ok()? + 1, u32::try_from(column).ok()? + 1))
}

/// A name inside its package: `Outer.Inner` for `pkg.Outer.Inner`.
fn nested_name<'a>(full_name: &'a str, package: &str) -> &'a str {
    if package.is_empty() { full_name } else { full_name.strip_prefix(package).map_or(full_name, |n| &n[1..]) }
}

/// Where a deleted element was: the closest enclosing message the new file
/// still has, or else the file.
fn enclosing(file: &FileDescriptor, nested: &str, new: &Side) -> At {
    let mut name = nested;
    while let Some((outer, _)) = name.rsplit_once('.') {
        let full =
            if file.package_name().is_empty() { outer.to_string() } else { format!("{}.{outer}", file.package_name()) };
        if let Some(message) = new.messages.get(&full).filter(|m| m.parent_file() == *file) {
            return At::Element(file.clone(), message.path().to_vec());
        }
        name = outer;
    }
    At::File(file.name().to_string())
}

/// proto2 and proto3 as buf names them.
fn syntax_name(file: &FileDescriptor) -> &'static str {
    match file.syntax() {
        Syntax::Proto2 => "proto2",
        Syntax::Proto3 => "proto3",
    }
}

#[cfg(test)]
mod tests;
