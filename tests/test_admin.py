"""The admin endpoint over real loopback sockets: routes, status codes, headers, and the limits that keep a slow or
malicious client from holding it (virtual time via autojump_clock where a timeout is the point)."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from tproxy import admin, metrics
from tproxy.config import Admin, Config
from tproxy.stats import State, Stats


def config(host: str | None = "127.0.0.1") -> Config:
    base = Config.from_dict({"intercept": {"ports": [8080]}})
    return attrs.evolve(base, admin=Admin(host=host, port=0))


async def exchange(addr, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        return data


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {response!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body) or not body
    return int(status), headers, body


async def get(addr, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(addr, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()))


@pytest.fixture
def stats() -> Stats:
    return Stats(accepted=3, bytes_in=10, bytes_out=20)


@pytest.fixture
def state() -> State:
    return State(mode="tproxy", backend="nftables")


@pytest.fixture
async def addr(nursery, stats, state):
    return await nursery.start(admin.serve_admin, config(), stats, state)


async def test_started_reports_the_bound_address(addr):
    host, port = addr
    assert host == "127.0.0.1" and port > 0


async def test_live(addr):
    status, headers, body = await get(addr, "/live")
    assert status == 200 and body == b"live\n"
    assert headers["connection"] == "close"


async def test_ready_flips_with_state(addr, state):
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: starting (waiting for rules and listeners)\n"
    state.rules_installed = True
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: starting (waiting for listeners)\n"
    state.listening = True
    status, _, body = await get(addr, "/ready")
    assert status == 200 and body == b"ready\n"
    state.draining = True
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: draining\n"


async def test_metrics(addr, stats, state):
    status, headers, body = await get(addr, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode() == metrics.render(stats, state)
    assert b"\ntproxy_connections_accepted_total 3\n" in body
    stats.accepted += 1
    _, _, body = await get(addr, "/metrics")
    assert b"\ntproxy_connections_accepted_total 4\n" in body


async def test_query_string_and_absolute_form(addr):
    assert (await get(addr, "/metrics?name[]=x"))[0] == 200
    assert (await get(addr, "http://localhost:4191/live"))[0] == 200


@pytest.mark.parametrize("path", ["/", "/metricsx", "/live/", "/favicon.ico", "/READY"])
async def test_unknown_path_is_404(addr, path):
    status, _, _ = await get(addr, path)
    assert status == 404


async def test_head_has_headers_and_no_body(addr):
    response = await exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse(response)
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 100


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405(addr, method):
    request = f"{method} /live HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode()
    status, headers, _ = parse(await exchange(addr, request))
    assert status == 405 and headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /live HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /live\r\n\r\n", 400),
        (b"GET  /live HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET live HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /live HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /live HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: \xff\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: x\r\n", 400),  # EOF inside the head (the client half-closes)
    ],
)
async def test_malformed_requests(addr, request_bytes, status):
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(request_bytes)
        await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert parse(data)[0] == status


async def test_http10_without_host_and_bare_newlines(addr):
    assert parse(await exchange(addr, b"GET /live HTTP/1.0\r\n\r\n"))[0] == 200
    assert parse(await exchange(addr, b"GET /live HTTP/1.0\n\n"))[0] == 200


async def test_oversized_request_is_rejected(addr):
    filler = b"X-Filler: " + b"a" * (admin.MAX_REQUEST_BYTES * 2) + b"\r\n"
    status, _, body = parse(await exchange(addr, b"GET /live HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n"))
    assert status == 431 and b"too large" in body


async def test_request_just_under_the_limit_is_served(addr):
    head = b"GET /live HTTP/1.1\r\nHost: x\r\n"
    pad = admin.MAX_REQUEST_BYTES - len(head) - len(b"X: \r\n\r\n")
    request = head + b"X: " + b"a" * pad + b"\r\n\r\n"
    assert len(request) == admin.MAX_REQUEST_BYTES
    assert parse(await exchange(addr, request))[0] == 200


async def test_client_that_sends_nothing_is_cut_off(autojump_clock, nursery, stats, state):
    addr = await nursery.start(admin.serve_admin, config(), stats, state)
    start = trio.current_time()
    with trio.fail_after(admin.REQUEST_TIMEOUT * 3):
        assert await exchange(addr, b"") == b""
    assert trio.current_time() - start >= admin.REQUEST_TIMEOUT


async def test_client_that_dribbles_is_cut_off(autojump_clock, nursery, stats, state):
    addr = await nursery.start(admin.serve_admin, config(), stats, state)
    stream = await trio.open_tcp_stream(*addr)
    start = trio.current_time()
    async with stream:
        for _ in range(int(admin.REQUEST_TIMEOUT) * 4):  # a byte a second, never finishing the request line
            try:
                await stream.send_all(b"G")
                with trio.move_on_after(1):
                    assert await stream.receive_some(100) == b""  # closed without a response
                    break
            except trio.BrokenResourceError:
                break
        else:
            pytest.fail("the server kept reading a request that never ends")
    assert trio.current_time() - start >= admin.REQUEST_TIMEOUT


async def test_slow_clients_do_not_block_others(addr):
    silent = [await trio.open_tcp_stream(*addr) for _ in range(admin.MAX_CLIENTS - 1)]
    try:
        assert (await get(addr, "/live"))[0] == 200
    finally:
        for s in silent:
            await s.aclose()


async def test_clients_beyond_the_limit_are_closed_at_once(autojump_clock, nursery, stats, state):
    addr = await nursery.start(admin.serve_admin, config(), stats, state)
    start = trio.current_time()
    closed_after: list[float] = []

    async def silent_client() -> None:
        async with await trio.open_tcp_stream(*addr) as stream:
            assert await stream.receive_some(100) == b""
            closed_after.append(trio.current_time() - start)

    with trio.fail_after(admin.REQUEST_TIMEOUT * 3):
        async with trio.open_nursery() as clients:
            for _ in range(admin.MAX_CLIENTS + 1):
                clients.start_soon(silent_client)
    assert len(closed_after) == admin.MAX_CLIENTS + 1
    assert sum(t < admin.REQUEST_TIMEOUT for t in closed_after) == 1  # the one beyond the limit, at once
    assert (await get(addr, "/live"))[0] == 200  # the slots came back


async def test_disabled_admin_starts_nothing(nursery, stats, state):
    assert await nursery.start(admin.serve_admin, config(host=None), stats, state) is None


async def test_ipv6_loopback(nursery, stats, state):
    addr = await nursery.start(admin.serve_admin, config(host="::1"), stats, state)
    assert addr[0] == "::1"
    assert (await get(addr, "/live"))[0] == 200


async def test_port_in_use_raises_before_started(nursery, stats, state, addr):
    cfg = attrs.evolve(config(), admin=Admin(host="127.0.0.1", port=addr[1]))
    with pytest.raises(OSError):
        await nursery.start(admin.serve_admin, cfg, stats, state)
