#!/usr/bin/env bash
# `make image`: the yukumo container image, built without a daemon (umoci).
#
# One image, two binaries: the controller and the agent share every
# library and release together, and the chart picks the binary by
# `command`. Contents (nothing else):
#   /usr/local/bin/yukumo-controller, /usr/local/bin/yukumo-agent
#     (the release binaries, debug info stripped);
#   the agent's runtime pieces: nft (firewall, NAT, anti-spoofing),
#     dnsmasq (DHCP per group), tc (the WAN tunnels' caps), tgtadm and
#     tgtd (iscsi pools), rbd and
#     qemu-img with its rbd module (rbd pools), each with exactly the
#     shared libraries `ldd` names;
#   /etc/ssl/certs/ca-certificates.crt (image URLs over https), /etc/passwd
#   and /etc/group (root, and nonroot 65532 the controller runs as), /tmp;
#   /usr/share/yukumo/packages.txt: the Debian package and version each
#     copied file came from.
# No time zone files: the binaries carry their own tz database (jiff's
# bundle), so weekly windows in any IANA zone work in the image.
# They are in the one image, not in a flavour of it: an `rbd` pool may be
# added to a Site at any time, and every agent must serve it then without a
# new image rolled out. No Python `ceph` CLI: the agent asks the monitors
# for `df` through librados itself.
#
# Reproducible from pinned inputs: the same binaries and package versions
# give the same image digest (every mtime, the created time and the history
# entry's time are the last commit's time; e2e/image-test.sh builds twice
# and compares).
#
# Output: $OUT (default target/image): oci/ (the OCI layout, tag $VERSION),
# yukumo-$VERSION.oci.tar (that layout as one tar: `ctr images import`,
# `skopeo copy oci-archive:`), rootfs/ (the files, for image/Dockerfile).
# Prints "<tar> <manifest digest> <bytes>".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/image}
BIN=${YUKUMO_BIN:-$ROOT/target/release}
VERSION=$(awk -F'"' '/^version = /{print $2; exit}' "$ROOT/Cargo.toml")
EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
command -v umoci >/dev/null || { echo "image: umoci is missing (e2e/lib/tools.sh installs it)" >&2; exit 1; }
for b in yukumo-controller yukumo-agent; do
  [ -x "$BIN/$b" ] || { echo "image: $BIN/$b is missing (make build)" >&2; exit 1; }
done

rm -rf "$OUT"
mkdir -p "$OUT"
rootfs=$OUT/rootfs
mkdir -p "$rootfs"/{usr/local/bin,usr/sbin,usr/share/yukumo,etc/ssl/certs,tmp,run,var,root}
# /var/run is /run, as on the hosts: libvirt's client looks for
# /var/run/libvirt/libvirt-sock, the agent pod mounts the host's /run/libvirt.
ln -s ../run "$rootfs/var/run"
chmod 1777 "$rootfs/tmp"
declare -A FROM=()   # copied system file -> its Debian package

copy_file() { # a system file, and the libraries it needs
  local f=$1 real
  real=$(readlink -f "$f")
  [ -e "$rootfs$f" ] && return 0
  mkdir -p "$rootfs$(dirname "$f")"
  cp -L "$f" "$rootfs$f"
  FROM[$f]=$(dpkg -S "$real" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
  [ -n "${FROM[$f]}" ] || FROM[$f]=$(dpkg -S "$f" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
}
copy_libs_of() { # the shared libraries a program needs
  local lib
  # "name => /path (addr)" lines, and the loader's own "/path (addr)" line.
  while read -r lib; do
    [ -n "$lib" ] && copy_file "$lib"
  done < <(ldd "$1" | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

for b in yukumo-controller yukumo-agent; do
  cp "$BIN/$b" "$rootfs/usr/local/bin/$b"
  strip --strip-debug "$rootfs/usr/local/bin/$b"
  copy_libs_of "$BIN/$b"
done
# The agent's tools, and those of `rbd` pools: rbd (librbd, librados: the
# agent's monitor `df` loads the latter), qemu-img with its rbd module
# (an image's copy into a pool), which QEMU loads from its module directory.
for p in /usr/sbin/nft /usr/sbin/dnsmasq /usr/sbin/tc /usr/sbin/tgtadm /usr/sbin/tgtd \
  /usr/bin/rbd /usr/bin/qemu-img /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so; do
  [ -e "$p" ] || { echo "image: $p is missing (e2e/lib/tools.sh installs its package)" >&2; exit 1; }
  copy_file "$p"
  copy_libs_of "$p"
done
copy_file /etc/ssl/certs/ca-certificates.crt
cat > "$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin
PASSWD
cat > "$rootfs/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
{
  echo "# file<TAB>Debian package (version) — what image/build.sh copied from this machine"
  for f in $(printf '%s\n' "${!FROM[@]}" | sort); do
    pkg=${FROM[$f]}
    ver=$( [ -n "$pkg" ] && dpkg-query -W -f='${Version}' "${pkg%%:*}" 2>/dev/null || echo "?")
    printf '%s\t%s (%s)\n' "$f" "${pkg:-?}" "$ver"
  done
} > "$rootfs/usr/share/yukumo/packages.txt"
find "$rootfs" -exec touch -h -d "@$EPOCH" {} +

# The OCI layout: an empty image, unpacked, the rootfs copied in, repacked
# as one layer; then the configuration.
oci=$OUT/oci
bundle=$OUT/bundle
umoci init --layout "$oci"
umoci new --image "$oci:$VERSION"
umoci unpack --image "$oci:$VERSION" "$bundle" >/dev/null
cp -a "$rootfs/." "$bundle/rootfs/"
umoci repack --image "$oci:$VERSION" --history.created "$CREATED" \
  --history.created_by "image/build.sh" --history.comment "yukumo $VERSION" "$bundle"
rm -rf "$bundle"
umoci config --no-history --image "$oci:$VERSION" \
  --created "$CREATED" --author "yukumo" --architecture amd64 --os linux \
  --config.user 65532:65532 \
  --config.env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd /usr/local/bin/yukumo-controller \
  --config.label "org.opencontainers.image.version=$VERSION" \
  --config.label "org.opencontainers.image.title=yukumo"
umoci gc --layout "$oci"
tar="$OUT/yukumo-$VERSION.oci.tar"
tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner -C "$oci" -cf "$tar" .
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$oci/index.json")
echo "$tar $digest $(stat -c %s "$tar")"
