#!/bin/sh
# Build the gateway image for tests/test_container.py with podman (called by `make image`).
#
# No container registry is reachable from CI, so the base is made here, once, and kept in podman's
# image store: Debian bookworm from debootstrap (minbase) with python3 and python3-venv from the
# Debian mirror. The Dockerfile takes it as its BASE build argument; operators build on the
# official Python image instead (README, Operations → Container image). The host's CA bundle is
# mounted read-only over the same file while pip runs (never copied into the image).
set -eu
IMAGE=${1:?image name}
BASE=${2:?base image name}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=/etc/ssl/certs/ca-certificates.crt
cd "$(dirname "$0")/../.."

if ! podman image exists "$BASE"; then
    root=$(mktemp -d /var/tmp/gateway-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap: bookworm minbase + python3 → $BASE (once; cached in podman's store)"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { tail -20 "$root.log"; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | podman import --quiet - "$BASE" >/dev/null
fi

ca_mount=""
[ -f "$CA" ] && ca_mount="--volume=$CA:$CA:ro"
# --format docker keeps the HEALTHCHECK (the OCI format has no such field). The build stage is
# tagged too, so that pruning the previous builds keeps its layers (the installed dependencies).
# shellcheck disable=SC2086
podman build --quiet --format docker --build-arg "BASE=$BASE" $ca_mount --target build --tag "$IMAGE-build" . >/dev/null
# shellcheck disable=SC2086
podman build --quiet --format docker --build-arg "BASE=$BASE" $ca_mount --tag "$IMAGE" . >/dev/null
podman image prune --force >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$IMAGE" | awk -v image="$IMAGE" '{printf "%s: %.0f MB\n", image, $2 / 1e6}'
