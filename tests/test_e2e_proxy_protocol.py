"""End to end, PROXY protocol in and out, with real peers (root, network namespaces).

In: HAProxy (Debian's) runs in the client namespace in front of the application's port, connecting from a load
balancer address of its own (:data:`LB`) with ``send-proxy-v2`` / ``send-proxy``; the lab client connects to HAProxy
from the client's address. tproxy intercepts HAProxy's connection, reads the header and connects to the application
from the client named in it: the application must see the client's address, not HAProxy's. A client outside
``proxy_protocol_from`` cannot spoof its address by sending a header (the application gets those bytes as data); a
trusted source that sends a malformed or incomplete header is reset and never reaches the application.

Out: nginx (``listen ... proxy_protocol``) behind tproxy with ``send_proxy_protocol``: nginx's ``$proxy_protocol_addr``
is the client's address, in tproxy mode and in nat mode without ``preserve_source``, where the proxy runs as nobody
with no capability at all.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab_fixtures import Cell, wait_logged_results
from tests.test_privileges_netns import NOBODY, SETPRIV, WITHOUT_CAPS, runtime_argv, start
from tproxy import lab as L
from tproxy import proxy_protocol as pp
from tproxy.privileges import ProcessCredentials

pytestmark = pytest.mark.root

LB = {4: "198.18.0.21", 6: "fd00:18::21"}  # HAProxy's source towards the node: the trusted load balancer
HAPROXY_PORT = {"v1": 7001, "v2": 7002, "mixed": 7003}  # in the client namespace, on the client's address
NGINX_PORT = 8085  # intercepted, free in the lab's application
PP_TIMEOUT = 1.0
CELLS = [Cell("tproxy", None, "nftables"), Cell("nat", True, "nftables"), Cell("tproxy", None, "iptables")]

HAPROXY_CFG = """\
global
    pidfile {dir}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""
HAPROXY_LISTEN = """\
listen {name}
    bind {bind}
    source {source}:0
    server app {server} {send}
"""

NGINX_CFG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {dir}/nginx-access.log pp;
    server {{
        listen {port} proxy_protocol;
        listen [::]:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "PP $proxy_protocol_addr $proxy_protocol_port $remote_addr\\n";
        }}
    }}
}}
"""

# A raw client, run in the client namespace: connect (from SRC if given), send DATA (hex), then either shut down
# writing ("eof") or not ("hold"), read until EOF, a reset or the timeout; one JSON line.
RAW_CLIENT = r"""
import errno, json, socket, sys, time
src, dst, port, data, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
s.settimeout(10)
if src:
    s.bind((src, 0))
s.connect((dst, port))
res = {"src": list(s.getsockname()[:2]), "error": None}
t0 = time.monotonic()
got = b""
try:
    s.sendall(data)
    if how == "eof":
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError as e:  # reset already: recv says so
            res["error"] = errno.errorcode.get(e.errno, str(e))
    while chunk := s.recv(65536):
        got += chunk
except OSError as e:
    res["error"] = errno.errorcode.get(e.errno, str(e)) if e.errno else "timeout"
res["elapsed"] = time.monotonic() - t0
res["got"] = got.decode(errors="replace")
print(json.dumps(res))
"""


def raw(lab: L.Lab, dst: str, port: int, data: bytes, *, src: str = "", how: str = "eof") -> dict:
    r = lab.client.run([sys.executable, "-c", RAW_CLIENT, src, dst, str(port), data.hex(), how], timeout=30)
    return json.loads(r.stdout)


def metrics(lab: L.Lab) -> str:
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:4191/metrics', timeout=10).read().decode())"
    return lab.node.run([sys.executable, "-c", code]).stdout


def counter(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def app_lines(lab: L.Lab) -> list[str]:
    path = lab.workdir / "app.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def lab() -> Iterator[L.Lab]:
    with L.Lab.up(app=False) as lab:
        for fam in (4, 6):
            cmd = ["ip", "addr", "add", f"{LB[fam]}/{L.PREFIX[fam]}", "dev", "veth0"]
            lab.client.run(cmd + (["nodad", "preferred_lft", "0"] if fam == 6 else []))
        lab.start_app(log=lab.workdir / "app.log")
        cfg = HAPROXY_CFG.format(dir=lab.workdir)
        for fam in (4, 6):
            client, node = L.CLIENT[fam], L.NODE[fam]  # (HAProxy reads an IPv6 address bare: up to the last colon)
            for version, send in (("v1", "send-proxy"), ("v2", "send-proxy-v2")):
                cfg += HAPROXY_LISTEN.format(
                    name=f"{version}_{fam}",
                    bind=f"{client}:{HAPROXY_PORT[version]}",
                    source=LB[fam],
                    server=f"{node}:{L.ECHO_PORT}",
                    send=send,
                )
        # an IPv4 client, an IPv6 connection to the application: the header's client cannot be the source
        cfg += HAPROXY_LISTEN.format(
            name="mixed",
            bind=f"{L.CLIENT[4]}:{HAPROXY_PORT['mixed']}",
            source=LB[6],
            server=f"{L.NODE[6]}:{L.ECHO_PORT}",
            send="send-proxy-v2",
        )
        (lab.workdir / "haproxy.cfg").write_text(cfg)
        log = open(lab.workdir / "haproxy.log", "ab")  # noqa: SIM115 - kept for the process's lifetime
        haproxy = lab.client.popen(
            ["haproxy", "-db", "-f", str(lab.workdir / "haproxy.cfg")], stdout=log, stderr=log, start_new_session=True
        )
        try:
            wait_listening(
                lab.client, [HAPROXY_PORT["v2"], HAPROXY_PORT["mixed"]], haproxy, lab.workdir / "haproxy.log"
            )
            yield lab
        finally:
            haproxy.send_signal(signal.SIGTERM)
            try:
                haproxy.wait(10)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait()
            log.close()


def wait_listening(ns, ports: list[int], proc: subprocess.Popen, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = ns.run(["ss", "-Htln"]).stdout
        if all(re.search(rf":{p}\b", out) for p in ports):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not listening on {ports}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def pp_config(cell: Cell, **kw) -> str:
    return cell.config(
        proxy_protocol="any",
        proxy_protocol_from=[f"{LB[4]}/32", f"{LB[6]}/128"],
        proxy_protocol_timeout=PP_TIMEOUT,
        **kw,
    )


@pytest.fixture(scope="module")
def proxied(lab, request):
    cell: Cell = request.param
    proxy = lab.start_proxy(pp_config(cell))
    try:
        yield lab, proxy, cell
    finally:
        proxy.stop()


cells = pytest.mark.parametrize("proxied", CELLS, indirect=True, scope="module", ids=str)
family = pytest.mark.parametrize("family", (4, 6), ids=lambda f: f"ipv{f}")


# ----------------------------------------------------------------------------------------------------------------
# In


@cells
@family
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_behind_haproxy_the_application_sees_the_client(proxied, family, version):
    lab, proxy, cell = proxied
    before = metrics(lab)
    results = lab.connect(
        {"dst": L.CLIENT[family], "port": HAPROXY_PORT[version], "count": 3, "concurrency": 3, "sizes": [1000]}
    )
    assert all(r["ok"] for r in results), results
    for r in results:
        assert r["src"][0] == L.CLIENT[family]
        assert r["peer"][0] == L.CLIENT[family], f"the application saw {r['peer']}, not the client (HAProxy: {LB})"
    after = metrics(lab)
    assert counter(after, "tproxy_connections_accepted_total") - counter(before, "tproxy_connections_accepted_total")
    assert "tproxy_proxy_protocol_errors_total{" not in after, after
    # the proxy's log names the client of the header (its address and port as HAProxy saw them)
    missing = wait_logged_results(proxy, cell, [{"src": r["src"], "peer": None} for r in results])
    assert not missing, proxy.log()[-3000:]


@cells
def test_a_header_of_the_other_family_connects_from_an_ordinary_source(proxied):
    lab, proxy, cell = proxied
    before = counter(metrics(lab), "tproxy_source_address_fallbacks_total")
    results = lab.connect({"dst": L.CLIENT[4], "port": HAPROXY_PORT["mixed"], "sizes": [100]})
    assert results[0]["ok"], results
    assert results[0]["peer"][0] == L.NODE[6], results  # not HAProxy's address, and no IPv4 source on IPv6
    assert counter(metrics(lab), "tproxy_source_address_fallbacks_total") == before + 1


@cells
@family
def test_a_header_from_an_untrusted_client_is_data(proxied, family):
    lab, proxy, cell = proxied
    forged = b"PROXY TCP4 198.18.200.1 198.18.0.2 1234 8080\r\n"
    r = raw(lab, L.NODE[family], L.ECHO_PORT, forged + b"hello")
    assert r["error"] is None, r
    head, _, rest = r["got"].partition("\n")
    assert head.split()[:2] == ["PEER", cell.expected_ip(family)], r
    assert rest == (forged + b"hello").decode(), r


@cells
@family
@pytest.mark.parametrize(
    ("case", "data", "how", "why"),
    [
        ("truncated", pp.build("v2", ("198.18.0.1", 1), ("198.18.0.2", 2))[:20], "eof", "eof"),
        ("LF without CR", b"PROXY TCP4 198.18.0.1 198.18.0.2 1 2\n", "hold", "bad_line"),
        ("bad signature", b"GET / HTTP/1.1\r\n\r\n", "hold", "bad_signature"),
        ("oversized v2", pp.V2_SIGNATURE + b"\x21\x11\x10\x00" + bytes(100), "hold", "too_long"),
        ("never completes", b"PROXY TCP4 198.18.0.1 ", "hold", "timeout"),
    ],
)
def test_a_bad_header_from_a_trusted_source_is_reset_and_never_reaches_the_application(
    proxied, family, case, data, how, why
):
    lab, proxy, cell = proxied
    before, seen = metrics(lab), len(app_lines(lab))
    r = raw(lab, L.NODE[family], L.ECHO_PORT, data, src=LB[family], how=how)
    assert r["error"] == "ECONNRESET" and r["got"] == "", r
    if why == "timeout":
        assert PP_TIMEOUT - 0.1 <= r["elapsed"] < PP_TIMEOUT + 2, r
    else:
        assert r["elapsed"] < PP_TIMEOUT, r
    name = f'tproxy_proxy_protocol_errors_total{{reason="{why}"}}'
    assert counter(metrics(lab), name) == counter(before, name) + 1
    assert len(app_lines(lab)) == seen, app_lines(lab)[seen:]
    # and the next connection is served
    results = lab.connect({"dst": L.CLIENT[family], "port": HAPROXY_PORT["v2"], "sizes": [10]})
    assert results[0]["ok"] and results[0]["peer"][0] == L.CLIENT[family], results


# ----------------------------------------------------------------------------------------------------------------
# Out


@pytest.fixture(scope="module")
def nginx(lab) -> Iterator[Path]:
    """nginx on :data:`NGINX_PORT` with ``proxy_protocol``; yields its access log. The proxy that the tests above
    left running (a module-scoped fixture lives to the module's end) is stopped first: one proxy at a time."""
    for proxy in lab.proxies:
        proxy.stop()
    lab.workdir.chmod(0o755)
    conf = lab.workdir / "nginx.conf"
    conf.write_text(NGINX_CFG.format(dir=lab.workdir, port=NGINX_PORT))
    log = open(lab.workdir / "nginx.out", "ab")  # noqa: SIM115 - kept for the process's lifetime
    proc = lab.node.popen(
        ["nginx", "-c", str(conf), "-p", str(lab.workdir)], stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_listening(lab.node, [NGINX_PORT], proc, lab.workdir / "nginx-error.log")
        yield lab.workdir / "nginx-access.log"
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def get(lab: L.Lab, family: int) -> tuple[dict, list[str]]:
    """GET / from nginx through the proxy: the client's result and the words of nginx's answer."""
    r = raw(lab, L.NODE[family], NGINX_PORT, b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
    errors = lab.workdir / "nginx-error.log"
    assert r["error"] is None and " 200 " in r["got"].split("\r\n")[0], (r, errors.read_text()[-1000:])
    body = r["got"].partition("\r\n\r\n")[2]
    assert body.startswith("PP "), r
    return r, body.split()[1:]


@family
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_nginx_learns_the_client_from_the_header_we_send(lab, nginx, family, version):
    cell = Cell("tproxy", None, "nftables")
    proxy = lab.start_proxy(cell.config(send_proxy_protocol=version))
    try:
        r, (pp_addr, pp_port, remote) = get(lab, family)
    finally:
        proxy.stop()
    assert [pp_addr, int(pp_port)] == r["src"], r
    assert remote == L.CLIENT[family]  # tproxy mode: the TCP source is the client's too
    assert f"{r['src'][0]} {r['src'][1]} {remote}" in nginx.read_text()


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[list[str], dict[str, str]]]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="tpx-pp-"))
    try:
        yield runtime_argv(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_nat_without_any_capability_nginx_still_learns_the_client(lab, nginx, runtime):
    """mode = "nat", preserve_source = false: the header carries the client's address, so the proxy needs no
    capability at all (run as nobody, empty CapEff, after `tproxy rules apply` as root)."""
    argv, env = runtime
    lab.workdir.chmod(0o755)
    config = lab.write_config(Cell("nat", False, "nftables").config(send_proxy_protocol="v2"), "nat-nobody.toml")
    config.chmod(0o644)
    lab.tproxy("rules", "apply", "-c", str(config))
    try:
        proxy = start(lab, [*SETPRIV, *WITHOUT_CAPS, *argv, "run", "--no-rules", "-c", str(config)], env, config)
        try:
            creds = ProcessCredentials.of(proxy.pid)
            assert creds.uids == (NOBODY,) * 4
            assert creds.effective == creds.permitted == creds.bounding == 0
            for family in (4, 6):
                r, (pp_addr, pp_port, remote) = get(lab, family)
                assert [pp_addr, int(pp_port)] == r["src"], r
                assert remote == L.NODE[family]  # nat: the TCP source is the proxy's own address
                assert f"{r['src'][0]} {r['src'][1]} {remote}" in nginx.read_text()
        finally:
            assert proxy.stop() == 0, proxy.log()
    finally:
        lab.tproxy("rules", "remove", "-c", str(config))
