#!/usr/bin/env bash
# Sourced by the image scripts: podman settings for this sandboxed, loopback-only machine
# (see ../shared/notes/tooling.md). The storage lives in TOLLGATE_PODMAN_DIR so that layers
# (base images, the dependency layer of the builder) survive between runs on one machine.
# Nothing here is needed, or shipped, to build the Dockerfile on an ordinary Docker/podman host.
TOLLGATE_PODMAN_DIR=${TOLLGATE_PODMAN_DIR:-/var/tmp/tollgate-podman}
mkdir -p "$TOLLGATE_PODMAN_DIR/root" "$TOLLGATE_PODMAN_DIR/run"
cat > "$TOLLGATE_PODMAN_DIR/containers.conf" <<CONF
[containers]
# The sandbox forbids raising rlimits; containers share the host's (loopback-only) network.
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$TOLLGATE_PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
runroot = "$TOLLGATE_PODMAN_DIR/run"
graphroot = "$TOLLGATE_PODMAN_DIR/root"
CONF
export CONTAINERS_CONF="$TOLLGATE_PODMAN_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$TOLLGATE_PODMAN_DIR/storage.conf"
