//! Files and packages: a file's options, syntax and package; what a file or
//! a package no longer declares.

use std::collections::BTreeMap;

use prost_reflect::FileDescriptor;
use prost_reflect::prost_types::FileOptions;

use super::{At, Report, Rule, Side, enclosing, nested_name, syntax_name};

pub(super) fn check(old: &Side, new: &Side, report: &mut Report<'_>) {
    for (name, _) in old.files.iter().filter(|(name, _)| !new.files.contains_key(*name)) {
        report.add(Rule::FileNoDelete, At::File(name.clone()), format!("file {name} was deleted"));
    }
    for (_, was, now) in Side::pairs(&old.files, &new.files) {
        same_options(was, now, report);
    }
    declarations_kept(old, new, report);
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

/// The kinds of elements a file or package declares, and the rules that
/// keep them in one file and in one package.
const KINDS: [(&str, Rule, Rule); 4] = [
    ("message", Rule::MessageNoDelete, Rule::PackageMessageNoDelete),
    ("enum", Rule::EnumNoDelete, Rule::PackageEnumNoDelete),
    ("extension", Rule::ExtensionNoDelete, Rule::PackageExtensionNoDelete),
    ("service", Rule::ServiceNoDelete, Rule::PackageServiceNoDelete),
];

/// What a file or a package declares: for each of [`KINDS`], the nested
/// names, each with the file that declares it.
type Declared = [BTreeMap<String, String>; 4];

/// What each file of a version declares (by its name), and each package (by
/// its name), in one pass over the version's elements.
fn declared(side: &Side) -> (BTreeMap<String, Declared>, BTreeMap<String, Declared>) {
    let nested = |full: &str, package: &str| nested_name(full, package).to_string();
    let elements = side
        .messages
        .values()
        .map(|m| (0, m.parent_file(), nested(m.full_name(), m.package_name())))
        .chain(side.enums.values().map(|e| (1, e.parent_file(), nested(e.full_name(), e.package_name()))))
        .chain(side.extensions.values().map(|e| (2, e.parent_file(), nested(e.full_name(), e.package_name()))))
        .chain(side.services.values().map(|s| (3, s.parent_file(), nested(s.full_name(), s.package_name()))));
    let (mut files, mut packages): (BTreeMap<String, Declared>, BTreeMap<String, Declared>) = Default::default();
    for file in side.files.values() {
        packages.entry(file.package_name().to_string()).or_default();
    }
    for (kind, file, name) in elements {
        let by_file = files.entry(file.name().to_string()).or_default();
        by_file[kind].insert(name.clone(), file.name().to_string());
        let by_package = packages.entry(file.package_name().to_string()).or_default();
        by_package[kind].insert(name, file.name().to_string());
    }
    (files, packages)
}

/// Where a deleted element was reported: in the new version of its file, in
/// the enclosing message still there (not for a service, which has none).
fn place(kind: &str, name: &str, file: Option<&FileDescriptor>, file_name: &str, new: &Side) -> At {
    match file {
        Some(now) if kind != "service" => enclosing(now, name, new),
        Some(now) => At::File(now.name().to_string()),
        None => At::File(file_name.to_string()),
    }
}

fn declarations_kept(old: &Side, new: &Side, report: &mut Report<'_>) {
    let ((before, packages_before), (after, packages_after)) = (declared(old), declared(new));
    let none = Declared::default();
    for (_, _, now) in Side::pairs(&old.files, &new.files) {
        let (was, is) = (before.get(now.name()).unwrap_or(&none), after.get(now.name()).unwrap_or(&none));
        for ((kind, rule, _), (gone, kept)) in KINDS.into_iter().zip(was.iter().zip(is)) {
            for name in gone.keys().filter(|name| !kept.contains_key(*name)) {
                let at = place(kind, name, Some(now), now.name(), new);
                report.add(rule, at, format!("{kind} {name} was deleted from file {}", now.name()));
            }
        }
    }
    for (package, was) in &packages_before {
        let Some(is) = packages_after.get(package) else {
            let file = old.files.values().find(|f| f.package_name() == package).map_or("", |f| f.name());
            report.add(Rule::PackageNoDelete, At::File(file.to_string()), format!("package {package:?} was deleted"));
            continue;
        };
        for ((kind, _, rule), (gone, kept)) in KINDS.into_iter().zip(was.iter().zip(is)) {
            for (name, file) in gone.iter().filter(|(name, _)| !kept.contains_key(*name)) {
                let at = place(kind, name, new.files.get(file), file, new);
                report.add(rule, at, format!("{kind} {name} was deleted from package {package:?}"));
            }
        }
    }
}
