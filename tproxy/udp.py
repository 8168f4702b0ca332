"""The UDP side of the proxy (tproxy mode): sessions of datagrams, the client's address preserved.

Kernel side (DESIGN.md "UDP"): TPROXY hands every intercepted datagram to one UDP listener per family, which reads
its original destination from the ancillary data. A *session* is keyed by (client address, original destination);
per session, an upstream socket bound to the client's IP (``IP_TRANSPARENT`` + ``SO_MARK``) and connected to the
destination (or the loopback target) carries the datagrams to the application, whose replies come back by the fwmark
path. Replies go to the client from one raw ``IPPROTO_UDP`` socket per family, with a UDP header built here and the
original destination as the source (``IP_PKTINFO``): the client sees the answer come from the address it wrote to,
and nothing of ours is bound to the application's address and port.

Shape (DESIGN.md "Architecture"): one receive task per listener, in the server's accept nursery; one task per session,
in the server's connection nursery, owning it from the first datagram to its log line. The application's replies are
read by the relay engine of ``proxy.relay``, as TCP's bytes are: ``shared`` (the default), one reader task in the accept
nursery for every session's upstream socket (one epoll); ``tasks``, the session's own task. A session ends when no
datagram passed either way for ``proxy.udp_idle_timeout`` seconds (``idle``), when the application's port answers with
an ICMP error (``refused``), at shutdown (``shutdown``: UDP has nothing to drain) or on an unexpected error (``error``).

Source port of the upstream leg (``preserve_source``): with ``upstream = "original"`` one from ``proxy.upstream_ports``
that is never the client port of a live session from the same client to the same destination (both legs would share a
conntrack entry, and the replies meant for the client would be routed back to us); with ``"loopback"`` the client's
own port unless it is below ``net.ipv4.ip_unprivileged_port_start`` (binding it would need CAP_NET_BIND_SERVICE).
Two sessions never get the same upstream 4-tuple.

Error handling: a datagram that cannot be delivered is dropped and counted in ``stats.udp_dropped[reason]``
(:data:`~tproxy.stats.UDP_DROPS`): ``max_sessions`` (``proxy.udp_max_sessions`` sessions are open: live ones are never
evicted), ``upstream_error`` (no upstream socket could be had), ``loop``, ``no_original_dst``, ``would_block`` (a send
that would block: UDP never waits) and ``send_error``. Nothing here raises into the server but ``Cancelled`` and an
error of the listener itself.

Resource handling: a session's task closes its upstream socket, releases its port and logs its line in ``finally``.
:meth:`UdpRelay.stop` ends every session at once and closes the listeners; :meth:`UdpRelay.close` the raw sockets too.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
from collections.abc import Callable, Sequence
from functools import partial

import attrs
import trio

from tproxy import log, sockets
from tproxy.config import Config
from tproxy.stats import Stats

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROTO_UDP = 17
_UDP_HEADER = struct.Struct("!HHHH")
DST_CACHE = 1024  # original destinations remembered by their raw ancillary data (cleared when full)
BATCH = 64  # datagrams a receive loop reads in a row before yielding to the other tasks
PORT_ATTEMPTS = 4  # chosen upstream ports tried before giving up on a session
MAX_EVENTS = 256  # ready upstream sockets the shared reply reader takes from epoll in one turn
BURST = 32  # replies read in a row from a session's socket that was ready in the previous turn too (a stream)
FEW = 8  # ... when the turn has fewer ready sockets than this (many one-reply sessions: one read each, no EAGAIN)
# errnos of recvmsg on the listener that concern one datagram or a passing shortage: go on with the next one
_TRANSIENT = frozenset({errno.ENOBUFS, errno.ENOMEM, errno.EINTR, errno.ECONNREFUSED, errno.EHOSTUNREACH})

_current_time = trio.current_time
_wait_readable = trio.lowlevel.wait_readable
_checkpoint = trio.lowlevel.checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Pure parts: the checksum and the header


def ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's complement sum of ``data`` (RFC 1071), odd lengths padded with a zero byte.

    Since 2**16 = 1 (mod 0xffff), the sum of the big-endian 16-bit words is the whole buffer read as one big-endian
    integer, modulo 0xffff: one C-level pass instead of a Python loop. A non-zero sum that is a multiple of 0xffff is
    0xffff (one's complement has two zeros); an all-zero buffer sums to 0.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    if n == 0:
        return 0
    s = n % 0xFFFF
    return s or 0xFFFF


def checksum_base(src: str, dst: str, sport: int, dport: int, family: int) -> int:
    """The part of a UDP checksum that every datagram of one flow shares: both addresses and the protocol (of the
    IPv4 or IPv6 pseudo-header) and both ports, summed. :func:`header_from_base` adds the length and the payload.
    Computed once per session instead of once per datagram. Pure."""
    af = _AF[family]
    addrs = socket.inet_pton(af, src) + socket.inet_pton(af, dst)
    return ones_complement_sum(addrs) + _PROTO_UDP + sport + dport


def header_from_base(base: int, sport: int, dport: int, payload: bytes | memoryview) -> bytes:
    """The 8-byte UDP header for ``payload`` given its flow's :func:`checksum_base`. The length appears twice in the
    sum (the pseudo-header's, IPv4 16-bit or IPv6 32-bit, and the header's); a computed checksum of 0 is sent as
    0xffff (0 means "none" on the wire). Pure."""
    length = 8 + len(payload)
    total = base + 2 * length + ones_complement_sum(payload)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return _UDP_HEADER.pack(sport, dport, length, (~total & 0xFFFF) or 0xFFFF)


def udp_header(src: str, dst: str, sport: int, dport: int, payload: bytes | memoryview, family: int) -> bytes:
    """The 8-byte UDP header for ``payload`` from ``src:sport`` to ``dst:dport``, with its checksum over the IPv4 or
    IPv6 pseudo-header (``family`` 4 or 6; the checksum is mandatory for IPv6). Pure."""
    return header_from_base(checksum_base(src, dst, sport, dport, family), sport, dport, payload)


# ----------------------------------------------------------------------------------------------------------------
# Sessions


@attrs.define(eq=False)
class Session:
    """One (client, original destination) flow. ``scope`` is the session task's cancel scope (cancelled to end it);
    ``last`` the time of its latest datagram either way, and ``idle`` the scope whose deadline is ``last`` plus the
    idle timeout as of the task's latest look (a datagram only stamps ``last``: moving a deadline per datagram costs a
    heap entry in trio's run loop). ``cmsg``, ``reply_to`` and ``csum`` are what every reply to the client reuses."""

    family: int  # 4 or 6
    client: tuple[str, int]
    dst: tuple[str, int]
    upstream: socket.socket
    usrc: tuple[str, int]
    target: tuple[str, int]
    reserved: int | None  # a port taken from the chooser (released at the end)
    scope: trio.CancelScope
    t0: float
    last: float
    cmsg: list[tuple[int, int, bytes]]  # IP_PKTINFO / IPV6_PKTINFO: the original destination as the source
    reply_to: tuple[str, int]  # the raw socket's destination (the client's address, port 0)
    csum: int  # checksum_base(original destination -> client)
    idle: trio.CancelScope | None = None
    fd: int = -1  # the upstream socket's, while the shared reply reader watches it
    turn: int = -1  # the shared reply reader's latest turn that found the upstream socket ready
    note: str | None = None  # the error, when the reason is "error"
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str | None = None  # set by whoever ends it (stop: "shutdown", ICMP: "refused"); idle when None


class UdpRelay:
    """The UDP side of a :class:`~tproxy.server.Server`: listeners, raw reply sockets, sessions.

    The server starts it (:meth:`start`) with its two nurseries and stops it (:meth:`stop`) when it stops accepting.
    ``is_loop(dst)``: whether ``dst`` is the proxy itself (the server's check for connections); ``mark``: the upstream
    sockets' SO_MARK (the server's, so both protocols follow the same reply routing).
    """

    def __init__(
        self,
        config: Config,
        listeners: Sequence[socket.socket],
        stats: Stats,
        *,
        mark: int,
        is_loop: Callable[[tuple[str, int]], bool] = lambda dst: False,
        port_start: int | None = None,
    ) -> None:
        self.stats = stats
        self.mark = mark
        self.reply_mark = sockets.listener_mark(config)  # the raw reply sockets' (their datagrams stay untracked)
        self.is_loop = is_loop
        self.preserve = config.preserve_source
        self.loopback = config.proxy.upstream == "loopback"
        ports = config.proxy.upstream_ports
        self.chooser = sockets.PortChooser(ports.lo, ports.hi)
        if port_start is None:
            from tproxy.privileges import _unprivileged_port_start

            port_start = _unprivileged_port_start()
        self.port_start = port_start
        self.idle_timeout = config.proxy.udp_idle_timeout
        self.max_sessions = config.proxy.udp_max_sessions
        self.listeners: list[socket.socket] = list(listeners)
        self.raws: dict[int, socket.socket] = {}
        self.sessions: dict[tuple[tuple[str, int], tuple[str, int]], Session] = {}
        self._tuples: set[tuple[str, int, tuple[str, int]]] = set()  # live upstream (ip, port, target)
        self._dsts: dict[bytes, tuple[str, int]] = {}  # original destinations by their ancillary data, as parsed
        self._rbuf = bytearray(sockets.UDP_MAX_PAYLOAD + 1)  # every session's replies are read here, one at a time
        self._receivers: dict[socket.socket, trio.CancelScope] = {}
        # proxy.relay = "shared": one task reads the replies of every session (level-triggered epoll of the upstream
        # sockets), both made with the first session (a server without UDP has neither); "tasks": each session's task
        # reads its own
        self.shared = config.proxy.relay == "shared"
        self._ep: select.epoll | None = None
        self._by_fd: dict[int, Session] = {}
        self._reader: trio.CancelScope | None = None
        self._accepts: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None
        self._stopped = False
        self._last_warning = -1e9

    # -- lifecycle

    async def start(self, accepts: trio.Nursery, conns: trio.Nursery) -> None:
        """Receive on every listener: the loops in ``accepts``, the sessions in ``conns``."""
        self._accepts, self._conns = accepts, conns
        for lsock in self.listeners:
            await accepts.start(self._receive, lsock)

    async def adopt(self, socks: Sequence[socket.socket]) -> None:
        """Receive on ``socks`` too (a reload); from now on they are ours to close."""
        if self._stopped or self._accepts is None:
            raise RuntimeError("the server is stopping")
        for lsock in socks:
            self.listeners.append(lsock)
            await self._accepts.start(self._receive, lsock)

    def retire(self, socks: Sequence[socket.socket]) -> None:
        """Stop receiving on ``socks`` and close them; sessions are not touched (their replies use the raw sockets)."""
        for lsock in socks:
            scope = self._receivers.pop(lsock, None)
            if scope is not None:
                scope.cancel()
            if lsock in self.listeners:
                self.listeners.remove(lsock)
            if lsock.fileno() >= 0:
                trio.lowlevel.notify_closing(lsock)  # (its receive loop may still wait on it)
            lsock.close()

    def stop(self) -> None:
        """No new datagram is read; every session ends now (``shutdown``). Idempotent."""
        self._stopped = True
        self.retire(list(self.listeners))
        if self._reader is not None:
            self._reader.cancel()
        for s in self.sessions.values():
            if s.reason is None:
                s.reason = "shutdown"
            s.scope.cancel()

    def close(self) -> None:
        """:meth:`stop`, and the raw sockets closed (once no session task runs)."""
        self.stop()
        for raw in self.raws.values():
            raw.close()
        self.raws.clear()
        if self._ep is not None and not self._ep.closed:
            trio.lowlevel.notify_closing(self._ep.fileno())  # (the reader may still wait on it, if never cancelled)
            self._ep.close()

    def apply_settings(self, config: Config) -> None:
        """``udp_idle_timeout`` (for every session at once, counted from its latest datagram) and
        ``udp_max_sessions`` (new sessions)."""
        self.idle_timeout = config.proxy.udp_idle_timeout
        self.max_sessions = config.proxy.udp_max_sessions
        for s in self.sessions.values():
            if s.idle is not None:
                s.idle.deadline = s.last + self.idle_timeout

    # -- client -> application

    async def _receive(self, lsock: socket.socket, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        family = 6 if lsock.family == socket.AF_INET6 else 4
        recvmsg_into = lsock.recvmsg_into
        space = sockets.ORIGDST_CMSG_SPACE
        buf = bytearray(sockets.UDP_MAX_PAYLOAD + 1)  # one per listener, reused: each datagram is sent on at once
        bufs = [buf]
        view = memoryview(buf)
        datagram = self._datagram
        with trio.CancelScope() as scope:
            self._receivers[lsock] = scope
            task_status.started()
            batch = 0
            now = _current_time()  # the time stamped on the sessions of a batch of datagrams
            while True:
                try:
                    n, anc, _flags, addr = recvmsg_into(bufs, space)
                except BlockingIOError:
                    batch = 0
                    try:
                        await _wait_readable(lsock)
                    except trio.ClosedResourceError:  # retire() closed it
                        return
                    now = _current_time()
                    continue
                except OSError as e:
                    if e.errno in _TRANSIENT:
                        continue
                    if lsock.fileno() < 0:  # closed by retire()
                        return
                    raise
                datagram(family, view[:n], anc, addr, now)
                batch += 1
                if batch >= BATCH:
                    batch = 0
                    await trio.lowlevel.checkpoint()
                    now = _current_time()

    def _drop(self, reason: str) -> None:
        self.stats.udp_dropped[reason] += 1

    def _datagram(
        self, family: int, data: bytes | memoryview, anc: list, addr: tuple, now: float | None = None
    ) -> None:
        """One datagram from a client (sent on before this returns: ``data`` may be a view of a reused buffer), to
        its session, opened first if need be. ``now``: the receive loop's time of the batch (else the current one)."""
        dst = self._dsts.get(anc[0][2]) if len(anc) == 1 else None
        if dst is None:
            dst = sockets.udp_original_dst(anc)
            if dst is None:
                self._drop("no_original_dst")
                return
            if len(anc) == 1:
                if len(self._dsts) >= DST_CACHE:
                    self._dsts.clear()
                self._dsts[anc[0][2]] = dst
        client = addr if len(addr) == 2 else (addr[0], addr[1])
        s = self.sessions.get((client, dst))
        if s is None or s.reason is not None:  # (ending: a reason is set before its task runs _end)
            s = self._open(family, client, dst)
            if s is None:
                return
        s.last = _current_time() if now is None else now
        try:
            s.upstream.send(data)
        except BlockingIOError:
            self._drop("would_block")
            return
        except OSError:  # e.g. ECONNREFUSED: the ICMP answer to an earlier datagram
            self._drop("send_error")
            return
        stats = self.stats
        s.datagrams_in += 1
        s.bytes_in += len(data)
        stats.udp_datagrams_in += 1
        stats.udp_bytes_in += len(data)

    def _open(self, family: int, client: tuple[str, int], dst: tuple[str, int]) -> Session | None:
        if self._stopped or self._accepts is None or self._conns is None:
            return None
        if self.is_loop(dst):
            self._drop("loop")
            return None
        if len(self.sessions) >= self.max_sessions:
            self._drop("max_sessions")
            self._warn("udp_max_sessions", open=len(self.sessions), hint="raise proxy.udp_max_sessions")
            return None
        af = _AF[family]
        try:
            if family not in self.raws:
                self.raws[family] = sockets.raw_udp_socket(family, self.reply_mark)
            if self.shared and self._ep is None:
                self._ep = select.epoll()
                self._accepts.start_soon(self._read_replies, name="tproxy.udp_replies")
            upstream, usrc, reserved, target = self._connect(af, client, dst)
            if self._ep is not None:
                try:
                    self._ep.register(upstream.fileno(), select.EPOLLIN)
                except OSError:
                    upstream.close()
                    if reserved is not None:
                        self.chooser.release(client[0], reserved)
                    raise
        except OSError as e:
            self._drop("upstream_error")
            self._warn("udp_upstream_error", client=log.addr(client), error=e.strerror or str(e))
            return None
        now = _current_time()
        s = Session(
            family=family,
            client=client,
            dst=dst,
            upstream=upstream,
            usrc=usrc,
            target=target,
            reserved=reserved,
            scope=trio.CancelScope(),
            t0=now,
            last=now,
            cmsg=[sockets.pktinfo(family, dst[0])],
            reply_to=(client[0], 0),
            csum=checksum_base(dst[0], client[0], dst[1], client[1], family),
        )
        self.sessions[(client, dst)] = s
        if self._ep is not None:
            s.fd = upstream.fileno()
            self._by_fd[s.fd] = s
        self.chooser.add_intercepted(client, dst)
        self._tuples.add((usrc[0], usrc[1], target))
        self.stats.udp_sessions += 1
        self.stats.udp_sessions_open += 1
        self._conns.start_soon(self._session, s, name="tproxy.udp_session")
        return s

    def _connect(
        self, af: int, client: tuple[str, int], dst: tuple[str, int]
    ) -> tuple[socket.socket, tuple[str, int], int | None, tuple[str, int]]:
        """The upstream socket: (socket, its source, the chooser's port or None, target). Raises OSError."""
        target = (sockets.LOOPBACK[af], dst[1]) if self.loopback else dst
        if not self.preserve:
            sock = sockets.udp_upstream_socket(af, transparent=False, mark=0, source=None, target=target)
            return sock, sockets.sockname(sock), None, target
        cip = client[0]
        if self.loopback and client[1] >= self.port_start and (cip, client[1], target) not in self._tuples:
            sock = sockets.udp_upstream_socket(af, transparent=True, mark=self.mark, source=client, target=target)
            return sock, client, None, target
        tried: set[int] = set()
        err: OSError | None = None
        for _ in range(PORT_ATTEMPTS):
            port = self.chooser.choose(cip, dst, tried)
            if port is None:
                break
            tried.add(port)
            if (cip, port, target) in self._tuples:
                continue
            try:
                sock = sockets.udp_upstream_socket(
                    af, transparent=True, mark=self.mark, source=(cip, port), target=target
                )
            except OSError as e:
                err = e
                continue
            self.chooser.reserve(cip, port)
            return sock, (cip, port), port, target
        raise err or OSError(errno.EADDRNOTAVAIL, "no free source port for the client's address")

    def _warn(self, name: str, **fields: object) -> None:
        now = _current_time()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.event(name, logging.WARNING, **fields)

    # -- one session: application -> client

    async def _session(self, s: Session) -> None:
        """The session from its first datagram to its log line: until it expires or ends."""
        try:
            with s.scope:
                await self._replies(s)
        except Exception as e:
            s.reason = "error"
            s.note = _describe(e)
            if not isinstance(e, OSError):
                log.event("udp_session_error", logging.ERROR, exc_info=e, client=log.addr(s.client))
        except BaseException:
            s.reason = s.reason or "cancelled"
            raise
        finally:
            self._end(s)

    async def _replies(self, s: Session) -> None:
        """Until the application's port refuses or no datagram passed either way for ``idle_timeout``: the idle
        scope's deadline is looked at only when it passes (then moved to the latest datagram's, if any came). The
        replies are relayed by the shared reader (which cancels ``s.scope`` on a refusal or an error), or here."""
        wait = trio.sleep_forever if self.shared else partial(self._relay_replies, s)
        while True:
            with trio.CancelScope(deadline=s.last + self.idle_timeout) as idle:
                s.idle = idle
                await wait()
                return  # refused ("tasks")
            s.idle = None
            if _current_time() >= s.last + self.idle_timeout:
                return  # idle

    async def _read_replies(self) -> None:
        """``proxy.relay = "shared"``: the replies of every session, read by one task from one level-triggered epoll
        of the upstream sockets (a task switch per ready socket costs more than the read and the send). Each turn
        reads one datagram per ready socket, or up to ``BURST`` from a socket that was ready in the previous turn too
        while few are ready (a stream of replies: fewer epoll calls; with many ready, one each, so no read finds
        nothing), then yields to the other tasks. A refusal (ICMP) or an error of a socket ends its session."""
        ep = self._ep
        if ep is None or self._stopped:  # (stopped before this task first ran: stop() found no reader to cancel)
            return
        poll = ep.poll
        epfd = ep.fileno()
        by_fd = self._by_fd
        buf = self._rbuf
        view = memoryview(buf)
        reply = self._reply
        turn = 0
        with trio.CancelScope() as scope:
            self._reader = scope
            while True:
                events = poll(0, MAX_EVENTS)
                if not events:
                    try:
                        await _wait_readable(epfd)
                    except trio.ClosedResourceError:  # close() closed it
                        return
                    continue
                turn += 1
                few = len(events) < FEW
                now = _current_time()  # the time stamped on the sessions of one turn
                for fd, _mask in events:
                    s = by_fd.get(fd)
                    if s is None:
                        continue
                    recv_into = s.upstream.recv_into
                    more = BURST if few and s.turn == turn - 1 else 1
                    s.turn = turn
                    for _ in range(more):
                        try:
                            n = recv_into(buf)
                        except BlockingIOError:
                            break
                        except OSError as e:  # ECONNREFUSED: ICMP port unreachable from the application's port
                            self._fail(s, e)
                            break
                        s.last = now
                        reply(s, view[:n])  # (sent before the next read: the buffer is shared by every session)
                await _checkpoint()

    def _fail(self, s: Session, e: OSError) -> None:
        """End ``s`` for the shared reader: ``refused`` or ``error``."""
        if s.reason is None:
            if isinstance(e, ConnectionRefusedError):
                s.reason = "refused"
            else:
                s.reason = "error"
                s.note = _describe(e)
        self._unwatch(s)
        s.scope.cancel()

    def _unwatch(self, s: Session) -> None:
        if s.fd >= 0 and self._by_fd.get(s.fd) is s:
            del self._by_fd[s.fd]
            if self._ep is not None and not self._ep.closed:
                try:
                    self._ep.unregister(s.fd)
                except OSError:
                    pass
        s.fd = -1

    async def _relay_replies(self, s: Session) -> None:
        """``proxy.relay = "tasks"``: the session's own replies, read by its task."""
        up = s.upstream
        recv_into = up.recv_into
        buf = self._rbuf
        view = memoryview(buf)
        reply = self._reply
        now = _current_time()  # the time stamped on the session for the replies of one wakeup
        while True:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                await _wait_readable(up)
                now = _current_time()
                continue
            except ConnectionRefusedError:  # ICMP port unreachable: nothing listens on the application's port
                s.reason = "refused"
                return
            s.last = now
            reply(s, view[:n])  # (sent before the next read: the buffer is shared by every session)

    def _reply(self, s: Session, data: bytes | memoryview) -> None:
        raw = self.raws.get(s.family)
        if raw is None:
            self._drop("send_error")
            return
        sport, dport = s.dst[1], s.client[1]
        head = header_from_base(s.csum, sport, dport, data)
        try:
            raw.sendmsg([head, data], s.cmsg, 0, s.reply_to)
        except BlockingIOError:
            self._drop("would_block")
            return
        except OSError:
            self._drop("send_error")
            return
        stats = self.stats
        s.datagrams_out += 1
        s.bytes_out += len(data)
        stats.udp_datagrams_out += 1
        stats.udp_bytes_out += len(data)

    def _end(self, s: Session) -> None:
        """Close, release, count, log. Never raises."""
        try:
            self._unwatch(s)  # (before the close: the fd's number may be reused at once)
            s.upstream.close()
        finally:
            if self.sessions.get((s.client, s.dst)) is s:
                del self.sessions[(s.client, s.dst)]
            self.chooser.remove_intercepted(s.client, s.dst)
            self._tuples.discard((s.usrc[0], s.usrc[1], s.target))
            if s.reserved is not None:
                self.chooser.release(s.client[0], s.reserved)
            self.stats.udp_sessions_open -= 1
        fields: dict[str, object] = {
            "client": log.addr(s.client),
            "original_dst": log.addr(s.dst),
            "upstream_src": log.addr(s.usrc),
            "datagrams_in": s.datagrams_in,
            "bytes_in": s.bytes_in,
            "datagrams_out": s.datagrams_out,
            "bytes_out": s.bytes_out,
            "duration_ms": round((_current_time() - s.t0) * 1000, 1),
            "reason": s.reason or "idle",
        }
        if s.note is not None:
            fields["error"] = s.note
        log.event("udp_session", **fields)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e))
    return repr(e)


def bind_listeners(config: Config) -> list[socket.socket]:
    """One UDP listener per family, at the TCP listener's address and port; none when ``intercept.udp_ports`` is
    empty or the mode is not tproxy.

    Error handling: PrivilegeError / TproxyError (see :func:`tproxy.sockets.udp_listener`); sockets bound so far are
    closed.
    """
    if config.mode != "tproxy" or not config.intercept.udp_ports:
        return []
    out: list[socket.socket] = []
    try:
        for family in config.families:
            out.append(sockets.udp_listener(family, config.listener.address_for(family), config.listener.port))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out
