//! End-to-end tests: sidecar pairs on loopback (many independent meshes
//! running in parallel), the binary as users run it, and its Kubernetes
//! front ends; one test binary.

mod apiserver;
mod boutique;
mod breaker;
mod breaking;
mod bulkheads;
mod capture;
mod cli;
mod cluster;
mod cluster_ip;
mod cni;
mod deadlines;
mod faults;
mod grpc_web;
mod harness;
mod health;
mod hedging;
mod injection;
mod isolation;
mod json;
mod kubelet;
mod kubernetes;
mod limits;
mod passthrough;
mod pods;
mod rate_limits;
mod reflection;
mod refusals;
mod relay;
mod reload;
mod resets;
mod retries;
mod tap;
mod tcp_bounds;
mod telemetry;
mod tracing;
mod validation;
mod webhook;
mod workers;
