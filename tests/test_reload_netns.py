"""Reload (SIGHUP) in the lab, per backend: the real ``tproxy run`` in the node namespace, real rules.

A long-lived connection (the echo application on 8080, opened before the reload, used again after it) must carry on;
a port added to ``intercept.ports`` must be intercepted right after (the proxy's log names the client); an invalid
file prints one line and the old rules keep working; a new listener port takes over new connections while the open
one survives. Each test gets its own lab.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.lab_fixtures import BACKENDS, Cell, wait_logged
from tests.test_privileges_netns import runtime  # noqa: F401 - the fixture
from tests.test_privileges_netns import start as start_unprivileged
from tproxy import lab as L

pytestmark = pytest.mark.root

# A client that stays connected: prints the application's PEER line and its own address, then echoes each stdin line
# through the connection and prints what came back.
HOLD = """
import json, socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((dst, port), timeout=20)
f = s.makefile("rb")
print(json.dumps({"peer": f.readline().decode().split()[1:], "src": list(s.getsockname()[:2])}), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().decode().strip(), flush=True)
"""


class Held:
    """A connection from the client namespace kept open across reloads."""

    def __init__(self, lab: L.Lab, family: int, port: int) -> None:
        self.proc = lab.client.popen(
            [sys.executable, "-c", HOLD, L.NODE[family], str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        hello = self.proc.stdout.readline()
        assert hello, self.proc.stderr.read()
        info = json.loads(hello)
        self.peer = info["peer"][0]
        self.src = (info["src"][0], info["src"][1])

    def echo(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def lab():
    with L.Lab.up() as lab:
        yield lab


def config(
    backend: str,
    *,
    ports: str = f'"{L.INTERCEPT_PORTS}"',
    listener_port: int = L.LISTENER_PORT,
    mode: str = "tproxy",
    preserve: bool | None = None,
) -> str:
    text = L.proxy_config(mode, backend, preserve_source=preserve)
    text = text.replace(f'ports = ["{L.INTERCEPT_PORTS}"]', f"ports = [{ports}]")
    return text.replace(f"port = {L.LISTENER_PORT}", f"port = {listener_port}")


def hup(proxy: L.Proxy, path: Path, text: str, *, expect: str, timeout: float = 30) -> str:
    """Write ``text`` to the config, SIGHUP the proxy, wait until its log (from now on) contains ``expect``."""
    since = len(proxy.log())
    path.write_text(text)
    proxy.proc.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + timeout
    while expect not in proxy.log()[since:]:
        assert proxy.proc.poll() is None, proxy.log()
        assert expect == "reload failed" or "reload failed" not in proxy.log()[since:], proxy.log()[since:]
        assert time.monotonic() < deadline, f"no {expect!r} after SIGHUP:\n{proxy.log()[since:]}"
        time.sleep(0.05)
    return proxy.log()[since:]


def through_proxy(lab: L.Lab, proxy: L.Proxy, port: int, cell: Cell | None = None) -> None:
    """A new connection per family to ``port`` works, the application sees the client, the proxy logs it."""
    since = len(proxy.log())
    results = lab.connect([{"dst": L.NODE[f], "port": port, "sizes": [100]} for f in (4, 6)])
    for r, fam in zip(results, (4, 6), strict=True):
        assert r["ok"] and r["peer"][0] == (cell.expected_ip(fam) if cell else L.CLIENT[fam]), r
    assert not wait_logged(proxy, [tuple(r["src"]) for r in results], since=since), proxy.log()[since:]


CELLS = [Cell("tproxy", None, b) for b in BACKENDS] + [Cell("nat", False, "nftables"), Cell("nat", True, "iptables")]


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_reload_adds_a_port_without_dropping_the_open_connection(lab, cell):
    backend = cell.backend

    make = functools.partial(config, mode=cell.mode, preserve=cell.preserve)
    path = lab.write_config(make(backend))
    proxy = lab.start_proxy(path)
    held = Held(lab, 4, L.ECHO_PORT)
    try:
        assert held.peer == cell.expected_ip(4)
        assert held.echo("before") == "before"
        out = hup(proxy, path, make(backend, ports=f'"{L.INTERCEPT_PORTS}", {L.DIRECT_PORT}'), expect="reloaded")
        assert 'key=intercept.ports old=[8080-8090] new="[8080-8090, 9090]"' in out, out
        assert held.echo("after") == "after"
        through_proxy(lab, proxy, L.DIRECT_PORT, cell)
        lab.wait_ready(proxy, timeout=5)

        # an invalid file: one line, the running config (9090 intercepted) stays
        out = hup(proxy, path, make(backend, ports='"9090-80"'), expect="reload failed")
        failed = [ln for ln in out.splitlines() if "reload failed" in ln]
        assert failed == [
            f"tproxy: reload failed: {path}: intercept.ports[0]: inverted range '9090-80' (low end above high end); "
            "keeping the running config"
        ], out
        assert held.echo("still") == "still"
        through_proxy(lab, proxy, L.DIRECT_PORT, cell)
    finally:
        held.close()
    assert not wait_logged(proxy, [held.src]), proxy.log()
    assert proxy.stop() == 0, proxy.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reload_moves_the_listener_without_dropping_the_open_connection(lab, backend):
    path = lab.write_config(config(backend))
    proxy = lab.start_proxy(path)
    held = Held(lab, 6, L.ECHO_PORT)
    try:
        assert held.echo("before") == "before"
        out = hup(proxy, path, config(backend, listener_port=4144), expect="reloaded")
        assert "key=listener.port old=4143 new=4144" in out, out
        listening = lab.node.run(["ss", "-Hltn"]).stdout
        assert ":4144 " in listening and ":4143 " not in listening, listening
        assert held.echo("after") == "after"
        through_proxy(lab, proxy, L.ECHO_PORT)
    finally:
        held.close()
    assert not wait_logged(proxy, [held.src]), proxy.log()
    assert proxy.stop() == 0, proxy.log()


def test_reload_switches_the_backend_without_dropping_the_open_connection(lab):
    before = lab.snapshot()
    path = lab.write_config(config("nftables"))
    proxy = lab.start_proxy(path)
    held = Held(lab, 4, L.ECHO_PORT)
    try:
        assert held.echo("before") == "before"
        out = hup(proxy, path, config("iptables"), expect="reloaded")
        assert "key=backend old=nftables new=iptables" in out, out
        assert "table inet tproxy_rules" not in lab.node.run(["nft", "list", "tables"]).stdout
        assert "TPROXY_PREROUTING" in lab.node.run(["iptables-save"]).stdout
        assert held.echo("after") == "after"
        through_proxy(lab, proxy, L.ECHO_PORT)
    finally:
        held.close()
    assert proxy.stop() == 0, proxy.log()
    assert lab.snapshot() == before  # the rules removed at the end are the reloaded backend's


def test_privileged_parent_moves_the_rules_on_reload(lab, runtime):  # noqa: F811 - the imported fixture
    argv, env = runtime
    lab.workdir.chmod(0o755)  # the unprivileged proxy re-reads its config from here
    nobody = '\n[privileges]\nuser = "nobody"\n'
    path = lab.write_config(config("nftables") + nobody)
    path.chmod(0o644)
    proxy = start_unprivileged(lab, [*argv, "run", "-c", str(path)], env, path)
    held = Held(lab, 4, L.ECHO_PORT)
    try:
        assert held.echo("before") == "before"
        out = hup(
            proxy, path, config("nftables", ports=f'"{L.INTERCEPT_PORTS}", {L.DIRECT_PORT}') + nobody, expect="reloaded"
        )
        assert 'by="privileged parent"' in out and "key=intercept.ports" in out, out
        assert held.echo("after") == "after"
        through_proxy(lab, proxy, L.DIRECT_PORT)

        # the listener moves: the proxy binds 4144, then the parent points the rules at it
        out = hup(
            proxy,
            path,
            config("nftables", ports=f'"{L.INTERCEPT_PORTS}", {L.DIRECT_PORT}', listener_port=4144) + nobody,
            expect="privileged parent",
        )
        table = lab.node.run(["nft", "list", "table", "inet", "tproxy_rules"]).stdout
        assert ":4144" in table and ":4143" not in table, out + table
        assert held.echo("moved") == "moved"
        through_proxy(lab, proxy, L.ECHO_PORT)
    finally:
        held.close()
    assert proxy.stop() == 0, proxy.log()
    assert "table inet tproxy_rules" not in lab.node.run(["nft", "list", "tables"]).stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_connection_misses_the_proxy_while_reloads_come_one_after_another(lab, backend):
    """Reloads back to back (intercepted ports, then the listener port, changing) during a client batch: every
    connection succeeds and goes through the proxy: no moment without interception, no listener gap."""
    path = lab.write_config(config(backend))
    proxy = lab.start_proxy(path)
    variants = [
        config(backend, ports=f'"{L.INTERCEPT_PORTS}", {L.DIRECT_PORT}'),
        config(backend, ports=f'"{L.INTERCEPT_PORTS}", {L.DIRECT_PORT}', listener_port=4144),
        config(backend, listener_port=4144),
        config(backend),
    ]
    stop = threading.Event()
    reloads: list[int] = []
    errors: list[BaseException] = []

    def reload_loop() -> None:
        try:
            while (not stop.is_set() or len(reloads) < 4) and len(reloads) < 40:  # the batch runs meanwhile
                hup(proxy, path, variants[len(reloads) % len(variants)], expect="reloaded")
                reloads.append(1)
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            errors.append(e)

    thread = threading.Thread(target=reload_loop)
    thread.start()
    try:
        job = {"port": L.ECHO_PORT, "count": 600, "concurrency": 8, "sizes": [64], "timeout": 10}
        results = lab.connect([{**job, "dst": L.NODE[f]} for f in (4, 6)], timeout=120)
    finally:
        stop.set()
        thread.join(60)
    if errors:
        raise errors[0]
    assert len(reloads) >= 4
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad[:5]
    assert not wait_logged(proxy, [tuple(r["src"]) for r in results]), "connections that bypassed the proxy"
    assert proxy.stop() == 0, proxy.log()


def test_rules_that_fail_to_apply_leave_the_running_ones(lab):
    """Routing fails after the new rule file went in (an intercepted interface that does not exist, with the loopback
    upstream's route_localnet): the running rules are back, one line says why, the proxy serves on."""
    text = L.proxy_config("tproxy", "nftables", upstream="loopback")
    path = lab.write_config(text)
    proxy = lab.start_proxy(path)
    rules_before = lab.node.run(["nft", "list", "table", "inet", "tproxy_rules"]).stdout
    held = Held(lab, 4, L.ECHO_PORT)
    try:
        bad = text.replace("[intercept]\n", '[intercept]\ninterfaces = ["nosuch0"]\n')
        out = hup(proxy, path, bad, expect="reload failed")
        failed = [ln for ln in out.splitlines() if "reload failed" in ln]
        assert len(failed) == 1 and "nosuch0" in failed[0] and failed[0].endswith("keeping the running config"), out
        assert lab.node.run(["nft", "list", "table", "inet", "tproxy_rules"]).stdout == rules_before
        assert held.echo("after") == "after"
        since = len(proxy.log())
        results = lab.connect([{"dst": L.NODE[f], "port": L.ECHO_PORT, "sizes": [100]} for f in (4, 6)])
        assert all(r["ok"] and r["peer"][0] == L.CLIENT[f] for r, f in zip(results, (4, 6), strict=True)), results
        assert not wait_logged(proxy, [tuple(r["src"]) for r in results], since=since), proxy.log()[since:]
    finally:
        held.close()
    assert proxy.stop() == 0, proxy.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reload_whose_routing_fails_after_the_new_rules_leaves_the_running_ones(lab, backend):
    """A reload that adds IPv6 while routing.table already holds someone else's IPv6 default route: the new rules (both
    families) go in, then the kernel refuses our local route ("File exists"). One line says so; the node's rules and
    routes read exactly as before (with iptables-nft: no ip6 table left behind either), and the proxy serves on."""
    v4 = config(backend).replace("ipv6 = true", "ipv6 = false")
    path = lab.write_config(v4)
    proxy = lab.start_proxy(path)
    lab.node.run(["ip", "-6", "route", "add", "blackhole", "default", "table", "100"])

    def state() -> str:  # (the kernel adds IPv6 link-local routes by itself, whenever DAD is done)
        return "\n".join(line for line in lab.snapshot().splitlines() if "fe80:" not in line)

    before = state()
    held = Held(lab, 4, L.ECHO_PORT)
    try:
        out = hup(proxy, path, config(backend), expect="reload failed")
        failed = [ln for ln in out.splitlines() if "reload failed" in ln]
        assert len(failed) == 1 and "IPv6" in failed[0] and "File exists" in failed[0], out
        assert failed[0].endswith("keeping the running config"), out
        assert state() == before
        assert held.echo("after") == "after"
        since = len(proxy.log())
        (r,) = lab.connect([{"dst": L.NODE[4], "port": L.ECHO_PORT, "sizes": [100]}])
        assert r["ok"] and r["peer"][0] == L.CLIENT[4], r
        assert not wait_logged(proxy, [tuple(r["src"])], since=since), proxy.log()[since:]
    finally:
        held.close()
    assert proxy.stop() == 0, proxy.log()
    lab.node.run(["ip", "-6", "route", "del", "blackhole", "default", "table", "100"])
