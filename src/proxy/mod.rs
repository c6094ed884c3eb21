//! The data plane. Each connection's [`edge`] reads the [`routes`] in force
//! and hands the call to its method's stack, composed in [`outbound`] and
//! [`inbound`] from the policies and telemetry layers; the stacks end at an
//! [`upstream`] (balanced endpoints over mTLS) or at the local app. Live
//! state that outlasts a version of the routes is kept in [`registry`].
//!
//! outbound: app h2c (or a captured connection: detected, else opaque TCP)
//!           → edge (memory budget, route by `:path`) → observe → message
//!           sizes → circuit breaker → deadline → retries or hedging
//!           → attempt spans → bulkheads (method, upstream) → forward budget
//!           → balancer (P2C, outlier detection, health checks) → pooled
//!           mTLS h2 connection
//! inbound:  mTLS h2 (client cert required; permissive ports also take
//!           plaintext, as opaque TCP) → edge (caller, route) → observe
//!           → authorization → rate limits (caller, method) → message sizes
//!           → deadline → bulkheads (method, caller) → forward budget
//!           → pooled h2c connection to the app

mod balance;
mod connection;
mod detect;
pub mod edge;
mod endpoint;
mod exchange;
mod health_answer;
mod health_check;
pub mod inbound;
mod keepalive;
mod opaque;
pub mod open;
mod original;
pub mod outbound;
mod reflection;
pub mod registry;
mod respond;
pub mod routes;
pub mod server;
pub mod shed;
pub mod upstream;
pub mod web;
