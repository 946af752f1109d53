#!/usr/bin/env bash
# Builds yukumo's tiny test guest: a bootable qcow2 disk image (FAT file
# system with syslinux, the Debian kernel of this machine and a busybox
# initramfs) that boots to userspace in seconds under TCG. Its init reads the
# NoCloud config disk (label cidata) like cloud-init does, sets the hostname,
# installs the ssh keys and reports on the serial console:
#   YUKUMO-GUEST hostname=<h> instance=<id> sshkeys=<n> sshkey0=<sha256 of key 0>
# then brings up eth0 with DHCP when the config asks for it, starts an sshd
# (Debian's dropbear: public keys only, host keys made at first use), runs a
# root shell for tests on its second serial port (ttyS1) and an interactive
# one on its console (ttyS0). Besides busybox and dropbear it has
# rawsend (e2e/lib/rawsend.c), which sends a raw Ethernet frame given in hex,
# and blkbench (e2e/lib/blkbench.c), the storage benchmark's block I/O.
#
# Output: $YUKUMO_CACHE/images/yukumo-tiny-guest-<kernel>.qcow2 (cached);
# prints "<path> sha256:<hex>".
set -euo pipefail
YUKUMO_CACHE=${YUKUMO_CACHE:-$HOME/.cache/yukumo}
KVER=$(find /lib/modules -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || { echo "tiny-guest: no Debian kernel in /boot (install linux-image-amd64)" >&2; exit 1; }
OUT_DIR=$YUKUMO_CACHE/images
OUT=$OUT_DIR/yukumo-tiny-guest-$KVER.qcow2
LIB=$(dirname "$0")
RAWSEND=$LIB/rawsend.c
BLKBENCH=$LIB/blkbench.c
# shellcheck source=initramfs-modules.sh
source "$LIB/initramfs-modules.sh"
[ -x /usr/sbin/dropbear ] || { echo "tiny-guest: no /usr/sbin/dropbear (install dropbear-bin)" >&2; exit 1; }
SCRIPT_SUM=$(cat "$0" "$RAWSEND" "$BLKBENCH" "$LIB/initramfs-modules.sh" /usr/sbin/dropbear | sha256sum | cut -c1-12)
OUT=${OUT%.qcow2}-$SCRIPT_SUM.qcow2
if [ ! -f "$OUT" ]; then
  mkdir -p "$OUT_DIR"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  root=$work/root
  mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc/dropbear,tmp,root/.ssh,cidata,lib/modules,usr/bin,usr/sbin,run,var/run,var/log}
  chmod 700 "$root/root/.ssh"
  cp /bin/busybox "$root/bin/busybox"
  # dropbear and the shared libraries it links (glibc has nss "files"
  # built in, so /etc/passwd is all the user database it needs).
  cp /usr/sbin/dropbear "$root/usr/sbin/dropbear"
  for lib in $(ldd /usr/sbin/dropbear | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
  echo 'root:x:0:' > "$root/etc/group"
  echo '/bin/sh' > "$root/etc/shells"
  # rawsend: a frame as a hostile tenant would send it (tests of the guard).
  gcc -static -Os -s -o "$root/bin/rawsend" "$RAWSEND"
  gcc -static -O2 -s -o "$root/bin/blkbench" "$BLKBENCH"
  # Kernel modules for virtio disks and NICs, ISO 9660, 802.1Q, and FAT (the
  # boot disk's file system: the boot-from-volume test writes a file there).
  initramfs_modules "$KVER" "$root" virtio_pci virtio_blk virtio_net isofs 8021q vfat nls_cp437 nls_ascii
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
exec >/dev/ttyS0 2>&1
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
found=""
# Disks appear asynchronously after the driver loads: look for up to 10 s.
for _ in $(seq 1 50); do
  for d in /dev/vd[b-z] /dev/sr0; do
    [ -b "$d" ] || continue
    if mount -t iso9660 -o ro "$d" /cidata 2>/dev/null; then
      if [ -f /cidata/meta-data ]; then found=$d; break; fi
      umount /cidata
    fi
  done
  [ -n "$found" ] && break
  sleep 0.2
done
if [ -z "$found" ]; then
  echo "YUKUMO-GUEST error=no-config-disk disks=$(ls /dev/vd* 2>/dev/null | tr "\n" " ") modules=$(cut -d" " -f1 /proc/modules | tr "\n" " ") fs=$(grep -c iso9660 /proc/filesystems)"
else
  h=$(sed -n 's/^local-hostname: *//p' /cidata/meta-data | head -n 1)
  id=$(sed -n 's/^instance-id: *//p' /cidata/meta-data | head -n 1)
  [ -n "$h" ] && hostname "$h"
  sed -n 's/^ *- *\(ssh-[^ ]* .*\)$/\1/p; s/^ *- *\(ecdsa-[^ ]* .*\)$/\1/p' /cidata/user-data > /root/.ssh/authorized_keys
  n=$(grep -c . /root/.ssh/authorized_keys || true)
  k0=$(head -n 1 /root/.ssh/authorized_keys | tr -d '\n' | sha256sum | cut -c1-64)
  echo "YUKUMO-GUEST hostname=$(hostname) instance=$id sshkeys=$n sshkey0=$k0"
  if grep -q 'dhcp4: *true' /cidata/network-config 2>/dev/null; then
    ip link set eth0 up
    udhcpc -i eth0 -t 20 -T 1 -n -q -s /bin/tiny-dhcp && echo "YUKUMO-GUEST dhcp=$(ip -4 -o addr show eth0 | awk '{print $4}')"
  fi
fi
# sshd: public keys only (-s), host keys made at the first connection (-R).
dropbear -R -s -p 22 && echo "YUKUMO-GUEST sshd=dropbear"
# A root shell on the second serial port (ttyS1), for tests to drive the
# guest from the host side without any network.
if [ -c /dev/ttyS1 ]; then
  # One command per line, "<marker> <base64>" (e2e/src/lib.rs guest_sh):
  # a line cut short by bytes lost while the port opened fails alone.
  stty -F /dev/ttyS1 -echo -onlcr -icanon min 1 time 0 2>/dev/null
  (while true; do sh -c 'while read -r m c; do sh -c "$(echo "$c" | base64 -d)" </dev/null; echo "__${m}__$?"; done' </dev/ttyS1 >/dev/ttyS1 2>&1; done) &
fi
echo "YUKUMO-GUEST ready"
# The serial console (ttyS0): a root shell, as a console login would give
# (`kubectl yukumo console`); started again whenever it exits.
while true; do sh -i </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done
INIT
  cat > "$root/bin/tiny-dhcp" <<'DHCP'
#!/bin/sh
case $1 in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
DHCP
  chmod +x "$root/init" "$root/bin/tiny-dhcp"
  (cd "$root" && find . | sort | cpio -o -H newc --quiet | gzip -9n) > "$work/initrd.gz"
  cat > "$work/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet rdinit=/init panic=5
CFG
  mkfs.vfat -C -i 59554b55 -n YUKUMOTINY "$work/disk.raw" 49152 >/dev/null
  syslinux --install "$work/disk.raw"
  mcopy -i "$work/disk.raw" "/boot/vmlinuz-$KVER" ::/vmlinuz
  mcopy -i "$work/disk.raw" "$work/initrd.gz" ::/initrd.gz
  mcopy -i "$work/disk.raw" "$work/syslinux.cfg" ::/syslinux.cfg
  qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$OUT.tmp"
  mv "$OUT.tmp" "$OUT"
fi
echo "$OUT sha256:$(sha256sum "$OUT" | cut -c1-64)"
