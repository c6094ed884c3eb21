//! End-to-end tests of the sidecar pair on loopback: one test binary, many
//! independent meshes running in parallel.

mod breaker;
mod bulkheads;
mod cli;
mod deadlines;
mod harness;
mod passthrough;
mod refusals;
mod reload;
mod resets;
mod retries;
mod telemetry;
mod tracing;
mod workers;
