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
check "ships the user roles, aggregated into view/edit/admin" test "$(grep -c "rbac.authorization.k8s.io/aggregate-to-" <<<"$render")" -eq 8
check "the console is for editors and admins, not viewers" grep -Pzq 'name: yukumo-console\n  labels:\n(    .*\n)*?    rbac.authorization.k8s.io/aggregate-to-edit: "true"\n    rbac.authorization.k8s.io/aggregate-to-admin: "true"\nrules:\n- apiGroups: \[yukumo.io\]\n  resources: \[virtualnodes/console\]\n  verbs: \[get\]' <<<"$render"
check "the agent serves consoles on the host's address" grep -q -- '--console-url=https://$(HOST_IP):9443' <<<"$render"
check "controller runs as non-root with no capabilities" grep -q 'runAsNonRoot: true' <<<"$render"
check "no Ceph keyring by default" refuses grep -q -- '--ceph-keyring' <<<"$render"
ceph=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set agent.cephKeyringSecret=ceph-yukumo)
check "agent.cephKeyringSecret passes --ceph-keyring" grep -q -- '--ceph-keyring=/etc/yukumo/ceph/keyring' <<<"$ceph"
check "agent.cephKeyringSecret mounts the Secret" grep -q 'secretName: ceph-yukumo' <<<"$ceph"
check "no iSCSI target by default" refuses grep -q -- '--iscsi-portal' <<<"$render"
iscsi=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set agent.iscsi.portal=auto)
check "agent.iscsi.portal passes the portal and tgtd's control port" grep -Pzq -- '- --iscsi-portal=auto\n        - --iscsi-control-port=0\n' <<<"$iscsi"
check "agent.iscsi.portal mounts tgtd's control socket" grep -q 'hostPath: {path: /run/tgtd, type: DirectoryOrCreate}' <<<"$iscsi"
# Every flag the chart passes exists and parses (clap validates what comes
# before --help, then prints help and exits 0), with all options set.
args_of() { # rendered manifest, template file: the container's args, one per line
  helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --show-only "templates/$2" "${@:3}" \
    | sed -n '/^        args:/,/^        env:/p' | sed -n 's/^        - //p' | tr -d '"' | sed 's/\$(NODE_NAME)/host-1/'
}
full=(--set agent.gateway=true --set agent.uplink=eno1 --set agent.cephKeyringSecret=ceph --set-json agent.cpuOvercommit=1.5
      --set agent.domainType=qemu --set agent.iscsi.portal=auto --set agent.iscsi.controlPort=7 --set 'agent.extraArgs[0]=--underlay-address=192.0.2.5' --set 'controller.extraArgs[0]=--identity=controller-a')
mapfile -t agent_args < <(args_of x agent.yaml "${full[@]}")
mapfile -t ctl_args < <(args_of x controller.yaml "${full[@]}")
check "the agent accepts every flag the chart passes (${#agent_args[@]})" "$ROOT/target/release/yukumo-agent" "${agent_args[@]}" --help
check "the controller accepts every flag the chart passes (${#ctl_args[@]})" "$ROOT/target/release/yukumo-controller" "${ctl_args[@]}" --help
check "a wrong flag would be caught" refuses "$ROOT/target/release/yukumo-agent" "${agent_args[@]}" --no-such-flag --help
for bad in "agent.domainType=xen" "agent.iscsi.portal=10.0.0.1" "agent.uplink=this-name-is-too-long" "controller.priorityClassName=Bad_Name" "controller.extraArgs[0]=not-a-flag"; do
  check "values schema refuses $bad" refuses helm lint "$CHART" --set "$bad"
done
check "controller PodDisruptionBudget with 2 replicas" grep -q '^kind: PodDisruptionBudget' <<<"$render"
check "no PodDisruptionBudget for 1 replica" refuses grep -q '^kind: PodDisruptionBudget' \
  <<<"$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set controller.replicas=1)"
check "ships the site agents' role and the policy keeping each to its own Host" \
  test "$(grep -c 'name: yukumo-site-agent' <<<"$render")" -ge 3
authz=(--set controller.authorizationWebhook.enabled=true --set controller.authorizationWebhook.tlsSecret=yukumo-authz-tls)
mapfile -t authz_args < <(args_of x controller.yaml "${authz[@]}")
check "the controller accepts the authorization webhook's flags (${#authz_args[@]})" "$ROOT/target/release/yukumo-controller" "${authz_args[@]}" --help
check "authorizationWebhook: the flags, the Secret mounted, the Service yukumo-authz" python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
pod = dep["spec"]["template"]["spec"]; c = pod["containers"][0]
assert "--authz-addr=0.0.0.0:8443" in c["args"], c["args"]
assert {"name": "authz", "containerPort": 8443} in c["ports"], c["ports"]
assert pod["volumes"][0]["secret"]["secretName"] == "yukumo-authz-tls", pod["volumes"]
assert c["volumeMounts"][0]["mountPath"] == "/etc/yukumo/authz"
svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "yukumo-authz")
assert svc["spec"]["ports"][0]["targetPort"] == "authz"
' < <(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 "${authz[@]}" --show-only templates/controller.yaml)
check "authorizationWebhook without its tlsSecret is refused, naming the value" sh -c \
  "helm template yukumo '$CHART' --kube-version 1.35.4 --set controller.authorizationWebhook.enabled=true 2>&1 | grep -q 'controller.authorizationWebhook.tlsSecret: name the'"
check "no webhook by default" refuses grep -q 'authz' <<<"$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --show-only templates/controller.yaml)"
check "admissionPolicy.enabled=false: no policy" refuses grep -q '^kind: ValidatingAdmissionPolicy' \
  <<<"$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set admissionPolicy.enabled=false)"
# Monitoring: the alerts pass promtool (syntax, and unit tests with
# synthetic series), the chart ships them, the PodMonitor and the dashboard.
check "promtool accepts the alerts" "$YUKUMO_PROMETHEUS_DIR/promtool" check rules "$CHART/files/alerts.yaml"
check "the alerts' promtool unit tests pass" "$YUKUMO_PROMETHEUS_DIR/promtool" test rules "$ROOT/e2e/monitoring/alerts-test.yaml"
mon=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set metrics.podMonitor.enabled=true \
  --set metrics.prometheusRule.enabled=true --set metrics.dashboard.enabled=true --show-only templates/monitoring.yaml)
check "monitoring: a PodMonitor, the PrometheusRule and the dashboard ConfigMap" \
  test "$(grep -c '^kind: \(PodMonitor\|PrometheusRule\|ConfigMap\)' <<<"$mon")" -eq 3
check "the PrometheusRule holds the alerts file, the ConfigMap the dashboard" python3 -c '
import sys, json, textwrap
docs = sys.stdin.read().split("\n---\n")
rule = next(d for d in docs if "\nkind: PrometheusRule\n" in d)
spec = textwrap.dedent(rule.split("\nspec:\n", 1)[1])
assert spec.strip() == open(sys.argv[1]).read().strip(), "differs from files/alerts.yaml"
cm = next(d for d in docs if "\nkind: ConfigMap\n" in d)
dash = json.loads(textwrap.dedent(cm.split("  yukumo.json: |\n", 1)[1]))
assert dash == json.load(open(sys.argv[2])) and dash["panels"], "differs from files/dashboard.json"
' "$CHART/files/alerts.yaml" "$CHART/files/dashboard.json" <<<"$mon"
check "no monitoring objects by default" test -z "$(helm template yukumo "$CHART" --kube-version 1.35.4 --show-only templates/monitoring.yaml 2>/dev/null | grep '^kind:')"
check "controller replicas prefer different nodes" grep -q 'podAntiAffinity' <<<"$render"
check "the agent reads its Node's labels (and may get Nodes)" grep -q -- '--from-node-labels' <<<"$render"
check "agent RBAC: get nodes" grep -B2 -A1 'resources: \[nodes\]' <<<"$render"
check "fromNodeLabels=false: neither" refuses grep -q -- 'resources: \[nodes\]\|--from-node-labels' \
  <<<"$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set agent.fromNodeLabels=false)"
check "agent has a readiness probe" grep -q 'readinessProbe' <<<"$(helm template yukumo "$CHART" --kube-version 1.35.4 --show-only templates/agent.yaml)"
pulls=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set 'image.pullSecrets[0].name=regcred' --set agent.priorityClassName=system-node-critical)
check "image.pullSecrets reach every pod (controller, agent, helm test)" test "$(grep -c 'name: regcred' <<<"$pulls")" -eq 3
hook=$(helm template yukumo "$CHART" --kube-version 1.35.4 --show-only templates/tests/check.yaml)
check "helm test: a hook pod running yukumo-controller --check" \
  test "$(grep -c -e 'helm.sh/hook: test' -e '- --check' <<<"$hook")" -eq 2
check "agent.priorityClassName is set" grep -q 'priorityClassName: system-node-critical' <<<"$pulls"
norender=$(helm template yukumo "$CHART" -n yukumo-system --kube-version 1.35.4 --set crds.install=false)
check "crds.install=false renders no CRD" test "$(grep -c '^kind: CustomResourceDefinition' <<<"$norender" || true)" -eq 0
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
