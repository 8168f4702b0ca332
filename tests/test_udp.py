"""The pure parts of tproxy/udp.py and the UDP socket helpers of tproxy/sockets.py: the checksum (RFC 1071, IPv4 and
IPv6 pseudo-headers), the header, the original destination in ancillary data, IP_PKTINFO, and the raw socket that
receives nothing. The kernel path is tested end to end in tests/test_e2e_udp.py (a receiver drops a datagram whose
checksum is wrong, so those tests fail on a bad header too)."""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import struct

import pytest

from tproxy import log, sockets
from tproxy.udp import ones_complement_sum, udp_header


def reference_sum(data: bytes) -> int:
    """RFC 1071 as written: 16-bit big-endian words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def reference_checksum(src: str, dst: str, sport: int, dport: int, payload: bytes) -> int:
    """The UDP checksum from RFC 768 (IPv4 pseudo-header) / RFC 8200 8.1 (IPv6 pseudo-header), word by word."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    if a.version == 4:
        pseudo = a.packed + b.packed + bytes([0, 17]) + length.to_bytes(2, "big")
    else:
        pseudo = a.packed + b.packed + length.to_bytes(4, "big") + bytes([0, 0, 0, 17])
    header = struct.pack("!HHHH", sport, dport, length, 0)
    c = ~reference_sum(pseudo + header + payload) & 0xFFFF
    return c or 0xFFFF


def test_ones_complement_sum_matches_rfc_1071():
    assert ones_complement_sum(b"") == 0 and ones_complement_sum(bytes(10)) == 0
    # RFC 1071 section 3's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2
    assert ones_complement_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert ones_complement_sum(b"\xff\xff") == 0xFFFF and ones_complement_sum(b"\xff\xff\x00\x01") == 0x0001
    rng = random.Random(7)
    for size in (1, 2, 3, 7, 8, 1471, 1472, 8000, 65507):
        data = rng.randbytes(size)
        assert ones_complement_sum(data) == reference_sum(data), size


@pytest.mark.parametrize(
    "src, dst",
    [("198.18.0.2", "198.18.0.1"), ("10.0.0.1", "192.0.2.200"), ("fd00:18::2", "fd00:18::1"), ("::1", "fe80::1")],
)
def test_header_checksum_over_the_pseudo_header(src, dst):
    family = ipaddress.ip_address(src).version
    rng = random.Random(3)
    for size in (0, 1, 2, 1472, 8000, 65507):
        payload = rng.randbytes(size)
        head = udp_header(src, dst, 53, 40000, payload, family)
        sport, dport, length, checksum = struct.unpack("!HHHH", head)
        assert (sport, dport, length) == (53, 40000, 8 + size)
        assert checksum == reference_checksum(src, dst, 53, 40000, payload), (src, size)


def test_ipv6_pseudo_header_is_not_ipv4s():
    """The same payload between IPv6 addresses whose bytes an IPv4 pseudo-header would sum alike: RFC 8200's layout
    (32-bit length, next header last) gives the checksum the receiver checks."""
    payload = b"x" * 11
    head = udp_header("fd00::2", "fd00::1", 5353, 1234, payload, 6)
    assert struct.unpack("!H", head[6:])[0] == reference_checksum("fd00::2", "fd00::1", 5353, 1234, payload)
    # verified the way a receiver does: the sum over pseudo-header, header and payload is all ones
    pseudo = socket.inet_pton(socket.AF_INET6, "fd00::2") + socket.inet_pton(socket.AF_INET6, "fd00::1")
    pseudo += struct.pack("!I3xB", 19, 17)
    assert reference_sum(pseudo + head + payload) == 0xFFFF


def test_a_zero_checksum_is_sent_as_all_ones():
    """0 means "no checksum" on the wire (and is invalid for IPv6): a computed 0 goes out as 0xffff. Find a payload
    whose checksum computes to 0 and check."""
    base = b"\0\0"
    c = reference_checksum("198.18.0.2", "198.18.0.1", 1, 2, base)
    # adjust the payload so the complement sum becomes 0xffff (checksum 0): add the missing amount
    partial = ~c & 0xFFFF  # the sum the payload gave
    fix = (0xFFFF - partial) % 0xFFFF
    payload = fix.to_bytes(2, "big")
    head = udp_header("198.18.0.2", "198.18.0.1", 1, 2, payload, 4)
    assert struct.unpack("!H", head[6:])[0] == 0xFFFF


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", 0)
    )


def test_original_destination_from_ancillary_data():
    v4 = [(sockets.SOL_IP, sockets.IP_RECVORIGDSTADDR, sockaddr_in("198.18.0.2", 5353))]
    assert sockets.udp_original_dst(v4) == ("198.18.0.2", 5353)
    v6 = [(sockets.SOL_IPV6, sockets.IPV6_RECVORIGDSTADDR, sockaddr_in6("fd00:18::2", 53))]
    assert sockets.udp_original_dst(v6) == ("fd00:18::2", 53)
    other = [(sockets.SOL_IP, sockets.IP_PKTINFO, bytes(12)), (socket.SOL_SOCKET, 29, bytes(16))]
    assert sockets.udp_original_dst(other) is None
    assert sockets.udp_original_dst(other + v4) == ("198.18.0.2", 5353)
    assert sockets.udp_original_dst([]) is None
    assert sockets.udp_original_dst([(sockets.SOL_IP, sockets.IP_RECVORIGDSTADDR, b"\x02\x00")]) is None  # short


def test_pktinfo_puts_the_source_where_the_kernel_reads_it():
    level, kind, data = sockets.pktinfo(4, "198.18.0.2")
    assert (level, kind, len(data)) == (socket.IPPROTO_IP, 8, 12)  # struct in_pktinfo: ifindex, spec_dst, addr
    assert data[4:8] == socket.inet_pton(socket.AF_INET, "198.18.0.2") and data[:4] == bytes(4)
    level, kind, data = sockets.pktinfo(6, "fd00:18::2")
    assert (level, kind, len(data)) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, 20)  # in6_pktinfo: addr, ifindex
    assert data[:16] == socket.inet_pton(socket.AF_INET6, "fd00:18::2") and data[16:] == bytes(4)


@pytest.mark.root
def test_the_raw_reply_socket_receives_nothing():
    """A raw IPPROTO_UDP socket gets a copy of every UDP datagram of the host; ours filters them all out, so its
    queue never fills (checked over loopback: a plain raw socket next to it does receive the datagram)."""
    ours = sockets.raw_udp_socket(4)
    plain = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    plain.settimeout(2)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"hello raw", rx.getsockname())
        while True:
            packet = plain.recv(65535)
            if packet.endswith(b"hello raw"):
                break
        with pytest.raises(BlockingIOError):
            ours.recv(65535)
    finally:
        for s in (ours, plain, rx, tx):
            s.close()


# ----------------------------------------------------------------------------------------------------------------
# The relay in-process, over loopback (root: the raw reply socket). The datagrams are handed to it as the listener
# would (client address, original destination in the ancillary data); the replies travel for real, through the raw
# socket with our header and the destination's address as source, to a client socket connected to the application.


ENGINES = pytest.mark.parametrize("engine", ["shared", "tasks"])  # proxy.relay: who reads the application's replies


def relay_config(**proxy):
    from tproxy.config import Config

    return Config.from_dict({"intercept": {"ports": [8080], "udp_ports": [53]}, "proxy": proxy})


async def start_echo(nursery):
    import trio

    app = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await app.bind(("127.0.0.1", 0))

    async def serve():
        while True:
            data, peer = await app.recvfrom(65536)
            await app.sendto(f"{peer[1]} ".encode() + data, peer)

    nursery.start_soon(serve)
    return app.getsockname()


def hand_over(relay, client, dst, data):
    relay._datagram(4, data, [(sockets.SOL_IP, sockets.IP_RECVORIGDSTADDR, sockaddr_in(*dst))], client)


@pytest.mark.root
@ENGINES
async def test_relay_round_trip_from_a_chosen_port_with_the_destination_as_source(engine):
    import trio

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    stats = Stats()
    async with trio.open_nursery() as outer:
        dst = await start_echo(outer)
        relay = UdpRelay(relay_config(relay=engine), [], stats, mark=0, port_start=1024)
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accepts:
                await relay.start(accepts, conns)
                assert relay._ep is None  # (the shared reply reader comes with the first session)
                client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await client.bind(("127.0.0.1", 0))
                await client.connect(dst)  # accepts only what comes from the application's address
                caddr = client.getsockname()
                for payload in (b"", b"x", os.urandom(8000)):
                    hand_over(relay, caddr, dst, payload)
                    with trio.fail_after(5):
                        reply = await client.recv(65536)
                    port, _, echoed = reply.partition(b" ")
                    assert echoed == payload
                    assert int(port) != caddr[1] and 1024 <= int(port) <= 32767  # never the client's own port
                assert len(relay.sessions) == 1 and stats.udp_sessions == 1
                assert (stats.udp_datagrams_in, stats.udp_datagrams_out) == (3, 3)
                assert stats.udp_bytes_in == 8001 and stats.udp_bytes_out == 8001 + 3 * len(port + b" ")
                accepts.cancel_scope.cancel()
            relay.close()
        assert stats.udp_sessions_open == 0 and not relay.sessions
        outer.cancel_scope.cancel()


@pytest.mark.root
@ENGINES
async def test_relay_max_sessions_idle_expiry_and_loopback_ports(engine):
    import trio

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    stats = Stats()
    async with trio.open_nursery() as outer:
        app = await start_echo(outer)
        # the client asked 127.0.0.3 (any local address); the loopback target is 127.0.0.1, where the application is
        dst = ("127.0.0.3", app[1])
        config = relay_config(udp_max_sessions=2, udp_idle_timeout=0.3, upstream="loopback", relay=engine)
        relay = UdpRelay(config, [], stats, mark=0, port_start=1024)
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accepts:
                await relay.start(accepts, conns)
                hand_over(relay, ("127.0.0.2", 40001), dst, b"a")
                hand_over(relay, ("127.0.0.2", 500), dst, b"b")
                hand_over(relay, ("127.0.0.2", 40002), dst, b"c")  # a third flow: dropped, the two live ones kept
                assert stats.udp_dropped["max_sessions"] == 1 and len(relay.sessions) == 2
                ports = {client[1]: s.usrc[1] for (client, _dst), s in relay.sessions.items()}
                assert ports[40001] == 40001  # loopback: the client's own port
                assert ports[500] != 500 and ports[500] >= 1024  # below ip_unprivileged_port_start: a chosen one
                hand_over(relay, ("127.0.0.2", 40001), dst, b"again")  # the same session
                assert stats.udp_sessions == 2
                with trio.fail_after(5):
                    while relay.sessions:
                        await trio.sleep(0.05)
                assert stats.udp_sessions_open == 0
                hand_over(relay, ("127.0.0.2", 40002), dst, b"c")  # room again: a new session
                assert stats.udp_sessions == 3 and len(relay.sessions) == 1
                accepts.cancel_scope.cancel()
            relay.close()
        outer.cancel_scope.cancel()


async def start_talker(nursery, count: int, interval: float, every: int = 1):
    """An application that answers a client's first datagram with ``count`` numbered datagrams (``000000``, ...),
    pausing ``interval`` seconds after every ``every`` of them (replies only: the client sends nothing more)."""
    import trio

    app = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await app.bind(("127.0.0.1", 0))

    async def serve():
        _data, peer = await app.recvfrom(65536)
        for i in range(count):
            await app.sendto(b"%06d" % i, peer)
            if i % every == every - 1:
                await trio.sleep(interval)

    nursery.start_soon(serve)
    return app.getsockname()


@pytest.mark.root
@ENGINES
async def test_datagrams_either_way_keep_a_session_and_it_expires_the_timeout_after_the_last(engine):
    """Expiry is counted from the latest datagram in either direction: client datagrams alone, then the
    application's alone, each spaced under the timeout, keep one session; it ends a timeout after the last one."""
    import trio

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    idle = 0.4
    stats = Stats()
    async with trio.open_nursery() as outer:
        echo = await start_echo(outer)
        talker = await start_talker(outer, count=8, interval=0.15)
        relay = UdpRelay(relay_config(udp_idle_timeout=idle, relay=engine), [], stats, mark=0, port_start=1024)
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accepts:
                await relay.start(accepts, conns)
                client = ("127.0.0.1", 40100)
                for _ in range(8):  # client -> application, 1.2 s in all
                    hand_over(relay, client, echo, b"ping")
                    await trio.sleep(0.15)
                assert stats.udp_sessions == 1 and len(relay.sessions) == 1
                hand_over(relay, client, talker, b"go")  # application -> client from now on
                with trio.fail_after(5):
                    while stats.udp_datagrams_out < 8 + 8:
                        await trio.sleep(0.01)
                last_reply = trio.current_time()
                assert stats.udp_sessions == 2 and (client, talker) in relay.sessions  # replies alone kept it 1 s
                with trio.fail_after(5):
                    while relay.sessions:
                        await trio.sleep(0.01)
                assert trio.current_time() - last_reply >= idle - 0.05
                assert stats.udp_sessions == 2 and stats.udp_sessions_open == 0
                accepts.cancel_scope.cancel()
            relay.close()
        outer.cancel_scope.cancel()


@pytest.mark.root
@ENGINES
async def test_a_reload_shortens_the_idle_timeout_of_live_sessions_at_once(engine):
    import trio

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    stats = Stats()
    async with trio.open_nursery() as outer:
        echo = await start_echo(outer)
        relay = UdpRelay(relay_config(udp_idle_timeout=600, relay=engine), [], stats, mark=0, port_start=1024)
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accepts:
                await relay.start(accepts, conns)
                hand_over(relay, ("127.0.0.1", 40200), echo, b"ping")
                await trio.sleep(0.2)
                relay.apply_settings(relay_config(udp_idle_timeout=0.3, relay=engine))
                with trio.fail_after(3):  # not 600 s, and not waiting for a next datagram
                    while relay.sessions:
                        await trio.sleep(0.01)
                assert stats.udp_sessions == 1 and stats.udp_sessions_open == 0
                accepts.cancel_scope.cancel()
            relay.close()
        outer.cancel_scope.cancel()


@pytest.mark.root
@ENGINES
async def test_a_stream_of_replies_arrives_whole_and_in_order(engine):
    """2,000 replies to one datagram, queued faster than they are read, reach the client all and in their order:
    the shared reader's bursts take several from one socket in a turn and must neither skip nor repeat any."""
    import trio

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    count = 2000
    stats = Stats()
    async with trio.open_nursery() as outer:
        # back to back, a short pause every 64: they queue up in the upstream socket's receive buffer faster than one
        # read per turn would take them (the client's and the upstream socket's receive buffers stay ahead)
        app = await start_talker(outer, count, 0.001, every=64)
        relay = UdpRelay(relay_config(relay=engine), [], stats, mark=0, port_start=1024)
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accepts:
                await relay.start(accepts, conns)
                client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                await client.bind(("127.0.0.1", 0))
                await client.connect(app)
                hand_over(relay, client.getsockname(), app, b"go")
                got = []
                with trio.fail_after(10):
                    while len(got) < count:
                        got.append(await client.recv(64))
                assert got == [b"%06d" % i for i in range(count)]
                assert stats.udp_datagrams_out == count and not any(stats.udp_dropped.values())
                accepts.cancel_scope.cancel()
            relay.close()
        outer.cancel_scope.cancel()


@pytest.mark.root
@ENGINES
async def test_an_icmp_refusal_ends_the_session_at_once_and_a_new_datagram_opens_another(engine, caplog):
    """Nothing listens on the destination port: the kernel answers the first datagram with ICMP port unreachable,
    the upstream socket reports ECONNREFUSED, and the session ends (``refused``) long before its idle timeout; the
    next datagram of the same flow opens a new session."""

    from tproxy.stats import Stats
    from tproxy.udp import UdpRelay

    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dst = closed.getsockname()
    closed.close()  # (a port nobody holds now)
    stats = Stats()
    relay = UdpRelay(relay_config(udp_idle_timeout=600, relay=engine), [], stats, mark=0, port_start=1024)
    caplog.set_level(logging.INFO, logger=log.LOGGER_NAME)
    handler = None if log.logger.propagate else caplog.handler  # (tproxy.log.setup stops propagation)
    if handler is not None:
        log.logger.addHandler(handler)
    try:
        await refuse_twice(relay, stats, dst)
    finally:
        if handler is not None:
            log.logger.removeHandler(handler)
    reasons = [r.fields["reason"] for r in caplog.records if r.getMessage() == "udp_session"]
    assert reasons == ["refused", "refused"]


async def refuse_twice(relay, stats, dst):
    import trio

    async with trio.open_nursery() as conns:
        async with trio.open_nursery() as accepts:
            await relay.start(accepts, conns)
            client = ("127.0.0.1", 40300)
            for n in (1, 2):
                hand_over(relay, client, dst, b"anyone?")
                assert stats.udp_sessions == n and len(relay.sessions) == 1
                with trio.fail_after(5):  # not 600 s
                    while relay.sessions:
                        await trio.sleep(0.01)
                assert stats.udp_sessions_open == 0
            assert relay._by_fd == {}
            accepts.cancel_scope.cancel()
        relay.close()
