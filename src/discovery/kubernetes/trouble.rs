//! What the API server fails to answer, or refuses, right now: each watch
//! and lookup reports its own failure here and clears it once answered, so
//! `/ready`'s body can say what is wrong while calls go on with the last
//! endpoints known (the sidecar stays ready: the API server is not on the
//! request path).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The failures in force, by what failed (a watched Service, a lookup).
#[derive(Clone, Debug, Default)]
pub struct ApiTrouble {
    failing: Arc<Mutex<BTreeMap<String, Failure>>>,
}

#[derive(Debug)]
struct Failure {
    error: String,
    since: Instant,
}

impl ApiTrouble {
    /// A place for `what` to report its failures, cleared when dropped.
    pub fn slot(&self, what: String) -> TroubleSlot {
        TroubleSlot { trouble: self.clone(), what }
    }

    /// Each failure in force, oldest first: what failed, for how long, and why.
    pub fn failing(&self) -> Vec<(String, Duration, String)> {
        let failing = self.failing.lock().expect("API trouble lock");
        let mut all: Vec<_> =
            failing.iter().map(|(what, f)| (what.clone(), f.since.elapsed(), f.error.clone())).collect();
        all.sort_by_key(|(_, since, _)| std::cmp::Reverse(*since));
        all
    }
}

/// One watch's or lookup's failure, if any.
#[derive(Debug)]
pub struct TroubleSlot {
    trouble: ApiTrouble,
    what: String,
}

impl TroubleSlot {
    /// Records `error`, keeping when the failure began.
    pub fn failed(&self, error: &str) {
        let mut failing = self.trouble.failing.lock().expect("API trouble lock");
        let failure =
            failing.entry(self.what.clone()).or_insert_with(|| Failure { error: String::new(), since: Instant::now() });
        failure.error = error.to_string();
    }

    /// It answers again.
    pub fn answered(&self) {
        self.trouble.failing.lock().expect("API trouble lock").remove(&self.what);
    }
}

impl Drop for TroubleSlot {
    fn drop(&mut self) {
        self.answered();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_lasts_until_answered_or_its_reporter_is_gone() {
        let trouble = ApiTrouble::default();
        let (watch, lookup) = (trouble.slot("k8s://a.b:1".into()), trouble.slot("lookup 10.0.0.1:80".into()));
        watch.failed("forbidden");
        lookup.failed("timed out");
        watch.failed("forbidden again");
        let failing: Vec<(String, String)> = trouble.failing().into_iter().map(|(what, _, why)| (what, why)).collect();
        assert_eq!(
            failing,
            [("k8s://a.b:1".into(), "forbidden again".into()), ("lookup 10.0.0.1:80".into(), "timed out".into())]
        );
        watch.answered();
        assert_eq!(trouble.failing().len(), 1);
        drop(lookup);
        assert!(trouble.failing().is_empty());
    }
}
