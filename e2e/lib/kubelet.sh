# Real kubelet nodes for the local environment (sourced by e2e/env.sh; `up
# --kubelets`): every simulated host is also a Kubernetes node — containerd,
# runc and a kubelet in the host's network namespace and in a mount
# namespace of its own — and the chart's pods (the agent DaemonSet, the
# controller Deployment) run there from the locally built image.
#
# Per host NAME (index I), under $DIR/hosts/NAME/node:
#   - a persistent mount namespace ($DIR/mntns/NAME) holding the node's
#     folders bind-mounted over the paths containerd and the kubelet use
#     (/run/containerd, /var/lib/{containerd,kubelet,cni}, /var/log/pods,
#     /etc/cni/net.d, ...), the host's libvirt folders (/run/libvirt, ...),
#     its yukumo state (/var/lib/yukumo) and /run/netns (shared, so the agent
#     pod's router namespaces are the node's), and a sysfs of the host's
#     network namespace with this machine's cgroup hierarchies under it.
#     libvirtd runs there too (cgroups hidden from it, as before), so a
#     guest's files are at the same paths for QEMU and for the agent pod.
#   - the API server at 10.250.0.1:443 (the `kubernetes` Service's address,
#     on the host's lo): socat into a unix socket of this machine's, which
#     another socat joins to the API server on 127.0.0.1 — no route between
#     the root namespace and the hosts' is ever made.
#   - the API server's "cluster" egress into it: e2e/lib/egress-proxy.py
#     `route` on this machine passes CONNECTs for 10.255.0.I and 10.244.I.x
#     to the node's half ($DIR/kubelets/node-I.sock, `node`, in the host's
#     namespace): `kubectl logs`, `exec`, `port-forward` and the pod proxy
#     (Prometheus scrapes the pods through it) work.
#   - pods: a CNI bridge cni0 in the host's namespace, 10.244.I.0/24, no
#     masquerade (the pods reach only the host and the API server).
# The kubelet authenticates callers by client certificate (this
# environment's CA; anonymous off) and authorises them all (AlwaysAllow):
# only the API server holds such a certificate for it.
# Kubernetes 1.35 is the last to run a kubelet on cgroup v1 (this machine's
# hierarchy), with failCgroupV1: false.

KUBE_SVC_IP=10.250.0.1
PAUSE_IMAGE=registry.k8s.io/pause:3.10

node_ns_file() { echo "$DIR/mntns/$1"; }
# The cgroup (in every hierarchy) holding node NAME's pods.
node_cgroup() { echo "yukumo-$(netns_prefix)-$1"; }

# The pause image (a static binary of ours: nothing can be pulled here) and
# the yukumo image (image/build.sh), as OCI archives under $DIR/images.
build_node_images() {
  local img=$DIR/images b
  mkdir -p "$img/pause"
  cat > "$img/pause/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
EOF
  b=$img/pause/bundle
  mkdir -p "$img/pause/rootfs"
  gcc -static -Os -s -o "$img/pause/rootfs/pause" "$img/pause/pause.c"
  umoci init --layout "$img/pause/oci"
  umoci new --image "$img/pause/oci:3.10"
  umoci unpack --image "$img/pause/oci:3.10" "$b" >/dev/null
  cp -a "$img/pause/rootfs/." "$b/rootfs/"
  umoci repack --image "$img/pause/oci:3.10" "$b"
  rm -rf "$b"
  umoci config --no-history --image "$img/pause/oci:3.10" --config.entrypoint /pause --config.user 65535:65535
  tar -C "$img/pause/oci" -cf "$img/pause.oci.tar" .
  log "building the yukumo image (image/build.sh)"
  YUKUMO_BIN=${YUKUMO_BIN_DIR:-$ROOT/target/release} "$ROOT/image/build.sh" "$img/yukumo" > "$img/yukumo.out"
  read -r YUKUMO_IMAGE_TAR _ _ < "$img/yukumo.out"
  cp "$YUKUMO_IMAGE_TAR" "$img/yukumo.oci.tar"
  rm -rf "$img/yukumo"
}

# The machine's side of the API forwarders and the kubelets' egress proxy.
start_node_plumbing() {
  mkdir -p "$DIR/kubelets"
  spawn api-uds socat "UNIX-LISTEN:$DIR/api.sock,fork,mode=600,unlink-early" "TCP:127.0.0.1:$API_PORT"
  spawn egress-proxy python3 "$ROOT/e2e/lib/egress-proxy.py" route "$DIR/egress.sock" "$DIR/kubelets"
  # Users' clients (`kubectl yukumo console`): the API server and the agents'
  # console endpoints (the chart's agent.consolePort, 9443), nothing else.
  local port
  port=$(free_port)
  mkdir -p "$DIR/ports"; echo "$port" > "$DIR/ports/user-proxy"
  spawn user-proxy python3 "$ROOT/e2e/lib/egress-proxy.py" users "$port" "$DIR/kubelets" "$API_PORT" 9443
  wait_for 20 "the API socket" test -S "$DIR/api.sock"
  log "starting kube-scheduler"
  spawn kube-scheduler "$YUKUMO_NODE_BIN/kube-scheduler" --kubeconfig "$DIR/kubeconfig-scheduler" \
    --authentication-kubeconfig "$DIR/kubeconfig-scheduler" --authorization-kubeconfig "$DIR/kubeconfig-scheduler" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 --v 1
}

# Host NAME (index I, its namespaces made by start_host) becomes a node.
start_node() { # name index
  local name=$1 i=$2 hdir=$DIR/hosts/$1 n ns nsf ip
  n=$hdir/node ns=$(cat "$hdir/netns") nsf=$(node_ns_file "$1") ip=10.255.0.$2
  mkdir -p "$n"/{containerd,run-containerd,kubelet,cni-state,log-pods,log-containers,cni,libexec,netns,cg,tgtd} \
    "$hdir/agent" "$DIR/mntns"
  if ! mountpoint -q "$DIR/mntns"; then
    mount --bind "$DIR/mntns" "$DIR/mntns" && mount --make-private "$DIR/mntns"
  fi
  touch "$nsf"
  mkdir -p /run/containerd /var/lib/containerd /var/lib/kubelet /var/lib/cni /var/log/pods \
    /var/log/containers /etc/cni/net.d /usr/libexec/kubernetes /var/lib/yukumo /run/netns /run/tgtd
  nsenter --net="/run/netns/$ns" unshare --mount="$nsf" --propagation slave sh -ec "
    mount --rbind /sys/fs/cgroup '$n/cg'
    umount -l /sys
    mount -t sysfs sysfs /sys
    mount --rbind '$n/cg' /sys/fs/cgroup
    umount -l '$n/cg'
    mount --bind '$hdir/run' /run/libvirt
    mount --bind '$hdir/lib' /var/lib/libvirt
    mount --bind '$hdir/etc' /etc/libvirt
    mount --bind '$hdir/log' /var/log/libvirt
    mount --bind '$hdir/cache' /var/cache/libvirt
    mount --bind '$n/run-containerd' /run/containerd
    mount --bind '$n/containerd' /var/lib/containerd
    mount --bind '$n/kubelet' /var/lib/kubelet
    mount --make-shared /var/lib/kubelet
    mount --bind '$n/cni-state' /var/lib/cni
    mount --bind '$n/log-pods' /var/log/pods
    mount --bind '$n/log-containers' /var/log/containers
    mount --bind '$n/cni' /etc/cni/net.d
    mount --bind '$n/libexec' /usr/libexec/kubernetes
    mount --bind '$hdir/agent' /var/lib/yukumo
    mount --bind '$n/tgtd' /run/tgtd
    while umount -l /run/netns 2>/dev/null; do :; done
    mount --bind '$n/netns' /run/netns
    mount --make-shared /run/netns"
  echo "$nsf" > "$hdir/mntns"

  cat > "$n/containerd.toml" <<EOF
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
EOF
  cat > "$n/cni/10-pods.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}]}
EOF
  # The node's client certificate (Node authorizer: system:node:NAME), its
  # kubelet's serving one, and its kubeconfig (the API server through lo).
  cert "node-$name" "/O=system:nodes/CN=system:node:$name" "extendedKeyUsage=clientAuth"
  cert "kubelet-$name" "/CN=$name" "subjectAltName=IP:$ip,DNS:$name
extendedKeyUsage=serverAuth"
  kubeconfig "$n/kubeconfig" cert "node-$name" "https://$KUBE_SVC_IP:443"
  cat > "$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "$name")
failSwapOn: false
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $DIR/pki/kubelet-$name.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-$name.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: AlwaysAllow}
podLogsDir: /var/log/pods
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "1%", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
  log "starting node $name: containerd, kubelet ($ip)"
  ip -n "$ns" addr add "$KUBE_SVC_IP/32" dev lo 2>/dev/null || true
  spawn "apifwd-$name" nsenter --net="/run/netns/$ns" \
    socat "TCP-LISTEN:443,bind=$KUBE_SVC_IP,fork,reuseaddr" "UNIX-CONNECT:$DIR/api.sock"
  spawn "nodeproxy-$name" nsenter --net="/run/netns/$ns" \
    python3 "$ROOT/e2e/lib/egress-proxy.py" node "$DIR/kubelets/node-$i.sock"
  local enter=(nsenter --net="/run/netns/$ns" --mount="$nsf" --) h
  # The cgroup its pods live in, in every hierarchy.
  for h in /sys/fs/cgroup/*/; do
    [ -e "$h/cgroup.procs" ] && mkdir -p "$h$(node_cgroup "$name")"
  done
  spawn "containerd-$name" "${enter[@]}" containerd --config "$n/containerd.toml"
  wait_for 30 "containerd of $name" "${enter[@]}" ctr version
  "${enter[@]}" ctr -n k8s.io images import --base-name "${PAUSE_IMAGE%:*}" "$DIR/images/pause.oci.tar" >/dev/null
  "${enter[@]}" ctr -n k8s.io images import --base-name ghcr.io/yukumo/yukumo "$DIR/images/yukumo.oci.tar" >/dev/null
  spawn "kubelet-$name" "${enter[@]}" "$YUKUMO_NODE_BIN/kubelet" --config "$n/kubelet.yaml" \
    --kubeconfig "$n/kubeconfig" --hostname-override "$name" --node-ip "$ip" \
    --node-labels "yukumo.io/hypervisor=true,yukumo.io/site=$(cat "$hdir/site"),yukumo.io/gateway=true,yukumo.io/uplink=ul0" \
    --v 1
  wait_for 60 "node $name to register" kubectl get node "$name"
}

# Stop node NAME: the kubelet, its pods' processes (every process in its
# cgroup), containerd, the pods' containerd shims and the forwarders.
stop_node() { # name
  local name=$1 pid cg
  stop_proc "kubelet-$name"
  for cg in /sys/fs/cgroup/pids/"$(node_cgroup "$name")"; do
    [ -d "$cg" ] || continue
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < <(find "$cg" -name cgroup.procs -exec cat {} +)
  done
  stop_proc "containerd-$name"
  # The shims: every process left in the node's own mount namespace (the
  # pods' processes have namespaces of their own, libvirtd one below it).
  local mnt f
  mnt=$(stat -L -c %i "$(node_ns_file "$name")" 2>/dev/null) || mnt=
  if [ -n "$mnt" ]; then
    for f in /proc/[0-9]*; do
      [ "$(readlink "$f/ns/mnt" 2>/dev/null)" = "mnt:[$mnt]" ] && kill -KILL "${f#/proc/}" 2>/dev/null || true
    done
  fi
  stop_proc "apifwd-$name"
  stop_proc "nodeproxy-$name"
}

# After every process of host NAME stopped: its mount namespace and the
# cgroups its kubelet made.
remove_node() { # name
  local name=$1 nsf cg
  nsf=$(node_ns_file "$name")
  [ -e "$nsf" ] && { umount "$nsf" 2>/dev/null || umount -l "$nsf" 2>/dev/null || true; rm -f "$nsf"; }
  for cg in /sys/fs/cgroup/*/"$(node_cgroup "$name")"; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  return 0
}
