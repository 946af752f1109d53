#!/usr/bin/env bash
# Installs and caches everything yukumo's tests and `make up` need, so that a
# fresh machine of this kind needs nothing installed by hand:
#   - Debian packages (libvirt, QEMU, nftables, dnsmasq, busybox, dropbear, a Debian
#     kernel and syslinux for the tiny test guest, ...)
#   - kube-apiserver, kube-controller-manager, kubectl and etcd, built from Go modules
#     pinned in e2e/tools/k8s/go.mod; helm from e2e/tools/helm/go.mod.
#   - kubelet and kube-scheduler (the local environment's nodes, which run the
#     chart's pods) from e2e/tools/kubelet/go.mod, same Kubernetes version;
#     containerd, runc and the CNI plugins from Debian.
#   - krew (the kubectl plugin manager) from e2e/tools/krew/go.mod, keyed by
#     its own version: it tests the plugin's krew manifest.
#   - Debian's Prometheus and promtool, unpacked from its package (never
#     installed: no service is started), keyed by the package's version.
# Go binaries are cached under $YUKUMO_CACHE (default ~/.cache/yukumo), keyed
# by version, outside the clone: CI runs in a fresh clone.
#
# Usage: e2e/lib/tools.sh            # install what is missing, print the bin dir
# Sourced: exports YUKUMO_TOOLS_BIN and puts it first on PATH.
set -euo pipefail

YUKUMO_ROOT=${YUKUMO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
YUKUMO_CACHE=${YUKUMO_CACHE:-$HOME/.cache/yukumo}

K8S_VERSION=$(awk '$1=="k8s.io/kubernetes"{print $2}' "$YUKUMO_ROOT/e2e/tools/k8s/go.mod")
ETCD_VERSION=$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2}' "$YUKUMO_ROOT/e2e/tools/k8s/go.mod")
HELM_VERSION=$(awk '$1=="require" && $2=="helm.sh/helm/v3"{print $3}' "$YUKUMO_ROOT/e2e/tools/helm/go.mod")
GO_VERSION=$(go env GOVERSION)
KREW_VERSION=$(awk '$1=="require" && $2=="sigs.k8s.io/krew"{print $3}' "$YUKUMO_ROOT/e2e/tools/krew/go.mod")
YUKUMO_KREW="$YUKUMO_CACHE/tools/krew-$KREW_VERSION-$GO_VERSION/kubectl-krew"
YUKUMO_NODE_BIN="$YUKUMO_CACHE/tools/kubelet-$K8S_VERSION-$GO_VERSION"
YUKUMO_TOOLS_BIN="$YUKUMO_CACHE/tools/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-$GO_VERSION/bin"

APT_PACKAGES=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-utils nftables iproute2 dnsmasq-base busybox-static
  pkg-config xz-utils cpio genisoimage openssl python3 curl
  linux-image-amd64 syslinux syslinux-common mtools dosfstools kmod socat
  gcc libc6-dev strace tgt qemu-block-extra lvm2 iperf3 iputils-ping
  ceph-mon ceph-osd ceph-mgr ceph-common librbd1
  lua5.1 lua-cjson umoci dropbear-bin openssh-client
  containerd runc containernetworking-plugins
)

tools_log() { echo "[tools] $*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  tools_log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # qemu-utils in the same command keeps qemu-img at the version matching qemu-system.
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

build_go_tools() {
  if [ -x "$YUKUMO_TOOLS_BIN/kube-apiserver" ] && [ -x "$YUKUMO_TOOLS_BIN/kube-controller-manager" ] \
     && [ -x "$YUKUMO_TOOLS_BIN/kubectl" ] && [ -x "$YUKUMO_TOOLS_BIN/etcd" ] && [ -x "$YUKUMO_TOOLS_BIN/helm" ]; then
    return 0
  fi
  local tmp="$YUKUMO_TOOLS_BIN.tmp.$$"
  mkdir -p "$tmp"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local vpkg=k8s.io/component-base/version
  local kflags="-s -w -X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
  tools_log "building kube-apiserver, kube-controller-manager, kubectl $K8S_VERSION and etcd $ETCD_VERSION (minutes on a cold cache)"
  (cd "$YUKUMO_ROOT/e2e/tools/k8s" && go build -trimpath -ldflags "$kflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
  (cd "$YUKUMO_ROOT/e2e/tools/k8s" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  tools_log "building helm $HELM_VERSION"
  (cd "$YUKUMO_ROOT/e2e/tools/helm" && go build -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)
  rm -rf "$YUKUMO_TOOLS_BIN"
  mv "$tmp" "$YUKUMO_TOOLS_BIN"
}

# kubelet and kube-scheduler: a module of their own (e2e/tools/kubelet) at
# the control plane's Kubernetes version, cached by that version.
build_node_tools() {
  [ -x "$YUKUMO_NODE_BIN/kubelet" ] && [ -x "$YUKUMO_NODE_BIN/kube-scheduler" ] && return 0
  local tmp="$YUKUMO_NODE_BIN.tmp.$$" minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local vpkg=k8s.io/component-base/version
  tools_log "building kubelet and kube-scheduler $K8S_VERSION"
  mkdir -p "$tmp"
  (cd "$YUKUMO_ROOT/e2e/tools/kubelet" && go build -trimpath \
      -ldflags "-s -w -X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean" \
      -o "$tmp/" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler)
  rm -rf "$YUKUMO_NODE_BIN"
  mv "$tmp" "$YUKUMO_NODE_BIN"
}

build_krew() {
  [ -x "$YUKUMO_KREW" ] && return 0
  tools_log "building krew $KREW_VERSION"
  local tmp="$YUKUMO_KREW.tmp.$$"
  mkdir -p "$(dirname "$YUKUMO_KREW")"
  (cd "$YUKUMO_ROOT/e2e/tools/krew" && go build -trimpath -ldflags "-s -w" -o "$tmp" sigs.k8s.io/krew/cmd/krew)
  mv "$tmp" "$YUKUMO_KREW"
}

# Debian's prometheus package, unpacked (not installed: its service would
# start) into $YUKUMO_CACHE/tools/prometheus-<version>/.
fetch_prometheus() {
  local version dir tmp
  version=$(apt-cache policy prometheus 2>/dev/null | awk '$1=="Candidate:"{print $2}')
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt-get update -q >/dev/null
    version=$(apt-cache policy prometheus | awk '$1=="Candidate:"{print $2}')
  fi
  [ -n "$version" ] && [ "$version" != "(none)" ] || { tools_log "no Debian prometheus package"; return 1; }
  dir="$YUKUMO_CACHE/tools/prometheus-${version//[^A-Za-z0-9.+-]/_}"
  if [ ! -x "$dir/prometheus" ] || [ ! -x "$dir/promtool" ]; then
    tools_log "fetching Debian's prometheus $version"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q "prometheus=$version" >/dev/null 2>&1 \
      && dpkg-deb -x prometheus_*.deb x) || { rm -rf "$tmp"; tools_log "cannot fetch prometheus $version"; return 1; }
    mkdir -p "$dir.tmp.$$"
    cp "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$dir.tmp.$$/"
    rm -rf "$tmp" "$dir"
    mv "$dir.tmp.$$" "$dir"
  fi
  YUKUMO_PROMETHEUS_DIR=$dir
}

install_apt
build_go_tools
build_node_tools
build_krew
fetch_prometheus
export YUKUMO_TOOLS_BIN YUKUMO_NODE_BIN YUKUMO_PROMETHEUS_DIR YUKUMO_KREW
export PATH="$YUKUMO_TOOLS_BIN:$PATH"
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "$YUKUMO_TOOLS_BIN"
fi
