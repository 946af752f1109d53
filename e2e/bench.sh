#!/usr/bin/env bash
# `make bench`: the compute, network, sites and storage benchmarks.
#
# Compute: starts a private environment (its own directory and ports) with 2
# simulated libvirt hosts for real guests and 20 agents on their own
# libvirt test-driver instances (site "bench"), runs
# target/release/yukumo-bench against it, and removes the environment
# afterwards, also on failure. Results: target/bench/compute.json.
# Network: target/release/yukumo-netbench programs 1,000 NetworkGroups with
# 10,000 public-IP mappings into one simulated router host (namespaces it
# creates and removes itself) against raw ip/nft batches.
# Results: target/bench/network.json.
# Storage: target/release/yukumo-storagebench, in the compute part's
# environment: a Volume of the local Site's dir pool created, hot-plugged
# into a tiny guest, and block I/O in the guest against the same program on
# a raw file on the host. Results: target/bench/storage.json.
# Sites: target/release/yukumo-sitesbench, two gateways of two Sites (its
# own namespaces) on 1 Gbit/s WAN links, their tunnel made by the agent's
# dataplane: guest-to-guest throughput and RTT through the tunnel against
# the WAN's, and through a capped tunnel. Results: target/bench/sites.json.
# YUKUMO_BENCH_ONLY=network|sites|compute|storage runs one.
# YUKUMO_BENCH_SMOKE=1 (`make test`): both parts at a small scale (a few
# nodes and groups, 2 real guests), figures not judged, results under
# target/bench/smoke/ — so a change that breaks `make bench` fails CI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/bench
NET_ARGS=()
SITES_ARGS=()
COMPUTE_ARGS=("$@")
STORAGE_ARGS=()
if [ "${YUKUMO_BENCH_SMOKE:-}" = 1 ]; then
  OUT=$ROOT/target/bench/smoke
  NET_ARGS=(--groups 20 --mappings 100 --single-rounds 4)
  SITES_ARGS=(--seconds 1)
  STORAGE_ARGS=(--size-mib 16)
  COMPUTE_ARGS=(--clusters 2 --nodes-per-cluster 10 --steady-secs 5 --real-guests 2 "$@")
  export YUKUMO_BENCH_AGENTS=${YUKUMO_BENCH_AGENTS:-4}
fi
mkdir -p "$OUT"
if [ -z "${YUKUMO_BENCH_ONLY:-}" ] || [ "${YUKUMO_BENCH_ONLY:-}" = network ]; then
  "$ROOT/target/release/yukumo-netbench" --out "$OUT/network.json" "${NET_ARGS[@]}"
fi
if [ -z "${YUKUMO_BENCH_ONLY:-}" ] || [ "${YUKUMO_BENCH_ONLY:-}" = sites ]; then
  "$ROOT/target/release/yukumo-sitesbench" --out "$OUT/sites.json" "${SITES_ARGS[@]}"
fi
case "${YUKUMO_BENCH_ONLY:-}" in network|sites) exit 0 ;; esac
WORK=$(mktemp -d /tmp/yukumo-bench.XXXXXX)
export YUKUMO_ENV_DIR=$WORK/env
AGENTS=${YUKUMO_BENCH_AGENTS:-20}
cleanup() {
  local rc=$?
  "$ROOT/e2e/env.sh" down --dir "$YUKUMO_ENV_DIR" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
# shellcheck disable=SC1091
source "$ROOT/e2e/lib/tools.sh" >/dev/null
export YUKUMO_HEARTBEAT=10s
"$ROOT/e2e/env.sh" up --dir "$YUKUMO_ENV_DIR" --hosts 2 --no-example --storage ceph --no-prometheus
export KUBECONFIG=$YUKUMO_ENV_DIR/kubeconfig
# The real guests boot right after 2,000 nodes are deleted; with 10 s
# heartbeats the local Site's 20 s grace (the e2e's) lets one late heartbeat
# (its libvirtd busy starting guests) count as a lost host, whose measured
# guests are then recreated elsewhere under new uids.
kubectl patch site local --type merge -p '{"spec":{"hostGraceSeconds":60}}' >/dev/null
if [ "${YUKUMO_BENCH_ONLY:-}" != storage ]; then
  kubectl apply -f - >/dev/null <<'YAML'
apiVersion: yukumo.io/v1alpha1
kind: Site
metadata: {name: bench}
spec: {hostGraceSeconds: 60}
YAML
  for i in $(seq 1 "$AGENTS"); do
    "$ROOT/e2e/env.sh" start-test-agent "bench-$i" bench --dir "$YUKUMO_ENV_DIR" >/dev/null
  done
fi
kubectl wait --for condition=Ready --timeout 120s hosts --all >/dev/null
YUKUMO_TINY_IMAGE=$("$ROOT/e2e/lib/tiny-guest.sh")
export YUKUMO_TINY_IMAGE YUKUMO_BENCH_AGENTS=$AGENTS
if [ "${YUKUMO_BENCH_ONLY:-}" != storage ]; then
  "$ROOT/target/release/yukumo-bench" --out "$OUT/compute.json" "${COMPUTE_ARGS[@]}"
fi
if [ "${YUKUMO_BENCH_ONLY:-}" != compute ]; then
  "$ROOT/target/release/yukumo-storagebench" --out "$OUT/storage.json" "${STORAGE_ARGS[@]}"
fi
