"""The UDP peers of the lab (the end-to-end tests and ``tproxy demo``), run inside the lab's namespaces
(``python -m tproxy.lab_udp app|client``).

- ``app PORT...``: a UDP application on each port, IPv4 and IPv6, bound to the wildcard address *without*
  SO_REUSEADDR (as most UDP services are). The datagram :data:`PROBE` is answered with the source it saw
  (``198.18.0.1 34567``); any other datagram is echoed unchanged. Prints ``UDP APP READY`` once bound.
- ``client``: reads a JSON list of flows on stdin and runs them all at once; each flow is one *connected* UDP socket
  (so only answers from the address it wrote to are accepted), asks for its peer first, then sends its ``sizes``
  (or ``count`` sizes drawn from ``choose``) one at a time: lock-step, one datagram in flight, ``retries`` more tries
  each after ``timeout`` seconds; every echo is checked. Prints one JSON result per flow: ``src``, ``peer`` (what the
  application saw), ``ok``, ``retries``, ``error``.
"""

from __future__ import annotations

import json
import random
import socket
import sys
from typing import Any

import trio

READY = "UDP APP READY"
MAX = 65507
PROBE = b"tproxy-udp-peer?"  # (no test payload has its length)


def raise_rcvbuf(s, size: int) -> None:
    """Past net.core.rmem_max when we may (root in the lab): many flows' large datagrams wait here at once."""
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


async def _app(ports: list[int]) -> None:
    socks = []
    for port in ports:
        for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = trio.socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            raise_rcvbuf(s, 16 << 20)
            await s.bind((host, port))
            socks.append(s)
    print(READY, flush=True)

    async def serve(s) -> None:
        while True:
            data, peer = await s.recvfrom(MAX + 1)
            reply = f"{peer[0]} {peer[1]}".encode() if data == PROBE else data
            try:
                await s.sendto(reply, peer)
            except OSError:
                pass

    async with trio.open_nursery() as n:
        for s in socks:
            n.start_soon(serve, s)


async def _flow(flow: dict[str, Any], i: int) -> dict[str, Any]:
    dst, port = flow["dst"], flow["port"]
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    timeout, retries = flow.get("timeout", 2.0), flow.get("retries", 3)
    res: dict[str, Any] = {"i": i, "src": None, "peer": None, "ok": False, "retries": 0, "error": None}
    s = trio.socket.socket(fam, socket.SOCK_DGRAM)
    try:
        raise_rcvbuf(s, 1 << 20)
        if flow.get("src_port"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", flow["src_port"]))
        await s.connect((dst, port))
        res["src"] = list(s.getsockname()[:2])
        rng = random.Random(flow.get("seed", 0) * 1_000_003 + i)
        sizes = flow["sizes"] if "sizes" in flow else [rng.choice(flow["choose"]) for _ in range(flow.get("count", 1))]
        for n, size in enumerate([None, *sizes]):
            data = PROBE if size is None else rng.randbytes(size)
            for _attempt in range(retries + 1):
                await s.send(data)
                with trio.move_on_after(timeout):
                    got = await s.recv(MAX + 1)
                    break
                res["retries"] += 1
            else:
                res["error"] = f"no answer to datagram {n} ({'?' if size is None else size} bytes)"
                return res
            if size is None:
                ip, p = got.decode().split()
                res["peer"] = [ip, int(p)]
            elif got != data:
                res["error"] = f"datagram {n} ({size} bytes) came back as {len(got)} different bytes"
                return res
        res["ok"] = True
    except OSError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    return res


async def _client(flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{}] * len(flows)

    async def one(i: int) -> None:
        out[i] = await _flow(flows[i], i)

    async with trio.open_nursery() as n:
        for i in range(len(flows)):
            n.start_soon(one, i)
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "app":
        trio.run(_app, [int(p) for p in argv[1:]])
        return 0
    for r in trio.run(_client, json.load(sys.stdin)):
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
