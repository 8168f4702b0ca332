"""UDP end to end (root): the real ``tproxy run`` in the lab's node namespace, a UDP application there that answers
with the source address it saw (tproxy/lab_udp.py), clients with *connected* UDP sockets in the client namespace (a
connected socket accepts answers only from the address it wrote to: an answer from anywhere else is lost, and the
flow fails).

"Went through the proxy" is never taken from "the application answered" (with nftables a missing proxy fails open):
the proxy's log names each session's client, and with ``upstream = "original"`` the application sees a source port
other than the client's. A reply with a wrong UDP checksum is dropped by the client's kernel, so these tests also
check the header we build.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab_fixtures import entries_of, fresh_ports, node_conntrack
from tproxy import lab as L
from tproxy.lab_udp import PROBE

pytestmark = pytest.mark.root

PORTS = (5353, 5354)  # the application's
DOWN = 5355  # intercepted, nothing listens
SIZES = [0, 1, 1472, 8000, 65507]


def udp_config(backend: str, *, upstream: str = "original", **proxy: object) -> str:
    text = L.proxy_config("tproxy", backend, upstream=upstream)
    text = text.replace(
        f'ports = ["{L.INTERCEPT_PORTS}"]', f'ports = ["{L.INTERCEPT_PORTS}"]\nudp_ports = ["{PORTS[0]}-{DOWN}"]'
    )
    settings = {"udp_idle_timeout": 2, **proxy}
    for key in settings:
        text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
    return text.replace("[proxy]\n", "[proxy]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


@pytest.fixture(scope="module")
def lab() -> Iterator[L.Lab]:
    with L.Lab.up(app=False) as lab:
        app = lab.node.popen(
            [sys.executable, "-m", "tproxy.lab_udp", "app", *map(str, PORTS)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            assert app.stdout.readline().strip() == "UDP APP READY"
            yield lab
        finally:
            app.kill()
            app.wait()


@pytest.fixture
def proxy(lab, request) -> Iterator[L.Proxy]:
    """A proxy for the test's ``config`` (indirect parameter: a config text), stopped afterwards."""
    p = lab.start_proxy(request.param)
    try:
        yield p
    finally:
        p.stop()


def flows(lab: L.Lab, jobs: list[dict], timeout: float = 120) -> list[dict]:
    r = lab.client.run(
        [sys.executable, "-m", "tproxy.lab_udp", "client"], input=json.dumps(jobs), timeout=timeout, check=False
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def metric(lab: L.Lab, name: str) -> float:
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:4191/metrics', timeout=10).read().decode())"
    text = lab.node.run([sys.executable, "-c", code]).stdout
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def sessions_logged(proxy: L.Proxy, ip: str, port: int, *, count: int = 1, timeout: float = 15) -> list[str]:
    """The proxy's ``udp_session`` lines for client ``ip:port``, once there are ``count`` of them (bounded wait: a
    session is logged when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in L.proxy_log_names(proxy.log(), ip, port) if " udp_session " in ln]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def node_udp_sockets(lab: L.Lab, ip: str) -> list[str]:
    """The node's UDP sockets bound to ``ip`` (the client's address: our upstream legs)."""
    out = lab.node.run(["ss", "-uanH"]).stdout
    return [ln for ln in out.splitlines() if re.search(rf"\s\[?{re.escape(ip)}\]?:\d+\s", ln)]


CELLS = [udp_config("nftables"), udp_config("iptables")]
cells = pytest.mark.parametrize("proxy", CELLS, indirect=True, ids=["nftables", "iptables"])
TASKS = udp_config("nftables", relay='"tasks"')  # the other relay engine: each session's task reads its replies
family = pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))


@pytest.mark.parametrize("proxy", [*CELLS, TASKS], indirect=True, ids=["nftables", "iptables", "tasks"])
@family
def test_the_client_gets_its_own_address_back_and_every_size_whole(lab, proxy, family):
    results = flows(lab, [{"dst": L.NODE[family], "port": PORTS[0], "sizes": SIZES} for _ in range(2)])
    for r in results:
        assert r["ok"] and r["retries"] == 0, r
        assert r["peer"][0] == L.CLIENT[family] == r["src"][0], r
        assert r["peer"][1] != r["src"][1], f"the application saw the client's own port: not proxied? {r}"
        lines = sessions_logged(proxy, *r["src"])
        assert len(lines) == 1, proxy.log()
        dst = f"[{L.NODE[6]}]" if family == 6 else L.NODE[4]
        assert f"original_dst={dst}:{PORTS[0]} " in lines[0], lines
        assert "datagrams_in=6 " in lines[0] and "datagrams_out=6 " in lines[0], lines
        assert f"bytes_in={sum(SIZES) + len(PROBE)} " in lines[0] and "reason=idle" in lines[0], lines


@cells
@family
def test_the_same_client_port_towards_two_destinations(lab, proxy, family):
    (port,) = fresh_ports(1)
    jobs = [{"dst": L.NODE[family], "port": p, "src_port": port, "sizes": [100, 0]} for p in PORTS]
    results = flows(lab, jobs)
    assert all(r["ok"] and r["src"][1] == port for r in results), results
    assert len({tuple(r["peer"]) for r in results}) == 2, results  # two upstream legs
    lines = sessions_logged(proxy, L.CLIENT[family], port, count=2)
    assert sorted(re.search(r"original_dst=\S+:(\d+) ", ln).group(1) for ln in lines) == [str(p) for p in PORTS]


@pytest.mark.parametrize("proxy", [udp_config("nftables")], indirect=True, ids=["nftables"])
def test_idle_sessions_expire_and_a_new_datagram_opens_a_new_one(lab, proxy):
    (port,) = fresh_ports(1)
    job = {"dst": L.NODE[4], "port": PORTS[0], "src_port": port, "sizes": [10]}
    first = flows(lab, [job])[0]
    assert first["ok"], first
    assert any(f":{first['peer'][1]} " in ln for ln in node_udp_sockets(lab, L.CLIENT[4]))
    assert len(sessions_logged(proxy, L.CLIENT[4], port)) == 1  # ended: udp_idle_timeout = 2
    assert not node_udp_sockets(lab, L.CLIENT[4]), "the expired session's socket is still open"
    assert metric(lab, "tproxy_udp_sessions_open") == 0
    second = flows(lab, [job])[0]
    assert second["ok"] and second["peer"] != first["peer"], (first, second)
    lines = sessions_logged(proxy, L.CLIENT[4], port, count=2)
    assert len(lines) == 2 and all("reason=idle" in ln for ln in lines), lines
    assert metric(lab, "tproxy_udp_sessions_total") == 2


@pytest.mark.parametrize(
    "proxy", [udp_config("iptables", udp_max_sessions=2, udp_idle_timeout=60)], indirect=True, ids=["iptables"]
)
def test_max_sessions_drops_new_flows_and_keeps_the_live_ones(lab, proxy):
    ports = fresh_ports(3)
    job = {"dst": L.NODE[4], "port": PORTS[0], "sizes": [10]}
    live = flows(lab, [{**job, "src_port": p} for p in ports[:2]])
    assert all(r["ok"] for r in live), live
    refused = flows(lab, [{**job, "src_port": ports[2], "timeout": 0.5, "retries": 1}])[0]
    assert not refused["ok"] and refused["peer"] is None, refused
    assert metric(lab, 'tproxy_udp_dropped_total{reason="max_sessions"}') == 2
    # the live sessions were not evicted: they still answer, from the same upstream legs
    again = flows(lab, [{**job, "src_port": p} for p in ports[:2]])
    assert [r["peer"] for r in again] == [r["peer"] for r in live], (live, again)
    assert metric(lab, "tproxy_udp_sessions_open") == 2 and metric(lab, "tproxy_udp_sessions_total") == 2


def test_sigterm_ends_sessions_at_once_and_leaves_no_socket_and_no_rule(lab):
    before = lab.snapshot()
    proxy = lab.start_proxy(udp_config("nftables", udp_idle_timeout=600, shutdown_grace=30))
    try:
        results = flows(lab, [{"dst": L.NODE[f], "port": p, "sizes": [1]} for f in (4, 6) for p in PORTS])
        assert all(r["ok"] for r in results), results
        assert len(node_udp_sockets(lab, L.CLIENT[4]) + node_udp_sockets(lab, L.CLIENT[6])) == 4
        t0 = time.monotonic()
        assert proxy.stop(signal.SIGTERM) == 0, proxy.log()
        assert time.monotonic() - t0 < 5, "UDP sessions held the shutdown up (nothing to drain)"
    finally:
        proxy.stop(signal.SIGKILL)
    assert proxy.log().count("reason=shutdown") == 4, proxy.log()
    assert not node_udp_sockets(lab, L.CLIENT[4]) and not node_udp_sockets(lab, L.CLIENT[6])
    assert lab.snapshot() == before


@pytest.mark.parametrize("proxy", [udp_config("nftables", upstream="loopback")], indirect=True, ids=["loopback"])
@family
def test_loopback_upstream_keeps_the_client_port(lab, proxy, family):
    results = flows(lab, [{"dst": L.NODE[family], "port": PORTS[1], "sizes": [0, 1472]}])
    assert all(r["ok"] and r["peer"] == r["src"] for r in results), results
    assert sessions_logged(proxy, *results[0]["src"]), proxy.log()


def test_reload_turns_udp_on_and_off(lab):
    """Started without ``udp_ports``, a SIGHUP that adds them binds the UDP listeners before the rules point at them
    (iptables: a TPROXY rule without a listener drops the datagram); one that removes them closes the listeners."""
    plain = L.proxy_config("tproxy", "iptables")
    proxy = lab.start_proxy(plain)
    try:
        job = {"dst": L.NODE[4], "port": PORTS[0], "sizes": [5]}
        direct = flows(lab, [job])[0]
        assert direct["ok"] and direct["peer"] == direct["src"], direct  # not intercepted yet

        def reload(text: str) -> None:
            n = proxy.log().count(" reloaded ")
            proxy.config_path.write_text(text)
            proxy.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while proxy.log().count(" reloaded ") == n:
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.05)

        reload(udp_config("iptables"))
        for f in (4, 6):
            r = flows(lab, [{**job, "dst": L.NODE[f]}])[0]
            assert r["ok"] and r["peer"][0] == r["src"][0] and r["peer"][1] != r["src"][1], r
            assert sessions_logged(proxy, *r["src"]), proxy.log()
        assert ":4143 " in lab.node.run(["ss", "-uanH", "sport", "= :4143"]).stdout
        reload(plain)
        assert not lab.node.run(["ss", "-uanH", "sport", "= :4143"]).stdout.strip()
        again = flows(lab, [job])[0]
        assert again["ok"] and again["peer"] == again["src"], again
        assert proxy.stop() == 0
    finally:
        proxy.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[list[str], dict[str, str]]]:
    from tests.test_privileges_netns import runtime_argv

    workdir = Path(tempfile.mkdtemp(prefix="tpx-udp-priv-"))
    try:
        yield runtime_argv(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_dnsmasq_sees_the_client_through_a_proxy_running_as_nobody_with_net_raw_only(runtime):
    """A real DNS server on port 53 (dnsmasq, on the wildcard address) behind the proxy, whose serving process is
    uid 65534 with CAP_NET_RAW only (privileged parent): ``kdig`` in the client namespace gets its answer from the
    address it asked, and dnsmasq's query log names the client's address."""
    from tests.test_privileges_netns import NET_RAW_ONLY, NOBODY, serving_child, start
    from tproxy.privileges import ProcessCredentials

    argv, env = runtime
    with L.Lab.up(app=False) as lab:
        lab.workdir.chmod(0o755)
        dns_log = lab.workdir / "dnsmasq.log"
        with open(dns_log, "wb") as out:
            dnsmasq = lab.node.popen(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--log-facility=-",
                    "--log-queries",
                    "--no-resolv",
                    "--no-hosts",
                    "--pid-file=",
                    "--port=53",
                    "--user=root",
                    "--address=/tproxy.test/198.18.0.99",
                    "--address=/tproxy.test/fd00::99",
                ],  # fmt: skip
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 10
            while ":53 " not in lab.node.run(["ss", "-uanH", "sport", "= :53"]).stdout:
                assert time.monotonic() < deadline and dnsmasq.poll() is None, dns_log.read_text()
                time.sleep(0.05)
            text = L.proxy_config("tproxy", "nftables").replace(
                f'ports = ["{L.INTERCEPT_PORTS}"]', f'ports = ["{L.INTERCEPT_PORTS}"]\nudp_ports = [53]'
            )
            config = lab.write_config(text + '\n[privileges]\nuser = "nobody"\n')
            parent = start(lab, [*argv, "run", "-c", str(config)], env, config)
            creds = ProcessCredentials.of(serving_child(parent.pid))
            assert creds.uids == (NOBODY,) * 4 and creds.effective == creds.permitted == NET_RAW_ONLY
            for fam, qtype, answer in ((4, "A", "198.18.0.99"), (6, "AAAA", "fd00::99")):
                r = lab.client.run(
                    ["kdig", f"@{L.NODE[fam]}", "tproxy.test", qtype, "+short", "+timeout=2", "+retry=2"], check=False
                )
                assert r.stdout.strip() == answer, (r.stdout, r.stderr, parent.log(), dns_log.read_text())
                assert f"query[{qtype}] tproxy.test from {L.CLIENT[fam]}" in dns_log.read_text()
            assert parent.stop(signal.SIGTERM) == 0, parent.log()
            log = parent.log()
            for fam in (4, 6):
                node = f"[{L.NODE[6]}]" if fam == 6 else L.NODE[4]
                assert re.search(
                    rf" udp_session client=\[?{re.escape(L.CLIENT[fam])}\]?:\d+ original_dst={re.escape(node)}:53 ", log
                ), log
        finally:
            dnsmasq.kill()
            dnsmasq.wait()


@pytest.mark.parametrize("proxy", [udp_config("nftables", udp_idle_timeout=30)], indirect=True, ids=["nftables"])
def test_a_thousand_concurrent_lock_step_flows_from_one_address(lab, proxy):
    """1,000 flows at once from one client address, each a connected socket sending 4 datagrams of random sizes
    (0, 1, 1472, 8,000 or 65,507 bytes) one at a time, with 3 retries on a 2 s timeout: every datagram answered
    exactly, no retry needed, every session logged at the stop."""
    jobs = [{"dst": L.NODE[4], "port": PORTS[0], "choose": SIZES, "count": 4, "seed": 15} for _ in range(1000)]
    t0 = time.monotonic()
    results = flows(lab, jobs, timeout=240)
    elapsed = time.monotonic() - t0
    bad = [r for r in results if not r["ok"]]
    assert not bad, (len(bad), bad[:3])
    retries = sum(r["retries"] for r in results)
    assert retries == 0, f"{retries} retries in {elapsed:.1f}s"
    assert metric(lab, "tproxy_udp_sessions_total") == 1000
    assert metric(lab, 'tproxy_udp_datagrams_total{direction="out"}') == 5000
    assert sum(v for k, v in dropped(lab).items()) == 0, dropped(lab)
    assert proxy.stop() == 0
    assert proxy.log().count(" udp_session ") == 1000


def dropped(lab: L.Lab) -> dict[str, float]:
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:4191/metrics', timeout=10).read().decode())"
    text = lab.node.run([sys.executable, "-c", code]).stdout
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^tproxy_udp_dropped_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


@pytest.mark.parametrize("proxy", [udp_config("nftables"), TASKS], indirect=True, ids=["nftables", "tasks"])
def test_a_session_to_a_closed_port_ends_refused(lab, proxy):
    """Nothing listens on the application's port: its ICMP port unreachable ends the session (``refused``) at once,
    not after the idle timeout, and the client gets no answer."""
    (port,) = fresh_ports(1)
    r = flows(lab, [{"dst": L.NODE[4], "port": DOWN, "src_port": port, "sizes": [], "timeout": 0.5, "retries": 0}])[0]
    assert not r["ok"] and r["peer"] is None, r
    (line,) = sessions_logged(proxy, L.CLIENT[4], port)
    assert "reason=refused" in line and "datagrams_out=0 " in line, line
    assert float(re.search(r"duration_ms=(\S+)", line).group(1)) < 1000, line


@cells
@family
def test_no_conntrack_entry_for_the_client_leg_and_the_upstream_leg_tracked(lab, proxy, family):
    """The client's datagrams are notracked in raw prerouting, the replies from the raw socket (the listener's mark,
    the original destination as source) in raw output: no entry in either orientation (README, "What the rules
    do"). The upstream leg keeps its entry (its connection mark routes the application's answers)."""
    ports = fresh_ports(4)
    results = flows(lab, [{"dst": L.NODE[family], "port": PORTS[0], "src_port": p, "sizes": [10, 0]} for p in ports])
    assert all(r["ok"] and r["peer"][1] != r["src"][1] for r in results), results
    entries = node_conntrack(lab, "udp")
    server = (L.NODE[family], PORTS[0])
    client_legs = [e for r in results for e in entries_of(entries, tuple(r["src"]), server)]
    assert client_legs == [], client_legs
    assert all(entries_of(entries, tuple(r["peer"]), server) for r in results), (results, entries)


def test_a_privileged_parent_moves_the_udp_rules_only_once_the_proxy_holds_the_udp_port(runtime):
    """Behind a privileged parent (the proxy runs as nobody), with iptables (a TPROXY rule without a transparent
    socket drops the datagram):

    - a reload that turns ``udp_ports`` on while someone else holds UDP port 4143: the proxy cannot bind it (one
      line, it keeps its running config), and the parent, which waits for the *proxy's* UDP socket, installs nothing:
      UDP still reaches the application directly instead of being dropped;
    - once the port is free, the same reload: the proxy binds it, then the parent installs the rules;
    - a reload that moves ``listener.port``: the rules point at 4144 once the proxy holds it over TCP and UDP; the old
      UDP listener receives until the next reload, which closes it.
    """
    from tests.test_privileges_netns import start

    argv, env = runtime
    nobody = '\n[privileges]\nuser = "nobody"\n'
    with L.Lab.up(app=False) as lab:
        lab.workdir.chmod(0o755)
        app = lab.node.popen(
            [sys.executable, "-m", "tproxy.lab_udp", "app", *map(str, PORTS)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        holder = lab.node.popen(
            [
                sys.executable,
                "-c",
                "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',4143))\n"
                "print('ready',flush=True)\ntime.sleep(120)",
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert app.stdout.readline().strip() == "UDP APP READY"
            assert holder.stdout.readline() == "ready\n"
            path = lab.write_config(L.proxy_config("tproxy", "iptables") + nobody)
            path.chmod(0o644)
            parent = start(lab, [*argv, "run", "-c", str(path)], env, path)

            def reload(text: str, expect: str) -> str:
                since = len(parent.log())
                path.write_text(text + nobody)
                parent.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30
                while expect not in parent.log()[since:]:
                    assert parent.proc.poll() is None and time.monotonic() < deadline, parent.log()[since:]
                    time.sleep(0.05)
                return parent.log()[since:]

            def through_proxy() -> None:
                for f in (4, 6):
                    r = flows(lab, [{"dst": L.NODE[f], "port": PORTS[0], "sizes": [5, 1472]}])[0]
                    assert r["ok"] and r["peer"][0] == r["src"][0] and r["peer"][1] != r["src"][1], r
                    assert sessions_logged(parent, *r["src"]), parent.log()

            def udp_bound(port: int) -> str:
                return lab.node.run(["ss", "-uanpH", f"sport = :{port}"]).stdout

            out = reload(udp_config("iptables"), "installed=")
            assert "tproxy: reload failed: cannot listen on udp 0.0.0.0:4143: Address already in use" in out, out
            assert 'installed="nothing: the proxy does not listen on the new port"' in out, out
            assert "intercept-udp" not in lab.node.run(["iptables-save"]).stdout
            r = flows(lab, [{"dst": L.NODE[4], "port": PORTS[0], "sizes": [5]}])[0]
            assert r["ok"] and r["peer"] == r["src"], r  # straight to the application: not intercepted, not dropped

            holder.kill()
            holder.wait()
            out = reload(udp_config("iptables"), 'by="privileged parent"')
            assert "reload failed" not in out, out
            assert "intercept-udp" in lab.node.run(["iptables-save"]).stdout
            through_proxy()

            moved = udp_config("iptables").replace(f"port = {L.LISTENER_PORT}", "port = 4144")
            out = reload(moved, 'by="privileged parent"')
            assert "reload failed" not in out, out
            save = lab.node.run(["iptables-save"]).stdout + lab.node.run(["ip6tables-save"]).stdout
            assert "--on-port 4144" in save and f"--on-port {L.LISTENER_PORT}" not in save, save
            assert udp_bound(4144).count("python") == 2, udp_bound(4144)  # IPv4 and IPv6, the proxy's
            through_proxy()
            assert udp_bound(L.LISTENER_PORT), "the old UDP listener closed before the next reload"
            reload(moved, "reloaded")
            assert not udp_bound(L.LISTENER_PORT), udp_bound(L.LISTENER_PORT)
            assert parent.stop() == 0, parent.log()
            assert "TPROXY" not in lab.node.run(["iptables-save"]).stdout
        finally:
            for proc in (holder, app):
                proc.kill()
                proc.wait()
