#!/usr/bin/env bash
# Makes the two base images the Dockerfile names, locally, because this machine cannot pull
# from a registry: `debian:bookworm-slim` (debootstrap minbase from the host's Debian mirror)
# and `rust:1.95-slim-bookworm` (that base + a C toolchain + cmake + a copy of the host's Rust
# toolchain + the host's extra CA certificates, so cargo reaches the registry from inside a
# build). Each is made once and kept in TOLLGATE_PODMAN_DIR; delete it to start over.
# Elsewhere the Dockerfile uses the official images and this script is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/podman-env.sh

RUNTIME=debian:bookworm-slim
BUILDER=rust:1.95-slim-bookworm
has() { podman image exists "$1"; }

mirror() {
  # The first Debian mirror apt on this host uses (deb822 or one-line format).
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {print $2}'
  } | grep -v security | head -n 1 || true
}

if ! has "$RUNTIME"; then
  rootfs=$(mktemp -d "$TOLLGATE_PODMAN_DIR/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  m=$(mirror)
  [ -n "$m" ] || { echo "image-bases: no Debian mirror found in /etc/apt" >&2; exit 1; }
  echo "image-bases: debootstrap bookworm from $m (a few minutes)"
  debootstrap --variant=minbase bookworm "$rootfs" "$m" > "$TOLLGATE_PODMAN_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$TOLLGATE_PODMAN_DIR/debootstrap.log" >&2; exit 1; }
  # Trimmed like the official slim image: no documentation, manuals, locales or caches
  # (debootstrap already wrote an apt source for the mirror).
  # Like the official image's /etc/apt/apt.conf.d/docker-clean: apt keeps no package caches.
  printf '%s\n' 'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };' \
    > "$rootfs/etc/apt/apt.conf.d/docker-clean"
  rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/* "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$RUNTIME" > /dev/null
  rm -rf "$rootfs"; trap - EXIT
fi

if ! has "$BUILDER"; then
  echo "image-bases: $BUILDER from $RUNTIME and the host's Rust toolchain"
  sysroot=$(rustc --print sysroot)
  ctr=$(buildah from --pull-never "$RUNTIME")
  trap 'buildah rm "$ctr" > /dev/null' EXIT
  # The host's extra CA certificates (a TLS-inspecting egress proxy, where there is one).
  if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    buildah run "$ctr" mkdir -p /usr/local/share/ca-certificates
    for c in /usr/local/share/ca-certificates/*.crt; do buildah copy "$ctr" "$c" /usr/local/share/ca-certificates/ > /dev/null; done
  fi
  buildah run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates gcc libc6-dev make cmake pkg-config > /dev/null && update-ca-certificates > /dev/null && rm -rf /var/lib/apt/lists/*'
  # The toolchain without its documentation (share/), as the official image has it.
  for d in bin lib libexec etc; do
    [ -d "$sysroot/$d" ] && buildah copy "$ctr" "$sysroot/$d" "/usr/local/rust/$d" > /dev/null
  done
  buildah config --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah run "$ctr" -- sh -c 'mkdir -p /usr/local/cargo/bin && rustc --version && cargo --version'
  buildah commit --quiet "$ctr" "$BUILDER" > /dev/null
  buildah rm "$ctr" > /dev/null; trap - EXIT
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'bookworm' || true
