//! Files and packages: a file's options, syntax and package; what a file or
//! a package no longer declares.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::FileDescriptor;
use prost_reflect::prost_types::FileOptions;

use super::{At, Report, Rule, Side, enclosing, nested_name, syntax_name};

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (name, _) in old.files.iter().filter(|(name, _)| !new.files.contains_key(*name)) {
        report.add(Rule::FileNoDelete, At::File(name.clone()), format!("file {name} was deleted"));
    }
    for (_, was, now) in Side::pairs(&old.files, &new.files) {
        same_options(was, now, report);
        declarations_kept(was, now, old, new, report);
    }
    packages_kept(old, new, report);
}

/// Each option as buf reads it: its value, or its default when unset.
fn options(file: &FileDescriptor) -> [(Rule, &'static str, String); 15] {
    let default = FileOptions::default();
    let options = file.file_descriptor_proto().options.as_ref().unwrap_or(&default);
    [
        (Rule::FileSameCcEnableArenas, "cc_enable_arenas", options.cc_enable_arenas().to_string()),
        (Rule::FileSameCcGenericServices, "cc_generic_services", options.cc_generic_services().to_string()),
        (Rule::FileSameCsharpNamespace, "csharp_namespace", options.csharp_namespace().to_string()),
        (Rule::FileSameGoPackage, "go_package", options.go_package().to_string()),
        (Rule::FileSameJavaGenericServices, "java_generic_services", options.java_generic_services().to_string()),
        (Rule::FileSameJavaMultipleFiles, "java_multiple_files", options.java_multiple_files().to_string()),
        (Rule::FileSameJavaOuterClassname, "java_outer_classname", options.java_outer_classname().to_string()),
        (Rule::FileSameJavaPackage, "java_package", options.java_package().to_string()),
        (Rule::FileSameObjcClassPrefix, "objc_class_prefix", options.objc_class_prefix().to_string()),
        (Rule::FileSameOptimizeFor, "optimize_for", options.optimize_for().as_str_name().to_string()),
        (Rule::FileSamePhpClassPrefix, "php_class_prefix", options.php_class_prefix().to_string()),
        (Rule::FileSamePhpMetadataNamespace, "php_metadata_namespace", options.php_metadata_namespace().to_string()),
        (Rule::FileSamePhpNamespace, "php_namespace", options.php_namespace().to_string()),
        (Rule::FileSamePyGenericServices, "py_generic_services", options.py_generic_services().to_string()),
        (Rule::FileSameRubyPackage, "ruby_package", options.ruby_package().to_string()),
    ]
}

fn same_options(was: &FileDescriptor, now: &FileDescriptor, report: &mut Report<'_>) {
    let swift = |file: &FileDescriptor| {
        file.file_descriptor_proto().options.as_ref().map_or(String::new(), |o| o.swift_prefix().to_string())
    };
    let mut compared: Vec<(Rule, &str, String, String)> = options(was)
        .into_iter()
        .zip(options(now))
        .map(|((rule, name, from), (_, _, to))| (rule, name, from, to))
        .collect();
    compared.push((Rule::FileSameSwiftPrefix, "swift_prefix", swift(was), swift(now)));
    compared.push((Rule::FileSameSyntax, "syntax", syntax_name(was).into(), syntax_name(now).into()));
    compared.push((Rule::FileSamePackage, "package", was.package_name().into(), now.package_name().into()));
    for (rule, name, from, to) in compared {
        if from != to {
            let what = if matches!(rule, Rule::FileSameSyntax | Rule::FileSamePackage) {
                name.to_string()
            } else {
                format!("option {name}")
            };
            report.add(rule, At::File(now.name().to_string()), format!("{what} changed from {from:?} to {to:?}"));
        }
    }
}

/// The nested names a file (or package) declares, of each kind.
#[derive(Default)]
struct Declared {
    messages: BTreeSet<String>,
    enums: BTreeSet<String>,
    extensions: BTreeSet<String>,
    services: BTreeSet<String>,
}

impl Declared {
    fn add(&mut self, file: &FileDescriptor, side: &Side) {
        let package = file.package_name();
        let mine = |other: FileDescriptor| other == *file;
        let nested = |full: &str| nested_name(full, package).to_string();
        self.messages.extend(side.messages.values().filter(|m| mine(m.parent_file())).map(|m| nested(m.full_name())));
        self.enums.extend(side.enums.values().filter(|e| mine(e.parent_file())).map(|e| nested(e.full_name())));
        self.extensions
            .extend(side.extensions.values().filter(|e| mine(e.parent_file())).map(|e| nested(e.full_name())));
        self.services.extend(side.services.values().filter(|s| mine(s.parent_file())).map(|s| nested(s.full_name())));
    }

    fn kinds(&self) -> [(&'static str, &BTreeSet<String>); 4] {
        [
            ("message", &self.messages),
            ("enum", &self.enums),
            ("extension", &self.extensions),
            ("service", &self.services),
        ]
    }
}

fn declarations_kept(was: &FileDescriptor, now: &FileDescriptor, old: &Side, new: &Side, report: &mut Report<'_>) {
    let (mut before, mut after) = (Declared::default(), Declared::default());
    before.add(was, old);
    after.add(now, new);
    let rules = [Rule::MessageNoDelete, Rule::EnumNoDelete, Rule::ExtensionNoDelete, Rule::ServiceNoDelete];
    for ((kind, gone), (rule, (_, kept))) in before.kinds().into_iter().zip(rules.into_iter().zip(after.kinds())) {
        for name in gone.difference(kept) {
            let at = if kind == "service" { At::File(now.name().to_string()) } else { enclosing(now, name, new) };
            report.add(rule, at, format!("{kind} {name} was deleted from file {}", now.name()));
        }
    }
}

fn packages_kept(old: &Side, new: &Side, report: &mut Report<'_>) {
    fn by_package(side: &Side) -> BTreeMap<String, (Declared, Vec<&FileDescriptor>)> {
        let mut packages: BTreeMap<String, (Declared, Vec<&FileDescriptor>)> = BTreeMap::new();
        for file in side.files.values() {
            let (declared, files) = packages.entry(file.package_name().to_string()).or_default();
            declared.add(file, side);
            files.push(file);
        }
        packages
    }
    let (before, after) = (by_package(old), by_package(new));
    let rules = [
        Rule::PackageMessageNoDelete,
        Rule::PackageEnumNoDelete,
        Rule::PackageExtensionNoDelete,
        Rule::PackageServiceNoDelete,
    ];
    for (package, (declared, files)) in &before {
        let Some((kept, _)) = after.get(package) else {
            report.add(
                Rule::PackageNoDelete,
                At::File(files[0].name().to_string()),
                format!("package {package:?} was deleted"),
            );
            continue;
        };
        for ((kind, gone), (rule, (_, kept))) in declared.kinds().into_iter().zip(rules.into_iter().zip(kept.kinds())) {
            for name in gone.difference(kept) {
                // Where it was, if the new version still has that file.
                let file = files.iter().find(|f| was_declared_in(f, kind, package, name, old)).map(|f| f.name());
                let at = match file.and_then(|name| new.files.get(name)) {
                    Some(now) if kind != "service" => enclosing(now, name, new),
                    Some(now) => At::File(now.name().to_string()),
                    None => At::File(file.unwrap_or_default().to_string()),
                };
                report.add(rule, at, format!("{kind} {name} was deleted from package {package:?}"));
            }
        }
    }
}

fn was_declared_in(file: &FileDescriptor, kind: &str, package: &str, name: &str, side: &Side) -> bool {
    let full = if package.is_empty() { name.to_string() } else { format!("{package}.{name}") };
    let parent = match kind {
        "message" => side.messages.get(&full).map(|m| m.parent_file()),
        "enum" => side.enums.get(&full).map(|e| e.parent_file()),
        "service" => side.services.get(&full).map(|s| s.parent_file()),
        _ => side.extensions.values().find(|e| e.full_name() == full).map(|e| e.parent_file()),
    };
    parent.as_ref() == Some(file)
}
