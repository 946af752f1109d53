#!/usr/bin/env python3
"""The API server's way to the local environment's kubelets (`kubectl logs`,
`exec`, `port-forward`): an HTTP CONNECT proxy on a unix socket, named by
the API server's EgressSelectorConfiguration ("cluster" egress).

The kubelets live in the simulated hosts' network namespaces, which nothing
routes to from this machine's root namespace. Each node publishes its
kubelet port as a unix socket DIR/IP_PORT.sock (socat inside the node's
namespace); `CONNECT IP:PORT` is spliced onto that socket. Anything else
is refused with 403: the proxy reaches only the environment's nodes.

Usage: egress-proxy.py LISTEN_SOCKET NODE_SOCKET_DIR
"""
import asyncio
import os
import re
import sys

LISTEN, NODES = sys.argv[1], sys.argv[2]
TARGET = re.compile(rb"^CONNECT (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) HTTP/1\.[01]\r?$")


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


async def handle(reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    m = TARGET.match(head.split(b"\n", 1)[0])
    sock = os.path.join(NODES, "%s_%s.sock" % (m.group(1).decode(), m.group(2).decode())) if m else None
    if sock is None or not os.path.exists(sock):
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        return
    try:
        r2, w2 = await asyncio.open_unix_connection(sock)
    except OSError:
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await asyncio.gather(pipe(reader, w2), pipe(r2, writer))


async def main():
    if os.path.exists(LISTEN):
        os.unlink(LISTEN)
    server = await asyncio.start_unix_server(handle, LISTEN)
    async with server:
        await server.serve_forever()


asyncio.run(main())
