#!/usr/bin/env python3
"""The API server's way into the local environment's kubelet nodes
(`kubectl logs`, `exec`, `port-forward`, the pod proxy Prometheus scrapes
through): HTTP CONNECT over unix sockets, in two halves.

  egress-proxy.py route LISTEN NODES_DIR
      On this machine, named by the API server's EgressSelectorConfiguration
      ("cluster" egress). `CONNECT IP:PORT` for a node's address
      (10.255.0.I) or one of its pods' (10.244.I.x) is passed on to node I's
      half, NODES_DIR/node-I.sock; anything else is refused (403).
  egress-proxy.py node LISTEN
      In node I's network namespace: connects to IP:PORT there (only the
      node's own addresses and pods: 10.255.0.0/24, 10.244.0.0/16) and
      splices.
  egress-proxy.py users PORT NODES_DIR API_PORT CONSOLE_PORT
      On this machine, for users' clients (the kubeconfigs `e2e/env.sh user`
      writes name it as their `proxy-url`), listening on 127.0.0.1:PORT:
      `CONNECT 127.0.0.1:API_PORT` (the API server) is connected here, and
      `CONNECT 10.255.0.I:CONSOLE_PORT` (node I's agent console endpoint,
      `kubectl yukumo console`) goes on to node I's half; nothing else.

The hosts' namespaces are never routed to from this machine's: each
connection crosses a unix socket.
"""
import asyncio
import ipaddress
import os
import re
import sys

MODE, LISTEN = sys.argv[1], sys.argv[2]
NODES = sys.argv[3] if MODE in ("route", "users") else None
API_PORT, CONSOLE_PORT = (int(sys.argv[4]), int(sys.argv[5])) if MODE == "users" else (None, None)
TARGET = re.compile(rb"^CONNECT (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) HTTP/1\.[01]\r?$")
UNDERLAY = ipaddress.ip_network("10.255.0.0/24")
PODS = ipaddress.ip_network("10.244.0.0/16")


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def refuse(writer, status):
    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


def node_of(ip):
    """The node index an address belongs to (None: not the environment's)."""
    if ip in UNDERLAY:
        return int(str(ip).split(".")[3])
    if ip in PODS:
        return int(str(ip).split(".")[2])
    return None


async def handle(reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    m = TARGET.match(head.split(b"\n", 1)[0])
    ip = ipaddress.ip_address(m.group(1).decode()) if m else None
    port = int(m.group(2)) if m else None
    node = node_of(ip) if ip else None
    if MODE == "users" and ip is not None:
        if ip == ipaddress.ip_address("127.0.0.1") and port == API_PORT:
            node = "here"
        elif ip not in UNDERLAY or port != CONSOLE_PORT:
            node = None
    if node is None:
        return await refuse(writer, b"403 Forbidden")
    try:
        if node != "here" and MODE in ("route", "users"):
            sock = os.path.join(NODES, "node-%d.sock" % node)
            r2, w2 = await asyncio.open_unix_connection(sock)
            w2.write(head)  # the node's half answers the CONNECT
        else:
            r2, w2 = await asyncio.wait_for(asyncio.open_connection(str(ip), port), 10)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    except (OSError, asyncio.TimeoutError):
        return await refuse(writer, b"502 Bad Gateway")
    await asyncio.gather(pipe(reader, w2), pipe(r2, writer))


async def main():
    if MODE == "users":
        server = await asyncio.start_server(handle, "127.0.0.1", int(LISTEN))
        async with server:
            await server.serve_forever()
    if os.path.exists(LISTEN):
        os.unlink(LISTEN)
    server = await asyncio.start_unix_server(handle, LISTEN)
    os.chmod(LISTEN, 0o600)
    async with server:
        await server.serve_forever()


asyncio.run(main())
