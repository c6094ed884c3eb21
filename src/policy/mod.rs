//! Per-call policies. Each decides from precomputed per-method data, so the hot
//! path does no parsing and no allocation to reach a decision.

pub mod authz;
pub mod method;
