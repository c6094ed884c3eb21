//! End-to-end tests of the sidecar pair on loopback: one test binary, many
//! independent meshes running in parallel.

mod cli;
mod harness;
mod passthrough;
mod refusals;
mod resets;
