#!/usr/bin/env bash
# The yukumo local environment: one script for `make up`, `make down` and the
# end-to-end tests.
#
#   e2e/env.sh up      [--dir D] [--hosts N] [--vm-hosts N] [--controllers N] [--no-example]
#                      [--no-prometheus]   (the benchmarks: no scrapes in their figures)
#                      [--storage ceph]   (also a single-node Ceph and the `ceph` rbd pool)
#                      [--kubelets]   (every host is also a kubelet node; the chart's
#                                      pods run the controller and agents: lib/kubelet.sh)
#   e2e/env.sh down    [--dir D]
#   e2e/env.sh status  [--dir D]
#   e2e/env.sh start-controller ID [--dir D]   (process "controller-ID")
#   e2e/env.sh start-agent HOST   [--dir D]    (process "agent-HOST")
#   e2e/env.sh start-libvirtd HOST [--dir D]   (process "libvirtd-HOST")
#   e2e/env.sh start-test-agent HOST SITE [--dir D]  (agent on libvirt's test driver)
#   e2e/env.sh test-libvirt-uri HOST [--dir D]  (a test-driver instance's URI)
#   e2e/env.sh start-vm-host HOST SITE INDEX [STORAGE_MIB] [--dir D] (process
#              "vm-HOST": a VM with a kernel of its own, e2e/lib/vm-host.sh;
#              with STORAGE_MIB a storage host: an LVM volume group and tgtd)
#   e2e/env.sh stop-vm-host HOST [--dir D]
#   e2e/env.sh start-site-host HOST SITE INDEX [--dir D]  (a simulated host of
#              another Site: its own underlay, the shared WAN 100.64.0.0/24;
#              processes "libvirtd-HOST", "agent-HOST")
#   e2e/env.sh stop-site-host HOST [--dir D]
#   e2e/env.sh stop NAME [--signal KILL|TERM] [--dir D]
#   e2e/env.sh guest NAMESPACE NODE COMMAND... [--dir D]  (runs COMMAND in the
#              guest's root shell on its second serial port: the tiny guest
#              only; the agent's local control socket, root on this machine)
#   e2e/env.sh user NAMESPACE NAME [ROLE] [--dir D]  (a ServiceAccount NAME
#              bound to ROLE (default edit) in NAMESPACE, and a kubeconfig
#              with a 24h token for it; prints the kubeconfig's path)
#
# What `up` starts, all on loopback with generated certificates:
#   etcd, kube-apiserver (RBAC on, audit log), kube-controller-manager
#   (garbage collection, namespace deletion), the yukumo Helm chart (CRDs,
#   ServiceAccounts, RBAC), N simulated hosts (each a network namespace with
#   its own libvirtd and virtlogd in a private mount namespace), the
#   controller(s), one agent per host, and Prometheus (Debian's) scraping
#   them with the chart's alerts loaded. The controller and agents run as
#   processes authenticated with the chart's ServiceAccount tokens, so RBAC is
#   exercised for real.
#
# Every process is recorded in $DIR/pids/NAME.pid and stopped by that PID
# only; every network namespace is recorded in $DIR/netns. `down` removes all
# of them and the directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export YUKUMO_ROOT=$ROOT
DIR=${YUKUMO_ENV_DIR:-$ROOT/.yukumo-env}
HOSTS=3
VM_HOSTS=0
CONTROLLERS=1
EXAMPLE=1
PROMETHEUS=1
STORAGE=${YUKUMO_STORAGE:-}
KUBELETS=${YUKUMO_KUBELETS:-0}
NAMESPACE=yukumo-system
SIGNAL=TERM

log() { echo "[env] $*" >&2; }
die() { echo "[env] error: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Start a background process in its own session, record its PID.
spawn() { # name, command...
  local name=$1; shift
  mkdir -p "$DIR/pids" "$DIR/logs"
  setsid "$@" >>"$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}

# Alive: exists and is not a zombie (an orphan that exited waits for this
# machine's PID 1 to reap it, which takes up to ~2 s here).
pid_alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Stop a recorded process by its PID (TERM, then KILL after 10 s).
stop_proc() { # name [signal]
  local name=$1 sig=${2:-TERM} pidf="$DIR/pids/$1.pid" pid
  [ -f "$pidf" ] || return 0
  pid=$(cat "$pidf")
  if pid_alive "$pid"; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  fi
  rm -f "$pidf"
  write_prom_targets
}

# Prometheus's scrape targets: every controller and agent running now (their
# metrics ports in $DIR/ports; a VM host's agent is alive while its VM is),
# rewritten whenever one starts or stops; Prometheus re-reads the file.
write_prom_targets() {
  # Not while `down` stops everything (Prometheus goes too).
  [ -d "$DIR/prometheus" ] && [ -z "${DOWN:-}" ] && [ "$KUBELETS" != 1 ] || return 0
  python3 - "$DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
ports = os.path.join(d, "ports")
out = []
for f in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
    comp, _, name = f.partition("-")
    if comp not in ("agent", "controller"):
        continue
    alive = False
    for pidname in (f, "vm-" + name):
        try:
            os.kill(int(open(os.path.join(d, "pids", pidname + ".pid")).read()), 0)
            alive = True
        except (OSError, ValueError):
            pass
    if alive:
        port = open(os.path.join(ports, f)).read().strip()
        out.append({"targets": ["127.0.0.1:" + port], "labels": {"component": comp, "name": name}})
tmp = os.path.join(d, "prometheus", "targets.json.tmp")
with open(tmp, "w") as fh:
    json.dump(out, fh, indent=1)
os.replace(tmp, os.path.join(d, "prometheus", "targets.json"))
PY
}

# Debian's Prometheus, scraping every controller and agent every 5 s, with
# the chart's alerts loaded (its port is in $DIR/prometheus.port).
start_prometheus() {
  local port
  port=$(free_port)
  echo "$port" > "$DIR/prometheus.port"
  mkdir -p "$DIR/prometheus/data"
  cat > "$DIR/prometheus/prometheus.yml" <<EOF
global: {scrape_interval: 5s, evaluation_interval: 5s}
rule_files: ["$ROOT/charts/yukumo/files/alerts.yaml"]
scrape_configs:
- job_name: yukumo
EOF
  if [ "$KUBELETS" = 1 ]; then
    # The chart's pods, scraped through the API server's pod proxy (the
    # nodes' namespaces are reached only through it); e2e/lib/prom-pods.py
    # keeps their list (Debian's Prometheus has no Kubernetes discovery).
    local tls="{ca_file: $DIR/pki/ca.crt, cert_file: $DIR/pki/admin.crt, key_file: $DIR/pki/admin.key}"
    printf '%s\n' "  tls_config: $tls" \
      "  file_sd_configs: [{files: [\"$DIR/prometheus/targets.json\"], refresh_interval: 5s}]" \
      >> "$DIR/prometheus/prometheus.yml"
    echo '[]' > "$DIR/prometheus/targets.json"
    spawn prom-pods env KUBECONFIG="$DIR/kubeconfig" python3 "$ROOT/e2e/lib/prom-pods.py" \
      "$YUKUMO_TOOLS_BIN/kubectl" "$NAMESPACE" "127.0.0.1:$API_PORT" "$DIR/prometheus/targets.json"
  else
    echo "  file_sd_configs: [{files: [\"$DIR/prometheus/targets.json\"], refresh_interval: 5s}]" \
      >> "$DIR/prometheus/prometheus.yml"
  fi
  write_prom_targets
  log "starting Prometheus on http://127.0.0.1:$port"
  spawn prometheus "$YUKUMO_PROMETHEUS_DIR/prometheus" --config.file "$DIR/prometheus/prometheus.yml" \
    --storage.tsdb.path "$DIR/prometheus/data" --storage.tsdb.retention.time 1d \
    --web.listen-address "127.0.0.1:$port" --log.level warn
  wait_for 60 Prometheus curl -sf "http://127.0.0.1:$port/-/ready"
}

wait_for() { # seconds, description, command...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && die "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}

# A key and a certificate signed by the environment's CA:
# $DIR/pki/NAME.{key,crt}.
cert() { # name, subject, extfile-content
  local pki=$DIR/pki
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}

gen_pki() {
  local pki=$DIR/pki
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=yukumo-local-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:$VM_API_ADDR,IP:10.250.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  cert scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  cert admin "/O=system:masters/CN=yukumo-admin" "extendedKeyUsage=clientAuth"
  cert kcm "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  cert authz "/CN=yukumo-authz" "subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# VM hosts reach the API server at this address of their management
# network (QEMU user networking, restricted: a guestfwd to 127.0.0.1 is its
# only way out).
VM_API_ADDR=10.0.2.100
VM_API_PORT=6443

kubeconfig() { # file, user-kind (cert NAME | token FILE), arg [server]
  local file=$1 kind=$2 arg=$3 server=${4:-https://127.0.0.1:$API_PORT}
  {
    echo "apiVersion: v1"
    echo "kind: Config"
    echo "clusters:"
    echo "- name: yukumo-local"
    echo "  cluster:"
    echo "    server: $server"
    echo "    certificate-authority: $DIR/pki/ca.crt"
    echo "users:"
    echo "- name: user"
    echo "  user:"
    if [ "$kind" = cert ]; then
      echo "    client-certificate: $DIR/pki/$arg.crt"
      echo "    client-key: $DIR/pki/$arg.key"
    else
      echo "    tokenFile: $arg"
    fi
    echo "contexts:"
    echo "- name: yukumo-local"
    echo "  context: {cluster: yukumo-local, user: user}"
    echo "current-context: yukumo-local"
  } > "$file"
}

load_state() {
  [ -f "$DIR/state" ] || die "no environment at $DIR (run: e2e/env.sh up)"
  # shellcheck disable=SC1091
  source "$DIR/state"
  # shellcheck disable=SC1091
  [ -f "$DIR/tools" ] && source "$DIR/tools" && export PATH="$YUKUMO_TOOLS_BIN:$PATH"
  export KUBECONFIG=$DIR/kubeconfig
}

start_control_plane() {
  ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port); AUTHZ_PORT=$(free_port)
  {
    echo "API_PORT=$API_PORT"; echo "ETCD_PORT=$ETCD_PORT"; echo "KUBELETS=$KUBELETS"
    echo "AUTHZ_PORT=$AUTHZ_PORT"
  } > "$DIR/state"
  gen_pki
  # The site agents' read scope (README "A remote Site's agents"): the
  # controller's authorization webhook, run on its own beside the API
  # server as a static pod would be (`--authz-only`), asked before RBAC for
  # a site agent's reads of yukumo kinds only, failing closed.
  log "starting the site agents' authorization webhook on https://127.0.0.1:$AUTHZ_PORT"
  spawn authz env RUST_LOG=info "$(controller_binary)" --authz-only --authz-addr "127.0.0.1:$AUTHZ_PORT" \
    --authz-tls-cert "$DIR/pki/authz.crt" --authz-tls-key "$DIR/pki/authz.key"
  printf '%s\n' "apiVersion: v1" "kind: Config" "clusters:" "- name: yukumo-authz" "  cluster:" \
    "    server: https://127.0.0.1:$AUTHZ_PORT/authorize" "    certificate-authority: $DIR/pki/ca.crt" \
    "users:" "- name: kube-apiserver" "contexts:" "- name: yukumo-authz" \
    "  context: {cluster: yukumo-authz, user: kube-apiserver}" "current-context: yukumo-authz" \
    > "$DIR/authz-webhook.kubeconfig"
  sed "s|@KUBECONFIG@|$DIR/authz-webhook.kubeconfig|" "$ROOT/docs/authorization-config.yaml" \
    > "$DIR/authorization-config.yaml"
  local kubelet_flags=()
  if [ "$KUBELETS" = 1 ]; then
    # The kubelets, in the hosts' namespaces, through e2e/lib/egress-proxy.py.
    printf '%s\n' "apiVersion: apiserver.k8s.io/v1beta1" "kind: EgressSelectorConfiguration" \
      "egressSelections:" "- name: cluster" "  connection:" "    proxyProtocol: HTTPConnect" \
      "    transport: {uds: {udsName: $DIR/egress.sock}}" > "$DIR/egress.yaml"
    kubelet_flags=(--egress-selector-config-file "$DIR/egress.yaml"
      --kubelet-client-certificate "$DIR/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "$DIR/pki/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$DIR/pki/ca.crt"
      --kubelet-preferred-address-types InternalIP)
  fi
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  spawn etcd "$YUKUMO_TOOLS_BIN/etcd" --name yukumo-local --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "yukumo-local=http://127.0.0.1:$ETCD_PEER_PORT" --quota-backend-bytes 4294967296 \
    --log-level warn
  wait_for 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

  cat > "$DIR/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
EOF
  log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
  spawn kube-apiserver "$YUKUMO_TOOLS_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --secure-port "$API_PORT" --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" \
    --authorization-config "$DIR/authorization-config.yaml" --enable-admission-plugins NodeRestriction --allow-privileged=true \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range 10.250.0.0/24 \
    --audit-policy-file "$DIR/audit-policy.yaml" --audit-log-path "$DIR/logs/audit.log" \
    --audit-log-format json --audit-log-maxsize 200 \
    --enable-priority-and-fairness=false --max-requests-inflight 2000 --max-mutating-requests-inflight 1000 \
    "${kubelet_flags[@]}" --v 1
  kubeconfig "$DIR/kubeconfig" cert admin
  export KUBECONFIG=$DIR/kubeconfig
  wait_for 120 kube-apiserver kubectl get --raw /readyz

  kubeconfig "$DIR/kubeconfig-kcm" cert kcm
  kubeconfig "$DIR/kubeconfig-scheduler" cert scheduler
  log "starting kube-controller-manager"
  spawn kube-controller-manager "$YUKUMO_TOOLS_BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kubeconfig-kcm" --authentication-kubeconfig "$DIR/kubeconfig-kcm" \
    --authorization-kubeconfig "$DIR/kubeconfig-kcm" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
    --controllers 'garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,clusterrole-aggregation-controller,root-ca-certificate-publisher-controller,deployment-controller,replicaset-controller,daemonset-controller,pod-garbage-collector-controller,disruption-controller,node-lifecycle-controller' \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/ca.crt" \
    --use-service-account-credentials=true --v 1
}

install_chart() {
  log "installing the yukumo Helm chart into namespace $NAMESPACE"
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label namespace "$NAMESPACE" --overwrite pod-security.kubernetes.io/enforce=privileged >/dev/null
  local values=(-f "$ROOT/e2e/values-local.yaml")
  [ "$KUBELETS" = 1 ] && values+=(-f "$ROOT/e2e/values-pods.yaml" --set "image.tag=$(image_version)")
  # The Secret is made with Ceph's keys (start_ceph, before the hosts).
  [ "$KUBELETS" = 1 ] && [ "$STORAGE" = ceph ] && values+=(--set agent.cephKeyringSecret=yukumo-ceph-keyring)
  helm upgrade --install yukumo "$ROOT/charts/yukumo" -n "$NAMESPACE" \
    "${values[@]}" --wait=false >/dev/null
  wait_for 60 "CRDs established" kubectl wait --for condition=Established --timeout 5s \
    crd/virtualclusters.yukumo.io crd/networkgroups.yukumo.io crd/volumes.yukumo.io \
    crd/sites.yukumo.io crd/virtualnodes.yukumo.io crd/hosts.yukumo.io
  for sa in controller agent; do
    kubectl -n "$NAMESPACE" create token "yukumo-$sa" --duration 48h > "$DIR/token-$sa"
    kubeconfig "$DIR/kubeconfig-$sa" token "$DIR/token-$sa"
  done
}

netns_prefix() { echo "yk$(echo "$DIR" | md5sum | cut -c1-6)"; }

# The environment's own networks, each a namespace with one bridge (never
# the machine's real interface): the underlay the hosts' VXLAN tunnels run
# over (10.255.0.0/24), and the "outside world" of the Site's external
# network (203.0.113.0/24): its gateway 203.0.113.1 and a client namespace
# at 203.0.113.200 stand for the internet.
start_fabric() {
  local p; p=$(netns_prefix)
  for n in ul out client wan; do
    ip netns add "$p-$n"
    echo "$p-$n" >> "$DIR/netns"
    ip -n "$p-$n" link set lo up
  done
  ip -n "$p-ul" link add br0 type bridge
  ip -n "$p-ul" link set br0 up
  # The WAN between Sites' gateways (100.64.0.0/24): one bridge, no route
  # anywhere else.
  ip -n "$p-wan" link add br0 type bridge
  ip -n "$p-wan" link set br0 up
  ip -n "$p-out" link add br0 type bridge
  ip -n "$p-out" addr add 203.0.113.1/24 dev br0
  ip -n "$p-out" link set br0 up
  ip -n "$p-out" link add client type veth peer name eth0 netns "$p-client"
  ip -n "$p-out" link set client master br0 up
  ip -n "$p-client" addr add 203.0.113.200/24 dev eth0
  ip -n "$p-client" link set eth0 up
  ip -n "$p-client" route add default via 203.0.113.1
}

# An ssh identity for the environment's guests and an ssh configuration
# that reaches public IPs (203.0.113.0/24) as the outside world does: from
# the client namespace (socat there; nothing is routed from this machine).
# The guests are rebuilt often and reuse addresses, so their host keys are
# not remembered. `kubectl yukumo ssh CLUSTER -F $DIR/ssh/config`.
start_ssh_client() {
  local p; p=$(netns_prefix)
  mkdir -p "$DIR/ssh"
  [ -f "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "yukumo-local@$(hostname)" -f "$DIR/ssh/id_ed25519"
  cat > "$DIR/ssh/config" <<EOF2
Host 203.0.113.*
  ProxyCommand ip netns exec $p-client socat - TCP:%h:%p,connect-timeout=10
Host *
  IdentityFile $DIR/ssh/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  ConnectTimeout 15
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF2
}

# Attach simulated host number I (namespace NS) to the underlay (its
# Site's: namespace UL, default the environment's), the external network
# and the WAN: ul0 (10.255.0.I), ext0 (no address; routers' WAN legs are
# macvlans on it) and wan0 (100.64.0.I/24; the Site's active gateway adds
# the Site's WAN endpoint there).
attach_host() { # ns index [underlay-ns]
  local ns=$1 i=$2 p; p=$(netns_prefix)
  local ul=${3:-$p-ul}
  ip -n "$ul" link add "h$i" type veth peer name ul0 netns "$ns"
  ip -n "$ul" link set "h$i" master br0 up
  ip -n "$ns" addr add "10.255.0.$i/24" dev ul0
  ip -n "$ns" link set ul0 up
  ip -n "$p-out" link add "h$i" type veth peer name ext0 netns "$ns"
  ip -n "$p-out" link set "h$i" master br0 up
  ip -n "$ns" link set ext0 up
  ip -n "$p-wan" link add "h$i" type veth peer name wan0 netns "$ns"
  ip -n "$p-wan" link set "h$i" master br0 up
  ip -n "$ns" addr add "100.64.0.$i/24" dev wan0
  ip -n "$ns" link set wan0 up
}

start_host() { # name site [index [underlay-ns]]
  local name=$1 site=$2 hdir=$DIR/hosts/$1 ns
  ns="$(netns_prefix)-$name"
  mkdir -p "$hdir"/{run,lib,etc,log,cache}
  cp -a /etc/libvirt/. "$hdir/etc/" 2>/dev/null || true
  # No autostarted libvirt networks: yukumo builds each host's networking itself.
  rm -f "$hdir"/etc/qemu/networks/autostart/*.xml
  # Guests' files live under the environment's directory: QEMU runs as root
  # there, without a security driver (simulated hosts only).
  printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n' >> "$hdir/etc/qemu.conf"
  ip netns add "$ns"
  echo "$ns" >> "$DIR/netns"
  ip -n "$ns" link set lo up
  [ -n "${3:-}" ] && attach_host "$ns" "$3" "${4:-}"
  echo "$ns" > "$hdir/netns"
  echo "$site" > "$hdir/site"
  log "starting host $name (site $site, netns $ns)"
  [ "$KUBELETS" = 1 ] && start_node "$name" "$3"
  start_libvirtd "$name"
  [ -n "${3:-}" ] && start_tgtd "$name" "$3"
  return 0
}

# The host's iSCSI target (tgt, userspace), on its underlay address: it
# exports the volumes of the host's `iscsi` pools. Its control socket
# (/var/run/tgtd/socket.PORT) gets a port unique to this environment.
# With kubelet nodes it runs in the node's mount namespace, whose /run/tgtd
# is the node's own: control port 0, as on a real host, and the agent pod
# (agent.iscsi, values-pods.yaml) reaches it there.
start_tgtd() { # name index
  local name=$1 i=$2 hdir=$DIR/hosts/$1 port
  if [ -f "$hdir/mntns" ]; then
    echo "0 10.255.0.$i:3260" > "$hdir/tgt"
    rm -f "$hdir/node/tgtd/socket.0" "$hdir/node/tgtd/socket.0.lock"
    spawn "tgtd-$name" nsenter --net="/run/netns/$(cat "$hdir/netns")" --mount="$(cat "$hdir/mntns")" -- \
      tgtd -f --iscsi "portal=10.255.0.$i:3260"
    wait_for 20 "tgtd of $name" test -S "$hdir/node/tgtd/socket.0"
    return
  fi
  port=$(( $(printf '%d' "0x$(echo "$DIR" | md5sum | cut -c1-2)") * 16 + i ))
  rm -f "/var/run/tgtd/socket.$port" "/var/run/tgtd/socket.$port.lock"
  echo "$port 10.255.0.$i:3260" > "$hdir/tgt"
  spawn "tgtd-$name" ip netns exec "$(cat "$hdir/netns")" tgtd -f -C "$port" --iscsi "portal=10.255.0.$i:3260"
  wait_for 20 "tgtd of $name" test -S "/var/run/tgtd/socket.$port"
}


# (Re)start the libvirtd of an existing simulated host, in its namespaces.
start_libvirtd() { # name
  local name=$1 hdir=$DIR/hosts/$1 ns
  ns=$(cat "$hdir/netns")
  rm -f "$hdir/run/libvirt-sock"
  if [ -f "$hdir/mntns" ]; then
    # A kubelet node: in the node's mount namespace (its folders are bound
    # there), in one of its own where the cgroup hierarchies are hidden as
    # `ip netns exec` hides them from the others.
    spawn "libvirtd-$name" nsenter --net="/run/netns/$ns" --mount="$(cat "$hdir/mntns")" -- \
      unshare --mount --propagation slave sh -c "
      umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup
      { virtlogd -d -p /run/libvirt/virtlogd.pid || true; } &&
      exec libvirtd -p /run/libvirt/libvirtd.pid"
    wait_for 30 "libvirtd of $name" test -S "$hdir/run/libvirt-sock"
    return 0
  fi
  # A private mount namespace with libvirt's state directories bind-mounted
  # from the host folder: one libvirtd per simulated host.
  spawn "libvirtd-$name" ip netns exec "$ns" unshare --mount --propagation private sh -c "
    mkdir -p /run/libvirt /var/lib/libvirt /etc/libvirt /var/log/libvirt /var/cache/libvirt &&
    mount --bind '$hdir/run' /run/libvirt &&
    mount --bind '$hdir/lib' /var/lib/libvirt &&
    mount --bind '$hdir/etc' /etc/libvirt &&
    mount --bind '$hdir/log' /var/log/libvirt &&
    mount --bind '$hdir/cache' /var/cache/libvirt &&
    { virtlogd -d -p /run/libvirt/virtlogd.pid || true; } &&
    exec libvirtd -p /run/libvirt/libvirtd.pid"
  wait_for 30 "libvirtd of $name" test -S "$hdir/run/libvirt-sock"
}

# shellcheck source=lib/vm-host.sh
source "$ROOT/e2e/lib/vm-host.sh"
# shellcheck source=lib/ceph.sh
source "$ROOT/e2e/lib/ceph.sh"
# shellcheck source=lib/kubelet.sh
source "$ROOT/e2e/lib/kubelet.sh"

image_version() { awk -F'"' '/^version = /{print $2; exit}' "$ROOT/Cargo.toml"; }

agent_binary() { echo "${YUKUMO_BIN_DIR:-$ROOT/target/release}/yukumo-agent"; }
controller_binary() { echo "${YUKUMO_BIN_DIR:-$ROOT/target/release}/yukumo-controller"; }
plugin_binary() { echo "${YUKUMO_BIN_DIR:-$ROOT/target/release}/kubectl-yukumo"; }

start_agent() { # host
  local host=$1 site hdir=$DIR/hosts/$1 mport cport
  [ -f "$hdir/site" ] || die "unknown host $host"
  site=$(cat "$hdir/site")
  mport=$(free_port); cport=$(free_port)
  mkdir -p "$DIR/ports"; echo "$mport" > "$DIR/ports/agent-$host"
  echo "$cport" > "$DIR/ports/console-$host"
  log "starting agent for $host (metrics on 127.0.0.1:$mport, consoles on 127.0.0.1:$cport)"
  spawn "agent-$host" env KUBECONFIG="$DIR/kubeconfig-agent" RUST_LOG="${RUST_LOG:-info}" \
    "$(agent_binary)" --host-name "$host" --site "$site" \
    --libvirt-uri "qemu:///system?socket=$hdir/run/libvirt-sock" \
    --netns "$(cat "$hdir/netns")" --gateway --uplink ul0 --wan-interface wan0 \
    --heartbeat-interval "${YUKUMO_HEARTBEAT:-5s}" --cpu-overcommit 8 --domain-type qemu \
    --metrics-addr "127.0.0.1:$mport" --state-dir "$hdir/agent" \
    --console-addr "127.0.0.1:$cport" --console-url "https://127.0.0.1:$cport" \
    $( [ -f "$hdir/tgt" ] && read -r tport portal < "$hdir/tgt" && echo "--iscsi-control-port $tport --iscsi-portal $portal" ) \
    $( [ -f "$DIR/ceph/keyring" ] && echo "--ceph-keyring $DIR/ceph/keyring" )
  write_prom_targets
}

# A host of another Site: its own underlay (namespace <prefix>-ul-SITE,
# made with the first of its hosts), the shared external network and WAN,
# libvirtd and an agent process.
start_site_host() { # name site index
  local name=$1 site=$2 i=$3 ul
  ul="$(netns_prefix)-ul-$site"
  if [ ! -e "/run/netns/$ul" ]; then
    ip netns add "$ul"
    echo "$ul" >> "$DIR/netns"
    ip -n "$ul" link set lo up
    ip -n "$ul" link add br0 type bridge
    ip -n "$ul" link set br0 up
  fi
  # (ends left by a host of this index stopped moments ago: the kernel
  # destroys a deleted namespace's links in the background)
  ip -n "$ul" link del "h$i" 2>/dev/null || true
  ip -n "$(netns_prefix)-out" link del "h$i" 2>/dev/null || true
  ip -n "$(netns_prefix)-wan" link del "h$i" 2>/dev/null || true
  KUBELETS=0 start_host "$name" "$site" "$i" "$ul"
  echo "$i $ul" > "$DIR/hosts/$name/attached"
  start_agent "$name"
}

# Stop a host started by start_site_host: its agent, guests, libvirtd, the
# routers and links its agent made, and its namespace (its Host object stays
# for the caller to delete).
stop_site_host() { # name
  local name=$1 hdir=$DIR/hosts/$1 ns f pid
  [ -f "$hdir/netns" ] || die "unknown host $name"
  ns=$(cat "$hdir/netns")
  stop_proc "agent-$name"
  for f in "$hdir"/run/qemu/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f"); pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  done
  stop_proc "libvirtd-$name"
  # tgtd ignores TERM while it serves targets; it holds only files.
  if [ -f "$hdir/tgt" ]; then
    stop_proc "tgtd-$name" KILL
    rm -f "/var/run/tgtd/socket.$(cut -d' ' -f1 "$hdir/tgt")"{,.lock}
  fi
  pid=$(cat "$hdir/run/virtlogd.pid" 2>/dev/null || true)
  if pid_alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  for f in "$hdir"/agent/net/*/dnsmasq.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f"); pid_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  for f in "$hdir"/agent/nodes/*; do
    [ -d "$f" ] && rm -f "/run/yukumo/$(basename "$f").sock" "/run/yukumo/$(basename "$f").console.sock"
  done
  for r in /run/netns/"$ns"-r*; do [ -e "$r" ] && ip netns del "$(basename "$r")" 2>/dev/null || true; done
  # Its links' other ends, now (deleting the namespace would take them
  # only when the kernel gets to it, and the index may be used again).
  local i ul
  if read -r i ul < "$hdir/attached" 2>/dev/null; then
    ip -n "$ul" link del "h$i" 2>/dev/null || true
    ip -n "$(netns_prefix)-out" link del "h$i" 2>/dev/null || true
    ip -n "$(netns_prefix)-wan" link del "h$i" 2>/dev/null || true
  fi
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$hdir"
}

# libvirt's test driver (domains and pools in memory) for agents without
# guests: one session-mode libvirtd as user nobody, its folders in
# $(test_libvirtd_dir), so it needs no namespace and touches nothing of the
# machine's. Each agent opens its own instance (test:///FILE is private to
# the connection that opened it).
test_libvirtd_dir() { echo "/run/yukumo-lvt-$(echo "$DIR" | md5sum | cut -c1-8)"; }

start_test_libvirtd() {
  local d
  d=$(test_libvirtd_dir)
  if [ -S "$d/run/libvirt/libvirt-sock" ] && pid_alive "$(cat "$DIR/pids/libvirtd-test.pid" 2>/dev/null)"; then
    return 0
  fi
  rm -rf "$d"
  mkdir -p "$d/home" "$d/run" "$d/config" "$d/cache" "$d/nodes"
  chown -R nobody:nogroup "$d"
  spawn libvirtd-test setpriv --reuid=65534 --regid=65534 --clear-groups env -i \
    HOME="$d/home" XDG_RUNTIME_DIR="$d/run" XDG_CONFIG_HOME="$d/config" XDG_CACHE_HOME="$d/cache" \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin libvirtd
  wait_for 30 "the test libvirtd" test -S "$d/run/libvirt/libvirt-sock"
}

# The URI of a test-driver instance of its own for HOST (started if needed).
test_libvirt_uri() { # host
  local d
  d=$(test_libvirtd_dir)
  start_test_libvirtd
  printf '<node/>\n' > "$d/nodes/$1.xml"
  chmod 644 "$d/nodes/$1.xml"
  echo "test+unix://$d/nodes/$1.xml?socket=$d/run/libvirt/libvirt-sock"
}

stop_test_libvirtd() {
  stop_proc libvirtd-test
  rm -rf "$(test_libvirtd_dir)"
}

# An agent on a libvirt test driver of its own (test_libvirt_uri): a host
# for scale benchmarks, with no guests or network namespace.
start_test_agent() { # name site
  local host=$1 site=$2 hdir=$DIR/hosts/$1 mport uri
  mkdir -p "$hdir"
  echo "$site" > "$hdir/site"
  uri=$(test_libvirt_uri "$host")
  mport=$(free_port)
  mkdir -p "$DIR/ports"; echo "$mport" > "$DIR/ports/agent-$host"
  spawn "agent-$host" env KUBECONFIG="$DIR/kubeconfig-agent" RUST_LOG="${RUST_LOG:-warn}" \
    "$(agent_binary)" --host-name "$host" --site "$site" --libvirt-uri "$uri" --no-network \
    --heartbeat-interval "${YUKUMO_HEARTBEAT:-10s}" --cpu-overcommit 8 --domain-type qemu \
    --metrics-addr "127.0.0.1:$mport" --state-dir "$hdir/agent"
  write_prom_targets
}

start_controller() { # id
  local id=$1 mport
  mport=$(free_port)
  mkdir -p "$DIR/ports"; echo "$mport" > "$DIR/ports/controller-$id"
  log "starting controller $id (metrics on 127.0.0.1:$mport)"
  spawn "controller-$id" env KUBECONFIG="$DIR/kubeconfig-controller" RUST_LOG="${RUST_LOG:-info}" \
    "$(controller_binary)" --namespace "$NAMESPACE" --identity "controller-$id" \
    --metrics-addr "127.0.0.1:$mport" \
    --lease-duration "${YUKUMO_LEASE_DURATION:-15s}"
  write_prom_targets
}

cmd_up() {
  [ -f "$DIR/state" ] && die "an environment already runs at $DIR (run: make down)"
  case $STORAGE in ""|ceph) ;; *) die "--storage/STORAGE: unknown storage '$STORAGE' (known: ceph)" ;; esac
  mkdir -p "$DIR"
  # shellcheck disable=SC1091
  source "$ROOT/e2e/lib/tools.sh" >/dev/null
  printf 'YUKUMO_TOOLS_BIN=%q\nYUKUMO_NODE_BIN=%q\nYUKUMO_PROMETHEUS_DIR=%q\n' \
    "$YUKUMO_TOOLS_BIN" "$YUKUMO_NODE_BIN" "$YUKUMO_PROMETHEUS_DIR" > "$DIR/tools"
  [ "$KUBELETS" = 1 ] && build_node_images
  start_control_plane
  [ "$KUBELETS" = 1 ] && start_node_plumbing
  install_chart
  local i
  start_fabric
  if [ "$STORAGE" = ceph ]; then
    # Before the hosts: the agent pods mount its keyring's Secret.
    start_ceph
    if [ "$KUBELETS" = 1 ]; then
      kubectl -n "$NAMESPACE" create secret generic yukumo-ceph-keyring \
        --from-file "keyring=$DIR/ceph/keyring" >/dev/null
    fi
  fi
  start_ssh_client
  for i in $(seq 1 "$HOSTS"); do start_host "host-$i" local "$i"; done
  if [ "$KUBELETS" = 1 ]; then
    # The chart's pods: one agent per node, the controller's replicas.
    wait_for 180 "the agent pods" kubectl -n "$NAMESPACE" rollout status ds/yukumo-agent --timeout 5s
    wait_for 180 "the controller pods" kubectl -n "$NAMESPACE" rollout status deploy/yukumo-controller --timeout 5s
  else
    for i in $(seq 1 "$CONTROLLERS"); do start_controller "$i"; done
    for i in $(seq 1 "$HOSTS"); do start_agent "host-$i"; done
  fi
  [ "$PROMETHEUS" = 1 ] && start_prometheus
  # VM hosts (802.1Q VLAN segments), in a Site of their own: underlay
  # addresses from 10.255.0.11 on.
  if [ "$VM_HOSTS" -gt 0 ]; then
    kubectl apply -f "$ROOT/examples/vmlab-site.yaml" >/dev/null
    for i in $(seq 1 "$VM_HOSTS"); do start_vm_host "vmhost-$i" vmlab $((10 + i)); done
  fi
  kubectl apply -f "$ROOT/examples/local-site.yaml" >/dev/null
  if [ "$STORAGE" = ceph ]; then
    # The `ceph` pool: images in the Ceph pool `yukumo`, managed by host-1's
    # agent, attached by QEMU's librbd on any host (user client.yukumo).
    kubectl patch site local --type json -p "[{\"op\":\"add\",\"path\":\"/spec/storagePools/-\",
      \"value\":{\"name\":\"ceph\",\"type\":\"rbd\",\"host\":\"host-1\",
      \"ceph\":{\"monitors\":[\"$CEPH_IP:6789\"],\"pool\":\"yukumo\",\"user\":\"yukumo\"}}}]" >/dev/null
  fi
  wait_for 90 "Hosts Ready" kubectl wait --for condition=Ready --timeout 5s hosts --all
  if [ "$EXAMPLE" = 1 ]; then
    # The quickstart boots the tiny guest built from this machine's kernel.
    local img sum
    read -r img sum < <("$ROOT/e2e/lib/tiny-guest.sh")
    local examples=("$ROOT/examples/quickstart.yaml") as_is=0 f key
    if [ "$KUBELETS" = 1 ]; then
      # Staged on every host where the examples name it, with its
      # SHA256SUMS (the agent pods' /var/lib/yukumo is the host's): the
      # quickstart applies as it is written.
      as_is=1
      for i in $(seq 1 "$HOSTS"); do stage_tiny_guest "$DIR/hosts/host-$i/agent/images" "$img" "$sum"; done
    fi
    if [ "$VM_HOSTS" -gt 0 ]; then
      wait_for 300 "VM hosts Ready" kubectl wait --for condition=Ready --timeout 5s \
        $(for i in $(seq 1 "$VM_HOSTS"); do echo "host/vmhost-$i"; done)
      examples+=("$ROOT/examples/vmlab-vlan.yaml")
    fi
    # Its ssh key: the environment's (`kubectl yukumo ssh`).
    key=$(cat "$DIR/ssh/id_ed25519.pub")
    for f in "${examples[@]}"; do
      if [ "$as_is" = 1 ] && [ "$f" = "$ROOT/examples/quickstart.yaml" ]; then
        sed -e "s|^  - ssh-ed25519 .* demo@yukumo\$|  - $key|" "$f"
      else
        # Agents that read this machine's files (processes, VM hosts): the
        # image where tiny-guest.sh made it, and its sum.
        sed -e "s|file:///var/lib/yukumo/images/yukumo-tiny-guest.qcow2|file://$img|" \
            -e "s|^  - ssh-ed25519 .* demo@yukumo\$|  - $key|" \
            -e "s|checksumURL: file:///var/lib/yukumo/images/SHA256SUMS|checksum: $sum|" "$f"
      fi | kubectl apply -f - >/dev/null
    done
  fi
  cmd_status
  cat <<EOF

yukumo local environment is up ($DIR).
  export KUBECONFIG=$DIR/kubeconfig
  kubectl get yukumo                 # every yukumo object
  kubectl get hosts,sites            # the simulated hosts and their site
  kubectl -n demo get vc,vn          # the quickstart cluster and its VMs
  kubectl yukumo -n demo ssh quickstart -F $DIR/ssh/config   # its frontend's shell (plugin: $ROOT/target/release)
  KUBECONFIG=\$(e2e/env.sh user demo me edit) kubectl yukumo console quickstart-worker-0   # a worker's serial console
$([ "$KUBELETS" = 1 ] && echo "  kubectl -n $NAMESPACE get pods -o wide   # the chart's controller and agent pods on the host nodes")
  kubectl -n vlan-lab get ng,vc,vn   # with VM_HOSTS: the lab on an 802.1Q VLAN
  kubectl explain virtualcluster.spec
  logs: $DIR/logs/   audit log: $DIR/logs/audit.log
  stop everything: make down
EOF
}

# The tiny guest as the examples name it on a host: DIR/yukumo-tiny-guest.qcow2
# and DIR/SHA256SUMS (checksumURL).
stage_tiny_guest() { # dir image sha256:sum
  mkdir -p "$1"
  cp "$2" "$1/yukumo-tiny-guest.qcow2"
  echo "${3#sha256:}  yukumo-tiny-guest.qcow2" > "$1/SHA256SUMS"
}

# Run a command in a tiny guest's root shell (its second serial port, the
# control socket the agent gives each domain): prints its output, exits
# with its status. The protocol is e2e/src/lib.rs guest_sh's.
cmd_user() { # namespace name [role]
  load_state
  local ns=$1 name=$2 role=${3:-edit} file
  [ -n "$ns" ] && [ -n "$name" ] || die "usage: e2e/env.sh user NAMESPACE NAME [ROLE]"
  kubectl -n "$ns" create serviceaccount "$name" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n "$ns" create rolebinding "$name" --clusterrole "$role" --serviceaccount "$ns:$name" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  file=$DIR/kubeconfig-user-$ns-$name
  kubectl -n "$ns" create token "$name" --duration 24h > "$file.token"
  kubeconfig "$file" token "$file.token"
  # With kubelet nodes the agents' console endpoints are in the hosts'
  # namespaces: the user's client reaches them (and the API server) through
  # the users' proxy (e2e/lib/egress-proxy.py users), as a user behind a
  # corporate proxy would.
  [ "$KUBELETS" = 1 ] && sed -i "s|^    server: .*|&\n    proxy-url: http://127.0.0.1:$(cat "$DIR/ports/user-proxy")|" "$file"
  sed -i "s/^  context: {cluster: yukumo-local, user: user}$/  context: {cluster: yukumo-local, user: user, namespace: $ns}/" "$file"
  echo "$file"
}

cmd_guest() { # namespace node command...
  load_state
  local ns=$1 node=$2 uid sock
  shift 2
  [ $# -gt 0 ] || die "usage: e2e/env.sh guest NAMESPACE NODE COMMAND..."
  uid=$(kubectl -n "$ns" get virtualnode "$node" -o jsonpath='{.metadata.uid}') \
    || die "no VirtualNode $ns/$node (kubectl -n $ns get vn)"
  sock=/run/yukumo/$uid.sock
  [ -S "$sock" ] || die "VirtualNode $ns/$node has no control socket on this machine ($sock): is it running here?"
  python3 - "$sock" "$*" <<'PY'
import base64, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(0.2)
marker = "END%d" % time.time_ns()
s.sendall(("%s %s\n" % (marker, base64.b64encode(sys.argv[2].encode()).decode())).encode())
pat, buf, deadline = "__%s__" % marker, b"", time.time() + 60
while time.time() < deadline:
    try:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    except socket.timeout:
        pass
    text = buf.decode(errors="replace")
    i = text.find(pat)
    if i >= 0 and "\n" in text[i + len(pat):]:
        sys.stdout.write(text[:i])
        rest = text[i + len(pat):].split("\n", 1)[0].strip()
        sys.exit(int(rest) if rest.lstrip("-").isdigit() else 1)
sys.exit("the guest did not answer within 60 s")
PY
}

cmd_status() {
  load_state
  local f name pid
  for f in "$DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid); pid=$(cat "$f")
    if pid_alive "$pid"; then echo "  running  $name (pid $pid)"; else echo "  dead     $name (pid $pid)"; fi
  done
  kubectl get hosts,sites 2>/dev/null || true
}

cmd_down() {
  [ -d "$DIR" ] || { log "nothing at $DIR"; return 0; }
  local f name hdir pid
  DOWN=1
  # yukumo first (agents may still clean up), then hosts, then the control plane.
  for f in "$DIR"/pids/controller-*.pid "$DIR"/pids/agent-*.pid; do
    [ -e "$f" ] && stop_proc "$(basename "$f" .pid)"
  done
  # Kubelet nodes: their pods (the controllers and agents), kubelets, containerd.
  for hdir in "$DIR"/hosts/*; do
    [ -f "$hdir/mntns" ] && stop_node "$(basename "$hdir")"
  done
  for hdir in "$DIR"/hosts/*; do
    [ -f "$hdir/vm" ] && stop_vm_host "$(basename "$hdir")"
  done
  for hdir in "$DIR"/hosts/*; do
    [ -d "$hdir" ] || continue
    name=$(basename "$hdir")
    stop_proc "libvirtd-$name"
    if [ -f "$hdir/tgt" ]; then
      # tgtd ignores TERM while it serves targets; it holds only files.
      stop_proc "tgtd-$name" KILL
      # (a node's tgtd kept its socket in the node's folder)
      [ -f "$hdir/mntns" ] || rm -f "/var/run/tgtd/socket.$(cut -d' ' -f1 "$hdir/tgt")"{,.lock}
    fi
    # virtlogd daemonized inside the host's mount namespace; its PID file is ours.
    pid=$(cat "$hdir/run/virtlogd.pid" 2>/dev/null || true)
    if pid_alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    # any qemu left by a guest of this host (its PID files are in the host's run dir)
    for f in "$hdir"/run/qemu/*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f"); pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    done
    # and the serial-console sockets of this host's guests (named by uid)
    for f in "$hdir"/agent/nodes/*; do
      [ -d "$f" ] && rm -f "/run/yukumo/$(basename "$f").sock" "/run/yukumo/$(basename "$f").console.sock"
    done
  done
  stop_test_libvirtd
  # Routers the agents made: their DHCP servers (PID files in the agents'
  # state), then their namespaces (named after the hosts' namespaces).
  for f in "$DIR"/hosts/*/agent/net/*/dnsmasq.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f"); pid_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  if [ -f "$DIR/netns" ]; then
    while read -r ns; do
      for r in /run/netns/"$ns"-r*; do [ -e "$r" ] && ip netns del "$(basename "$r")" 2>/dev/null || true; done
    done < "$DIR/netns"
  fi
  stop_ceph
  stop_proc kube-controller-manager
  stop_proc kube-apiserver
  stop_proc etcd
  for f in "$DIR"/pids/*.pid; do [ -e "$f" ] && stop_proc "$(basename "$f" .pid)"; done
  for hdir in "$DIR"/hosts/*; do
    [ -f "$hdir/mntns" ] && remove_node "$(basename "$hdir")"
  done
  if mountpoint -q "$DIR/mntns"; then umount "$DIR/mntns" 2>/dev/null || umount -l "$DIR/mntns"; fi
  if [ -f "$DIR/netns" ]; then
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done < "$DIR/netns"
  fi
  rm -rf "$DIR"
  log "environment at $DIR removed"
}

main() {
  local cmd=${1:-}; shift || true
  local args=()
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) DIR=$2; shift 2 ;;
      --hosts) HOSTS=$2; shift 2 ;;
      --vm-hosts) VM_HOSTS=$2; shift 2 ;;
      --controllers) CONTROLLERS=$2; shift 2 ;;
      --no-example) EXAMPLE=0; shift ;;
      --no-prometheus) PROMETHEUS=0; shift ;;
      --storage) STORAGE=$2; shift 2 ;;
      --kubelets) KUBELETS=1; shift ;;
      --signal) SIGNAL=$2; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  DIR=$(mkdir -p "$(dirname "$DIR")" && cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    start-controller) load_state; start_controller "${args[0]}" ;;
    start-agent) load_state; start_agent "${args[0]}" ;;
    start-test-agent) load_state; start_test_agent "${args[0]}" "${args[1]}" ;;
    test-libvirt-uri) load_state; test_libvirt_uri "${args[0]}" ;;
    start-libvirtd) load_state; start_libvirtd "${args[0]}" ;;
    start-site-host) load_state; start_site_host "${args[0]}" "${args[1]}" "${args[2]}" ;;
    stop-site-host) load_state; stop_site_host "${args[0]}" ;;
    start-vm-host) load_state; start_vm_host "${args[0]}" "${args[1]}" "${args[2]}" "${args[3]:-}" ;;
    stop-vm-host) load_state; stop_vm_host "${args[0]}" ;;
    stop) load_state; stop_proc "${args[0]}" "$SIGNAL" ;;
    guest) cmd_guest "${args[@]}" ;;
    user) cmd_user "${args[@]}" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
}

main "$@"
