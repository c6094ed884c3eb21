//! What the sidecar tells about itself: Prometheus metrics (served by the
//! admin server), the `Observe` layer that records every call (and gives it
//! its request ID), and traces
//! (a span per call and per attempt, exported over OTLP), and the tap that
//! copies live calls for `protomesh tap`.

mod attempts;
pub mod log_throttle;
pub mod metrics;
mod observe;
pub mod process;
mod request_id;
pub mod tap;
pub mod trace;

pub use attempts::TraceAttempts;
pub use log_throttle::LogThrottle;
pub use metrics::{CallMetrics, Metrics};
pub use observe::{Logged, Observe, Observed, Peer};
pub use tap::{Tap, Taps};
pub use trace::{Tracing, TracingConfig};
