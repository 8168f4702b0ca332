"""The admin endpoint: ``/live``, ``/ready``, ``/metrics`` and ``/config``, HTTP/1.1 on trio through h11.

h11 (the HTTP/1.1 state machine trio projects pair with) parses requests and frames responses; this module decides
what to answer. One request per connection (``Connection: close``), GET and HEAD only.

What the proxy can rely on: a slow or malicious admin client never stalls it. Each connection has one deadline for
the whole exchange (:data:`REQUEST_TIMEOUT`), the request head is bounded (:data:`MAX_REQUEST_BYTES`, else 431:
never more than that is read before a request is complete), and at most :data:`MAX_CLIENTS` admin connections are
served at once (more are closed at once). Handlers run in their own tasks; the only blocking part of a scrape
(``/proc``) runs in a worker thread (see :mod:`tproxy.metrics`).

The endpoint is unauthenticated, so it listens on loopback by default; bound to any other address it logs a warning
naming what it exposes (:data:`EXPOSURE`).

Error handling: a client's error (reset, timeout, garbage) ends that client's connection only. A failure to bind
the admin address raises ``OSError`` from :func:`serve_admin` before ``started`` is called, so the runner sees it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
import trio

from tproxy import log, metrics
from tproxy.config import Config
from tproxy.stats import State, Stats

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0
LINGER_TIMEOUT = 1.0
MAX_CLIENTS = 32

EXPOSURE = (
    "the admin endpoint has no authentication: anyone who can reach it reads /metrics (traffic volumes, "
    "connection counts, errors) and /config (the whole configuration: intercepted ports, excluded networks, "
    "the user the proxy runs as)"
)

_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_PATHS = "(try /live, /ready, /metrics, /config)"


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_admin(
    config: Config,
    stats: Stats,
    state: State,
    *,
    current_config: Callable[[], Config] | None = None,
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``config.admin.host:port`` until cancelled.

    ``current_config`` returns the configuration in force for ``/config`` (it changes on reload); by default
    ``config``. Calls ``task_status.started((host, port))`` with the bound address (so port 0 works in tests), or
    ``started(None)`` and returns at once when the endpoint is disabled (``admin.address = ""``).
    """
    if not config.admin.enabled:
        task_status.started(None)
        return
    listeners = await trio.open_tcp_listeners(config.admin.port, host=config.admin.host)
    host, port = listeners[0].socket.getsockname()[:2]
    if not ipaddress.ip_address(host).is_loopback:
        log.event("admin_not_loopback", logging.WARNING, address=log.addr((host, port)), exposure=EXPOSURE)
    app = _Admin(stats, state, current_config or (lambda: config))
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, app.handle, listeners)
        task_status.started((host, port))


class _Admin:
    def __init__(self, stats: Stats, state: State, config: Callable[[], Config]) -> None:
        self.stats = stats
        self.state = state
        self.config = config
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            request = await read_request(conn, stream)
            if request is None:
                return  # the client closed without sending a request
            method, path = check_request(request)
        except _Reject as e:
            await respond(conn, stream, e.status, e.message + "\n", head_only=False)
            return
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await respond(conn, stream, 405, "method not allowed\n", head_only=False, extra={"Allow": "GET, HEAD"})
        elif path == "/live":
            await respond(conn, stream, 200, "live\n", head_only=head_only)
        elif path == "/ready":
            if self.state.ready:
                unverified = " (rules not verified: --no-rules)" if self.state.rules_intact is None else ""
                await respond(conn, stream, 200, f"ready{unverified}\n", head_only=head_only)
            else:
                await respond(conn, stream, 503, f"not ready: {self.not_ready_reason()}\n", head_only=head_only)
        elif path == "/metrics":
            accept = ", ".join(v.decode("latin-1") for k, v in request.headers if k == b"accept")
            body, content_type = await metrics.scrape(self.stats, self.state, accept)
            await respond(conn, stream, 200, body, head_only=head_only, content_type=content_type)
        elif path == "/config":
            body = json.dumps(config_document(self.config()), indent=2) + "\n"
            await respond(conn, stream, 200, body, head_only=head_only, content_type=_JSON)
        else:
            await respond(conn, stream, 404, f"not found {_PATHS}\n", head_only=head_only)

    def not_ready_reason(self) -> str:
        if self.state.draining:
            return "draining"
        st = self.state
        if st.rules_intact is False:
            return st.rules_note or "rules missing"
        missing = [name for name, ok in (("rules", st.rules_installed), ("listeners", st.listening)) if not ok]
        return "starting (waiting for " + " and ".join(missing) + ")" if missing else "starting"


def config_document(config: Config) -> dict:
    """``/config``: every key as the file spells it, with its effective value (the one in force) and where that value
    came from; a key whose new value a reload left for a restart also has ``restart_pending``: the file's value and
    source."""
    settings: dict[str, dict] = {}
    for key, value in config.settings().items():
        settings[key] = {"value": value, "source": config.source_of(key)}
        if key in config.restart_pending:
            settings[key]["restart_pending"] = dict(config.restart_pending[key])
    return {"file": config.file, "settings": settings}


async def read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The request head, parsed by h11; ``None`` if the client closed before sending anything.

    Never reads more than MAX_REQUEST_BYTES (plus one byte, to know it was exceeded) before the head is complete:
    _Reject(431) past it, _Reject(400 or h11's status hint) on anything h11 refuses, EOF inside the head included.
    """
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise _Reject(431, "request head too large") from None
            raise _Reject(e.error_status_hint, f"bad request: {e}") from None
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        if received > MAX_REQUEST_BYTES:
            raise _Reject(431, "request head too large")
        chunk = await stream.receive_some(MAX_REQUEST_BYTES + 1 - received)
        received += len(chunk)
        conn.receive_data(chunk)


def check_request(request: h11.Request) -> tuple[str, str]:
    """(method, path) from what h11 accepted; refuses what h11 lets through but we do not serve."""
    if request.http_version not in (b"1.0", b"1.1"):
        raise _Reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    target = request.target.decode("ascii", "replace")
    if target.startswith("/"):
        path = target
    elif target.lower().startswith(("http://", "https://")):
        path = urlsplit(target).path or "/"
    else:
        raise _Reject(400, "malformed request target")
    return request.method.decode("ascii", "replace"), path.split("?", 1)[0]


async def respond(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: str | bytes,
    *,
    head_only: bool,
    content_type: str = _TEXT,
    extra: dict[str, str] | None = None,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(data)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **(extra or {}),
    }
    out = conn.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=list(headers.items())))
    if not head_only and data:
        out += conn.send(h11.Data(data=data))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    await linger(stream)


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
