"""Hold N idle keep-alive connections open (run inside the client namespace by the benchmark; standalone script).

Phase 1: open N connections to HOST:PORT (at most WINDOW connecting at once), one ``GET /idle`` each, read the answer
(so both legs of a proxy are established end to end), print one JSON line, then wait for a line on stdin.
Phase 2: one more request on every connection held; print one JSON line with how many answered (the rest were lost).
Everything is bounded in time; the process exits after phase 2 or when stdin closes.
"""

from __future__ import annotations

import collections
import errno
import json
import resource
import selectors
import socket
import sys
import time

REQ = b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n"


def _fail(counter: collections.Counter, sel: selectors.BaseSelector, sock: socket.socket, why: str) -> None:
    counter[why] += 1
    try:
        sel.unregister(sock)
    except (KeyError, ValueError):
        pass
    sock.close()


def open_all(host: str, port: int, n: int, window: int, timeout: float) -> tuple[list[socket.socket], dict]:
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    failed: collections.Counter = collections.Counter()
    bufs: dict[int, bytes] = {}
    started = pending = 0
    deadline = time.monotonic() + timeout
    while (started < n or pending) and time.monotonic() < deadline:
        while started < n and pending < window:
            started += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                failed[errno.errorcode.get(err, str(err))] += 1
                s.close()
                continue
            sel.register(s, selectors.EVENT_WRITE, "connect")
            pending += 1
        for key, _ in sel.select(0.2):
            s = key.fileobj
            if key.data == "connect":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    _fail(failed, sel, s, errno.errorcode.get(err, str(err)))
                    pending -= 1
                    continue
                s.send(REQ)
                bufs[s.fileno()] = b""
                sel.modify(s, selectors.EVENT_READ, "read")
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError as e:
                bufs.pop(s.fileno(), None)
                _fail(failed, sel, s, errno.errorcode.get(e.errno, str(e.errno)))
                pending -= 1
                continue
            if not data:
                bufs.pop(s.fileno(), None)
                _fail(failed, sel, s, "eof")
                pending -= 1
                continue
            buf = bufs[s.fileno()] + data
            bufs[s.fileno()] = buf
            if b"\r\n\r\n" in buf:
                del bufs[s.fileno()]
                sel.unregister(s)
                held.append(s)
                pending -= 1
    for key in list(sel.get_map().values()):
        _fail(failed, sel, key.fileobj, "timeout")
    failed["not started"] += n - started
    return held, {k: v for k, v in failed.items() if v}


def ask_all(held: list[socket.socket], timeout: float) -> tuple[int, dict]:
    sel = selectors.DefaultSelector()
    lost: collections.Counter = collections.Counter()
    bufs: dict[int, bytes] = {}
    for s in held:
        try:
            s.send(REQ)
        except OSError as e:
            lost[errno.errorcode.get(e.errno, str(e.errno))] += 1
            continue
        bufs[s.fileno()] = b""
        sel.register(s, selectors.EVENT_READ)
    answered = 0
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError as e:
                _fail(lost, sel, s, errno.errorcode.get(e.errno, str(e.errno)))
                continue
            if not data:
                _fail(lost, sel, s, "eof")
                continue
            bufs[s.fileno()] += data
            if b"\r\n\r\n" in bufs[s.fileno()]:
                sel.unregister(s)
                answered += 1
    lost["timeout"] += len(sel.get_map())
    return answered, {k: v for k, v in lost.items() if v}


def main() -> None:
    host, port, n, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.monotonic()
    held, failed = open_all(host, port, n, window, timeout=20)
    print(json.dumps({"phase": 1, "held": len(held), "failed": failed, "seconds": time.monotonic() - t0}), flush=True)
    if not sys.stdin.readline():
        return
    answered, lost = ask_all(held, timeout=30)
    print(json.dumps({"phase": 2, "answered": answered, "lost": lost}), flush=True)
    for s in held:
        s.close()


if __name__ == "__main__":
    main()
