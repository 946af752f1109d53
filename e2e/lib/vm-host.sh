# Sourced by e2e/env.sh: VM hosts.
#
# A VM host is a TCG virtual machine with the Debian kernel of /boot (it has
# 802.1Q VLAN sub-interfaces; this machine's kernel has not) and this
# machine's root file system, read-only over 9p (e2e/lib/vm-host-initrd.sh).
# It runs a yukumo agent of its own, on libvirt's test driver: its guests
# are defined and "run" in libvirt but not booted (a TCG guest inside a TCG
# VM would take minutes), so a test gives each of them a network endpoint
# by hand: a namespace inside the VM behind a veth named like the guest's
# tap. Everything else is the real agent on a real kernel: the Host and its
# probed capabilities, bridges, VLAN and VXLAN links, the anti-spoofing
# table, router namespaces with NAT, firewall and dnsmasq.
#
# Its NICs:
#   mgmt0  QEMU user networking with restrict=on: its only way out is a
#          guestfwd of $VM_API_ADDR:$VM_API_PORT to the API server on
#          127.0.0.1 (a socat per connection), and a hostfwd of the agent's
#          metrics port to 127.0.0.1 of this machine;
#   ul0    on the environment's underlay bridge, 10.255.0.INDEX: the uplink
#          that carries the tagged VLAN segments (and VXLAN);
#   ext0   on the environment's outside bridge (the Site's external network);
#   wan0   on the environment's WAN bridge, 100.64.0.INDEX/24 (a gateway's
#          WAN interface: its Site's tunnels to other Sites' gateways). Its
#          name is also that of a router's external leg, which the Debian
#          kernel would refuse to create from a host namespace holding a link
#          of that name: the agent creates it under a temporary name (proven
#          here, this machine's kernel does not look names up that way).
# Its agent is a remote Site's agent: it reaches the API server only through
# mgmt0's guestfwd, with the credential `kubectl yukumo site join SITE NAME`
# makes for it (its own ServiceAccount, kept by the chart's
# yukumo-site-agent-scope policy to its own Host, nodes and volumes);
# stopping the VM host revokes it.
# A storage VM host (a 4th argument: a disk size in MiB) is not a gateway:
# it gets that disk (a sparse file in its folder, /dev/vda in the VM) as
# the LVM volume group `yukumo` (1 MiB extents; device-mapper is in the
# Debian kernel, not in this machine's), and a tgtd of its own serving
# iSCSI on its underlay address (portal 10.255.0.INDEX:3260), for an
# LVM-backed `iscsi` pool of its Site. LVM runs without udev, with its
# configuration and metadata backups in the VM's /run (LVM_SYSTEM_DIR).
# A root shell on its second serial port is the unix socket named in
# $DIR/hosts/NAME/shell; its console, with the agent's log, is
# $DIR/logs/vm-NAME-console.log. Everything it holds lives in its memory: stopping
# its QEMU (process "vm-NAME") removes the host and all its state at once.

start_vm_host() { # name site index [storage MiB] (index: 10..250, the underlay address)
  local name=$1 site=$2 i=$3 disk=${4:-} hdir=$DIR/hosts/$1 p kernel initrd mport sock mac
  local role="--gateway --wan-interface wan0" storage="" drive=()
  p=$(netns_prefix)
  read -r kernel initrd < <("$ROOT/e2e/lib/vm-host-initrd.sh") || die "cannot build the VM host initramfs"
  mkdir -p "$hdir" /run/yukumo
  echo "$site" > "$hdir/site"
  echo "$i" > "$hdir/vm"
  mport=$(free_port)
  mkdir -p "$DIR/ports"
  echo "$mport" > "$DIR/ports/agent-$name"
  sock=/run/yukumo/$p-$name.sock
  echo "$sock" > "$hdir/shell"
  mac=$(printf '52:54:00:79:%02x' "$i")
  if [ -n "$disk" ]; then
    truncate -s "${disk}M" "$hdir/pv.img"
    drive=(-drive "file=$hdir/pv.img,format=raw,if=virtio,cache=unsafe,discard=unmap")
    role="--iscsi-portal 10.255.0.$i:3260"
    storage="modprobe -a virtio_blk dm_mod dm_snapshot
mkdir -p /run/lvm-etc /run/lvm /run/lock/lvm
cat > /run/lvm-etc/lvm.conf <<'LVM'
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 filter = [ \"a|^/dev/vd|\", \"r|.*|\" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
global { use_lvmpolld = 0 }
LVM
export LVM_SYSTEM_DIR=/run/lvm-etc LVM_SUPPRESS_FD_WARNINGS=1
for t in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 1; done
lvm pvcreate -q /dev/vda && lvm vgcreate -q -s 1m yukumo /dev/vda || echo 'YUKUMO-VM-HOST error=no-volume-group'
tgtd -f --iscsi portal=10.255.0.$i:3260 >/dev/null 2>&1 &"
  fi
  "$(plugin_binary)" site join "$site" "$name" --server "https://$VM_API_ADDR:$VM_API_PORT" \
    --duration 48h -o "$hdir/kubeconfig" >>"$DIR/logs/vm-$name-join.log" 2>&1 \
    || die "kubectl yukumo site join $site $name failed: $(tail -n 3 "$DIR/logs/vm-$name-join.log")"
  cat > "$hdir/vm.sh" <<EOF
#!/bin/sh
# Runs inside VM host $name (written by e2e/env.sh start-vm-host).
hostname $name
for d in /sys/class/net/*; do
  case \$(cat "\$d/address") in
    $mac:01) ip link set "\${d##*/}" name mgmt0 ;;
    $mac:02) ip link set "\${d##*/}" name ul0 ;;
    $mac:03) ip link set "\${d##*/}" name ext0 ;;
    $mac:04) ip link set "\${d##*/}" name wan0 ;;
  esac
done
ip link set lo up
ip addr add 10.0.2.15/24 dev mgmt0 && ip link set mgmt0 up
ip addr add 10.255.0.$i/24 dev ul0 && ip link set ul0 up
ip link set ext0 up
ip addr add 100.64.0.$i/24 dev wan0 && ip link set wan0 up
modprobe -a 8021q bridge vxlan veth macvlan nf_tables wireguard sch_netem sch_htb
mkdir -p /run/netns /run/yukumo-agent
if [ -c /dev/ttyS1 ]; then
  # One command per line, "<marker> <base64>" (e2e/src/lib.rs guest_sh):
  # a line cut short by bytes lost while the port opened fails alone.
  stty -F /dev/ttyS1 -echo -onlcr -icanon min 1 time 0 2>/dev/null
  (while true; do sh -c 'while read -r m c; do sh -c "\$(echo "\$c" | base64 -d)" </dev/null; echo "__\${m}__\$?"; done' </dev/ttyS1 >/dev/ttyS1 2>&1; done) &
fi
$storage
# libvirt's test driver for the agent: a session-mode libvirtd as nobody,
# its folders on /run (the agent's domains live in memory there).
mkdir -p /run/yk-lvt/home /run/yk-lvt/run /run/yk-lvt/config /run/yk-lvt/cache
printf '<node/>\\n' > /run/yk-lvt/node.xml
chown -R nobody:nogroup /run/yk-lvt
setpriv --reuid=65534 --regid=65534 --clear-groups env -i HOME=/run/yk-lvt/home \\
  XDG_RUNTIME_DIR=/run/yk-lvt/run XDG_CONFIG_HOME=/run/yk-lvt/config XDG_CACHE_HOME=/run/yk-lvt/cache \\
  PATH=/usr/sbin:/usr/bin:/sbin:/bin libvirtd >/run/yk-lvt.log 2>&1 &
for _ in \$(seq 300); do [ -S /run/yk-lvt/run/libvirt/libvirt-sock ] && break; sleep 0.1; done
echo "YUKUMO-VM-HOST ready \$(uname -r)"
while true; do
  KUBECONFIG=$hdir/kubeconfig RUST_LOG=${RUST_LOG:-info} $(agent_binary) \\
    --host-name $name --site $site \\
    --libvirt-uri 'test+unix:///run/yk-lvt/node.xml?socket=/run/yk-lvt/run/libvirt/libvirt-sock' \\
    $role --uplink ul0 --underlay-address 10.255.0.$i \\
    --heartbeat-interval ${YUKUMO_HEARTBEAT:-5s} --cpu-overcommit 8 --domain-type qemu \\
    --metrics-addr 10.0.2.15:9464 --state-dir /run/yukumo-agent
  echo "YUKUMO-VM-HOST agent exited with \$?"
  sleep 1
done
EOF
  log "starting VM host $name (site $site, underlay 10.255.0.$i, ${kernel##*/})"
  spawn "vm-$name" qemu-system-x86_64 -machine q35,accel=tcg -m 1024 -smp 1 \
    -nodefaults -display none -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init yk.init=$hdir/vm.sh" \
    -fsdev local,id=root,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot \
    -netdev "user,id=mgmt,restrict=on,net=10.0.2.0/24,guestfwd=tcp:$VM_API_ADDR:$VM_API_PORT-cmd:socat - TCP:127.0.0.1:$API_PORT,hostfwd=tcp:127.0.0.1:$mport-10.0.2.15:9464" \
    -device "virtio-net-pci,netdev=mgmt,mac=$mac:01" \
    -netdev "tap,id=ul,ifname=${p}v${i}u,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=ul,mac=$mac:02" \
    -netdev "tap,id=ext,ifname=${p}v${i}e,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=ext,mac=$mac:03" \
    -netdev "tap,id=wan,ifname=${p}v${i}w,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=wan,mac=$mac:04" "${drive[@]}" \
    -serial "file:$DIR/logs/vm-$name-console.log" \
    -serial "unix:$sock,server=on,wait=off"
  # QEMU makes its taps in the namespace it runs in (this one, where its
  # user networking reaches 127.0.0.1): they move to the environment's
  # underlay and outside bridges at once, before the VM's kernel is up.
  wait_for 30 "the taps of VM host $name" ip link show "${p}v${i}w"
  ip link set "${p}v${i}u" netns "$p-ul"
  ip -n "$p-ul" link set "${p}v${i}u" master br0 up
  ip link set "${p}v${i}e" netns "$p-out"
  ip -n "$p-out" link set "${p}v${i}e" master br0 up
  ip link set "${p}v${i}w" netns "$p-wan"
  ip -n "$p-wan" link set "${p}v${i}w" master br0 up
  write_prom_targets
}

# Stop a VM host: its QEMU, by PID (the VM and everything in it go with it).
stop_vm_host() { # name
  local name=$1 sock site
  stop_proc "vm-$name" KILL
  site=$(cat "$DIR/hosts/$name/site" 2>/dev/null || true)
  [ -n "$site" ] && "$(plugin_binary)" site revoke "$site" "$name" >/dev/null 2>&1 || true
  sock=$(cat "$DIR/hosts/$name/shell" 2>/dev/null || true)
  [ -n "$sock" ] && rm -f "$sock"
  rm -rf "${DIR:?}/hosts/$name" "$DIR/ports/agent-$name"
  write_prom_targets
}
