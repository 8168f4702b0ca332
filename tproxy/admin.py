"""The admin endpoint: ``/live``, ``/ready`` and ``/metrics`` over a minimal HTTP/1.1 server on trio.

One request per connection (``Connection: close``), GET and HEAD only. The server is deliberately small: no
library of ours speaks HTTP on trio, and an operator's probe or a Prometheus scrape needs nothing more.

What the proxy can rely on: a slow or malicious admin client never stalls it. Each connection has one deadline for
the whole exchange (:data:`REQUEST_TIMEOUT`), the request head is bounded (:data:`MAX_REQUEST_BYTES`, else 431),
and at most :data:`MAX_CLIENTS` admin connections are served at once (more are closed at once). Handlers run in
their own tasks, so nothing they do blocks the proxy's accept loops or relays.

Error handling: a client's error (reset, timeout, garbage) ends that client's connection only. A failure to bind
the admin address raises ``OSError`` from :func:`serve_admin` before ``started`` is called, so the runner sees it.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import trio

from tproxy import log, metrics
from tproxy.config import Config
from tproxy.stats import State, Stats

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0
LINGER_TIMEOUT = 1.0
MAX_CLIENTS = 32

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_admin(
    config: Config,
    stats: Stats,
    state: State,
    *,
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``config.admin.host:port`` until cancelled.

    Calls ``task_status.started((host, port))`` with the bound address (so port 0 works in tests), or
    ``started(None)`` and returns at once when the endpoint is disabled (``admin.address = ""``).
    """
    if not config.admin.enabled:
        task_status.started(None)
        return
    listeners = await trio.open_tcp_listeners(config.admin.port, host=config.admin.host)
    host, port = listeners[0].socket.getsockname()[:2]
    app = _Admin(stats, state)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, app.handle, listeners)
        task_status.started((host, port))


class _Admin:
    def __init__(self, stats: Stats, state: State) -> None:
        self.stats = stats
        self.state = state
        self.slots = trio.Semaphore(MAX_CLIENTS)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            return  # serve_listeners closes the stream
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await self.exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as e:  # never let one admin request take the proxy down
            log.event("admin_error", logging.ERROR, exc_info=e)
        finally:
            self.slots.release()

    async def exchange(self, stream: trio.SocketStream) -> None:
        try:
            head = await read_head(stream)
            method, path = parse_request(head)
        except _BadRequest as e:
            await self.respond(stream, e.status, e.message + "\n", head_only=False)
            return
        if head is None:
            return  # the client closed without sending a request
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await self.respond(stream, 405, "method not allowed\n", head_only=False, extra={"Allow": "GET, HEAD"})
        elif path == "/live":
            await self.respond(stream, 200, "live\n", head_only=head_only)
        elif path == "/ready":
            if self.state.ready:
                unverified = " (rules not verified: --no-rules)" if self.state.rules_intact is None else ""
                await self.respond(stream, 200, f"ready{unverified}\n", head_only=head_only)
            else:
                await self.respond(stream, 503, f"not ready: {self.not_ready_reason()}\n", head_only=head_only)
        elif path == "/metrics":
            body = metrics.render(self.stats, self.state) + metrics.render_process()
            await self.respond(stream, 200, body, head_only=head_only, content_type=metrics.CONTENT_TYPE)
        else:
            await self.respond(stream, 404, "not found (try /live, /ready, /metrics)\n", head_only=head_only)

    def not_ready_reason(self) -> str:
        if self.state.draining:
            return "draining"
        st = self.state
        if st.rules_intact is False:
            return st.rules_note or "rules missing"
        missing = [name for name, ok in (("rules", st.rules_installed), ("listeners", st.listening)) if not ok]
        return "starting (waiting for " + " and ".join(missing) + ")" if missing else "starting"

    async def respond(
        self,
        stream: trio.SocketStream,
        status: int,
        body: str,
        *,
        head_only: bool,
        content_type: str = _TEXT,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = body.encode()
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(data)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **(extra or {}),
        }
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"] + [f"{k}: {v}" for k, v in headers.items()]
        out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else data)
        await stream.send_all(out)
        await linger(stream)


async def read_head(stream: trio.SocketStream) -> bytes | None:
    """Read up to the blank line ending the request head; ``None`` if the client closed before sending anything.

    Raises _BadRequest(431) past MAX_REQUEST_BYTES, _BadRequest(400) on EOF inside the head.
    """
    buf = bytearray()
    while True:
        end = _head_end(buf)
        if end is not None:
            return bytes(buf[:end])
        if len(buf) > MAX_REQUEST_BYTES:
            raise _BadRequest(431, "request head too large")
        chunk = await stream.receive_some(MAX_REQUEST_BYTES + 1 - len(buf))
        if not chunk:
            if not buf:
                return None
            raise _BadRequest(400, "incomplete request")
        buf += chunk


def _head_end(buf: bytearray) -> int | None:
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    hits = [x for x in (i, j) if x >= 0]
    return min(hits) if hits else None


def parse_request(head: bytes | None) -> tuple[str, str]:
    """(method, path) from a request head; raises _BadRequest for anything malformed (RFC 9112 section 3)."""
    if head is None:
        return "", ""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and lines[0] == "":
        lines.pop(0)  # RFC 9112 2.2: ignore at least one empty line before the request line
    if not lines:
        raise _BadRequest(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        if version.startswith("HTTP/"):
            raise _BadRequest(505, "only HTTP/1.x is supported")
        raise _BadRequest(400, "malformed request line")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, "malformed method")
    hosts = 0
    for line in lines[1:]:
        name, sep, _ = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        hosts += name.lower() == "host"
    if version == "HTTP/1.1" and hosts != 1:
        raise _BadRequest(400, "HTTP/1.1 requires exactly one Host header")
    if target.startswith("/"):
        path = target
    elif target.lower().startswith(("http://", "https://")):
        path = urlsplit(target).path or "/"
    else:
        raise _BadRequest(400, "malformed request target")
    return method, path.split("?", 1)[0]


async def linger(stream: trio.SocketStream) -> None:
    """Half-close, then discard what the client still sends for a moment.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the response before the
    client reads it (e.g. a POST body we never read); a short, bounded drain avoids that.
    """
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    drained = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        while drained < 16 * MAX_REQUEST_BYTES:
            chunk = await stream.receive_some(MAX_REQUEST_BYTES)
            if not chunk:
                return
            drained += len(chunk)
