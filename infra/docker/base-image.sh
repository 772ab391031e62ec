#!/usr/bin/env bash
# Builds the runtime base image (default capstan-base:bookworm) from a
# Debian bookworm rootfs made with debootstrap, for machines that cannot
# pull debian:bookworm-slim. Pass it to the Dockerfile as RUNTIME_IMAGE.
#
#   infra/docker/base-image.sh [IMAGE]
#
# The rootfs tarball is cached in $CAPSTAN_IMAGE_CACHE (default
# /var/cache/capstan-images) and the image is kept in Docker, so a second
# run on the same machine does nothing. Needs root (debootstrap) and
# `apt-get install -y debootstrap`.
set -euo pipefail

image=${1:-capstan-base:bookworm}
cache=${CAPSTAN_IMAGE_CACHE:-/var/cache/capstan-images}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the Dockerfile's runtime stage wants, so that it downloads nothing:
# python3 (the example and test apps, init.sh), curl (vault-init),
# ca-certificates (TLS to Vault, Consul and OTLP endpoints).
packages=python3,curl,ca-certificates

digest=$(echo "$packages" | md5sum | cut -c1-8)
if [ "$(docker image inspect -f '{{index .Config.Labels "io.capstan.packages"}}' "$image" 2>/dev/null)" = "$digest" ]; then
  echo "base-image: $image is already built"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

tarball="$cache/bookworm-$digest.tar"
if [ ! -f "$tarball" ]; then
  mkdir -p "$cache"
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "base-image: debootstrap bookworm into $root (a few minutes, once per machine)"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
  tar -C "$root" --numeric-owner -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi
docker import --change 'CMD ["/bin/bash"]' --change "LABEL io.capstan.packages=$digest" \
  "$tarball" "$image" >/dev/null
echo "base-image: imported $image from $tarball"
