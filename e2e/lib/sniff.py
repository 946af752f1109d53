#!/usr/bin/env python3
"""Record the frames crossing one interface for a bounded time.

    sniff.py IFNAME SECONDS

Prints one JSON object per frame: dir ("rx": received by this namespace
from the interface, for a guest's tap what the guest sent; "tx": sent out
of it, towards the guest), src/dst MAC, vlan (the 802.1Q id, also when the
kernel moved the tag into packet metadata), type (the ethertype after any
tag), vlans (every 802.1Q/802.1ad id of the frame, outermost first), and
for IPv4 src_ip/dst_ip/proto/sport/dport (udp_head, the first 4 bytes of
a UDP payload in hex, and inner_src, the source MAC inside a VXLAN packet
to port 4789, 4790 or 4791), for IPv6 src_ip6/dst_ip6/
next_header (and icmp6_type), for ARP op/spa/tpa.
Used by the e2e tests to prove what does and does not reach a guest; it
stops by itself after SECONDS.
"""
import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4


def mac(b):
    return ":".join(f"{x:02x}" for x in b)


def decode(data, aux, pkttype):
    if len(data) < 14:
        return None
    f = {"dir": "tx" if pkttype == PACKET_OUTGOING else "rx",
         "dst": mac(data[0:6]), "src": mac(data[6:12]), "vlan": None, "vlans": []}
    (etype,) = struct.unpack("!H", data[12:14])
    off = 14
    if aux is not None:
        status, _, _, _, _, tci, _ = struct.unpack("IIIHHHH", aux[:20])
        if status & TP_STATUS_VLAN_VALID:
            f["vlan"] = tci & 0x0FFF
            f["vlans"].append(tci & 0x0FFF)
    while etype in (0x8100, 0x88A8) and len(data) >= off + 4:
        (tci, etype) = struct.unpack("!HH", data[off:off + 4])
        f["vlan"] = tci & 0x0FFF
        f["vlans"].append(tci & 0x0FFF)
        off += 4
    f["type"] = etype
    p = data[off:]
    if etype == 0x0800 and len(p) >= 20:
        ihl = (p[0] & 0x0F) * 4
        f["proto"] = p[9]
        f["src_ip"] = socket.inet_ntoa(p[12:16])
        f["dst_ip"] = socket.inet_ntoa(p[16:20])
        if p[9] == 1 and len(p) > ihl:
            f["icmp_type"] = p[ihl]
        if p[9] in (6, 17) and len(p) >= ihl + 4:
            f["sport"], f["dport"] = struct.unpack("!HH", p[ihl:ihl + 4])
        # UDP: the first 4 bytes of its payload, in hex (a VXLAN header
        # starts 08, a WireGuard message 01-04 then three zero bytes).
        if p[9] == 17 and len(p) >= ihl + 12:
            f["udp_head"] = p[ihl + 8:ihl + 12].hex()
        # VXLAN (yukumo's ports, its I flag set): the source MAC of the
        # frame inside.
        if (p[9] == 17 and f.get("dport") in (4789, 4790, 4791)
                and len(p) >= ihl + 8 + 8 + 14 and p[ihl + 8] & 0x08):
            inner = ihl + 8 + 8
            f["inner_src"] = mac(p[inner + 6:inner + 12])
    elif etype == 0x86DD and len(p) >= 40:
        f["next_header"] = p[6]
        f["src_ip6"] = socket.inet_ntop(socket.AF_INET6, p[8:24])
        f["dst_ip6"] = socket.inet_ntop(socket.AF_INET6, p[24:40])
        if p[6] == 58 and len(p) >= 41:
            f["icmp6_type"] = p[40]
    elif etype == 0x0806 and len(p) >= 28:
        (f["op"],) = struct.unpack("!H", p[6:8])
        f["spa"] = socket.inet_ntoa(p[14:18])
        f["tpa"] = socket.inet_ntoa(p[24:28])
    return f


def main():
    ifname, seconds = sys.argv[1], float(sys.argv[2])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    # Room for bursts (a test's storm of hundreds of frames at once).
    s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
    s.bind((ifname, 0))
    print(json.dumps({"ready": ifname}), flush=True)
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            continue
        data, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(32))
        aux = None
        for level, kind, payload in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                aux = payload
        f = decode(data, aux, addr[2])
        if f is not None:
            print(json.dumps(f), flush=True)


if __name__ == "__main__":
    main()
