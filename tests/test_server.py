"""The server over loopback, without kernel rules: the original destination is injected (it points at a loopback
application), everything else is the real thing: listeners, accept loops, upstream connect, relay, limits, drain.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import socket

import pytest
import trio
import trio.testing

from tests.trio_helpers import bounded
from tproxy import log, sockets
from tproxy import proxy_protocol as pp
from tproxy.config import Config
from tproxy.relay import PipePool
from tproxy.server import Server
from tproxy.stats import State, Stats

ENGINE = "shared"  # set per test by the engine fixture: every server test runs on both relay engines


@pytest.fixture(autouse=True, params=["shared", "tasks"])
def engine(request, monkeypatch) -> str:
    monkeypatch.setattr(f"{__name__}.ENGINE", request.param)
    return request.param


def make_config(**proxy) -> Config:
    proxy = {"preserve_source": False, "relay": ENGINE, **proxy}
    doc = {"mode": "nat", "intercept": {"ports": [3000], "ipv6": False}, "proxy": proxy}
    return Config.from_dict(doc)


@pytest.fixture
def log_lines():
    """Capture the tproxy log as JSON objects."""
    buf = io.StringIO()
    log.setup("debug", "json", stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    log.setup("info", "text")


async def echo_app(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def eof_app(stream: trio.SocketStream) -> None:
    """Reads until EOF, then answers with the SHA-256 of what it read."""
    h = hashlib.sha256()
    while data := await stream.receive_some(65536):
        h.update(data)
    await stream.send_all(h.hexdigest().encode())


async def start_app(nursery: trio.Nursery, handler, host: str = "127.0.0.1") -> tuple[str, int]:
    async def wrapped(stream):
        async with stream:
            try:
                await handler(stream)
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, wrapped, 0, host=host))
    return listeners[0].socket.getsockname()[:2]


async def start_proxy(nursery, config, dst, *, family=4, host="127.0.0.1", **kw) -> tuple[Server, Stats, State]:
    lsock = sockets.listener(family, host, 0, transparent=False)
    stats, state = Stats(), State()
    original = dst if callable(dst) else (lambda s: dst)
    server = Server(config, [lsock], stats, state, original_dst=original, **kw)
    await nursery.start(server.serve)
    return server, stats, state


async def stop(server: Server, nursery: trio.Nursery) -> None:
    """Shut the proxy down, wait until every connection has ended, then stop the applications."""
    server.shutdown()
    await server.stopped.wait()
    nursery.cancel_scope.cancel()


async def connect(server: Server) -> trio.SocketStream:
    host, port = server.addresses[0]
    return await trio.open_tcp_stream(host, port)


async def exchange(stream: trio.SocketStream, data: bytes) -> bytes:
    async with trio.open_nursery() as n:

        async def send():
            await stream.send_all(data)
            await stream.send_eof()

        n.start_soon(send)
        out = bytearray()
        while chunk := await stream.receive_some(1 << 20):
            out += chunk
    return bytes(out)


async def expect_reset(stream: trio.SocketStream) -> None:
    with pytest.raises(trio.BrokenResourceError) as info:
        while await stream.receive_some(100):
            pass
    assert isinstance(info.value.__cause__, ConnectionResetError)


async def expect_reset_at_connect(server: Server) -> None:
    """Connect and see a reset, not a clean end. The proxy opens a connection as soon as it accepts it, so the reset
    can come before our own connect() has returned: either way counts, an orderly close does not."""
    with trio.socket.socket() as sock:
        try:
            await sock.connect(server.addresses[0])
        except ConnectionResetError:
            return
        with pytest.raises(ConnectionResetError):
            while await sock.recv(100):
                pass


@bounded
@pytest.mark.parametrize("use_splice", [True, False])
async def test_proxies_and_logs_one_line_per_connection(log_lines, use_splice):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, state = await start_proxy(n, make_config(), app, use_splice=use_splice)
        assert state.listening
        data = os.urandom(3 << 20)
        async with await connect(server) as s:
            assert await exchange(s, data) == data
            client = s.socket.getsockname()
        while stats.open:
            await trio.sleep(0.01)
        await stop(server, n)
    assert stats.accepted == 1 and stats.closed == {"ok": 1}
    assert (stats.bytes_in, stats.bytes_out) == (len(data), len(data))
    assert stats.relay_path == {"splice" if use_splice else "copy": 2}
    conns = [e for e in log_lines() if e["event"] == "connection"]
    assert len(conns) == 1
    line = conns[0]
    assert line["client"] == f"{client[0]}:{client[1]}"
    assert line["original_dst"] == f"{app[0]}:{app[1]}"
    assert line["upstream_src"].startswith("127.0.0.1:")
    assert (line["bytes_in"], line["bytes_out"], line["outcome"]) == (len(data), len(data), "ok")
    assert line["duration_ms"] >= 0
    assert not state.listening


@bounded
async def test_an_upstream_still_connecting_is_waited_for_then_relayed(monkeypatch, log_lines):
    # A local application answers inside connect(); a remote one does not, and the connection then waits in a task
    # of its own. Make every connect look unfinished to take that path here.
    monkeypatch.setattr(sockets, "is_connected", lambda sock: False)
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(), app)
        for i in range(3):
            async with await connect(server) as s:
                assert await exchange(s, b"slow upstream %d" % i) == b"slow upstream %d" % i
        await stop(server, n)
    assert stats.closed == {"ok": 3} and stats.connect_errors == {}
    conns = [e for e in log_lines() if e["event"] == "connection"]
    assert [e["outcome"] for e in conns] == ["ok"] * 3
    assert all(e["upstream_src"].startswith("127.0.0.1:") for e in conns)


@bounded
async def test_ipv6_listener_and_upstream():
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app, host="::1")
        cfg = Config.from_dict(
            {"mode": "nat", "intercept": {"ports": [3000], "ipv4": False}, "proxy": {"preserve_source": False}}
        )
        server, stats, _ = await start_proxy(n, cfg, app, family=6, host="::1")
        async with await connect(server) as s:
            assert await exchange(s, b"over ipv6") == b"over ipv6"
        await stop(server, n)
    assert stats.closed == {"ok": 1}


@bounded
async def test_half_close_application_answers_after_eof():
    async with trio.open_nursery() as n:
        app = await start_app(n, eof_app)
        server, stats, _ = await start_proxy(n, make_config(), app)
        data = os.urandom(1 << 20)
        async with await connect(server) as s:
            assert await exchange(s, data) == hashlib.sha256(data).hexdigest().encode()
        await stop(server, n)
    assert stats.closed == {"ok": 1}


@bounded
async def test_refused_upstream_resets_the_client(log_lines):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()  # nothing listens here once closed
    async with trio.open_nursery() as n:
        server, stats, _ = await start_proxy(n, make_config(), dead)
        await expect_reset_at_connect(server)
        await stop(server, n)
    assert stats.closed == {"refused": 1}
    assert stats.connect_errors == {"ECONNREFUSED": 1}
    (line,) = [e for e in log_lines() if e["event"] == "connection"]
    assert line["outcome"] == "refused" and line["upstream_src"] == "-"


@bounded
async def test_connect_timeout_resets_the_client(autojump_clock):
    # a listener with a full accept queue (backlog 0, one connection never accepted) drops further SYNs
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname())
        try:
            async with trio.open_nursery() as n:
                server, stats, _ = await start_proxy(n, make_config(connect_timeout=7.0), full.getsockname())
                start = trio.current_time()
                async with await connect(server) as s:
                    await expect_reset(s)
                assert trio.current_time() - start >= 7.0
                await stop(server, n)
        finally:
            filler.close()
    assert stats.closed == {"timeout": 1}
    assert stats.connect_errors == {"ETIMEDOUT": 1}


@bounded
async def test_idle_connection_is_closed(autojump_clock):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(idle_timeout=30.0), app)
        async with await connect(server) as s:
            await s.send_all(b"hi")
            assert await s.receive_some(10) == b"hi"
            t = trio.current_time()
            assert await s.receive_some(10) == b""  # closed by the proxy, not by the client
            assert trio.current_time() - t >= 30
        await stop(server, n)
    assert stats.closed == {"idle": 1}


@bounded
async def test_max_connections_holds_new_connections_back_until_one_closes():
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(max_connections=2), app)
        first, second = await connect(server), await connect(server)
        for s in (first, second):
            await s.send_all(b"x")
            assert await s.receive_some(1) == b"x"
        third = await connect(server)  # completes in the kernel's backlog
        await third.send_all(b"waiting")
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert stats.accepted == 2 and stats.open == 2
        assert stats.max_connections_waits == 1
        await first.aclose()
        assert await third.receive_some(100) == b"waiting"  # admitted once one closed
        assert stats.accepted == 3
        await second.aclose()
        await third.aclose()
        await stop(server, n)
    assert stats.closed == {"ok": 3}


@bounded
async def test_loop_to_own_listener_is_refused(log_lines):
    async with trio.open_nursery() as n:
        server, stats, _ = await start_proxy(n, make_config(), lambda s: s.getsockname()[:2])
        await expect_reset_at_connect(server)
        await stop(server, n)
    assert stats.loops_refused == 1 and stats.closed == {"refused": 1}
    assert stats.accepted == 1  # the upstream connect never happened: no second connection to ourselves
    (line,) = [e for e in log_lines() if e["event"] == "connection"]
    assert "loop" in line["error"]


@bounded
async def test_unknown_original_destination_is_refused():
    def no_dst(sock):
        raise OSError(errno.ENOENT, "No such file or directory")

    async with trio.open_nursery() as n:
        server, stats, _ = await start_proxy(n, make_config(), no_dst)
        await expect_reset_at_connect(server)
        await stop(server, n)
    assert stats.closed == {"refused": 1}


@bounded
async def test_shutdown_stops_accepting_and_lets_open_connections_finish():
    async with trio.open_nursery() as n:
        app = await start_app(n, eof_app)
        server, stats, state = await start_proxy(n, make_config(shutdown_grace=30.0), app)
        addr = server.addresses[0]
        s = await connect(server)
        await s.send_all(b"part one, ")
        await trio.testing.wait_all_tasks_blocked(0.05)
        server.shutdown()
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert state.draining and not state.listening and not server.stopped.is_set()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr).close()
        await s.send_all(b"part two")  # the open connection still works
        await s.send_eof()
        answer = await s.receive_some(100)
        assert answer == hashlib.sha256(b"part one, part two").hexdigest().encode()
        await s.aclose()
        await stop(server, n)
    assert stats.closed == {"ok": 1}


@bounded
async def test_grace_expiry_cancels_open_connections(autojump_clock, log_lines):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(shutdown_grace=5.0, idle_timeout=600.0), app)
        async with await connect(server) as s:
            await s.send_all(b"x")
            assert await s.receive_some(1) == b"x"
            t = trio.current_time()
            server.shutdown()
            with pytest.raises(trio.BrokenResourceError):  # cut short: a reset, not a clean end of stream
                await s.receive_some(10)
            assert trio.current_time() - t >= 5.0
        await stop(server, n)
    assert stats.closed == {"cancelled": 1}
    assert [e["outcome"] for e in log_lines() if e["event"] == "connection"] == ["cancelled"]


@bounded
async def test_skip_grace_cancels_at_once(autojump_clock):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(shutdown_grace=500.0), app)
        async with await connect(server) as s:
            await s.send_all(b"x")
            assert await s.receive_some(1) == b"x"
            t = trio.current_time()
            server.shutdown()
            await trio.sleep(1)
            assert stats.open == 1
            server.skip_grace()
            with pytest.raises(trio.BrokenResourceError):
                await s.receive_some(10)
            assert trio.current_time() - t < 500
        await stop(server, n)
    assert stats.closed == {"cancelled": 1}


@bounded
async def test_cancellation_mid_transfer_leaves_no_fd_open():
    pipes = PipePool(keep=4)
    async with trio.open_nursery() as outer:
        app = await start_app(outer, echo_app)
        before = len(os.listdir("/proc/self/fd"))
        clients = []
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                server, stats, _ = await start_proxy(n, make_config(), app, pipes=pipes)
                for _ in range(5):
                    s = await connect(server)
                    clients.append(s)
                    n.start_soon(s.send_all, b"y" * (16 << 20))  # nobody reads the echo: buffers and pipes fill
                while stats.bytes_in < 5 << 20:
                    await trio.sleep(0.01)
                scope.cancel()
        assert stats.closed == {"cancelled": 5} and stats.open == 0
        for s in clients:
            await s.aclose()
        pipes.close()
        await trio.testing.wait_all_tasks_blocked(0.05)  # the app's handlers see the resets and close
        assert len(os.listdir("/proc/self/fd")) == before
        outer.cancel_scope.cancel()


@bounded
async def test_accept_survives_emfile(log_lines):
    import resource

    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(), app)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hog = []
        try:
            c = socket.create_connection(server.addresses[0])  # waits in the backlog
            # use up every descriptor so that accept() fails with EMFILE
            while True:
                try:
                    hog.append(os.open("/dev/null", os.O_RDONLY))
                except OSError as e:
                    assert e.errno == errno.EMFILE
                    break
            await trio.testing.wait_all_tasks_blocked(0.05)
            await trio.sleep(0.25)  # a couple of back-off rounds
            assert stats.accepted == 0
            for fd in hog:
                os.close(fd)
            hog.clear()
            c.setblocking(False)
            s = trio.SocketStream(trio.socket.from_stdlib_socket(c))
            assert await exchange(s, b"after EMFILE") == b"after EMFILE"
            await s.aclose()
        finally:
            for fd in hog:
                os.close(fd)
        await stop(server, n)
    assert stats.accepted == 1 and stats.closed == {"ok": 1}
    assert any(e["event"] == "accept_paused" and e["error"] == "EMFILE" for e in log_lines())


# -- preserve_source: IP_TRANSPARENT on the upstream socket needs CAP_NET_RAW


@pytest.mark.root
@bounded
async def test_preserve_source_original_binds_client_ip_and_a_chosen_port():
    seen = []

    async def peer_app(stream):
        seen.append(stream.socket.getpeername()[:2])
        await echo_app(stream)

    async with trio.open_nursery() as n:
        app = await start_app(n, peer_app)
        cfg = make_config(preserve_source=True)
        server, stats, _ = await start_proxy(n, cfg, app)
        async with await connect(server) as s:
            client = s.socket.getsockname()[:2]
            assert await exchange(s, b"who am i") == b"who am i"
        await stop(server, n)
    (peer,) = seen
    lo, hi = sockets.UPSTREAM_PORTS
    assert peer[0] == client[0] and lo <= peer[1] <= hi and peer[1] != client[1]
    assert stats.source_fallbacks == 0 and stats.source_port_fallbacks == 0
    assert server.chooser.own == {} and server.chooser.intercepted == {}  # released when the connection ended


@pytest.mark.root
@bounded
async def test_preserve_source_never_reuses_the_client_port_for_the_same_destination():
    seen = []

    async def peer_app(stream):
        seen.append(stream.socket.getpeername()[1])
        await echo_app(stream)

    async with trio.open_nursery() as n:
        app = await start_app(n, peer_app)
        server, stats, _ = await start_proxy(n, make_config(preserve_source=True), app)
        # SO_REUSEADDR: the proxy could bind the client's port too on this one host, were it chosen
        c = trio.socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await c.bind(("127.0.0.1", 0))
        cport = c.getsockname()[1]
        server.chooser.lo = server.chooser.hi = cport  # the only port in range is the client's own
        await c.connect(server.addresses[0])
        async with trio.SocketStream(c) as s:
            assert await exchange(s, b"x") == b"x"
        await stop(server, n)
    assert seen[0] != cport
    assert stats.source_port_fallbacks == 1  # no port to choose: the kernel's choice, counted


@pytest.mark.root
@bounded
async def test_preserve_source_loopback_keeps_client_port():
    seen = []

    async def peer_app(stream):
        seen.append(stream.socket.getpeername()[:2])
        await echo_app(stream)

    async with trio.open_nursery() as n:
        app = await start_app(n, peer_app)
        cfg = make_config(preserve_source=True, upstream="loopback")
        # the injected original destination names a non-loopback address; "loopback" connects to 127.0.0.1 anyway
        server, stats, _ = await start_proxy(n, cfg, ("198.18.0.2", app[1]))
        # on one host the client's own socket holds 127.0.0.1:port; SO_REUSEADDR on both lets the proxy bind it too
        c = trio.socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await c.bind(("127.0.0.1", 0))
        await c.connect(server.addresses[0])
        client = c.getsockname()[:2]
        async with trio.SocketStream(c) as s:
            assert await exchange(s, b"loop") == b"loop"
        await stop(server, n)
    assert seen == [client]
    assert stats.source_port_fallbacks == 0


@pytest.mark.root
@bounded
async def test_preserve_source_port_taken_falls_back_not_fails(log_lines):
    seen = []

    async def peer_app(stream):
        seen.append(stream.socket.getpeername()[:2])
        await echo_app(stream)

    async with trio.open_nursery() as n:
        app = await start_app(n, peer_app)
        cfg = make_config(preserve_source=True)
        server, stats, _ = await start_proxy(n, cfg, app)
        # the only port the chooser may pick is held by a listener: bind() fails EADDRINUSE, every try
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            port = blocker.getsockname()[1]
            server.chooser.lo = server.chooser.hi = port
            async with await connect(server) as s:
                assert await exchange(s, b"fallback") == b"fallback"
        await stop(server, n)
    assert stats.source_port_fallbacks == 1 and stats.closed == {"ok": 1}
    assert seen[0][0] == "127.0.0.1" and seen[0][1] != port
    assert any(e["event"] == "source_port_fallback" for e in log_lines())


@bounded
async def test_only_the_idle_connection_is_closed(autojump_clock):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(idle_timeout=30.0), app)
        quiet, busy = await connect(server), await connect(server)
        for s in (quiet, busy):
            await s.send_all(b"x")
            assert await s.receive_some(1) == b"x"
        for _ in range(5):  # 50 s: the busy one talks every 10 s
            await trio.sleep(10)
            await busy.send_all(b"y")
            assert await busy.receive_some(1) == b"y"
        assert await quiet.receive_some(10) == b""  # closed by the proxy
        assert stats.closed == {"idle": 1} and stats.open == 1
        await busy.aclose()
        await quiet.aclose()
        await stop(server, n)
    assert stats.closed == {"idle": 1, "ok": 1}


@bounded
async def test_every_connection_is_one_task_in_the_connection_nursery():
    """The shape: a connection's whole life is one task; cancelling the nursery is cancelling the connections."""
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(), app)
        streams = [await connect(server) for _ in range(5)]
        for st in streams:
            await st.send_all(b"hi")
            assert await st.receive_some(10) == b"hi"
        tasks = [t for t in server._conns.child_tasks if t.name == "tproxy.connection"]
        assert len(tasks) == stats.open == 5
        for st in streams:
            await st.aclose()
        while stats.open:
            await trio.sleep(0.01)
        assert not [t for t in server._conns.child_tasks if t.name == "tproxy.connection"]
        await stop(server, n)


@bounded
async def test_bytes_lost_at_idle_timeout_end_with_a_reset_not_a_fin(autojump_clock, log_lines):
    """The application stops reading; when the idle timeout ends the connection the proxy still holds bytes it
    could not deliver: both peers must see a reset (a FIN would make a stream with bytes missing look whole)."""
    accepted: list[trio.SocketStream] = []

    async def never_reads(stream):
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        app = await start_app(n, never_reads)
        server, stats, _ = await start_proxy(n, make_config(idle_timeout=10), app)
        st = await connect(server)
        st.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        client_saw: list = []

        async def upload():
            # until the reset: a fixed amount can fit whole in the socket buffers (the proxy's receive buffer, which it
            # grows while it reads, may reach tcp_rmem's max, 32 MiB on some hosts), and then nothing is cut at all
            chunk = b"L" * (1 << 20)
            try:
                while True:
                    await st.send_all(chunk)
            except trio.BrokenResourceError as e:
                client_saw.append(e.__cause__)

        n.start_soon(upload)
        while stats.closed.total() == 0:
            await trio.sleep(1)
        assert stats.closed == {"idle": 1}
        while not client_saw:
            await trio.sleep(1)
        assert isinstance(client_saw[0], ConnectionResetError)  # the client's upload is cut by a reset
        with pytest.raises(trio.BrokenResourceError) as info:  # the application, reading at last
            while await accepted[0].receive_some(1 << 20):
                pass
        assert isinstance(info.value.__cause__, ConnectionResetError)
        line = [e for e in log_lines() if e["event"] == "connection"][0]
        assert line["outcome"] == "idle" and "discarded" in line["error"]
        await stop(server, n)


@bounded
async def test_an_error_in_one_connections_teardown_ends_neither_others_nor_the_server(monkeypatch, log_lines):
    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, _ = await start_proxy(n, make_config(), app)
        keep = await connect(server)
        await keep.send_all(b"1")
        assert await keep.receive_some(10) == b"1"
        real = sockets.set_reset_on_close

        def broken(sock):
            raise RuntimeError("teardown bug")

        monkeypatch.setattr(sockets, "set_reset_on_close", broken)
        victim = await connect(server)
        await victim.send_all(b"x")
        assert await victim.receive_some(10) == b"x"
        victim.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await victim.aclose()  # a reset: the proxy's teardown takes the broken path
        while stats.closed.total() < 1:
            await trio.sleep(0.01)
        monkeypatch.setattr(sockets, "set_reset_on_close", real)
        await keep.send_all(b"2")  # the other connection is untouched
        assert await keep.receive_some(10) == b"2"
        late = await connect(server)  # and the server still accepts
        await late.send_all(b"3")
        assert await late.receive_some(10) == b"3"
        assert any(e.get("phase") == "teardown" for e in log_lines())
        assert stats.open == 2
        await keep.aclose()
        await late.aclose()
        await stop(server, n)


@bounded
async def test_a_log_reader_that_never_reads_stalls_no_connection():
    """stderr is a pipe nobody reads (journald stuck, a full pipe): connections go on, dropped lines are counted."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # a page: full after ~25 lines
    stream = os.fdopen(w, "w", buffering=1)
    stats_box: list[Stats] = []
    try:
        log.setup("info", "text", stream=stream)
        async with trio.open_nursery() as n:
            app = await start_app(n, echo_app)
            server, stats, _ = await start_proxy(n, make_config(), app)
            stats_box.append(stats)
            with log.threaded(stats, max_lines=50):
                for i in range(300):  # each connection logs a line; the pipe is full after a few
                    st = await connect(server)
                    await st.send_all(b"%d" % i)
                    assert await st.receive_some(10) == b"%d" % i
                    await st.aclose()
                while stats.open:
                    await trio.sleep(0.01)
                assert stats.log_dropped > 0
                await stop(server, n)
                os.close(r)  # lets the writer thread finish (EPIPE) so the block can end at once
                r = -1
    finally:
        log.setup("info", "text")
        if r >= 0:
            os.close(r)
        with contextlib.suppress(OSError):  # (what the stuck writer still held: the pipe is gone)
            stream.close()
    assert stats_box[0].closed == {"ok": 300}


# -- PROXY protocol: in from a trusted peer (read before the upstream connect), out to the application


def pp_config(*, listener: dict | None = None, **proxy) -> Config:
    proxy = {"preserve_source": False, "relay": ENGINE, **proxy}
    doc = {"mode": "nat", "intercept": {"ports": [3000], "ipv6": False}, "proxy": proxy, "listener": listener or {}}
    return Config.from_dict(doc)


TRUST_LOOPBACK = {"proxy_protocol": "any", "proxy_protocol_from": ["127.0.0.0/8"], "proxy_protocol_timeout": 2}


async def recording_app(nursery: trio.Nursery, seen: list) -> tuple[str, int]:
    """An application that records (peer, every byte it read) per connection and echoes nothing: answers "ok"."""

    async def app(stream):
        got = bytearray()
        while data := await stream.receive_some(65536):
            got += data
        seen.append((stream.socket.getpeername()[:2], bytes(got)))
        await stream.send_all(b"ok")

    return await start_app(nursery, app)


@bounded
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_trusted_peers_header_is_read_and_the_payload_relayed(log_lines, version):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        server, stats, _ = await start_proxy(n, pp_config(listener=TRUST_LOOPBACK), app)
        header = pp.build(version, ("198.18.7.7", 4567), ("198.18.0.2", 3000))
        async with await connect(server) as s:
            peer = s.socket.getsockname()[:2]
            assert await exchange(s, header + b"payload") == b"ok"
        await stop(server, n)
    assert seen == [(seen[0][0], b"payload")]  # the header was consumed, not a byte more
    assert not stats.proxy_protocol_errors
    (line,) = [x for x in log_lines() if x.get("event") == "connection"]
    assert line["client"] == "198.18.7.7:4567" and line["peer"] == f"{peer[0]}:{peer[1]}", line


@bounded
async def test_an_untrusted_peers_header_is_data():
    seen: list = []
    listener = {**TRUST_LOOPBACK, "proxy_protocol_from": ["198.18.0.0/15"]}
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        server, stats, _ = await start_proxy(n, pp_config(listener=listener), app)
        forged = b"PROXY TCP4 198.18.200.1 198.18.0.2 1234 3000\r\n"
        async with await connect(server) as s:
            assert await exchange(s, forged + b"x") == b"ok"
        await stop(server, n)
    assert seen[0][1] == forged + b"x"
    assert not stats.proxy_protocol_errors


@bounded
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "bad_signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_line"),
        (pp.V2_SIGNATURE + b"\x21\x11\xff\xff", "too_long"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[:10], "eof"),  # then EOF
    ],
)
async def test_a_bad_header_from_a_trusted_peer_resets_and_never_connects(log_lines, data, reason):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        server, stats, _ = await start_proxy(n, pp_config(listener=TRUST_LOOPBACK), app)
        async with await connect(server) as s:
            await s.send_all(data)
            if reason == "eof":  # (the others are reset at once: a shutdown could find the socket reset already)
                await s.send_eof()
            await expect_reset(s)
        # the proxy keeps serving
        async with await connect(server) as s:
            assert await exchange(s, pp.build("v1", ("198.18.0.9", 9), ("198.18.0.2", 3000)) + b"next") == b"ok"
        await stop(server, n)
    assert [got for _, got in seen] == [b"next"]  # the bad one never reached the application
    assert stats.proxy_protocol_errors == {reason: 1}
    assert stats.closed["reset"] == 1 and stats.connect_errors == {}
    lines = [x for x in log_lines() if x.get("event") == "connection"]
    assert lines[0]["outcome"] == "reset" and f"bad PROXY protocol header: {reason}" in lines[0]["error"], lines


@bounded
async def test_a_header_that_never_completes_is_reset_after_the_timeout(autojump_clock):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        server, stats, _ = await start_proxy(n, pp_config(listener=TRUST_LOOPBACK), app)
        async with await connect(server) as s:
            await s.send_all(b"PROXY TCP4 ")
            t0 = trio.current_time()
            await expect_reset(s)
            assert trio.current_time() - t0 == pytest.approx(2, abs=0.1)
        await stop(server, n)
    assert seen == [] and stats.proxy_protocol_errors == {"timeout": 1}


@bounded
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_header_out_comes_first_in_one_write_naming_client_and_original_destination(version):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        server, _, _ = await start_proxy(n, pp_config(send_proxy_protocol=version), ("127.0.0.1", app[1]))
        async with await connect(server) as s:
            client = s.socket.getsockname()[:2]
            assert await exchange(s, b"data") == b"ok"
        await stop(server, n)
    ((_, got),) = seen
    h = pp.parse(got, allow=version)
    assert h.source == client and h.destination == ("127.0.0.1", app[1])
    assert got[h.length :] == b"data"


@bounded
async def test_a_header_in_is_passed_on_out():
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        cfg = pp_config(listener=TRUST_LOOPBACK, send_proxy_protocol="v2")
        server, _, _ = await start_proxy(n, cfg, ("127.0.0.1", app[1]))
        async with await connect(server) as s:
            header = pp.build("v1", ("198.18.7.7", 4567), ("198.18.0.2", 3000))
            assert await exchange(s, header + b"data") == b"ok"
        await stop(server, n)
    ((_, got),) = seen
    h = pp.parse(got, allow="v2")
    assert h.source == ("198.18.7.7", 4567) and h.destination == ("127.0.0.1", app[1])
    assert got[h.length :] == b"data"


@bounded
@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", pp.V2_SIGNATURE + b"\x20\x00\x00\x00"])
async def test_unknown_and_local_headers_mean_the_tcp_peer(header):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        cfg = pp_config(listener=TRUST_LOOPBACK, send_proxy_protocol="v1")
        server, _, _ = await start_proxy(n, cfg, ("127.0.0.1", app[1]))
        async with await connect(server) as s:
            client = s.socket.getsockname()[:2]
            assert await exchange(s, header + b"data") == b"ok"
        await stop(server, n)
    ((_, got),) = seen
    assert pp.parse(got, allow="v1").source == client and got.endswith(b"\r\ndata")


@pytest.mark.root
@bounded
async def test_preserve_source_binds_the_headers_client(log_lines):
    seen: list = []
    async with trio.open_nursery() as n:
        app = await recording_app(n, seen)
        cfg = pp_config(listener=TRUST_LOOPBACK, preserve_source=True)
        server, stats, _ = await start_proxy(n, cfg, app)
        for source in [("127.0.0.5", 4567), ("fd00::5", 4567)]:  # the second: not IPv4, cannot be the source
            async with await connect(server) as s:
                header = pp.build("v2", source, ("fd00::2", 3000) if ":" in source[0] else ("127.0.0.1", 3000))
                assert await exchange(s, header + b"x") == b"ok"
        await stop(server, n)
    assert seen[0][0][0] == "127.0.0.5" and seen[0][0][1] != 4567  # a chosen port, as for any client
    assert seen[1][0][0] == "127.0.0.1"  # an ordinary source, counted and logged
    assert stats.source_fallbacks == 1
    assert server.chooser.own == {} and server.chooser.intercepted == {}  # the header's client's port released
    assert [x["client"] for x in log_lines() if x.get("event") == "source_fallback"] == ["[fd00::5]:4567"]
