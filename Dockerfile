# syntax=docker/dockerfile:1
# One image runs the sidecar, the injector and the webhook (`protomesh run`,
# `inject`, `webhook`); the sample services have a target of their own, so
# the sidecar's image carries none of their code:
#   docker build -t ghcr.io/protomesh/protomesh:0.1.0 .
#   docker build --target samples -t ghcr.io/protomesh/protomesh-samples:0.1.0 .
# `protomesh init` needs the nft tool, which distroless lacks: its image is
#   docker build --target init -t ghcr.io/protomesh/protomesh-init:0.1.0 .
# The CNI plugin and its installer (k8s/cni's DaemonSet):
#   docker build --target cni -t ghcr.io/protomesh/protomesh-cni:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Two builds, so that the sidecar is built with none of the samples' features;
# release builds lay out functions in bench/protomesh.order (see build.rs).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p protomesh --bin protomesh --bin protomesh-cni \
 && cargo build --release --locked -p protomesh-samples --bin protomesh-samples \
 && mkdir /out && cp target/release/protomesh target/release/protomesh-cni target/release/protomesh-samples /out/

# glibc and libgcc, nothing else; a non-root user, and nothing is written to
# the root filesystem, which runs read-only.
FROM gcr.io/distroless/cc-debian12:nonroot AS samples
COPY --from=build /out/protomesh-samples /protomesh-samples
USER 1000:1000
ENTRYPOINT ["/protomesh-samples"]

# Runs as root with only NET_ADMIN, in the pod's init container.
FROM debian:bookworm-slim AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/protomesh /protomesh
ENTRYPOINT ["/protomesh", "init"]

# Copies itself onto the node (the plugin runs there, with the node's nft):
# root, to write the node's CNI directories, with no capability.
FROM gcr.io/distroless/cc-debian12 AS cni
COPY --from=build /out/protomesh-cni /protomesh-cni
ENTRYPOINT ["/protomesh-cni", "install"]

FROM gcr.io/distroless/cc-debian12:nonroot AS protomesh
COPY --from=build /out/protomesh /protomesh
USER 2102:2102
EXPOSE 4140 4143 4191 8443
ENTRYPOINT ["/protomesh"]
CMD ["run"]
