#!/usr/bin/env bash
# `make bench`: the compute and network benchmarks.
#
# Compute: starts a private environment (its own directory and ports) with 2
# simulated libvirt hosts for real guests and 20 agents on their own
# in-process test:///default hypervisors (site "bench"), runs
# target/release/yukumo-bench against it, and removes the environment
# afterwards, also on failure. Results: target/bench/compute.json.
# Network: target/release/yukumo-netbench programs 1,000 NetworkGroups with
# 10,000 public-IP mappings into one simulated router host (namespaces it
# creates and removes itself) against raw ip/nft batches.
# Results: target/bench/network.json. YUKUMO_BENCH_ONLY=network|compute runs one.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$ROOT/target/bench"
if [ "${YUKUMO_BENCH_ONLY:-}" != compute ]; then
  "$ROOT/target/release/yukumo-netbench" --out "$ROOT/target/bench/network.json"
fi
[ "${YUKUMO_BENCH_ONLY:-}" = network ] && exit 0
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
"$ROOT/e2e/env.sh" up --dir "$YUKUMO_ENV_DIR" --hosts 2 --no-example
export KUBECONFIG=$YUKUMO_ENV_DIR/kubeconfig
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: yukumo.io/v1alpha1
kind: Site
metadata: {name: bench}
spec: {hostGraceSeconds: 60}
YAML
for i in $(seq 1 "$AGENTS"); do
  "$ROOT/e2e/env.sh" start-test-agent "bench-$i" bench --dir "$YUKUMO_ENV_DIR" >/dev/null
done
kubectl wait --for condition=Ready --timeout 120s hosts --all >/dev/null
YUKUMO_TINY_IMAGE=$("$ROOT/e2e/lib/tiny-guest.sh")
export YUKUMO_TINY_IMAGE YUKUMO_BENCH_AGENTS=$AGENTS
mkdir -p "$ROOT/target/bench"
"$ROOT/target/release/yukumo-bench" --out "$ROOT/target/bench/compute.json" "$@"
