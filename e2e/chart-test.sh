#!/usr/bin/env bash
# Chart checks that need no cluster: lint against values.schema.json, bad
# values refused by the schema, rendering with and without CRDs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/e2e/lib/tools.sh" >/dev/null
CHART=$ROOT/charts/yukumo
pass=0; fail=0
check() { # description, command...
  local what=$1; shift
  if "$@" >/tmp/yukumo-chart-test.out 2>&1; then pass=$((pass+1)); echo "ok   $what"
  else fail=$((fail+1)); echo "FAIL $what"; cat /tmp/yukumo-chart-test.out; fi
}
refuses() { ! "$@"; }
check "helm lint --strict" helm lint --strict "$CHART"
check "helm lint with the local values" helm lint --strict "$CHART" -f "$ROOT/e2e/values-local.yaml"
for bad in "controller.replicas=0" "agent.site=Not_A_Label" "controller.logLevel=loud" "unknownKey=1" "agent.cephKeyringSecret=Bad_Name"; do
  check "values schema refuses $bad" refuses helm lint "$CHART" --set "$bad"
done
render=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4)
check "renders 6 CRDs" test "$(grep -c '^kind: CustomResourceDefinition' <<<"$render")" -eq 6
check "CRDs are kept on uninstall" test "$(grep -c 'helm.sh/resource-policy: keep' <<<"$render")" -eq 6
check "renders the controller Deployment with 2 replicas" grep -q 'replicas: 2' <<<"$render"
check "renders the agent DaemonSet" grep -q '^kind: DaemonSet' <<<"$render"
check "ships the user roles, aggregated into view/edit/admin" test "$(grep -c "rbac.authorization.k8s.io/aggregate-to-" <<<"$render")" -eq 6
check "controller runs as non-root with no capabilities" grep -q 'runAsNonRoot: true' <<<"$render"
check "no Ceph keyring by default" refuses grep -q -- '--ceph-keyring' <<<"$render"
ceph=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set agent.cephKeyringSecret=ceph-yukumo)
check "agent.cephKeyringSecret passes --ceph-keyring" grep -q -- '--ceph-keyring=/etc/yukumo/ceph/keyring' <<<"$ceph"
check "agent.cephKeyringSecret mounts the Secret" grep -q 'secretName: ceph-yukumo' <<<"$ceph"
norender=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set crds.install=false)
check "crds.install=false renders no CRD" test "$(grep -c '^kind: CustomResourceDefinition' <<<"$norender" || true)" -eq 0
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
