"""The relay over real loopback TCP connections: exactness, half-close, resets, idle timeout, both paths, no leaks.

Each test builds two connected pairs, ``client <-> a`` and ``b <-> app``, and relays between ``a`` and ``b`` as the
server would; the test plays the client and the application on the outer ends.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import socket

import pytest
import trio
import trio.testing

from tests.trio_helpers import bounded
from tproxy import relay as relay_mod
from tproxy.relay import BufferPool, Flow, PipePool, relay
from tproxy.sockets import set_reset_on_close
from tproxy.stats import Stats

PATHS = ["splice", "copy"]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair, both ends non-blocking."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
    for x in (c, s):
        x.setblocking(False)
    return c, s


class Legs:
    """client <-> a (relay) b <-> app; the relay's sockets are ``a`` and ``b``."""

    def __init__(self) -> None:
        self.client, self.a = tcp_pair()
        self.b, self.app = tcp_pair()
        self.client_s = trio.SocketStream(trio.socket.from_stdlib_socket(self.client))
        self.app_s = trio.SocketStream(trio.socket.from_stdlib_socket(self.app))

    def close(self) -> None:
        for s in (self.client_s.socket, self.app_s.socket, self.a, self.b):
            s.close()


@pytest.fixture
async def legs():
    lg = Legs()
    yield lg
    lg.close()


async def send_random(stream: trio.SocketStream, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    view = memoryview(data)
    off = 0
    while off < len(view):
        n = rng.choice((1, 7, 1000, 65536, 300_000))
        await stream.send_all(view[off : off + n])
        off += n
    await stream.send_eof()


async def receive_digest(stream: trio.SocketStream) -> tuple[int, bytes]:
    h = hashlib.sha256()
    total = 0
    while chunk := await stream.receive_some(1 << 20):
        h.update(chunk)
        total += len(chunk)
    return total, h.digest()


async def receive_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


def run_relay(nursery: trio.Nursery, legs: Legs, flow: Flow, stats: Stats, done: list, **kw) -> None:
    async def go() -> None:
        done.append(await relay(legs.a, legs.b, flow, stats, **kw))

    nursery.start_soon(go)


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_64mib_each_way_at_once(legs, path):
    size = 64 << 20
    up, down = os.urandom(size), os.urandom(size)
    flow, stats, done = Flow(), Stats(), []
    results = {}

    async def recv(name, stream):
        results[name] = await receive_digest(stream)

    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, use_splice=path == "splice")
        n.start_soon(send_random, legs.client_s, up, 1)
        n.start_soon(send_random, legs.app_s, down, 2)
        n.start_soon(recv, "app", legs.app_s)
        n.start_soon(recv, "client", legs.client_s)
    assert results["app"] == (size, hashlib.sha256(up).digest())
    assert results["client"] == (size, hashlib.sha256(down).digest())
    assert done == ["ok"]
    assert (flow.bytes_in, flow.bytes_out) == (size, size)
    assert (stats.bytes_in, stats.bytes_out) == (size, size)
    assert stats.relay_path == {path: 2}


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_half_close_app_answers_after_client_eof(legs, path):
    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, use_splice=path == "splice")
        await legs.client_s.send_all(b"question")
        await legs.client_s.send_eof()
        assert await receive_all(legs.app_s) == b"question"  # the app saw EOF: the write side was shut down
        await legs.app_s.send_all(b"answer after eof")  # the other direction still flows
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b"answer after eof"
    assert done == ["ok"]


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_half_close_client_keeps_sending_after_app_eof(legs, path):
    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, use_splice=path == "splice")
        await legs.app_s.send_all(b"banner")
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b"banner"
        await legs.client_s.send_all(b"late data")
        await legs.client_s.send_eof()
        assert await receive_all(legs.app_s) == b"late data"
    assert done == ["ok"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("who", ["client", "app"])
@bounded
async def test_reset_is_propagated_as_reset(legs, path, who):
    flow, stats, done = Flow(), Stats(), []
    resetter, other = (legs.client_s, legs.app_s) if who == "client" else (legs.app_s, legs.client_s)
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, use_splice=path == "splice")
        await resetter.send_all(b"x")
        assert await other.receive_some(10) == b"x"
        set_reset_on_close(resetter.socket)
        resetter.socket.close()
    assert done == ["reset"]
    assert flow.error is not None and flow.error.errno in (errno.ECONNRESET, errno.EPIPE)
    # the server closes both legs with SO_LINGER 0 after a reset; the other peer must see a reset, not EOF
    set_reset_on_close(legs.a)
    set_reset_on_close(legs.b)
    legs.a.close()
    legs.b.close()
    with pytest.raises(trio.BrokenResourceError) as info:
        await other.receive_some(10)
    assert isinstance(info.value.__cause__, ConnectionResetError)


@bounded
async def test_idle_timeout_closes_both_and_activity_postpones_it(legs, autojump_clock):
    flow, stats, done = Flow(), Stats(), []
    ended = trio.Event()

    async def go():
        done.append(await relay(legs.a, legs.b, flow, stats, idle_timeout=10))
        done.append(trio.current_time())
        ended.set()

    async with trio.open_nursery() as n:
        n.start_soon(go)
        await trio.sleep(8)
        await legs.client_s.send_all(b"ping")  # activity at t=8: the deadline moves to t>=18
        assert await legs.app_s.receive_some(10) == b"ping"
        last = trio.current_time()
        await trio.sleep(9)  # t=17: 9 s after the last byte, not idle yet
        assert not ended.is_set()
        await ended.wait()
    assert done[0] == "idle"
    assert done[1] - last >= 10
    assert done[1] - last < 10 + relay_mod.idle_tick(10) + 0.5  # checked every tick


@bounded
async def test_cancellation_mid_transfer_closes_in_flight_pipes(legs):
    pipes = PipePool(keep=4)
    before = len(os.listdir("/proc/self/fd"))
    flow, stats = Flow(), Stats()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: relay(legs.a, legs.b, flow, stats, idle_timeout=60, pipes=pipes))
            # fill the path towards the app, which never reads: the relay ends up holding a full pipe
            data = b"z" * (8 << 20)
            n.start_soon(legs.client_s.send_all, data)
            while flow.bytes_in < 1 << 20:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert pipes.created >= 1
            scope.cancel()
    # the pipe that still held bytes was closed, not pooled; the pooled ones close with the pool
    pipes.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert flow.outcome == "cancelled"


@bounded
async def test_pipes_are_pooled_not_held_by_idle_connections():
    pipes = PipePool(keep=8)
    stats = Stats()
    all_legs = [Legs() for _ in range(20)]
    try:
        async with trio.open_nursery() as n:
            for lg in all_legs:
                n.start_soon(lambda lg=lg: relay(lg.a, lg.b, Flow(), stats, idle_timeout=60, pipes=pipes))
            for lg in all_legs:  # one exchange each, one after the other
                await lg.client_s.send_all(b"hello")
                assert await lg.app_s.receive_some(10) == b"hello"
            await trio.testing.wait_all_tasks_blocked(0.05)
            # 20 connections, 40 directions, all idle now: no pipe is held, and the pool reused one or two
            assert pipes.created <= 2
            assert len(pipes.free) == pipes.created
            n.cancel_scope.cancel()
    finally:
        for lg in all_legs:
            lg.close()
        pipes.close()


@bounded
async def test_splice_refused_falls_back_to_copy(legs):
    class BrokenPipes(PipePool):
        def get(self):  # a "pipe" whose write end is a read end: splice() answers EBADF
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(w)
            return r, os.dup(r)

    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, pipes=BrokenPipes(keep=0), buffers=BufferPool())
        await legs.client_s.send_all(b"up")
        await legs.client_s.send_eof()
        assert await receive_all(legs.app_s) == b"up"
        await legs.app_s.send_all(b"down")
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b"down"
    assert done == ["ok"]
    assert stats.relay_path == {"copy": 2}


def test_pipe_pool_reuses_and_bounds():
    pool = PipePool(keep=2)
    before = len(os.listdir("/proc/self/fd"))
    a, b, c = pool.get(), pool.get(), pool.get()
    assert pool.created == 3
    assert fcntl.fcntl(a[1], fcntl.F_GETPIPE_SZ) == relay_mod.PIPE_SIZE
    for x in (a, b, c):
        pool.put(x)
    assert pool.free == [a, b]  # the third was closed
    assert len(os.listdir("/proc/self/fd")) == before + 4
    assert pool.get() == b
    pool.put(b)
    assert pool.created == 3
    pool.close()
    assert len(os.listdir("/proc/self/fd")) == before


# -- the shared epoll relay (the server's form): many flows, one task


def _shared_flows(n: int) -> tuple[list[Legs], list[Flow], list[Flow]]:
    all_legs = [Legs() for _ in range(n)]
    flows, ended = [], []
    for lg in all_legs:
        f = Flow()
        f.client, f.upstream, f.on_done = lg.a, lg.b, ended.append
        flows.append(f)
    return all_legs, flows, ended


@bounded
async def test_epoll_relay_many_flows_exact_both_ways_one_task():
    stats, pipes = Stats(), PipePool(keep=8)
    all_legs, flows, ended = _shared_flows(8)
    before = len(os.listdir("/proc/self/fd"))
    try:
        async with trio.open_nursery() as n:
            ep = relay_mod.EpollRelay(stats, n, pipes=pipes)
            for f in flows:
                ep.add(f)
            results: dict = {}

            async def one(i: int, lg: Legs) -> None:
                up = random.Random(i).randbytes(300_000 + i * 7919)
                down = random.Random(-i).randbytes(200_000 + i * 104729)
                async with trio.open_nursery() as m:
                    m.start_soon(send_random, lg.client_s, up, i)
                    m.start_soon(send_random, lg.app_s, down, -i)

                    async def rx_app() -> None:
                        results[i, "up"] = (await receive_digest(lg.app_s), (len(up), hashlib.sha256(up).digest()))

                    async def rx_client() -> None:
                        got = await receive_digest(lg.client_s)
                        results[i, "down"] = (got, (len(down), hashlib.sha256(down).digest()))

                    m.start_soon(rx_app)
                    m.start_soon(rx_client)

            async with trio.open_nursery() as m:
                for i, lg in enumerate(all_legs):
                    m.start_soon(one, i, lg)
            assert ep.running  # the task stays for the next flow ...
            ep.close_when_empty()
        # ... and ends with the last one once asked to
        assert not ep.running
        ep.close()
        assert len(results) == 16 and all(got == want for got, want in results.values())
        assert sorted(map(id, ended)) == sorted(map(id, flows))  # on_done once per flow
        assert all(f.outcome is None for f in flows)
        assert stats.relay_path == {"splice": 16}
        assert len(pipes.free) == pipes.created  # no pipe held once the flows ended
        pipes.close()
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        for lg in all_legs:
            lg.close()


@bounded
async def test_epoll_relay_cancelled_ends_every_flow_once_and_abort_ends_one():
    stats = Stats()
    all_legs, flows, ended = _shared_flows(3)
    try:
        async with trio.open_nursery() as n:
            ep = relay_mod.EpollRelay(stats, n)
            for f in flows:
                ep.add(f)
            await all_legs[0].client_s.send_all(b"ping")
            assert await all_legs[0].app_s.receive_some(10) == b"ping"
            relay_mod.abort(flows[1], "idle")
            relay_mod.abort(flows[1], "reset")  # the first outcome sticks
            while ended != [flows[1]]:
                await trio.sleep(0.01)
            # the aborted flow relays nothing more; the others go on
            await all_legs[1].client_s.send_all(b"never relayed")
            await all_legs[2].client_s.send_all(b"pong")
            assert await all_legs[2].app_s.receive_some(10) == b"pong"
            n.cancel_scope.cancel()
        ep.close()
        assert ended[0] is flows[1] and sorted(map(id, ended)) == sorted(map(id, flows))
        assert [f.outcome for f in flows] == ["cancelled", "idle", "cancelled"]
        assert flows[1].bytes_in == 0 and flows[0].bytes_in == 4 and flows[2].bytes_in == 4
    finally:
        for lg in all_legs:
            lg.close()
