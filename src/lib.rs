//! protomesh: a gRPC service-mesh sidecar whose policy lives in the `.proto` contracts.

pub mod admin;
pub mod check;
pub mod config;
pub mod contract;
pub mod demo;
pub mod grpc;
pub mod identity;
pub mod policy;
pub mod proxy;
pub mod sample;
pub mod telemetry;

/// Generated from `proto/`: the policy options and the example services.
pub mod pb {
    pub mod protomesh {
        pub mod v1 {
            tonic::include_proto!("protomesh.v1");
        }
    }
    pub mod echo {
        pub mod v1 {
            tonic::include_proto!("echo.v1");
        }
    }
    pub mod shop {
        pub mod v1 {
            tonic::include_proto!("shop.v1");
        }
    }
}
