"""The admin endpoint over real loopback sockets: routes, status codes, headers, and the limits that keep a slow or
malicious client from holding it (virtual time via autojump_clock where a timeout is the point)."""

from __future__ import annotations

import functools
import io
import json
import signal
import subprocess
import sys
import time

import attrs
import pytest
import trio
import trio.testing
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tproxy import admin, log
from tproxy.config import Admin, Config
from tproxy.netns import netns
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


async def get(addr, path: str, method: str = "GET", headers: str = "") -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(addr, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode()))


def values(body: bytes, *, openmetrics: bool = False) -> dict[str, float]:
    """Unlabelled samples by name, parsed by prometheus-client."""
    parse = parse_openmetrics if openmetrics else parse_text
    return {s.name: s.value for fam in parse(body.decode()) for s in fam.samples if not s.labels}


@pytest.fixture
def log_lines():
    """Capture the tproxy log as JSON objects."""
    buf = io.StringIO()
    log.setup("debug", "json", stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    log.setup("info", "text")


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
    assert status == 200 and body == b"ready (rules not verified: --no-rules)\n"  # nobody here watches the rules
    state.rules_intact = True
    status, _, body = await get(addr, "/ready")
    assert status == 200 and body == b"ready\n"
    state.rules_intact, state.rules_note = False, "rules missing"
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: rules missing\n"
    state.rules_note = "rules removed by the operator"
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: rules removed by the operator\n"
    state.rules_intact = True
    state.draining = True
    status, _, body = await get(addr, "/ready")
    assert status == 503 and body == b"not ready: draining\n"


async def test_metrics(addr, stats, state):
    status, headers, body = await get(addr, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = values(body)
    assert m["tproxy_connections_accepted_total"] == 3 and m["process_open_fds"] >= 3
    stats.accepted += 1
    _, _, body = await get(addr, "/metrics")
    assert values(body)["tproxy_connections_accepted_total"] == 4


async def test_metrics_in_openmetrics_when_the_scraper_asks(addr):
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n"
    status, headers, body = await get(addr, "/metrics", headers=accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert body.endswith(b"# EOF\n")
    m = values(body, openmetrics=True)
    assert m["tproxy_connections_accepted_total"] == 3 and m["process_open_fds"] >= 3


async def test_config_names_each_keys_value_and_source(nursery, stats, state, tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text('[intercept]\nports = [8080, "9000-9010"]\n[proxy]\nidle_timeout = 60\n')
    cfg = attrs.evolve(Config.from_toml(path, mode="nat"), admin=Admin(host="127.0.0.1", port=0))
    addr = await nursery.start(admin.serve_admin, cfg, stats, state)
    status, headers, body = await get(addr, "/config")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["file"] == str(path)
    settings = doc["settings"]
    assert settings["intercept.ports"] == {"value": [8080, "9000-9010"], "source": "file"}
    assert settings["proxy.idle_timeout"] == {"value": 60.0, "source": "file"}
    assert settings["mode"] == {"value": "nat", "source": "flag"}
    assert settings["backend"] == {"value": "nftables", "source": "default"}
    assert settings["proxy.preserve_source"] == {"value": False, "source": "default"}
    assert settings["listener.port"] == {"value": 4143, "source": "default"}
    assert set(settings) == set(cfg.settings())
    assert (await get(addr, "/config", method="HEAD"))[2] == b""


async def test_config_follows_the_config_in_force(nursery, stats, state):
    holder = [config()]
    addr = await nursery.start(
        functools.partial(admin.serve_admin, current_config=lambda: holder[0]), config(), stats, state
    )
    holder[0] = holder[0].with_overrides(backend="iptables")  # a reload swaps the config in force
    settings = json.loads((await get(addr, "/config"))[2])["settings"]
    assert settings["backend"] == {"value": "iptables", "source": "flag"}


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


async def test_obs_text_in_a_field_value_is_accepted(addr):
    # RFC 9110 5.5 allows obs-text (0x80-0xff) in field values; h11 accepts it, and so do we (the old parser did not)
    assert parse(await exchange(addr, b"GET /live HTTP/1.1\r\nHost: \xff\r\n\r\n"))[0] == 200


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


async def test_loopback_binds_do_not_warn(nursery, stats, state, log_lines):
    await nursery.start(admin.serve_admin, config(), stats, state)
    await nursery.start(admin.serve_admin, config(host="::1"), stats, state)
    assert not [ln for ln in log_lines() if ln["event"] == "admin_not_loopback"]


_EXPOSED = """\
import sys, trio, attrs
from tproxy import admin, log
from tproxy.config import Admin, Config
from tproxy.stats import State, Stats
log.setup("info", "json")
async def main():
    cfg = attrs.evolve(Config.from_dict({"intercept": {"ports": [8080]}}), admin=Admin(host=sys.argv[1], port=0))
    async with trio.open_nursery() as n:
        await n.start(admin.serve_admin, cfg, Stats(), State())
        n.cancel_scope.cancel()
trio.run(main)
"""


@pytest.mark.root
@pytest.mark.parametrize("host", ["198.18.0.1", "0.0.0.0", "::"])
def test_non_loopback_bind_warns_naming_the_exposure(host):
    # in a namespace of our own: the wildcard binds expose nothing of the host's
    with netns("adm") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        ns.run(["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"])
        r = ns.run([sys.executable, "-c", _EXPOSED, host])
    lines = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    warnings = [ln for ln in lines if ln["event"] == "admin_not_loopback"]
    assert len(warnings) == 1, r.stderr
    assert warnings[0]["level"] == "warning" and "/metrics" in warnings[0]["exposure"]
    assert "/config" in warnings[0]["exposure"]


async def test_port_in_use_raises_before_started(nursery, stats, state, addr):
    cfg = attrs.evolve(config(), admin=Admin(host="127.0.0.1", port=addr[1]))
    with pytest.raises(OSError):
        await nursery.start(admin.serve_admin, cfg, stats, state)


# ----------------------------------------------------------------------------------------------------------------
# The real proxy in the lab's namespaces (root): /ready after start and on SIGTERM, /metrics exact after traffic

_GET = """\
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
sys.stdout.write(f"{status}\\n{body.decode()}")
"""

_HOLD = """\
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"held")
line = b""
while not line.endswith(b"\\n"):
    line += s.recv(1)
print(line.decode().strip(), flush=True)
sys.stdin.read()
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
"""


def admin_get(lab, path: str) -> tuple[int, str]:
    from tproxy import lab as L

    url = f"http://{L.ADMIN[0]}:{L.ADMIN[1]}{path}"
    r = lab.node.run([sys.executable, "-c", _GET, url])
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def scrape(lab) -> dict[str, float]:
    """Samples keyed as Prometheus prints them, ``name{label="value",...}`` with labels in sorted order."""
    status, body = admin_get(lab, "/metrics")
    assert status == 200
    samples = {}
    for fam in parse_text(body):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def poll(what, until, timeout: float = 15.0):
    """``what()`` until ``until(value)``; the last value either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if until(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.root
def test_ready_and_exact_metrics_with_the_real_proxy():
    from tproxy import __version__
    from tproxy import lab as L

    with L.Lab.up() as lab:
        proxy = lab.start_proxy(L.proxy_config("tproxy", "nftables", shutdown_grace=60.0))  # waits for /ready 200
        try:
            assert admin_get(lab, "/ready") == (200, "ready\n")
            assert admin_get(lab, "/live") == (200, "live\n")
            status, body = admin_get(lab, "/config")  # the runner hands the admin endpoint the config in force
            settings = json.loads(body)["settings"]
            assert status == 200 and settings["mode"] == {"value": "tproxy", "source": "file"}
            assert settings["proxy.idle_timeout"] == {"value": 3600.0, "source": "default"}

            sizes = [0, 1, 1000, 65536, 300001]
            jobs = [
                {"dst": L.NODE[f], "port": L.ECHO_PORT, "count": 10, "concurrency": 5, "sizes": sizes, "timeout": 10}
                for f in (4, 6)
            ]
            results = lab.connect(jobs)
            assert len(results) == 20 and all(r["ok"] for r in results), results
            assert {r["peer"][0] for r in results} == {L.CLIENT[4], L.CLIENT[6]}  # it went through the proxy

            m = poll(lambda: scrape(lab), lambda m: m['tproxy_connections_closed_total{outcome="ok"}'] >= 20)
            assert m["tproxy_connections_accepted_total"] == 20
            assert m["tproxy_connections_open"] == 0
            assert m['tproxy_connections_closed_total{outcome="ok"}'] == 20
            for outcome in ("reset", "refused", "timeout", "idle", "cancelled"):
                assert m[f'tproxy_connections_closed_total{{outcome="{outcome}"}}'] == 0
            assert m['tproxy_bytes_relayed_total{direction="in"}'] == sum(r["size"] for r in results)
            peer_lines = sum(len(f"PEER {r['peer'][0]} {r['peer'][1]}\n") for r in results)
            assert m['tproxy_bytes_relayed_total{direction="out"}'] == sum(r["size"] for r in results) + peer_lines
            assert m['tproxy_relay_path_total{path="splice"}'] + m['tproxy_relay_path_total{path="copy"}'] == 40
            assert m[f'tproxy_info{{backend="nftables",mode="tproxy",version="{__version__}"}}'] == 1
            assert m["tproxy_ready"] == 1 and m["tproxy_draining"] == 0

            # a connection held open keeps the drain going after SIGTERM: /ready says 503 meanwhile
            holder = lab.client.popen(
                [sys.executable, "-c", _HOLD, L.NODE[4], str(L.ECHO_PORT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout.readline().startswith(f"PEER {L.CLIENT[4]} ")
                assert (
                    poll(lambda: scrape(lab), lambda m: m["tproxy_connections_open"] == 1)["tproxy_connections_open"]
                    == 1
                )
                proxy.proc.send_signal(signal.SIGTERM)
                ready = poll(lambda: admin_get(lab, "/ready"), lambda r: r[1] == "not ready: draining\n")
                assert ready == (503, "not ready: draining\n")
                m = scrape(lab)
                assert m["tproxy_ready"] == 0 and m["tproxy_draining"] == 1 and m["tproxy_connections_open"] == 1
                holder.stdin.close()  # the client finishes; the drain ends early and the proxy exits cleanly
                assert holder.wait(30) == 0
            finally:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait()
            assert proxy.proc.wait(30) == 0
        finally:
            proxy.stop()
