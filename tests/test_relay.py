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
ENGINES = ["shared", "tasks"]


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Every relay test runs against both engines (the tasks engine is the reference)."""
    return request.param


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
    """Relay ``legs`` in ``nursery``; the outcome is appended to ``done``. ``kw`` goes to :func:`relay`."""

    async def go() -> None:
        done.append(await relay(legs.a, legs.b, flow, stats, **kw))

    nursery.start_soon(go)


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_64mib_each_way_at_once(legs, path, engine):
    size = 64 << 20
    up, down = os.urandom(size), os.urandom(size)
    flow, stats, done = Flow(), Stats(), []
    results = {}

    async def recv(name, stream):
        results[name] = await receive_digest(stream)

    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine, use_splice=path == "splice")
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
async def test_half_close_app_answers_after_client_eof(legs, path, engine):
    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine, use_splice=path == "splice")
        await legs.client_s.send_all(b"question")
        await legs.client_s.send_eof()
        assert await receive_all(legs.app_s) == b"question"  # the app saw EOF: the write side was shut down
        await legs.app_s.send_all(b"answer after eof")  # the other direction still flows
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b"answer after eof"
    assert done == ["ok"]


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_half_close_client_keeps_sending_after_app_eof(legs, path, engine):
    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine, use_splice=path == "splice")
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
async def test_reset_is_propagated_as_reset(legs, path, who, engine):
    flow, stats, done = Flow(), Stats(), []
    resetter, other = (legs.client_s, legs.app_s) if who == "client" else (legs.app_s, legs.client_s)
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine, use_splice=path == "splice")
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
async def test_idle_timeout_closes_both_and_activity_postpones_it(legs, autojump_clock, engine):
    flow, stats, done = Flow(), Stats(), []
    ended = trio.Event()

    async def go():
        done.append(await relay(legs.a, legs.b, flow, stats, idle_timeout=10, engine=engine))
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
async def test_cancellation_mid_transfer_closes_in_flight_pipes(legs, engine):
    pipes = PipePool(keep=4)
    before = len(os.listdir("/proc/self/fd"))
    flow, stats = Flow(), Stats()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: relay(legs.a, legs.b, flow, stats, idle_timeout=60, engine=engine, pipes=pipes))
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
async def test_pipes_are_pooled_not_held_by_idle_connections(engine):
    pipes = PipePool(keep=8)
    stats = Stats()
    all_legs = [Legs() for _ in range(20)]
    try:
        async with trio.open_nursery() as n:
            for lg in all_legs:
                n.start_soon(
                    lambda lg=lg: relay(lg.a, lg.b, Flow(), stats, idle_timeout=60, engine=engine, pipes=pipes)
                )
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
async def test_splice_refused_falls_back_to_copy(legs, engine):
    class BrokenPipes(PipePool):
        def get(self):  # a "pipe" whose write end is a read end: splice() answers EBADF
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(w)
            return r, os.dup(r)

    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(
            n, legs, flow, stats, done, idle_timeout=60, engine=engine, pipes=BrokenPipes(keep=0), buffers=BufferPool()
        )
        await legs.client_s.send_all(b"up")
        await legs.client_s.send_eof()
        assert await receive_all(legs.app_s) == b"up"
        await legs.app_s.send_all(b"down")
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b"down"
    assert done == ["ok"]
    assert stats.relay_path == {"copy": 2}
    assert stats.splice_fallbacks == 2


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


# -- the shared epoll relay (the server's default): many flows, one task


def _shared_flows(n: int) -> tuple[list[Legs], list[Flow]]:
    all_legs = [Legs() for _ in range(n)]
    flows = []
    for lg in all_legs:
        flows.append(Flow(client=lg.a, upstream=lg.b))
    return all_legs, flows


@bounded
async def test_shared_relay_many_flows_exact_both_ways_one_task():
    stats, pipes = Stats(), PipePool(keep=8)
    all_legs, flows = _shared_flows(8)
    before = len(os.listdir("/proc/self/fd"))
    outcomes: list = []
    try:
        async with trio.open_nursery() as n:
            ep = relay_mod.SharedRelay(stats, n, pipes=pipes)

            async def conn_task(f: Flow) -> None:
                outcomes.append((f, await ep.splice(f)))

            for f in flows:
                n.start_soon(conn_task, f)
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
            while len(outcomes) < len(flows):
                await trio.sleep(0.01)
            assert ep.running  # the relay task stays for the next flow ...
            ep.close_when_empty()
        # ... and ends with the last one once asked to
        assert not ep.running
        ep.close()
        assert len(results) == 16 and all(got == want for got, want in results.values())
        assert sorted(id(f) for f, _ in outcomes) == sorted(map(id, flows))  # every connection task woken once
        assert {o for _, o in outcomes} == {"ok"}
        assert stats.relay_path == {"splice": 16}
        assert len(pipes.free) == pipes.created  # no pipe held once the flows ended
        pipes.close()
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        for lg in all_legs:
            lg.close()


@bounded
async def test_shared_relay_cancelled_ends_every_flow_once_and_abort_ends_one():
    stats = Stats()
    all_legs, flows = _shared_flows(3)
    ended: list = []
    try:
        async with trio.open_nursery() as n:
            ep = relay_mod.SharedRelay(stats, n)

            async def conn_task(f: Flow) -> None:
                try:
                    await ep.splice(f)
                finally:
                    ended.append(f)

            for f in flows:
                n.start_soon(conn_task, f)
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
        assert all(f.owner is None and f.task is None for f in flows)
    finally:
        for lg in all_legs:
            lg.close()


@bounded
async def test_a_cancelled_connection_task_ends_only_its_own_flow():
    """Cancelling the task that awaits splice() (the grace deadline, a connection's own scope) ends that flow, and
    the relay goes on for the others."""
    stats = Stats()
    all_legs, flows = _shared_flows(2)
    try:
        async with trio.open_nursery() as n:
            ep = relay_mod.SharedRelay(stats, n)
            scope = trio.CancelScope()

            async def cancelled_one() -> None:
                with scope:
                    await ep.splice(flows[0])

            n.start_soon(cancelled_one)
            n.start_soon(ep.splice, flows[1])
            await trio.testing.wait_all_tasks_blocked(0.05)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert flows[0].outcome == "cancelled" and flows[0].owner is None
            await all_legs[1].client_s.send_all(b"still here")
            assert await all_legs[1].app_s.receive_some(20) == b"still here"
            assert ep.count == 1
            n.cancel_scope.cancel()
        ep.close()
    finally:
        for lg in all_legs:
            lg.close()


# -- edge cases, both engines


@bounded
async def test_bytes_in_flight_at_idle_timeout_are_reported_lost(legs, engine, autojump_clock):
    """The application stops reading; the relay holds bytes it cannot deliver when the idle timeout ends the flow.
    The flow must say so (the server then closes with a reset, never a FIN after a stream with bytes missing)."""
    flow, stats = Flow(), Stats()
    legs.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.open_nursery() as n:
        n.start_soon(legs.client_s.send_all, b"q" * (4 << 20))
        outcome = await relay(legs.a, legs.b, flow, stats, idle_timeout=10, engine=engine)
        n.cancel_scope.cancel()
    assert outcome == "idle"
    assert flow.lost


@bounded
async def test_a_finished_flow_has_lost_nothing(legs, engine):
    flow, stats, done = Flow(), Stats(), []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine)
        await legs.client_s.send_all(b"x" * 100_000)
        await legs.client_s.send_eof()
        assert len(await receive_all(legs.app_s)) == 100_000
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b""
    assert done == ["ok"] and not flow.lost


@bounded
async def test_relay_path_counter_never_decreases_on_fallback(legs, engine):
    """Each direction is counted once, when it ends, by the path it ended on; a fallback is counted apart."""

    class BrokenPipes(PipePool):
        def get(self):
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(w)
            return r, os.dup(r)

    flow, stats, done = Flow(), Stats(), []
    seen: list[dict] = []
    async with trio.open_nursery() as n:
        run_relay(n, legs, flow, stats, done, idle_timeout=60, engine=engine, pipes=BrokenPipes(keep=0))
        for msg in (b"a", b"b"):
            seen.append(dict(stats.relay_path))
            await legs.client_s.send_all(msg)
            assert await legs.app_s.receive_some(10) == msg
        seen.append(dict(stats.relay_path))
        await legs.client_s.send_eof()
        await legs.app_s.send_eof()
        await receive_all(legs.client_s)
    seen.append(dict(stats.relay_path))
    for earlier, later in zip(seen, seen[1:], strict=False):
        assert all(later.get(k, 0) >= v for k, v in earlier.items()), seen
    assert stats.relay_path == {"copy": 2}
    assert stats.splice_fallbacks == 2


@pytest.mark.parametrize("path", PATHS)
@bounded
async def test_a_direction_whose_budget_ran_out_is_taken_up_again_without_a_new_event(legs, path, monkeypatch):
    """The shared engine moves a direction at most BUDGET times per turn, then queues it for the next turn: with
    edge-triggered epoll nothing else would ever wake it. Here the whole upload is already queued in the relay's
    socket when the flow starts and the client then sends nothing (no EOF), so no new event comes: every byte must
    still arrive. (Checked to fail, by timeout, when the exhausted direction is not queued again.)"""
    monkeypatch.setattr(relay_mod, "BUDGET", 1)
    monkeypatch.setattr(relay_mod, "PIPE_SIZE", 32 * 1024)  # bytes per splice: what a socket queues is ~160 KiB
    chunk = relay_mod.PIPE_SIZE if path == "splice" else relay_mod.COPY_SIZE  # moved per transfer at most
    payload = random.Random(5).randbytes(64 * chunk)
    sent = 0
    while sent < len(payload):  # fill the client -> relay queue before the relay looks at it
        try:
            sent += legs.client.send(payload[sent : sent + 65536])
        except BlockingIOError:
            break
    assert sent > 2 * chunk, f"only {sent} bytes queued: too few to exhaust the budget twice"
    stats, done = Stats(), []
    async with trio.open_nursery() as n:
        ep = relay_mod.SharedRelay(stats, n, use_splice=path == "splice")

        async def conn_task() -> None:
            done.append(await ep.splice(Flow(client=legs.a, upstream=legs.b, last=trio.current_time())))

        n.start_soon(conn_task)
        got = bytearray()
        while len(got) < sent:
            got += await legs.app_s.receive_some(1 << 20)
        assert bytes(got) == payload[:sent]
        await legs.client_s.send_eof()
        await legs.app_s.send_eof()
        assert await receive_all(legs.client_s) == b""
        while not done:
            await trio.sleep(0.01)
        ep.close_when_empty()
    ep.close()
    assert done == ["ok"] and stats.relay_path == {path: 2}
