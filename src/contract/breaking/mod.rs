//! Breaking changes between two versions of the contracts, as a caller built
//! against the old ones would meet them: a service or method gone, a request
//! or response type changed, a call shape changed. Added methods and
//! services, and policy changes, break nobody.

use std::collections::BTreeSet;
use std::fmt;

use super::Contracts;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakingChange {
    ServiceRemoved { service: String },
    MethodRemoved { path: String },
    TypeChanged { path: String, which: &'static str, from: String, to: String },
    ShapeChanged { path: String, from: String, to: String },
}

impl fmt::Display for BreakingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakingChange::ServiceRemoved { service } => write!(f, "service {service} was removed"),
            BreakingChange::MethodRemoved { path } => write!(f, "method {path} was removed"),
            BreakingChange::TypeChanged { path, which, from, to } => {
                write!(f, "method {path}: {which} type changed from {from} to {to}")
            }
            BreakingChange::ShapeChanged { path, from, to } => write!(f, "method {path}: changed from {from} to {to}"),
        }
    }
}

/// What `new` breaks of `old`, sorted; empty when callers of `old` keep working.
pub fn breaking_changes(old: &Contracts, new: &Contracts) -> Vec<BreakingChange> {
    let new_services: BTreeSet<&str> = new.methods().map(|m| m.service.as_str()).collect();
    let mut changes = BTreeSet::new();
    for method in old.methods() {
        let Some(now) = new.method(&method.path) else {
            changes.insert(if new_services.contains(method.service.as_str()) {
                BreakingChange::MethodRemoved { path: method.path.clone() }
            } else {
                BreakingChange::ServiceRemoved { service: method.service.clone() }
            });
            continue;
        };
        let path = &method.path;
        for (which, from, to) in [("request", &method.input, &now.input), ("response", &method.output, &now.output)] {
            if from != to {
                let (from, to) = (from.clone(), to.clone());
                changes.insert(BreakingChange::TypeChanged { path: path.clone(), which, from, to });
            }
        }
        if method.shape != now.shape {
            let (from, to) = (method.shape.to_string(), now.shape.to_string());
            changes.insert(BreakingChange::ShapeChanged { path: path.clone(), from, to });
        }
    }
    changes.into_iter().collect()
}

#[cfg(test)]
mod tests {
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

    const BASE: &str = r#"syntax = "proto3"; package p;
        message A {} message B {}
        service S { rpc Get(A) returns (B); rpc Watch(A) returns (stream B); }
        service T { rpc Ping(A) returns (A); }"#;

    #[test]
    fn additions_break_nothing() {
        let added =
            BASE.replace("service T {", "service U { rpc New(A) returns (B); } service T { rpc More(A) returns (B);");
        assert_eq!(breaking_changes(&contracts(BASE), &contracts(&added)), []);
    }

    #[test]
    fn removals_type_and_shape_changes_are_named_by_method() {
        let changed = r#"syntax = "proto3"; package p;
            message A {} message B {}
            service S { rpc Get(A) returns (A); rpc Watch(stream A) returns (stream B); }"#;
        let changes: Vec<String> =
            breaking_changes(&contracts(BASE), &contracts(changed)).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "service p.T was removed",
                "method /p.S/Get: response type changed from p.B to p.A",
                "method /p.S/Watch: changed from server-streaming to bidi-streaming",
            ]
        );
        let fewer = BASE.replace("rpc Watch(A) returns (stream B);", "");
        assert_eq!(
            breaking_changes(&contracts(BASE), &contracts(&fewer)),
            [BreakingChange::MethodRemoved { path: "/p.S/Watch".into() }]
        );
    }
}
