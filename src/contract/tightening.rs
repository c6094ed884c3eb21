//! Policy that a new version of the contracts tightens: what breaks no
//! generated code, yet may refuse calls that were served (a shorter timeout,
//! a lower limit, a caller no longer allowed). `check --breaking` lists these
//! as warnings.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::policy::fields::PolicyValue;
use crate::policy::source::Source;
use crate::policy::{MethodPolicy, PolicyFields};

use super::breaking::line_column;
use super::{Contracts, MethodInfo};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tightened {
    pub file: String,
    pub line_column: Option<(u32, u32)>,
    /// `/pkg.Service/Method`.
    pub method: String,
    /// The policy field, as `(protomesh.v1.method)` names it.
    pub field: &'static str,
    pub message: String,
}

/// The policy of each method both versions declare that `new` tightens, as
/// the contracts state it (method options over service options).
pub fn tightened(old: &Contracts, new: &Contracts) -> Vec<Tightened> {
    let mut found = Vec::new();
    for now in new.methods() {
        let Some(was) = old.method(&now.path) else { continue };
        let (before, after) = (stated(was), stated(now));
        let mut add = |field: &'static str, change: String| {
            let line_column = new.descriptors().get_service_by_name(&now.service).and_then(|service| {
                let method = service.methods().find(|m| m.name() == now.method)?;
                line_column(&method.parent_file(), method.path())
            });
            let message = format!("method {}: {field} {change}", now.path);
            found.push(Tightened { file: now.file.clone(), line_column, method: now.path.clone(), field, message });
        };
        for (field, from, to) in [
            ("timeout", &before.timeout, &after.timeout),
            ("idle_timeout", &before.idle_timeout, &after.idle_timeout),
            ("stream_timeout", &before.stream_timeout, &after.stream_timeout),
        ] {
            if let Some(change) =
                lowered(from.as_ref().map(|s| s.value), to.as_ref().map(|s| s.value), |d: &Duration| d.as_secs_f64())
            {
                add(field, change);
            }
        }
        let concurrency = |p: &MethodPolicy| p.concurrency.as_ref().map(|c| c.value.clone());
        if let Some(change) = lowered(concurrency(&before), concurrency(&after), |c| f64::from(c.max_in_flight)) {
            add("concurrency", change);
        }
        let size = |p: &MethodPolicy| p.max_message_size.as_ref().map(|s| s.value);
        if let Some(change) = lowered(size(&before), size(&after), |s| s.as_u64() as f64) {
            add("max_message_size", change);
        }
        let rate = |p: &MethodPolicy| p.rate_limit.as_ref().map(|r| r.value.clone());
        if let Some(change) = lowered(rate(&before), rate(&after), |r| r.per_second) {
            add("rate_limit", change);
        }
        let caller_rate = |p: &MethodPolicy| p.caller_rate_limit.as_ref().map(|r| r.value.clone());
        if let Some(change) = lowered(caller_rate(&before), caller_rate(&after), |r| r.per_second) {
            add("caller_rate_limit", change);
        }
        if let Some(change) = callers_removed(was, now) {
            add("allowed_callers", change);
        }
    }
    found.sort();
    found
}

/// What the contract states for the method: its option's fields over its service's.
fn stated(method: &MethodInfo) -> MethodPolicy {
    let none = PolicyFields::default();
    let contract = &method.contract;
    MethodPolicy::merge(&[
        (contract.method.as_ref().unwrap_or(&none), Source::MethodOption),
        (contract.service.as_ref().unwrap_or(&none), Source::ServiceOption),
    ])
}

/// `lowered from 5s to 1s`, or `set to 1s` where there was no limit.
fn lowered<T: PolicyValue>(from: Option<T>, to: Option<T>, size: impl Fn(&T) -> f64) -> Option<String> {
    match (from, to) {
        (Some(from), Some(to)) if size(&to) < size(&from) => {
            Some(format!("lowered from {} to {}", from.show().1, to.show().1))
        }
        (None, Some(to)) => Some(format!("set to {} where there was no limit", to.show().1)),
        _ => None,
    }
}

/// Callers the old contract allowed that the new one names no more.
fn callers_removed(was: &MethodInfo, now: &MethodInfo) -> Option<String> {
    let names = |m: &MethodInfo| -> Option<BTreeSet<String>> {
        m.contract.allowed_callers.as_ref().map(|c| c.value.iter().map(ToString::to_string).collect())
    };
    match (names(was), names(now)) {
        (Some(before), Some(after)) => {
            let gone: Vec<&String> = before.difference(&after).collect();
            (!gone.is_empty() && !after.contains("*"))
                .then(|| format!("no longer allows {}", gone.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")))
        }
        (None, Some(after)) if !after.contains("*") => {
            Some(format!("now allows only {}", after.into_iter().collect::<Vec<_>>().join(", ")))
        }
        _ => None,
    }
}
