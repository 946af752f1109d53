#!/usr/bin/env bash
# Builds the initramfs of a "VM host": a TCG virtual machine running the
# Debian kernel of /boot (which, unlike the kernel of this machine, has
# 802.1Q VLAN sub-interfaces) with this machine's root file system, read-only
# over virtio-9p. Such a VM is a hypervisor host with a kernel of its own, for
# the code paths the machine's kernel cannot run (VLAN segments).
#
# The initramfs loads the virtio and 9p modules, mounts the machine's root
# at /newroot (with a tmpfs on /run, the VM's only writable place: the rest,
# /tmp included, is the machine's, read-only), and runs the script named by
# the kernel argument `yk.init=<path>` (a path on the machine's file system,
# written by e2e/env.sh) inside it, with a PATH of the usual directories.
#
# Output: $YUKUMO_CACHE/images/yukumo-vm-host-<kernel>-<script sum>.initrd.gz
# (cached); prints "<kernel image> <initrd>".
set -euo pipefail
YUKUMO_CACHE=${YUKUMO_CACHE:-$HOME/.cache/yukumo}
# The newest kernel with both an image in /boot and its modules.
KVER=""
for v in $(find /lib/modules -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V); do
  [ -f "/boot/vmlinuz-$v" ] && KVER=$v
done
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || { echo "vm-host-initrd: no Debian kernel in /boot (install linux-image-amd64)" >&2; exit 1; }
LIB=$(dirname "$0")
# shellcheck source=initramfs-modules.sh
source "$LIB/initramfs-modules.sh"
SCRIPT_SUM=$(cat "$0" "$LIB/initramfs-modules.sh" | sha256sum | cut -c1-12)
OUT=$YUKUMO_CACHE/images/yukumo-vm-host-$KVER-$SCRIPT_SUM.initrd.gz
if [ ! -f "$OUT" ]; then
  mkdir -p "$(dirname "$OUT")"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  root=$work/root
  mkdir -p "$root"/{bin,proc,sys,dev,newroot,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  initramfs_modules "$KVER" "$root" virtio_pci virtio_net 9p 9pnet_virtio
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/ttyS0 2>&1
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m"; done
script=""
for a in $(cat /proc/cmdline); do
  case $a in yk.init=*) script=${a#yk.init=} ;; esac
done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot; then
  echo "YUKUMO-VM-HOST error=no-host-root"; echo o > /proc/sysrq-trigger
fi
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
echo "YUKUMO-VM-HOST kernel=$(uname -r) init=$script"
exec chroot /newroot /usr/bin/env -i HOME=/root TERM=dumb \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/sh "$script"
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | sort | cpio -o -H newc --quiet | gzip -6n) > "$OUT.tmp"
  mv "$OUT.tmp" "$OUT"
fi
echo "/boot/vmlinuz-$KVER $OUT"
