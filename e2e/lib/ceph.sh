# A real single-node Ceph for the local environment's `rbd` pool (sourced by
# e2e/env.sh; recipe and pitfalls: docs/ceph-recipe.md). One mon, one mgr
# (pool statistics: capacity and free space) and one bluestore OSD on a
# sparse file, cephx on, all in a network namespace of their own on the
# underlay at 10.255.0.250, where the hosts' QEMUs and agents reach it.
# The pool `yukumo` is used by the client `client.yukumo` (RBD profile on
# that pool only); its keyring is $DIR/ceph/keyring, given to every agent.
CEPH_IP=10.255.0.250

ceph_ns() { echo "$(netns_prefix)-ceph"; }

# The Ceph CLI as an admin, in Ceph's namespace (bounded: a command never hangs).
ceph_admin() { # tool args...
  local tool=$1; shift
  timeout 60 ip netns exec "$(ceph_ns)" "$tool" -c "$DIR/ceph/ceph.conf" "$@"
}

start_ceph() {
  local D=$DIR/ceph ns C fsid u id p
  ns=$(ceph_ns); C=$D/ceph.conf
  p=$(netns_prefix)
  log "starting Ceph (mon, mgr, 1 OSD) at $CEPH_IP"
  mkdir -p "$D"/{run,log,mon,osd,mgr/ceph-x,crash}
  ip netns add "$ns"
  echo "$ns" >> "$DIR/netns"
  ip -n "$ns" link set lo up
  ip -n "$p-ul" link add ceph type veth peer name ul0 netns "$ns"
  ip -n "$p-ul" link set ceph master br0 up
  ip -n "$ns" addr add "$CEPH_IP/24" dev ul0
  ip -n "$ns" link set ul0 up
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat > "$C" <<CONF
[global]
fsid = $fsid
mon host = [v2:$CEPH_IP:3300,v1:$CEPH_IP:6789]
mon initial members = a
public addr = $CEPH_IP
cluster addr = $CEPH_IP
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $D/run
admin socket = $D/run/\$cluster-\$name.asok
pid file = $D/run/\$cluster-\$name.pid
crash dir = $D/crash
mon cluster log file = $D/log/\$cluster.\$channel.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
[mon]
mon data = $D/mon/\$cluster-\$id
keyring = $D/mon/\$cluster-\$id/keyring
log file = $D/log/\$cluster-\$name.log
[mgr]
mgr data = $D/mgr/\$cluster-\$id
log file = $D/log/\$cluster-\$name.log
[osd]
osd data = $D/osd/\$cluster-\$id
keyring = $D/osd/\$cluster-\$id/keyring
log file = $D/log/\$cluster-\$name.log
osd objectstore = bluestore
bluestore block create = true
bluestore block size = ${YUKUMO_CEPH_BYTES:-4294967296}
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
[client]
keyring = $D/ceph.client.admin.keyring
log file = /dev/null
admin socket =
CONF
  ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$D/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$D/mon.keyring" --import-keyring "$D/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:$CEPH_IP:3300,v1:$CEPH_IP:6789]" "$D/monmap" >/dev/null
  ceph-mon -c "$C" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" >/dev/null
  spawn ceph-mon ip netns exec "$ns" ceph-mon -c "$C" -f -i a
  wait_for 60 "Ceph mon" ceph_admin ceph mon stat
  ceph_admin ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$D/mgr/ceph-x/keyring" >/dev/null
  spawn ceph-mgr ip netns exec "$ns" ceph-mgr -c "$C" -f -i x
  u=$(cat /proc/sys/kernel/random/uuid)
  id=$(ceph_admin ceph osd new "$u")
  mkdir -p "$D/osd/ceph-$id"
  timeout 180 ceph-osd -c "$C" -i "$id" --mkfs --mkkey --no-mon-config --osd-uuid "$u" >/dev/null 2>&1
  ceph_admin ceph auth add "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$D/osd/ceph-$id/keyring" >/dev/null 2>&1
  spawn ceph-osd ip netns exec "$ns" ceph-osd -c "$C" -f -i "$id"
  wait_for 120 "Ceph OSD up" sh -c "timeout 10 ip netns exec '$ns' ceph -c '$C' osd stat | grep -q '1 up'"
  ceph_admin ceph osd pool create yukumo 16 16 >/dev/null 2>&1
  ceph_admin rbd pool init yukumo
  ceph_admin ceph auth get-or-create client.yukumo mon 'profile rbd' osd 'profile rbd pool=yukumo' \
    mgr 'profile rbd pool=yukumo' -o "$D/keyring" >/dev/null
  wait_for 60 "Ceph pool statistics (mgr)" sh -c \
    "timeout 10 ip netns exec '$ns' ceph -c '$C' df -f json | grep -q '\"name\":\"yukumo\"'"
  echo "$CEPH_IP" > "$D/ip"
  echo "$ns" > "$D/netns"
}

# Guests must let go before the OSD stops (they would hang on I/O): called
# after the hosts are down. OSD, mgr, then mon, by PID.
stop_ceph() {
  [ -d "$DIR/ceph" ] || return 0
  stop_proc ceph-osd
  stop_proc ceph-mgr
  stop_proc ceph-mon
}
