//! protomesh: a gRPC service-mesh sidecar whose policy lives in the `.proto` contracts.
//!
//! From the ground up: `grpc`, `duration`, `discovery` and `workers` know
//! nothing of the rest; `identity` holds the workload's credentials; `call`
//! is what every layer shares; `policy` and `telemetry` are the layers;
//! `contract` and `config` are the inputs, and `effective` what they mean
//! for each method; `proxy` composes the stacks and carries the calls; `app`
//! wires a running sidecar; `check` is the command that reports.

#![forbid(unsafe_code)]

pub mod app;
pub mod call;
pub mod capture;
pub mod check;
pub mod cni;
pub mod config;
pub mod contract;
pub mod digest;
pub mod discovery;
pub mod duration;
pub mod effective;
pub mod grpc;
pub mod grpc_health;
pub mod identity;
pub mod kube;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod transcode;
pub mod watch;
pub mod workers;

/// Generated from `proto/`: the gRPC health messages.
pub mod pb {
    pub mod grpc {
        pub mod health {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
            }
        }
    }
}
