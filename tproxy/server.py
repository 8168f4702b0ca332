"""The proxy service: accept loops, upstream connect, relay, limits and graceful drain.

One trio nursery owns everything (hypercorn's two-nursery shape): the *connection* nursery holds one task per
connection (:meth:`Server._connection`, which owns it from accept to its log line) and, with the shared relay
engine, the engine's task; inside it the *accept* nursery holds an accept loop per listening socket and the idle
check. :meth:`Server.shutdown` cancels the accept nursery (no new connection is accepted; the listeners are closed),
then the connection nursery gets ``shutdown_grace`` seconds before it is cancelled; :meth:`Server.skip_grace` cancels
it at once. Cancelling a connection's task is cancelling the connection: it ends with outcome ``cancelled`` and a
reset. Closing the listeners at once means that, while the proxy drains, new connections are refused in nat mode and
go straight to the application in tproxy mode (TPROXY finds no listener: fail-open, DESIGN.md), rather than waiting
in a backlog nobody accepts from.

Upstream source (``preserve_source``): the client's IP, with a port chosen by :class:`tproxy.sockets.PortChooser` so the
two legs never share a 5-tuple (``upstream = "original"``), or the client's own port (``"loopback"``). A port that
cannot be had falls back to the kernel's choice (``stats.source_port_fallbacks``), an address that cannot be bound to an
ordinary source (``stats.source_fallbacks``); both are logged, neither fails the connection.

PROXY protocol (:mod:`tproxy.proxy_protocol`): from a peer in ``listener.proxy_protocol_from`` the task reads the
header before connecting upstream (exactly the header: the payload stays in the socket), and the client it names
takes the TCP peer's place as the upstream source, in the log line (the peer is logged as ``peer``) and in the header
out; a header of the other family than the connection's cannot be the source: an ordinary one, counted as a source
fallback. A bad, incomplete or late header resets the connection (``stats.proxy_protocol_errors[reason]``, the
connection's log line says why) and nothing is connected. With ``proxy.send_proxy_protocol`` the header out is one
``send`` on the connected upstream socket, before the relay moves any byte of the client's.

Error handling: a connection's error never reaches the server (it is counted and logged, the connection closed with a
reset). Accept errors that mean "out of file descriptors or memory" pause that accept loop briefly and keep serving;
errors that concern one pending connection are skipped; anything else is raised. ``Cancelled`` is never swallowed.

Resource handling: a connection's task closes both sockets, releases the ports and logs the line in ``finally``,
however the connection ends; the bytes are moved by the engine ``proxy.relay`` names (:mod:`tproxy.relay`). One idle
check covers every connection. The listening sockets are the caller's; the server closes them when it stops
accepting. Connection log lines are written once per turn of the event loop (:func:`tproxy.log.hold_until_idle`).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence

import trio

from tproxy import log, sockets
from tproxy.config import Config
from tproxy.proxy_protocol import ProxyProtocolError, build, read_header, same_family
from tproxy.relay import LOST, PIPES, Engine, Flow, PipePool, make_engine, reap_idle
from tproxy.stats import State, Stats
from tproxy.udp import UdpRelay

# Accept errnos that mean the process or the system is out of a resource: back off and keep serving (trio's list).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Accept errnos that concern one pending connection only (it died in the backlog): skip it.
ACCEPT_IGNORABLE_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPERM,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
ACCEPT_BACKOFF = 0.1  # seconds an accept loop pauses after EMFILE & co.
ACCEPT_BATCH = 32  # accepts in a row before yielding to the other tasks
PORT_ATTEMPTS = 4  # chosen upstream ports tried before falling back to the kernel's choice

OriginalDst = Callable[[socket.socket], tuple[str, int]]

_current_time = trio.current_time
_log_enabled = log.logger.isEnabledFor
_INFO = logging.INFO
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
_TASK_NAME = "tproxy.connection"  # (a name given saves trio from computing one per task)
# cut short (by an error, or by the end of the shutdown grace): the peers see a reset, never a clean end of stream
_RESET_OUTCOMES = frozenset({"reset", "refused", "timeout", "cancelled"})


class Server:
    """The proxy on a set of listening sockets. Run :meth:`serve` with ``nursery.start``; it returns after shutdown.

    ``original_dst``: how to find a connection's original destination; by default ``getsockname()`` in tproxy mode
    and ``SO_ORIGINAL_DST`` in nat mode (tests inject one that points at a loopback server). ``use_splice=False``
    forces the copy relay.
    """

    def __init__(
        self,
        config: Config,
        listeners: Sequence[socket.socket],
        stats: Stats,
        state: State,
        *,
        original_dst: OriginalDst | None = None,
        use_splice: bool = True,
        pipes: PipePool = PIPES,
        udp_listeners: Sequence[socket.socket] = (),
    ) -> None:
        self.config = config
        self.listeners = list(listeners)
        self.stats = stats
        self.state = state
        if original_dst is None:
            original_dst = sockets.original_dst_tproxy if config.mode == "tproxy" else sockets.original_dst_nat
        self.original_dst = original_dst
        self.use_splice = use_splice
        self.pipes = pipes
        self.preserve = config.preserve_source
        self.loopback = config.proxy.upstream == "loopback"
        self.mark = config.routing.upstream_mark  # no ip rule routes it (README, "Marks")
        self.connect_timeout = config.proxy.connect_timeout
        self.idle_timeout = config.proxy.idle_timeout
        self.max_connections = config.proxy.max_connections
        self.grace = config.proxy.shutdown_grace
        ports = config.proxy.upstream_ports
        self.chooser = sockets.PortChooser(ports.lo, ports.hi) if self.preserve and not self.loopback else None
        self.addresses = [sockets.sockname(s) for s in self.listeners]
        self._listen_ports = {a[1] for a in self.addresses}
        self._listen_exact = {a for a in self.addresses if not _unspecified(a[0])}
        self._listen_wild_ports = {a[1] for a in self.addresses if _unspecified(a[0])}
        self._lot = trio.lowlevel.ParkingLot()
        self._parked = 0  # accept loops parked in _lot (at max_connections)
        self._now = _current_time  # the run's clock, bound in serve() (one call less per use)
        self._accepts: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None
        self._stopping = False
        self._skip_grace = False
        self._last_capacity_log = -1e9
        self.stopped = trio.Event()  # set when serve() has returned: every connection has ended
        self._flows: set[Flow] = set()  # connections relaying: the idle check looks at them
        self._listening: dict[socket.socket, tuple[trio.CancelScope, trio.Event]] = {}  # reload: accept loops
        self._reaper: trio.CancelScope | None = None  # reload: the idle check, restarted when idle_timeout changes
        self.engine: Engine | None = None  # moves the bytes of every connection (proxy.relay)
        self.udp: UdpRelay | None = None  # the UDP sessions (tproxy mode): tproxy/udp.py
        if config.mode == "tproxy":
            self.udp = UdpRelay(config, udp_listeners, stats, mark=self.mark, is_loop=self._is_loop)

    # -- lifecycle

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and proxy until :meth:`shutdown`, drain, return. ``task_status.started(self)``."""
        flusher = log.hold_until_idle()  # connection lines: written once per turn of the event loop, not one by one
        self._now = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as conns:
                self._conns = conns
                self.engine = make_engine(
                    self.config.proxy.relay,
                    self.stats,
                    conns,
                    use_splice=self.use_splice,
                    pipes=self.pipes,
                    close_sends_fin=True,
                )
                async with trio.open_nursery() as accepts:
                    self._accepts = accepts
                    for lsock in self.listeners:
                        await accepts.start(self._listen, lsock)
                    if self.udp is not None:
                        await self.udp.start(accepts, conns)
                    accepts.start_soon(self._reap)  # (the grace bounds a drain)
                    self.state.listening = True
                    task_status.started(self)
                    if self._stopping:
                        accepts.cancel_scope.cancel()
                self._close_listeners()
                if self.udp is not None:
                    self.udp.stop()  # UDP has nothing to drain: its sessions end now
                self.state.draining = True
                self.engine.close_when_empty()  # the shared relay task ends with the last connection
                if self._skip_grace:
                    conns.cancel_scope.cancel()
                else:
                    conns.cancel_scope.deadline = _current_time() + self.grace
                    if self.stats.open:
                        log.event("draining", open=self.stats.open, grace_s=self.grace)
        finally:
            self._close_listeners()
            if self.udp is not None:
                self.udp.close()
            if self.engine is not None:
                self.engine.close()
            log.release(flusher)
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop accepting now; open connections get ``shutdown_grace`` seconds. Idempotent; callable before start."""
        self._stopping = True
        if self._accepts is not None:
            self._accepts.cancel_scope.cancel()

    def skip_grace(self) -> None:
        """Stop accepting and cancel every open connection now (a second signal)."""
        self._skip_grace = True
        self.shutdown()
        if self._conns is not None and self.state.draining:
            self._conns.cancel_scope.cancel()

    def _close_listeners(self) -> None:
        self.state.listening = False
        for lsock in self.listeners:
            lsock.close()

    # -- accepting

    async def _accept_loop(self, lsock: socket.socket) -> None:
        accept = sockets.accepter(lsock)
        stats = self.stats
        spawn = self._conns.start_soon
        connection = self._connection
        batch = 0
        while True:
            if stats.open >= self.max_connections:
                stats.max_connections_waits += 1
                log.event("max_connections", logging.DEBUG, open=stats.open)
                self._parked += 1
                try:
                    while stats.open >= self.max_connections:
                        await self._lot.park()
                finally:
                    self._parked -= 1
            try:
                csock, caddr = accept()
            except BlockingIOError:
                batch = 0
                await _wait_readable(lsock)
                continue
            except OSError as e:
                if e.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._capacity_warning(e)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if e.errno in ACCEPT_IGNORABLE_ERRNOS:
                    continue
                raise
            stats.accepted += 1
            stats.open += 1
            spawn(connection, csock, caddr, name=_TASK_NAME)
            batch += 1
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()

    def _capacity_warning(self, e: OSError) -> None:
        now = _current_time()
        if now - self._last_capacity_log >= 1.0:
            self._last_capacity_log = now
            log.event(
                "accept_paused",
                logging.WARNING,
                error=errno.errorcode.get(e.errno, str(e.errno)),
                open=self.stats.open,
                hint="raise LimitNOFILE or lower proxy.max_connections",
            )

    # -- one connection

    def _is_loop(self, dst: tuple[str, int]) -> bool:
        port = dst[1]
        if port not in self._listen_ports:
            return False
        return port in self._listen_wild_ports or dst in self._listen_exact

    async def _connection(self, csock: socket.socket, caddr: tuple) -> None:
        """One connection, from accept to its log line: original destination, loop check, (PROXY header in),
        upstream connect within ``connect_timeout``, (PROXY header out), ``await engine.splice``; then, however it
        ended (done, failed, cancelled), both legs closed (with a reset when anything was lost), ports released,
        counted and logged in ``finally``.

        Error handling: nothing escapes but ``Cancelled``: an error is this connection's outcome (``"reset"``, logged
        with its traceback when it is not a socket error), never the server's."""
        t0 = self._now()
        client = (caddr[0], caddr[1])
        family = _AF_INET6 if len(caddr) == 4 else _AF_INET  # (csock.family builds an enum member)
        dst = usrc = upstream = flow = reserved = note = None
        source = client  # the client the upstream leg speaks for: the TCP peer, or the one a PROXY header names
        registered = False
        outcome = "reset"
        try:
            csock.setblocking(False)  # TCP_NODELAY is inherited from the listener
            try:
                dst = self.original_dst(csock)
            except OSError as e:
                outcome, note = "refused", "no original destination: " + (e.strerror or str(e))
                return
            if self._is_loop(dst):
                self.stats.loops_refused += 1
                outcome, note = "refused", "loop: the original destination is the proxy itself"
                return
            config = self.config  # (a reload replaces it for the connections that come after)
            listener = config.listener
            if listener.proxy_protocol != "off" and listener.trusts(client[0]):
                try:
                    header = await read_header(
                        csock, allow=listener.proxy_protocol, timeout=listener.proxy_protocol_timeout
                    )
                except ProxyProtocolError as e:
                    self.stats.proxy_protocol_errors[e.reason] += 1
                    note = str(e)
                    return
                if header.source is not None:
                    source = header.source
            if self.chooser is not None:
                self.chooser.add_intercepted(client, dst)
                registered = True
            target = (sockets.LOOPBACK[family], dst[1]) if self.loopback else dst
            preserve = self.preserve
            if source is not client and preserve and (":" in source[0]) != (family == _AF_INET6):
                preserve = False
                self._source_fallback(source, OSError(errno.EAFNOSUPPORT, "the header's client is of another family"))
            try:
                upstream, err, reserved = self._start_connect(family, source, dst, target, preserve=preserve)
            except OSError as e:  # EMFILE and the like: this connection fails, the server goes on
                err = e.errno
            else:
                if err == errno.EINPROGRESS and not sockets.is_connected(upstream):  # (usually connected already)
                    err = errno.ETIMEDOUT
                    with trio.move_on_after(self.connect_timeout):
                        await _wait_writable(upstream)
                        err = sockets.connect_error(upstream)
                        if err == errno.EINPROGRESS:
                            err = errno.ETIMEDOUT
                elif err == errno.EINPROGRESS:
                    err = 0
            if err:
                outcome, note = self._connect_failed(err)
                return
            send = config.proxy.send_proxy_protocol
            if send != "off":  # one write, before any byte of the client's
                header_out = build(send, *same_family(source, dst))
                if upstream.send(header_out) != len(header_out):
                    raise OSError(errno.EAGAIN, "the PROXY header did not fit the upstream socket's buffer")
            if _log_enabled(_INFO):  # the source is only for the log line; a chosen port is known already
                usrc = (source[0], reserved) if reserved is not None else sockets.sockname(upstream)
            flow = Flow(client=csock, upstream=upstream, last=self._now())
            flows = self._flows
            flows.add(flow)
            try:
                outcome = await self.engine.splice(flow)
            finally:
                flows.discard(flow)
        except Exception as e:
            outcome = "reset"
            note = errno.errorcode.get(e.errno, str(e)) if isinstance(e, OSError) and e.errno else repr(e)
            if not isinstance(e, OSError):
                log.event("connection_error", logging.ERROR, exc_info=e, client=log.addr(client))
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            try:
                self._finish(csock, upstream, flow, client, dst, usrc, reserved, registered, outcome, note, t0, source)
            except Exception as e:  # a bug in teardown ends this connection's task, never another's or the server
                log.event("connection_error", logging.ERROR, exc_info=e, client=log.addr(client), phase="teardown")

    def _connect_failed(self, err: int) -> tuple[str, str]:
        """A refused or unreachable upstream: outcome ``"refused"``; no answer within ``connect_timeout``:
        ``"timeout"``. Counted in ``stats.connect_errors``."""
        name = errno.errorcode.get(err, str(err))
        self.stats.connect_errors[name] += 1
        return ("timeout" if err == errno.ETIMEDOUT else "refused"), name

    def _finish(
        self,
        csock: socket.socket,
        usock: socket.socket | None,
        flow: Flow | None,
        client: tuple[str, int],
        dst: tuple[str, int] | None,
        usrc: tuple[str, int] | None,
        reserved: int | None,
        registered: bool,
        outcome: str,
        note: str | None,
        t0: float,
        source: tuple[str, int],
    ) -> None:
        """Close both legs (with a reset after a failure, or when bytes were lost), release the ports, count, log.
        ``client`` is the TCP peer, ``source`` the client a PROXY header named (else ``client`` itself): the log line
        names ``source`` as the client, and the load balancer as ``peer``.

        Error handling: never raises (it runs in ``finally``); a close cannot fail in a way that matters here."""
        stats = self.stats
        lost = flow is not None and flow.state & LOST
        try:
            if outcome in _RESET_OUTCOMES or lost:
                sockets.set_reset_on_close(csock)
                if usock is not None:
                    sockets.set_reset_on_close(usock)
        finally:
            csock.close()
            if usock is not None:
                usock.close()
            stats.open -= 1
            stats.closed[outcome] += 1
            if self._parked:
                self._lot.unpark_all()
            if registered:
                self.chooser.remove_intercepted(client, dst)
            if reserved is not None:
                self.chooser.release(source[0], reserved)
        if not _log_enabled(_INFO):
            return
        if flow is not None:
            bytes_in, bytes_out = flow.bytes_in, flow.bytes_out
            if note is None and outcome == "reset" and flow.error is not None:
                err = flow.error
                note = errno.errorcode.get(err.errno, str(err)) if isinstance(err, OSError) and err.errno else repr(err)
            if lost and note is None:
                note = "bytes in flight were discarded: closed with a reset"
        else:
            bytes_in = bytes_out = 0
        args = (source, dst, usrc, bytes_in, bytes_out, self._now() - t0, outcome)
        if source is not client:
            if note is None:
                log.connection(*args, peer=log.addr(client))
            else:
                log.connection(*args, peer=log.addr(client), error=note)
        elif note is None:
            log.connection(*args)
        else:
            log.connection(*args, error=note)
        if flow is not None and outcome == "reset" and flow.error is not None and not isinstance(flow.error, OSError):
            log.event("connection_error", logging.ERROR, exc_info=flow.error, client=log.addr(client))

    def _start_connect(
        self,
        family: int,
        client: tuple[str, int],
        dst: tuple[str, int],
        target: tuple[str, int],
        *,
        preserve: bool,
    ) -> tuple[socket.socket, int, int | None]:
        """Create, bind and start connecting the upstream socket: (socket, connect_ex result, reserved port); from
        ``client``'s address when ``preserve``.

        Error handling: raises OSError only when not even an ordinary socket can be had (EMFILE and the like).
        """
        if preserve:
            started = self._start_transparent(family, client, dst, target)
            if started is not None:
                return started
        sock = sockets.upstream_socket(family, transparent=False, mark=0, source=None)
        return sock, sock.connect_ex(target), None

    def _start_transparent(
        self, family: int, client: tuple[str, int], dst: tuple[str, int], target: tuple[str, int]
    ) -> tuple[socket.socket, int, int | None] | None:
        """From the client's IP: a port that cannot collide (see :class:`sockets.PortChooser`), or for the loopback
        target the client's own port. A port that cannot be had falls back to the kernel's choice
        (``source_port_fallbacks``); an address that cannot be bound returns None (``source_fallbacks``): the
        caller uses an ordinary source."""
        upstream_socket = sockets.upstream_socket
        cip = client[0]
        chooser = self.chooser
        tried: set[int] = set()
        for attempt in range(PORT_ATTEMPTS):
            if chooser is None:
                if attempt:
                    break
                port = client[1]
            else:
                port = chooser.choose(cip, dst, tried)
                if port is None:
                    break
            try:
                sock = upstream_socket(family, transparent=True, mark=self.mark, source=(cip, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    tried.add(port)
                    continue
                self._source_fallback(client, e)
                return None
            err = sock.connect_ex(target)
            if err in sockets.PORT_TAKEN:
                sock.close()
                tried.add(port)
                continue
            if chooser is not None:
                chooser.reserve(cip, port)
                return sock, err, port
            return sock, err, None
        self._port_fallback(client, tried)
        try:
            sock = upstream_socket(family, transparent=True, mark=self.mark, source=(cip, 0), no_port=True)
        except OSError as e:
            self._source_fallback(client, e)
            return None
        err = sock.connect_ex(target)
        if err in sockets.PORT_TAKEN:
            sock.close()
            self._source_fallback(client, OSError(err, "no free source port for the client's address"))
            return None
        return sock, err, None

    def _port_fallback(self, client: tuple[str, int], tried: set[int]) -> None:
        self.stats.source_port_fallbacks += 1
        log.event("source_port_fallback", logging.INFO, client=log.addr(client), tried=len(tried))

    def _source_fallback(self, client: tuple[str, int], e: OSError) -> None:
        self.stats.source_fallbacks += 1
        log.event("source_fallback", logging.WARNING, client=log.addr(client), error=e.strerror or str(e))

    # -- reload (the runner applies a tproxy.reload.Plan): listeners adopted and retired, settings for new connections

    async def _listen(self, lsock: socket.socket, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """An accept loop that :meth:`retire_listeners` can stop on its own."""
        done = trio.Event()
        with trio.CancelScope() as scope:
            self._listening[lsock] = (scope, done)
            task_status.started()
            try:
                await self._accept_loop(lsock)
            finally:
                done.set()

    async def _reap(self) -> None:
        """The idle check; :meth:`apply_settings` restarts it with a new ``idle_timeout``."""
        while True:
            with trio.CancelScope() as self._reaper:
                await reap_idle(self._flows, self.idle_timeout)

    async def adopt_listeners(self, socks: Sequence[socket.socket]) -> None:
        """Accept on ``socks`` too (bound and listening); from now on they are the server's to close.

        Error handling: raises RuntimeError once the server is stopping (the caller closes ``socks`` then)."""
        if self._stopping or self._accepts is None:
            raise RuntimeError("the server is stopping")
        for lsock in socks:
            await self._accepts.start(self._listen, lsock)
            self.listeners.append(lsock)
        self._update_addresses()

    async def retire_listeners(self, socks: Sequence[socket.socket]) -> None:
        """Stop accepting on ``socks``, proxy what already waits in their backlog, close them. Open connections
        are not touched."""
        for lsock in socks:
            entry = self._listening.pop(lsock, None)
            if entry is not None:
                entry[0].cancel()
                await entry[1].wait()
            while self._conns is not None and not self._stopping:
                try:
                    csock, caddr = lsock.accept()
                except OSError:
                    break
                self.stats.accepted += 1
                self.stats.open += 1
                self._conns.start_soon(self._connection, csock, caddr, name=_TASK_NAME)
            if lsock in self.listeners:
                self.listeners.remove(lsock)
            lsock.close()
        self._update_addresses()

    def _update_addresses(self) -> None:
        self.addresses = [sockets.sockname(s) for s in self.listeners if s.fileno() >= 0]
        self._listen_ports = {a[1] for a in self.addresses}
        self._listen_exact = {a for a in self.addresses if not _unspecified(a[0])}
        self._listen_wild_ports = {a[1] for a in self.addresses if _unspecified(a[0])}

    def apply_settings(self, config: Config) -> None:
        """Timeouts and limits of ``config`` for new connections (the idle check applies to all of them). Keys a
        reload cannot change (mode, mark, preserve_source, upstream) are ignored here."""
        self.config = config
        self.connect_timeout = config.proxy.connect_timeout
        self.max_connections = config.proxy.max_connections
        self.grace = config.proxy.shutdown_grace
        if self.udp is not None:
            self.udp.apply_settings(config)
        if config.proxy.idle_timeout != self.idle_timeout:
            self.idle_timeout = config.proxy.idle_timeout
            if self._reaper is not None:
                self._reaper.cancel()
        if self._lot:
            self._lot.unpark_all()  # a higher max_connections frees parked accept loops


def _unspecified(host: str) -> bool:
    return host in ("0.0.0.0", "::")


async def serve(
    config: Config,
    listeners: Sequence[socket.socket],
    stats: Stats,
    state: State,
    *,
    original_dst: OriginalDst | None = None,
    use_splice: bool = True,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`Server` on ``listeners`` (trio's start protocol: ``started`` gets the Server, whose
    ``shutdown()`` / ``skip_grace()`` end it and ``addresses`` says where it listens)."""
    server = Server(config, listeners, stats, state, original_dst=original_dst, use_splice=use_splice)
    await server.serve(task_status=task_status)
