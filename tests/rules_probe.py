"""A minimal transparent proxy and application, to prove the installed rules divert and route what they should.

Not the product: one connection at a time, blocking sockets, for tests/test_rules_netns.py only. Run inside the
server namespace: ``python -m tests.rules_probe MODE UPSTREAM MARK PROXY_PORT APP_PORT``. The application answers
each connection with the peer address it saw; the proxy prefixes ``via-proxy`` so a test can tell that a connection
really went through it (in tproxy mode a dead proxy fails open, so "the app answered" proves nothing).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST on SOL_IPV6
TIMEOUT = 10.0


def listen(family: int, port: int, transparent: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        if family == socket.AF_INET:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    s.listen(16)
    return s


def original_dst(conn: socket.socket, mode: str) -> tuple[str, int]:
    if mode == "tproxy":
        return conn.getsockname()[:2]
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw)
        return socket.inet_ntop(socket.AF_INET, addr), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, addr = struct.unpack("!2xH4x16s4x", raw)
    return socket.inet_ntop(socket.AF_INET6, addr), port


def app(sock: socket.socket) -> None:
    while True:
        conn, peer = sock.accept()
        with conn:
            conn.sendall(f"{peer[0]} {peer[1]}\n".encode())


def proxy(sock: socket.socket, mode: str, upstream: str, mark: int, spoof: bool) -> None:
    while True:
        conn, peer = sock.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                host, port = original_dst(conn, mode)
                if upstream == "loopback":
                    host = "127.0.0.1" if conn.family == socket.AF_INET else "::1"
                up = socket.socket(conn.family, socket.SOCK_STREAM)
                up.settimeout(TIMEOUT)
                with up:
                    if spoof:
                        level, opt = (
                            (socket.SOL_IP, IP_TRANSPARENT)
                            if conn.family == socket.AF_INET
                            else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
                        )
                        up.setsockopt(level, opt, 1)
                        up.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                        up.bind((peer[0], 0))
                    up.connect((host, port))
                    answer = up.recv(200).decode().strip()
                conn.sendall(f"via-proxy {answer}\n".encode())
            except OSError as e:
                with contextlib.suppress(OSError):
                    conn.sendall(f"proxy-error {e}\n".encode())


def main() -> None:
    mode, upstream, mark, proxy_port, app_port, spoof = sys.argv[1:7]
    for fam in (socket.AF_INET, socket.AF_INET6):
        threading.Thread(target=app, args=(listen(fam, int(app_port), False),), daemon=True).start()
        p = listen(fam, int(proxy_port), transparent=True)
        args = (p, mode, upstream, int(mark), spoof == "1")
        threading.Thread(target=proxy, args=args, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin


if __name__ == "__main__":
    main()
