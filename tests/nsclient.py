"""Sockets inside the lab's namespaces from the test process itself, and what a running proxy says about itself.

The fault tests and the soak drive clients in-process (to hold a connection, stop mid-transfer, see how it ended),
which the lab's batch client cannot. A socket belongs to the network namespace of the thread that created it, and
``setns`` moves one thread only: :func:`socket_in` creates the socket on a worker thread that entered the namespace
once; the socket is then used from any thread, or from trio (``trio.socket.from_stdlib_socket``).

Also: the admin endpoint read from the node namespace (:func:`admin_get`, :func:`metrics`) and a process's open
file descriptors by kind (:func:`fd_kinds`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import socket
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tproxy import lab as L
from tproxy.netns import Netns

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_workers: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _enter(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _worker(ns: Netns) -> concurrent.futures.ThreadPoolExecutor:
    w = _workers.get(ns.name)
    if w is None:
        w = concurrent.futures.ThreadPoolExecutor(1, f"netns-{ns.name}", initializer=_enter, initargs=(ns.name,))
        _workers[ns.name] = w
    return w


def socket_in(ns: Netns, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket in ``ns`` (the namespace must exist for as long as the socket is used)."""
    return _worker(ns).submit(socket.socket, family, kind).result()


def forget(ns: Netns) -> None:
    """End the worker thread of ``ns`` (call before or after deleting the namespace)."""
    w = _workers.pop(ns.name, None)
    if w is not None:
        w.shutdown(wait=True)


def connect(ns: Netns, addr: tuple[str, int], timeout: float = 10) -> socket.socket:
    """A blocking TCP connection from ``ns`` to ``addr``."""
    s = socket_in(ns, socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def admin_get(ns: Netns, path: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of ``GET path`` on the lab proxy's admin endpoint, from the node namespace."""
    with connect(ns, L.ADMIN, timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n".encode())
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def metrics(ns: Netns) -> dict[str, float]:
    """The admin endpoint's /metrics as ``name{label="v",...}`` -> value (labels sorted), as tests/test_admin.py."""
    status, body = admin_get(ns, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body[:200]}")
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def closed_total(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("tproxy_connections_closed_total{"))


def fd_kinds(pid: int) -> Counter:
    """Open file descriptors of ``pid`` by kind: ``socket``, ``pipe``, ``anon`` (epoll & co.), ``file``."""
    out: Counter = Counter()
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        out["anon" if kind == "anon_inode" else kind] += 1
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
