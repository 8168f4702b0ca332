"""Socket options, listeners, original-destination lookup and the upstream source-port chooser.

The only module that knows setsockopt numbers. Everything here is synchronous and cheap; the server awaits around it.

Error handling: :func:`listener` turns a missing capability into :class:`~tproxy.errors.PrivilegeError` and a bind
failure into :class:`~tproxy.errors.TproxyError`, one line each, for the operator. The per-connection helpers raise
plain :class:`OSError` and leave the decision (fall back, reset, count) to the server.
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import itertools
import os
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

from tproxy.config import Config
from tproxy.errors import PrivilegeError, TproxyError

SOL_IP = 0  # socket.SOL_IP
SOL_IPV6 = 41  # socket.IPPROTO_IPV6
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80  # netfilter, IPv4 (SOL_IP)
IP6T_SO_ORIGINAL_DST = 80  # netfilter, IPv6 (SOL_IPV6)
IP_BIND_ADDRESS_NO_PORT = 24
SO_MARK = 36
TCP_NODELAY = socket.TCP_NODELAY
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
# UDP (tproxy/udp.py); Python 3.11's socket module lacks these
IP_PKTINFO = 8
IPV6_PKTINFO = 50
IP_RECVORIGDSTADDR = 20  # also the ancillary type of the original destination (IP_ORIGDSTADDR)
IPV6_RECVORIGDSTADDR = 74  # (IPV6_ORIGDSTADDR)
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SO_NETNS_COOKIE = 71  # Linux >= 5.14
UDP_MAX_PAYLOAD = 65507  # the largest IPv4 UDP payload (65535 - 20 - 8); IPv6 takes the same
UDP_RCVBUF = 32 << 20  # the UDP listener's receive buffer when it can be forced (root, before a privilege drop)
ORIGDST_CMSG_SPACE = socket.CMSG_SPACE(28)  # room for a sockaddr_in6

# Upstream source ports chosen for ``proxy.upstream = "original"``: below the ranges clients use for their own
# ephemeral ports (Linux 32768-60999, Windows/BSD 49152-65535), so a client's next connection rarely lands on the
# tuple of one of our upstream legs.
UPSTREAM_PORTS = (1024, 32767)

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
BACKLOG = 4096
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # non-blocking from socket(2): one syscall fewer
# A socket's family as a plain int: ``socket.socket.family`` builds an enum member on every read (0.5 us).
raw_family = _socket.socket.family.__get__

_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, padding
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope id


def transparent_option(family: int) -> tuple[int, int]:
    """(level, optname) of IP_TRANSPARENT / IPV6_TRANSPARENT for ``family`` (AF_INET / AF_INET6)."""
    return (SOL_IP, IP_TRANSPARENT) if family == socket.AF_INET else (SOL_IPV6, IPV6_TRANSPARENT)


def set_transparent(sock: socket.socket) -> None:
    """Raises PermissionError without CAP_NET_RAW (or CAP_NET_ADMIN)."""
    level, opt = transparent_option(sock.family)
    sock.setsockopt(level, opt, 1)


def set_mark(sock: socket.socket, mark: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def set_nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NODELAY, 1)


def set_reset_on_close(sock: socket.socket) -> None:
    """Make ``close()`` send a RST instead of a FIN (SO_LINGER 0). Never raises."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


def listener(
    family: int, address: str, port: int, *, transparent: bool, mark: int = 0, backlog: int = BACKLOG
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for ``family`` (4 or 6).

    IPv6 listeners are V6ONLY (the IPv4 one, if any, is separate). ``transparent`` sets IP_TRANSPARENT /
    IPV6_TRANSPARENT, which TPROXY needs to hand connections to it and which a preserve-source upstream needs as well.
    TCP_NODELAY is set on the listener: accepted sockets inherit it (one setsockopt per connection fewer). A non-zero
    ``mark`` is set as SO_MARK (needs CAP_NET_RAW or CAP_NET_ADMIN, as IP_TRANSPARENT does): the SYN-ACK, the accepted
    sockets and their TIME_WAIT replies carry it too, so rules can tell the client leg's outgoing packets
    (:func:`listener_mark`).

    Error handling: a missing capability raises :class:`PrivilegeError`; any other failure (address in use, no such
    address) raises :class:`TproxyError`. The socket is closed on failure.
    """
    af = FAMILIES[family]
    sock = socket.socket(af, socket.SOCK_STREAM)
    where = f"[{address}]:{port}" if family == 6 else f"{address}:{port}"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NODELAY, 1)
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            try:
                set_transparent(sock)
            except PermissionError:
                name = "IPV6_TRANSPARENT" if family == 6 else "IP_TRANSPARENT"
                raise PrivilegeError(
                    f"cannot listen on {where}: needs CAP_NET_RAW for {name} (run as root, or grant the capability "
                    "with AmbientCapabilities=CAP_NET_RAW)"
                ) from None
        if mark:
            try:
                set_mark(sock, mark)
            except PermissionError:
                raise PrivilegeError(f"cannot listen on {where}: needs CAP_NET_RAW for SO_MARK") from None
        try:
            sock.bind((address, port))
            sock.listen(backlog)
        except OSError as e:
            raise TproxyError(f"cannot listen on {where}: {e.strerror}") from None
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def listener_mark(config: Config) -> int:
    """The SO_MARK of the TCP listeners and of the UDP reply socket: in tproxy mode ``routing.upstream_mark``, so
    that the client leg's outgoing packets (from an address of this host) are kept out of conntrack in raw output as
    its incoming ones are in raw prerouting (README, "What the rules do"); 0 in nat mode, whose REDIRECT needs
    conntrack on that leg."""
    return config.routing.upstream_mark if config.mode == "tproxy" else 0


def accepter(lsock: socket.socket) -> Callable[[], tuple[socket.socket, Any]]:
    """``lsock.accept`` without its per-call costs (two enum conversions, a default-timeout check): a function that
    accepts one connection and returns (socket, peer address). The socket is blocking, like ``accept()``'s, and has
    TCP_NODELAY when the listener has it (:func:`listener`).

    Error handling: raises OSError like ``accept()`` (BlockingIOError when nothing is pending).
    """
    raw = lsock._accept
    family, stype = raw_family(lsock), socket.SOCK_STREAM
    new = socket.socket

    def accept() -> tuple[socket.socket, Any]:
        fd, addr = raw()
        try:
            return new(family, stype, 0, fd), addr
        except BaseException:
            os.close(fd)
            raise

    return accept


def netns_cookie() -> int | None:
    """The cookie of the current network namespace: unique for the life of the kernel, never given to another
    namespace (its inode number is reused once it is freed); None on a kernel without ``SO_NETNS_COOKIE``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return None
    return struct.unpack("=Q", raw)[0] if len(raw) == 8 else None


def sockname(sock: socket.socket) -> tuple[str, int]:
    """The local (host, port); for IPv6 without flowinfo and scope."""
    a = sock.getsockname()
    return a[0], a[1]


def original_dst_tproxy(sock: socket.socket) -> tuple[str, int]:
    """Under TPROXY the packet is not rewritten: the accepted socket's local address is the original destination."""
    a = sock.getsockname()
    return a[0], a[1]


def original_dst_nat(sock: socket.socket) -> tuple[str, int]:
    """The pre-REDIRECT destination from conntrack (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).

    Raises OSError (ENOENT) when conntrack knows no such connection.
    """
    if raw_family(sock) == socket.AF_INET:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = _SOCKADDR_IN.unpack(raw[:16])
        return socket.inet_ntop(socket.AF_INET, addr), port
    raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port, addr = _SOCKADDR_IN6.unpack(raw[:28])
    return socket.inet_ntop(socket.AF_INET6, addr), port


def upstream_socket(
    family: int, *, transparent: bool, mark: int, source: tuple[str, int] | None, no_port: bool = False
) -> socket.socket:
    """A non-blocking TCP socket for the upstream leg, TCP_NODELAY set, bound to ``source`` when given.

    ``transparent``: IP_TRANSPARENT + SO_MARK (needed to bind the client's non-local address). ``no_port``: set
    IP_BIND_ADDRESS_NO_PORT so a port-0 bind leaves the port to connect(), which knows the whole 4-tuple.
    SO_REUSEADDR lets a chosen port be reused while an earlier leg on it sits in TIME_WAIT (connect() still refuses
    an exact duplicate 4-tuple with EADDRNOTAVAIL).

    Error handling: raises OSError (the socket closed) when an option or the bind fails.
    """
    sock = socket.socket(family, _STREAM_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NODELAY, 1)
        if source is not None:
            if transparent:
                level, opt = transparent_option(family)
                sock.setsockopt(level, opt, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if no_port:
                sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # SOL_IP on IPv6 sockets too (ip_setsockopt)
            sock.bind(source)
        return sock
    except BaseException:
        sock.close()
        raise


def is_connected(sock: socket.socket) -> bool:
    """Whether a non-blocking connect has completed already (the handshake with a local or nearby application often
    completes within ``connect()`` itself): one syscall instead of a wait for writability. False while in progress
    and after a failure."""
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def connect_error(sock: socket.socket) -> int:
    """The pending error of a non-blocking connect (0: connected)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


# Errnos meaning "this source address/port cannot be used", as opposed to "the upstream is unreachable".
PORT_TAKEN = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


class PortChooser:
    """Chooses upstream source ports so that the two legs of a connection never share a 5-tuple (DESIGN.md).

    The intercepted leg is ``client:Y -> dst:P``; an upstream leg ``client:X -> dst:P`` with ``X == Y`` is the same
    tuple. The server tells the chooser about every live intercepted connection (:meth:`add_intercepted` /
    :meth:`remove_intercepted`) and every live upstream port (:meth:`reserve` / :meth:`release`); :meth:`choose`
    returns a port in ``UPSTREAM_PORTS`` that is neither (random, so that ports are not reused at once), or None
    when every port is taken (the caller falls back).

    Resource handling: memory is one set entry per live connection; empty sets are dropped.
    """

    TRIES = 16

    def __init__(self, lo: int = UPSTREAM_PORTS[0], hi: int = UPSTREAM_PORTS[1], rng: random.Random | None = None):
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port range {lo}-{hi}")
        self.lo = lo
        self.hi = hi
        self._random = (rng or random.Random()).random  # (lo + int(random() * span): a third of randint's cost)
        self.intercepted: dict[tuple[str, str, int], set[int]] = {}  # (client ip, dst ip, dst port) -> client ports
        self.own: dict[str, set[int]] = {}  # client ip -> our live upstream source ports

    def add_intercepted(self, client: tuple[str, int], dst: tuple[str, int]) -> None:
        key = (client[0], dst[0], dst[1])
        ports = self.intercepted.get(key)
        if ports is None:
            self.intercepted[key] = {client[1]}
        else:
            ports.add(client[1])

    def remove_intercepted(self, client: tuple[str, int], dst: tuple[str, int]) -> None:
        key = (client[0], dst[0], dst[1])
        ports = self.intercepted.get(key)
        if ports is not None:
            ports.discard(client[1])
            if not ports:
                del self.intercepted[key]

    def choose(
        self, client_ip: str, dst: tuple[str, int], exclude: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        """A port for an upstream leg ``client_ip:port -> dst``: random, else the first free one; None when none is.

        ``exclude``: ports already tried for this connection. Does not reserve the port.
        """
        taken = self.intercepted.get((client_ip, dst[0], dst[1]), ())
        own = self.own.get(client_ip, ())
        rand, lo, hi = self._random, self.lo, self.hi
        span = hi - lo + 1
        for _ in range(self.TRIES):
            port = lo + int(rand() * span)
            if port not in taken and port not in own and port not in exclude:
                return port
        # crowded: walk the whole range once from a random point (rare; bounded by the range's size)
        start = lo + int(rand() * span)
        for port in itertools.chain(range(start, hi + 1), range(lo, start)):
            if port not in taken and port not in own and port not in exclude:
                return port
        return None

    def reserve(self, client_ip: str, port: int) -> None:
        own = self.own.get(client_ip)
        if own is None:
            self.own[client_ip] = {port}
        else:
            own.add(port)

    def release(self, client_ip: str, port: int) -> None:
        own = self.own.get(client_ip)
        if own is not None:
            own.discard(port)
            if not own:
                del self.own[client_ip]


# ----------------------------------------------------------------------------------------------------------------
# UDP


def udp_listener(family: int, address: str, port: int) -> socket.socket:
    """The UDP listener of one family: non-blocking, ``IP_TRANSPARENT`` (TPROXY hands datagrams only to a transparent
    socket), ``IP_RECVORIGDSTADDR`` so each datagram carries its original destination, V6ONLY for IPv6. Its receive
    buffer is raised to :data:`UDP_RCVBUF` where the process may (CAP_NET_ADMIN), else as far as ``rmem_max`` lets.

    Error handling: like :func:`listener` (PrivilegeError, TproxyError naming the address); closed on failure.
    """
    af = FAMILIES[family]
    sock = socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    where = f"udp [{address}]:{port}" if family == 6 else f"udp {address}:{port}"
    try:
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        try:
            set_transparent(sock)
        except PermissionError:
            raise PrivilegeError(f"cannot listen on {where}: needs CAP_NET_RAW for IP_TRANSPARENT") from None
        _raise_rcvbuf(sock, UDP_RCVBUF)
        try:
            sock.bind((address, port))
        except OSError as e:
            raise TproxyError(f"cannot listen on {where}: {e.strerror}") from None
        return sock
    except BaseException:
        sock.close()
        raise


def _raise_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)  # capped at net.core.rmem_max


_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: "ret #0", accept nothing


def raw_udp_socket(family: int, mark: int = 0) -> socket.socket:
    """A raw ``IPPROTO_UDP`` socket that sends UDP datagrams with a header we build (tproxy/udp.py) and a source given
    per datagram (``IP_PKTINFO`` / ``IPV6_PKTINFO``): replies to clients come from their original destination, with
    nothing bound to that address and port. ``IP_TRANSPARENT`` lets that source be any address. A raw socket would
    also receive a copy of every UDP datagram of the host: a filter accepting nothing keeps its queue empty. A
    non-zero ``mark`` is set as SO_MARK (:func:`listener_mark`: the replies stay out of conntrack).

    Error handling: raises OSError (PermissionError without CAP_NET_RAW); closed on failure.
    """
    sock = socket.socket(FAMILIES[family], socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.IPPROTO_UDP)
    try:
        set_transparent(sock)
        if mark:
            set_mark(sock, mark)
        program = ctypes.create_string_buffer(_DROP_ALL)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(program)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # (the kernel's minimum)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_RCVBUF)  # (capped at net.core.wmem_max)
        return sock
    except BaseException:
        sock.close()
        raise


def udp_upstream_socket(
    family: int, *, transparent: bool, mark: int, source: tuple[str, int] | None, target: tuple[str, int]
) -> socket.socket:
    """A non-blocking UDP socket (``family``: AF_INET / AF_INET6) for a session's upstream leg, bound to ``source``
    (the client's IP; with ``transparent``: IP_TRANSPARENT + SO_MARK) and connected to ``target``: the application's
    replies reach it by the fwmark path, and a connected socket receives nothing else. SO_REUSEADDR: one client port
    may have sessions to several destinations (the connected 4-tuples differ; the caller never makes two the same).

    Error handling: raises OSError (the socket closed) when an option, the bind or the connect fails.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        if source is not None:
            if transparent:
                level, opt = transparent_option(sock.family)
                sock.setsockopt(level, opt, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)
        sock.connect(target)
        return sock
    except BaseException:
        sock.close()
        raise


def udp_original_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination in a TPROXY'd datagram's ancillary data (``IP_ORIGDSTADDR``: a ``sockaddr_in``;
    ``IPV6_ORIGDSTADDR``: a ``sockaddr_in6``), or None when it carries none. Pure."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, addr = _SOCKADDR_IN.unpack(data[:16].ljust(16, b"\0"))
            return socket.inet_ntop(socket.AF_INET, addr), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port, addr = _SOCKADDR_IN6.unpack(data[:28].ljust(28, b"\0"))
            return socket.inet_ntop(socket.AF_INET6, addr), port
    return None


def pktinfo(family: int, source: str) -> tuple[int, int, bytes]:
    """The ancillary item that makes a raw socket's datagram leave from ``source`` (an address of this host).
    ``in_pktinfo``: ifindex 0, spec_dst = source, addr unused; ``in6_pktinfo``: addr = source, ifindex 0. Pure."""
    if family == 4 or family == socket.AF_INET:
        return SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, socket.inet_pton(socket.AF_INET, source), bytes(4))
    return SOL_IPV6, IPV6_PKTINFO, struct.pack("=16si", socket.inet_pton(socket.AF_INET6, source), 0)
