#!/usr/bin/env bash
# `make krew`: the kubectl plugin as krew distributes it — a reproducible
# archive of target/release/kubectl-yukumo and the krew manifest naming it
# by URL and sha256.
#
# Output: $OUT (default target/dist): kubectl-yukumo_v$VERSION_linux_amd64.tar.gz
# and yukumo.yaml. The manifest's URL is where a release would publish the
# archive ($YUKUMO_RELEASE_URL, default the project's GitHub releases); until
# then install from the two files:
#   kubectl krew install --manifest=target/dist/yukumo.yaml \
#     --archive=target/dist/kubectl-yukumo_v0.1.0_linux_amd64.tar.gz
# Prints "<manifest> <archive> <sha256>".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/dist}
BIN=$ROOT/target/release/kubectl-yukumo
[ -x "$BIN" ] || { echo "krew: no $BIN (run make build)" >&2; exit 1; }
VERSION=$(awk -F'"' '/^version *=/{print $2; exit}' "$ROOT/Cargo.toml")
RELEASE_URL=${YUKUMO_RELEASE_URL:-https://github.com/yukumo/yukumo/releases/download/v$VERSION}
NAME=kubectl-yukumo_v${VERSION}_linux_amd64.tar.gz
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Debug info stripped; every file's time the last commit's (reproducible).
objcopy --strip-debug "$BIN" "$work/kubectl-yukumo"
epoch=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  -C "$work" -cf - kubectl-yukumo | gzip -9n > "$OUT/$NAME.tmp"
mv "$OUT/$NAME.tmp" "$OUT/$NAME"
sum=$(sha256sum "$OUT/$NAME" | cut -c1-64)
cat > "$OUT/yukumo.yaml" <<MANIFEST
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: yukumo
spec:
  version: v$VERSION
  homepage: https://github.com/yukumo/yukumo
  shortDescription: Use yukumo virtual clusters
  description: |
    Use the virtual clusters (frontend and worker VMs on libvirt hosts) of
    the yukumo operator: status as a tree, scale a pool, start, stop or
    restart a cluster, pool or node, ssh to a node, its serial console,
    and remote Sites' agent credentials. Every request is yours: your
    kubeconfig, your RBAC.
  platforms:
  - selector:
      matchLabels:
        os: linux
        arch: amd64
    uri: $RELEASE_URL/$NAME
    sha256: $sum
    files:
    - from: kubectl-yukumo
      to: .
    bin: kubectl-yukumo
MANIFEST
echo "$OUT/yukumo.yaml $OUT/$NAME $sum"
