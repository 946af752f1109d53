#!/usr/bin/env bash
# The image (`make image`, image/build.sh) is reproducible and works: built
# twice (same digest), unpacked from its tar with umoci, and every program
# in it run from its own root (chroot, a fresh network namespace for nft):
# the controller as non-root, the agent, nft (a table added and listed),
# dnsmasq (its configuration test), tc (a qdisc listed), tgtadm and tgtd, rbd, qemu-img's rbd
# module and the agent's librados helper. Prints the size and the
# largest files.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=$(mktemp -d /tmp/yukumo-image.XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() { echo "image-test: $*" >&2; exit 1; }
read -r tar1 d1 size1 < <("$ROOT/image/build.sh" "$W/a" | tail -n 1)
read -r _ d2 _ < <("$ROOT/image/build.sh" "$W/b" | tail -n 1)
[ "$d1" = "$d2" ] || fail "two builds differ: $d1 vs $d2"
echo "image-test: reproducible, manifest $d1, $((size1 / 1024 / 1024)) MiB tar"
VERSION=$(awk -F'"' '/^version = /{print $2; exit}' "$ROOT/Cargo.toml")
mkdir -p "$W/layout"
tar -xf "$tar1" -C "$W/layout"
umoci unpack --image "$W/layout:$VERSION" "$W/bundle" >/dev/null
rootfs=$W/bundle/rootfs
python3 - "$W/bundle/config.json" <<'PY' || fail "runtime config"
import json, sys
c = json.load(open(sys.argv[1]))
u = c["process"]["user"]
assert (u["uid"], u["gid"]) == (65532, 65532), u
assert c["process"]["args"] == ["/usr/local/bin/yukumo-controller"], c["process"]["args"]
PY
# What a container runtime provides: /dev/null and /dev/urandom.
mkdir -p "$rootfs/dev"
mknod -m 666 "$rootfs/dev/null" c 1 3
mknod -m 666 "$rootfs/dev/urandom" c 1 9
run() { env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin "$@"; }
v=$(run chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/yukumo-controller --version) || fail "controller as non-root"
echo "image-test: $v (as 65532)"
v=$(run chroot "$rootfs" /usr/local/bin/yukumo-agent --version) || fail "agent"
echo "image-test: $v"
# The tz database travels in the binaries (weekly windows in any zone).
[ ! -e "$rootfs/usr/share/zoneinfo" ] || fail "zoneinfo should not be needed"
n=$(grep -c -a TZif "$rootfs/usr/local/bin/yukumo-controller" || true)
[ "$n" -gt 100 ] || fail "no bundled tz database in the controller ($n TZif)"
[ ! -e "$rootfs/bin/sh" ] || fail "a shell in the image"
printf 'table inet imagetest {\n chain c { type filter hook input priority 0; }\n}\nlist table inet imagetest\n' \
  | run unshare --net -- chroot "$rootfs" /usr/sbin/nft -f - | grep 'chain c' >/dev/null || fail "nft -f in the image"
echo "image-test: $(run chroot "$rootfs" /usr/sbin/nft --version)"
run chroot "$rootfs" /usr/sbin/dnsmasq --test --conf-file=/dev/null >/dev/null 2>&1 || fail "dnsmasq --test"
echo "image-test: $(run chroot "$rootfs" /usr/sbin/dnsmasq --version | head -n 1)"
run unshare --net -- chroot "$rootfs" /usr/sbin/tc qdisc show dev lo >/dev/null 2>&1 || fail "tc in the image"
echo "image-test: $(run chroot "$rootfs" /usr/sbin/tc -V)"
run chroot "$rootfs" /usr/sbin/tgtadm --help >/dev/null 2>&1 || fail "tgtadm"
run chroot "$rootfs" /usr/sbin/tgtd --help >/dev/null 2>&1 || fail "tgtd"
echo "image-test: tgtadm and tgtd run"
# rbd pools: rbd, qemu-img's rbd module (it reads Ceph's configuration: the
# module loaded) and librados (the agent's monitor helper loads it, then
# reads the configuration).
echo "image-test: $(run chroot "$rootfs" /usr/bin/rbd --version)"
out=$(run chroot "$rootfs" /usr/bin/qemu-img info "rbd:p/i:conf=/nonexistent.conf" 2>&1 || true)
grep -q "error reading conf file /nonexistent.conf" <<<"$out" || fail "qemu-img's rbd module: $out"
out=$(run chroot "$rootfs" /usr/local/bin/yukumo-agent rados-mon-command /nonexistent.conf u '{}' 2>&1 || true)
grep -q "reading /nonexistent.conf" <<<"$out" || fail "librados in the image: $out"
echo "image-test: qemu-img opens rbd images, the agent loads librados"
echo "image-test: $(du -sh --apparent-size "$rootfs" | cut -f1) unpacked, $(find "$rootfs" -type f | wc -l) files; largest:"
# (awk reads all: a `head` here can close the pipe early, and pipefail
# turns sort's SIGPIPE into a failure.)
find "$rootfs" -type f -printf '%s %P\n' | sort -rn | awk 'NR <= 6 {printf "  %6.1f MiB  %s\n", $1/1048576, $2}'
