//! What the sidecar tells about itself: Prometheus metrics (served by the
//! admin server) and the `Observe` layer that records every call.

pub mod metrics;
mod observe;
pub mod policy_metrics;
mod process;
pub mod trace;

pub use metrics::Metrics;
pub use observe::{CallRecord, Observe};
