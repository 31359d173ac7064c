# syntax=docker/dockerfile:1
# tollgate container image: `docker build -t tollgate .` (or podman build).
#
# Two stages: a builder that compiles the release binary, with the dependencies in a layer of
# their own (a change under src/ rebuilds only tollgate itself), and a small runtime stage that
# holds the binary, its default configuration and a non-root user.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# Pingora builds zlib-ng with cmake. Versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake make pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# 1. Dependencies only: the manifests and empty targets, so this layer is reused until
#    Cargo.toml or Cargo.lock change. The manifest names the criterion benches, so their files
#    must exist for it to parse (they are not built here).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '//! placeholder' > src/lib.rs \
 && cargo build --release --locked --bin tollgate \
 && rm -rf src target/release/tollgate* target/release/deps/tollgate-* \
           target/release/deps/libtollgate-* target/release/.fingerprint/tollgate-*

# 2. tollgate itself.
COPY src ./src
RUN cargo build --release --locked --bin tollgate \
 && strip --strip-debug target/release/tollgate \
 && ./target/release/tollgate --version

FROM ${RUNTIME_IMAGE}
ARG UID=10001
# The system roots, for upstream TLS without a ca_file.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid ${UID} tollgate \
 && useradd --system --uid ${UID} --gid tollgate --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tollgate
COPY --from=builder /build/target/release/tollgate /usr/local/bin/tollgate
COPY conf/container.yaml /etc/tollgate/tollgate.yaml
USER ${UID}:${UID}
# 8080: traffic; 9901: admin (health, readiness, metrics); 8443: TLS, when configured.
EXPOSE 8080 8443 9901
# SIGTERM drains (readiness off, grace_period, then graceful_shutdown_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["-c", "/etc/tollgate/tollgate.yaml"]
