#!/usr/bin/env bash
# End-to-end tests: starts a private local environment (its own directory,
# free ports, 3 simulated hosts), runs the e2e test crate against it, and
# removes the environment afterwards, also when a test fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d /tmp/yukumo-e2e.XXXXXX)
export YUKUMO_ENV_DIR=$WORK/env
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -d "$YUKUMO_ENV_DIR/logs" ]; then
    echo "e2e failed; last lines of each component log:" >&2
    for f in "$YUKUMO_ENV_DIR"/logs/*.log; do
      case $f in *audit.log) continue ;; esac
      echo "--- $f" >&2; tail -n 15 "$f" | cut -c1-400 >&2
    done
  fi
  "$ROOT/e2e/env.sh" down --dir "$YUKUMO_ENV_DIR" || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
# shellcheck disable=SC1091
source "$ROOT/e2e/lib/tools.sh" >/dev/null   # puts the pinned kubectl/helm first on PATH
# The environment runs the controller and agents from target/release: build
# them from this tree first (a no-op after `make build`), so a run after a
# checkout never tests stale binaries.
cargo build --release --workspace --all-targets
# Fast heartbeats and a short lease keep the failure tests quick.
export YUKUMO_HEARTBEAT=2s YUKUMO_LEASE_DURATION=6s
"$ROOT/e2e/env.sh" up --dir "$YUKUMO_ENV_DIR" --hosts 3 --no-example --storage ceph
# The tiny guest image the guest tests boot ("<path> sha256:<hex>").
YUKUMO_TINY_IMAGE=$("$ROOT/e2e/lib/tiny-guest.sh")
export YUKUMO_TINY_IMAGE
# --workspace with --test '*': the same feature unification as `make build`,
# so nothing is compiled twice; '*' selects the integration tests (e2e/tests).
cargo test --release --workspace --test '*' -- --test-threads=1 "$@"
