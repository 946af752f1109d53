#!/usr/bin/env bash
# The chart's pods on real kubelet nodes (`e2e/env.sh up --kubelets`): two
# simulated hosts, each a kubelet node with containerd; the chart installed
# with the image `image/build.sh` makes, imported into each node. Checks:
#   - one agent pod per node, two controller replicas, one of them leader;
#     both Hosts Ready through the agent pods (libvirtd of the host);
#   - `kubectl logs` and `kubectl exec` reach the pods (API server → kubelet);
#   - a VirtualCluster of real tiny guests comes up, driven by the pods;
#   - deleting the leader's pod: the standby leads, a new replica starts,
#     and the new leader acts (a pool scaled up gets its node);
#   - deleting an agent pod: its successor takes the host over without
#     restarting the guests (same QEMU processes), the Host stays Ready;
#   - `kubectl yukumo console` reaches a worker's shell through its host's
#     agent pod for an editor and is refused (403) to a viewer;
#   - an iSCSI volume is exported by host-1's agent pod (its node's tgtd)
#     and read by a guest, and removed from the target when deleted;
#   - an `rbd` volume in a real single-node Ceph: its pool's capacity read
#     by host-1's agent pod (the monitors' `df` through librados), made from
#     an image by the pod's qemu-img, and read by the same guest's QEMU with
#     the key the pod got from the keyring Secret (the bytes are the image's);
#   - `helm test` fails naming the cause while the Hosts have no Site, then
#     passes;
#   - `helm upgrade` to a new image tag rolls every pod, guests untouched.
# Timings are printed. Everything is removed at the end, also on failure.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/tools.sh
source "$ROOT/e2e/lib/tools.sh" >/dev/null
W=$(mktemp -d /tmp/yukumo-pods.XXXXXX)
DIR=$W/env
NS=yukumo-system
cleanup() {
  "$ROOT/e2e/env.sh" down --dir "$DIR" >"$W/down.log" 2>&1 || cat "$W/down.log" >&2
  rm -rf "$W"
}
trap cleanup EXIT
say() { echo "pods-test: $*"; }
fail() {
  echo "pods-test: FAILED: $*" >&2
  kubectl -n "$NS" get pods -o wide >&2 2>/dev/null || true
  kubectl get hosts >&2 2>/dev/null || true
  exit 1
}
k() { kubectl -n "$NS" "$@"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(now)"; }
# Wait up to $1 seconds for a command to succeed.
until_ok() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}
pods_of() { k get pods -l "app.kubernetes.io/component=$1" -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.nodeName}{" "}{.metadata.uid}{"\n"}{end}'; }
leader() { k get lease yukumo-controller -o jsonpath='{.spec.holderIdentity}'; }
# Every guest's QEMU process (libvirt's PID files), as NAME=PID.
qemu_pids() {
  local f
  for f in "$DIR"/hosts/*/run/qemu/yk-*.pid; do
    [ -e "$f" ] && echo "$(basename "$f" .pid)=$(cat "$f")"
  done | sort | tr '\n' ' '
}

t=$(now)
"$ROOT/e2e/env.sh" up --dir "$DIR" --hosts 2 --kubelets --storage ceph --no-example --no-prometheus > "$W/up.log" 2>&1 \
  || { tail -20 "$W/up.log" >&2; fail "env.sh up --kubelets --storage ceph"; }
say "environment with 2 kubelet nodes, a single-node Ceph and the chart's pods up in $(since "$t") s"
export KUBECONFIG=$DIR/kubeconfig

# One agent pod per node; two controllers, one leading.
[ "$(pods_of agent | awk '{print $2}' | sort | tr '\n' ' ')" = "host-1 host-2 " ] \
  || fail "agent pods are not one per node: $(pods_of agent)"
[ "$(pods_of controller | wc -l)" = 2 ] || fail "not 2 controller pods"
# (Outputs are read whole before grep -q: under pipefail, a writer killed
# by SIGPIPE after grep's early exit would fail the pipeline.)
controllers=$(pods_of controller | awk '{print $1}')
grep -qx "$(leader)" <<<"$controllers" || fail "the lease holder $(leader) is no controller pod"
# `helm test` while the Hosts' Site is missing: it fails, naming why.
until_ok 60 sh -c "kubectl get hosts -o name | grep -c . | grep -qx 2" || fail "the agent pods registered no 2 Hosts"
kubectl delete site local --wait=true --timeout 60s >/dev/null || fail "deleting the Site"
until_ok 60 sh -c "kubectl get host host-1 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].reason}' | grep -qx SiteNotFound" \
  || fail "host-1 is not SiteNotFound without its Site"
if helm test yukumo -n "$NS" --logs --timeout 120s > "$W/helm-test.out" 2>&1; then
  fail "helm test passed with no Site for the Hosts: $(cat "$W/helm-test.out")"
fi
grep -q "FAILED: host host-1 is not Ready: SiteNotFound" "$W/helm-test.out" \
  || fail "helm test did not name the Hosts' cause: $(cat "$W/helm-test.out")"
say "helm test without the Site fails naming it: $(grep -m1 'FAILED: host' "$W/helm-test.out" | cut -c1-90)…"
kubectl apply -f "$ROOT/examples/local-site.yaml" >/dev/null
t=$(now)
until_ok 90 kubectl wait --for condition=Ready --timeout 5s hosts/host-1 hosts/host-2 || fail "Hosts not Ready"
say "2 agent pods, 2 controller pods (leader $(leader)); Hosts Ready $(since "$t") s after the Site"
helm test yukumo -n "$NS" --logs --timeout 120s > "$W/helm-test.out" 2>&1 \
  || fail "helm test: $(cat "$W/helm-test.out")"
grep -q "ok: 2/2 Hosts Ready" "$W/helm-test.out" || fail "helm test said: $(cat "$W/helm-test.out")"
say "helm test passes: $(grep '^ok:' "$W/helm-test.out" | tr '\n' ' ')"

# The API server reaches the kubelets.
agent1=$(pods_of agent | awk '$2=="host-1"{print $1}')
logs=$(k logs "$agent1" --tail 50) || fail "kubectl logs $agent1 failed"
[ -n "$logs" ] || fail "kubectl logs $agent1 is empty"
v=$(k exec "$agent1" -- /usr/local/bin/yukumo-agent --version) || fail "kubectl exec $agent1"
say "kubectl logs and exec work ($v)"

# A cluster of real tiny guests, its image staged on each host at the
# quickstart's path (/var/lib/yukumo/images on the host: the agent's state).
read -r img sum < <("$ROOT/e2e/lib/tiny-guest.sh")
for h in host-1 host-2; do
  mkdir -p "$DIR/hosts/$h/agent/images"
  cp "$img" "$DIR/hosts/$h/agent/images/yukumo-tiny-guest.qcow2"
  echo "${sum#sha256:}  yukumo-tiny-guest.qcow2" > "$DIR/hosts/$h/agent/images/SHA256SUMS"
done
# The example as written (its image by checksumURL), one worker fewer.
sed -e "s|replicas: 3|replicas: 1|" "$ROOT/examples/quickstart.yaml" | kubectl apply -f - >/dev/null
t=$(now)
until_ok 300 kubectl -n demo wait --for condition=Ready --timeout 5s vc/quickstart \
  || fail "quickstart not Ready: $(kubectl -n demo get vc,vn 2>&1)"
before=$(qemu_pids)
[ "$(echo "$before" | wc -w)" = 2 ] || fail "expected 2 QEMU processes, found: $before"
say "quickstart (frontend + 1 worker, real guests) Ready in $(since "$t") s; QEMU $before"

# The leader's pod goes: the standby takes over, a new replica starts.
old=$(leader)
t=$(now)
k delete pod "$old" --wait=false >/dev/null
until_ok 60 sh -c "h=\$(kubectl -n $NS get lease yukumo-controller -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != $old ]" \
  || fail "no new leader after deleting $old"
say "leader pod $old deleted: $(leader) leads after $(since "$t") s"
until_ok 120 k rollout status deploy/yukumo-controller --timeout 5s || fail "no replacement controller replica"
until_ok 60 sh -c "[ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=controller -o name | grep -c .) = 2 ]" \
  || fail "not 2 controller pods after the deletion: $(pods_of controller)"
t=$(now)
kubectl -n demo patch vc quickstart --type json -p '[{"op":"replace","path":"/spec/pools/0/replicas","value":2}]' >/dev/null
until_ok 300 sh -c "[ \"\$(kubectl -n demo get vc quickstart -o jsonpath='{.status.readyNodes}')\" = 3 ]" \
  || fail "the new leader did not bring up the scaled pool: $(kubectl -n demo get vc,vn 2>&1)"
until_ok 60 kubectl -n demo wait --for condition=Ready --timeout 5s vc/quickstart || fail "quickstart not Ready after scaling"
say "the new leader acts: pool scaled 1 → 2, 3/3 nodes Ready in $(since "$t") s"
before=$(qemu_pids)

# An agent pod goes: its successor adopts the guests without restarting
# them, and the guests' network carries on (a ping from the frontend on
# host-1 to a worker on host-2 throughout, 0.2 s apart).
fe=quickstart-frontend
w=$(kubectl -n demo get vn -o jsonpath='{range .items[?(@.spec.host!="host-1")]}{.metadata.name}{" "}{.spec.network.ip}{"\n"}{end}' | awk 'NR == 1')
[ -n "$w" ] || w=$(kubectl -n demo get vn -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.network.ip}{"\n"}{end}' | grep -v "^$fe " | awk 'NR == 1')
wip=${w#* }
# (the guests' shells answer once they booted: up to a minute or two)
until_ok 240 "$ROOT/e2e/env.sh" guest demo "$fe" "ping -c 1 -W 2 $wip" --dir "$DIR" \
  || fail "$fe cannot ping ${w% *} ($wip) before the test"
"$ROOT/e2e/env.sh" guest demo "$fe" "ping -q -c 75 -i 0.2 -W 1 $wip" --dir "$DIR" > "$W/ping.out" 2>&1 &
ping_pid=$!
sleep 2
t=$(now)
k delete pod "$agent1" --wait=false >/dev/null
until_ok 120 sh -c "kubectl -n $NS get pods -l app.kubernetes.io/component=agent -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.containerStatuses[0].ready}{\"\\n\"}{end}' | grep -v '^$agent1 ' | grep -q ' host-1 true'" \
  || fail "no ready agent pod replaced $agent1"
until_ok 60 kubectl wait --for condition=Ready --timeout 5s hosts/host-1 || fail "host-1 not Ready after its agent pod's replacement"
[ "$(qemu_pids)" = "$before" ] || fail "guests restarted with the agent pod: QEMU $before → $(qemu_pids)"
until_ok 60 kubectl -n demo wait --for condition=Ready --timeout 5s vc/quickstart || fail "quickstart not Ready after the agent pod's replacement"
say "agent pod $agent1 deleted: a new one ready and host-1 Ready in $(since "$t") s; guests untouched (QEMU $before)"
wait "$ping_pid" || fail "ping $fe → ${w% *} across the agent pod's replacement: $(cat "$W/ping.out")"
grep -q " 0% packet loss" "$W/ping.out" || fail "ping lost packets across the agent pod's replacement: $(grep loss "$W/ping.out")"
say "ping $fe → ${w% *} throughout: $(grep -o '[0-9]* packets transmitted, [0-9]* packets received, [0-9]*% packet loss' "$W/ping.out")"

# A worker's serial console as a user (`kubectl yukumo console`): the
# agent pod's endpoint on host-2 (10.255.0.2:9443, in the host's namespace)
# through the users' proxy the kubeconfig names; an editor gets the guest's
# shell, a viewer a 403. The editor has the usual NO_PROXY of a proxied
# workstation (localhost, 127.0.0.1: the API server direct, the proxy still
# taken to the hosts).
plugin=${YUKUMO_BIN_DIR:-$ROOT/target/release}/kubectl-yukumo
wname=${w% *}
alice=$("$ROOT/e2e/env.sh" user demo console-alice edit --dir "$DIR")
bob=$("$ROOT/e2e/env.sh" user demo console-bob view --dir "$DIR")
grep -q "proxy-url: http://127.0.0.1:" "$alice" || fail "the user's kubeconfig names no proxy: $(cat "$alice")"
if out=$(KUBECONFIG=$bob timeout 30 "$plugin" -n demo console "$wname" </dev/null 2>&1); then
  fail "a viewer got $wname's console: $out"
fi
grep -q "refused (403 Forbidden)" <<<"$out" || fail "the viewer's refusal is not a 403: $out"
t=$(now)
( for _ in $(seq 1 60); do
    grep -q "42-$wname" "$W/console.out" 2>/dev/null && break
    echo 'echo $((6*7))-$(hostname)'; sleep 0.5
  done ) | NO_PROXY=localhost,127.0.0.1 KUBECONFIG=$alice timeout 60 "$plugin" -n demo console "$wname" > "$W/console.out" 2>&1 \
  || fail "kubectl yukumo console $wname as an editor: $(cat "$W/console.out")"
grep -q "42-$wname" "$W/console.out" || fail "no shell answered on $wname's console: $(cat "$W/console.out")"
say "kubectl yukumo console $wname (its host's agent pod, through the users' proxy): the guest's shell answered in $(since "$t") s as an editor; a viewer got 403"

# An iSCSI volume (the Site's `san` pool on host-1): host-1's agent pod
# exports it from the node's tgtd (agent.iscsi.portal auto, control socket
# /run/tgtd mounted from the node), and a guest's QEMU reads it over the
# underlay. With it an `rbd` volume in Ceph (the environment's `ceph` pool,
# managed by host-1's agent pod), made from the tiny guest's image.
kubectl patch site local --type json -p "[{\"op\":\"add\",\"path\":\"/spec/storagePools/-\",
  \"value\":{\"name\":\"ceph\",\"type\":\"rbd\",\"host\":\"host-1\",
  \"ceph\":{\"monitors\":[\"$(cat "$DIR/ceph/ip"):6789\"],\"pool\":\"yukumo\",\"user\":\"yukumo\"}}}]" >/dev/null \
  || fail "adding the ceph pool to the Site"
t=$(now)
until_ok 60 sh -c "kubectl get site local -o jsonpath='{.status.storagePools[?(@.name==\"ceph\")].capacityBytes}' | grep -q '^[1-9]'" \
  || fail "the ceph pool's capacity is not in the Site's status: $(kubectl get site local -o jsonpath='{.status.storagePools}' 2>&1)"
cap=$(kubectl get site local -o jsonpath='{.status.storagePools[?(@.name=="ceph")].capacityBytes}')
say "ceph pool: capacity $((cap / 1048576)) MiB read by host-1's agent pod (monitors' df through librados) $(since "$t") s after it was declared"
t=$(now)
kubectl apply -f - >/dev/null <<EOF
apiVersion: yukumo.io/v1alpha1
kind: Volume
metadata: {name: data, namespace: demo}
spec: {size: 64Mi, pool: san}
---
apiVersion: yukumo.io/v1alpha1
kind: Volume
metadata: {name: cdata, namespace: demo}
spec:
  size: 96Mi
  pool: ceph
  source: {image: {url: 'file:///var/lib/yukumo/images/yukumo-tiny-guest.qcow2', checksum: '$sum'}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {name: store, namespace: demo}
spec:
  networkGroup: demo-net
  frontend:
    size: {cpu: 1, memory: 160Mi}
    image: {url: 'file:///var/lib/yukumo/images/yukumo-tiny-guest.qcow2', checksum: '$sum'}
    volumes: [{name: data}, {name: cdata}]
EOF
until_ok 120 kubectl -n demo wait --for condition=Ready --timeout 5s volume/data \
  || fail "the iSCSI volume is not Ready: $(kubectl -n demo get volume data -o yaml 2>&1)"
until_ok 120 kubectl -n demo wait --for condition=Ready --timeout 5s volume/cdata \
  || fail "the rbd volume is not Ready: $(kubectl -n demo get volume cdata -o yaml 2>&1)"
say "rbd volume (96 MiB from the image, copied by the agent pod's qemu-img) Ready in $(since "$t") s"
portal=$(kubectl -n demo get volume data -o jsonpath='{.status.backing.iscsi.portal}')
[ "$portal" = 10.255.0.1:3260 ] || fail "the iSCSI volume's portal is '$portal', not host-1's underlay address"
iqn=$(kubectl -n demo get volume data -o jsonpath='{.status.backing.iscsi.iqn}')
targets=$(nsenter --mount="$DIR/mntns/host-1" -- tgtadm --lld iscsi --op show --mode target) \
  || fail "tgtadm on host-1"
grep -qF "$iqn" <<<"$targets" || fail "host-1's tgtd does not export $iqn"
until_ok 300 kubectl -n demo wait --for condition=Ready --timeout 5s vc/store \
  || fail "the cluster with the iSCSI volume is not Ready: $(kubectl -n demo get vc,vn 2>&1)"
shost=$(kubectl -n demo get vn store-frontend -o jsonpath='{.spec.host}')
until_ok 240 "$ROOT/e2e/env.sh" guest demo store-frontend "test \$(cat /sys/block/vdc/size) = 131072" --dir "$DIR" \
  || fail "store-frontend (on $shost) does not see the 64 MiB iSCSI disk as vdc"
say "iSCSI volume (pool san, portal $portal from the agent pod's 'auto') exported by host-1's tgtd and read by a guest on $shost in $(since "$t") s"
# The rbd disk: vdd, 96 MiB, its first MiB the image's (QEMU's librbd on
# $shost with the libvirt secret its agent pod made from the keyring Secret).
want=$(qemu-img convert -O raw "$img" "$W/guest.raw" && head -c 1048576 "$W/guest.raw" | md5sum | cut -d' ' -f1)
until_ok 60 "$ROOT/e2e/env.sh" guest demo store-frontend \
  "test \$(cat /sys/block/vdd/size) = 196608 && head -c 1048576 /dev/vdd | md5sum | grep -q ^$want" --dir "$DIR" \
  || fail "store-frontend (on $shost) does not read the rbd volume as vdd with the image's bytes"
say "rbd volume read by the guest on $shost as vdd: 96 MiB, the image's bytes (md5 of its first MiB $want)"
kubectl -n demo delete vc store --wait=true --timeout 120s >/dev/null || fail "deleting the cluster store"
kubectl -n demo delete volume data cdata --wait=true --timeout 120s >/dev/null || fail "deleting the volumes"
left=$(ip netns exec "$(cat "$DIR/ceph/netns")" rbd -c "$DIR/ceph/ceph.conf" ls -p yukumo) || fail "rbd ls in the environment's Ceph"
[ -z "$left" ] || fail "Ceph still holds images after the rbd volume's deletion: $left"
targets=$(nsenter --mount="$DIR/mntns/host-1" -- tgtadm --lld iscsi --op show --mode target) \
  || fail "tgtadm on host-1"
if grep -qF "$iqn" <<<"$targets"; then
  fail "host-1's tgtd still exports $iqn after the volume's deletion"
fi

# helm upgrade to a new image tag (the same image, tagged anew on each
# node) rolls every pod; the guests stay, the cluster stays Ready.
tag=$(kubectl -n "$NS" get ds yukumo-agent -o jsonpath='{.spec.template.spec.containers[0].image}')
for h in host-1 host-2; do
  nsenter --mount="$DIR/mntns/$h" -- ctr -n k8s.io images tag "$tag" "$tag-next" >/dev/null \
    || fail "tagging the image anew on $h"
done
uids=$(pods_of agent; pods_of controller)
t=$(now)
helm upgrade yukumo "$ROOT/charts/yukumo" -n "$NS" --reuse-values --set "image.tag=${tag##*:}-next" \
  --wait=false >/dev/null || fail "helm upgrade"
ready_seen=$(mktemp -p "$W")
( while sleep 1; do
    kubectl -n demo get vc quickstart -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}{"\n"}' >> "$ready_seen" 2>/dev/null
  done ) &
watch_pid=$!
until_ok 240 k rollout status ds/yukumo-agent --timeout 5s || fail "the agent DaemonSet did not roll"
until_ok 240 k rollout status deploy/yukumo-controller --timeout 5s || fail "the controller Deployment did not roll"
# (a replaced pod may take a moment to go once its successor is ready)
for uid in $(echo "$uids" | awk '{print $3}'); do
  until_ok 60 sh -c "! kubectl -n $NS get pods -o jsonpath='{range .items[*]}{.metadata.uid}{\"\\n\"}{end}' | grep -qx $uid" \
    || fail "pod $uid survived the upgrade"
done
until_ok 60 kubectl wait --for condition=Ready --timeout 5s hosts/host-1 hosts/host-2 || fail "Hosts not Ready after the upgrade"
until_ok 60 kubectl -n demo wait --for condition=Ready --timeout 5s vc/quickstart || fail "quickstart not Ready after the upgrade"
[ "$(qemu_pids)" = "$before" ] || fail "guests restarted by the upgrade: QEMU $before → $(qemu_pids)"
kill "$watch_pid" 2>/dev/null; wait "$watch_pid" 2>/dev/null || true
grep -qv '^True$' "$ready_seen" && fail "the cluster was not Ready during the upgrade: $(sort "$ready_seen" | uniq -c | tr '\n' ' ')"
images=$(k get pods -l 'app.kubernetes.io/component in (agent,controller)' \
  -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}') || fail "kubectl get pods"
grep -qv -- "-next$" <<<"$images" && fail "a pod runs another image than $tag-next: $images"
say "helm upgrade to ${tag##*:}-next rolled all 4 pods in $(since "$t") s; guests untouched, the cluster Ready throughout ($(wc -l < "$ready_seen") looks)"

say "ok"
