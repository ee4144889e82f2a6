# The agent's image for Kubernetes mode (charts/diskchain): Debian 12 with QEMU's tools
# (qemu-img, qemu-io, qemu-storage-daemon) and libvirt's client library, both from
# bookworm-backports, added from the mirror the base image's own apt sources use
# (scripts/setup.sh does that; this file names no package registry).
#
#   docker build -t diskchain:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/setup.sh && cargo build --release -p diskchain --bin diskchain

FROM debian:bookworm-slim
COPY scripts/setup.sh /usr/local/lib/diskchain/setup.sh
RUN /usr/local/lib/diskchain/setup.sh && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/diskchain /usr/local/bin/diskchain
ENTRYPOINT ["/usr/local/bin/diskchain"]
