"""End to end: the real ``tproxy run`` in a node namespace, a client in another, an application that says whom it saw.

The matrix is {tproxy, nat, nat + preserve_source} × {nftables, iptables} × {IPv4, IPv6}. One lab serves the whole
module and one proxy serves every test of a cell (pytest groups the tests by cell), so a cell costs one start.

"Went through the proxy" is never taken from "the application answered": in tproxy mode a missing proxy fails open.
Proof is the proxy's log naming the client's address and port, and, with ``upstream = "original"`` and the client's
IP kept, the application seeing a source port other than the client's.
"""

from __future__ import annotations

import collections
import random
import re
import time

import pytest

from tests.lab_fixtures import (
    FAMILIES,
    MATRIX,
    TASKS_CELLS,
    Cell,
    explain,
    fresh_ports,
    lab_for_module,
    running,
    wait_logged,
    wait_logged_results,
)
from tproxy import lab as L

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    yield from lab_for_module()


@pytest.fixture(scope="module")
def proxied(lab, request):
    """(lab, proxy, cell): a running, ready proxy for the cell given by indirect parametrization."""
    cell: Cell = request.param
    with running(lab, cell) as proxy:
        yield lab, proxy, cell


def matrix(cells=MATRIX):
    return pytest.mark.parametrize("proxied", cells, indirect=True, scope="module", ids=str)


family = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"ipv{f}")


def summary(results):
    """A short account of failures, for assertion messages."""
    return collections.Counter((r["ok"], r["error"]) for r in results).most_common(5)


@matrix(MATRIX + TASKS_CELLS)
@family
def test_the_application_sees_the_expected_address(proxied, family):
    lab, proxy, cell = proxied
    since = len(proxy.log())
    results = lab.connect({"dst": L.NODE[family], "port": L.ECHO_PORT, "count": 4, "concurrency": 4, "sizes": [100]})
    assert len(results) == 4 and all(r["ok"] for r in results), results
    for r in results:
        assert r["src"][0] == L.CLIENT[family]
        assert r["peer"][0] == cell.expected_ip(family), r
        if cell.keeps_client_ip:
            assert r["peer"][1] != r["src"][1], f"the application saw the client's own port: not proxied? {r}"
    missing = wait_logged_results(proxy, cell, results, since=since)
    assert not missing, f"the proxy's log does not name {missing}:\n{proxy.log()}"


@matrix()
@family
@pytest.mark.parametrize(
    "case",
    ["port not intercepted", "excluded port", "excluded source network"],
)
def test_what_is_not_intercepted_reaches_the_application_directly(proxied, family, case):
    lab, proxy, cell = proxied
    job = {"dst": L.NODE[family], "port": L.DIRECT_PORT, "count": 3, "concurrency": 3, "sizes": [100]}
    if case == "excluded port":
        job["port"] = L.EXCLUDED_PORT
    elif case == "excluded source network":
        job["port"] = L.ECHO_PORT
        job["src"] = L.EXCLUDED_CLIENT[family]
    since = len(proxy.log())
    results = lab.connect(job)
    assert all(r["ok"] for r in results), results
    for r in results:
        # the very same address and port: no proxy in between (it would change one or the other)
        assert r["peer"] == r["src"], r
    # connections it handled since are logged; these never appear
    probe = lab.connect({"dst": L.NODE[family], "port": L.ECHO_PORT, "sizes": [1]})
    assert probe[0]["ok"], probe
    missing = wait_logged_results(proxy, cell, probe, since=since)
    log = proxy.log()[since:]
    assert not missing, (probe, log[-2000:])  # (what the proxy did log instead, if anything)
    assert not [ln for r in results for ln in L.proxy_log_names(log, *r["src"])], log


@matrix([c for c in MATRIX if c.mode == "nat"])
@family
def test_nat_a_client_port_reused_towards_another_intercepted_port_is_still_proxied_and_logged(proxied, family):
    """Every intercepted port is REDIRECTed to the one listener, so a client port used a moment ago towards another
    intercepted port gives the same reply tuple: conntrack then rewrites the client's port (README, "The two
    modes"). The connection must still go through the proxy, and its log line still be found: by the upstream
    source the application saw, as the client port in it may be the rewritten one."""
    lab, proxy, cell = proxied
    (port,) = fresh_ports(1)
    since = len(proxy.log())
    first = lab.connect({"dst": L.NODE[family], "port": L.ECHO_PORT, "src_ports": [port], "sizes": [10]})
    second = lab.connect({"dst": L.NODE[family], "port": L.EOF_PORT, "src_ports": [port], "sizes": [10]})
    results = first + second
    assert all(r["ok"] and r["src"][1] == port for r in results), results
    assert all(r["peer"][0] == cell.expected_ip(family) and r["peer"][1] != port for r in results), results
    assert wait_logged_results(proxy, cell, results, since=since) == []
    # each connection has its own line, found by the upstream source the application saw (unique to it)
    log = proxy.log()[since:]
    lines = [L.proxy_log_names_upstream(log, r["src"][0], r["peer"]) for r in results]
    assert all(len(found) == 1 for found in lines), (results, log)
    assert L.proxy_log_names(lines[0][0], L.CLIENT[family], port), lines[0]  # a fresh port: not rewritten


@matrix(MATRIX + TASKS_CELLS)
@family
def test_200_concurrent_connections_echo_their_payloads(proxied, family):
    """200 at once, each a different random payload of up to 1 MiB, each echo checked by SHA-256."""
    lab, proxy, cell = proxied
    job = {
        "dst": L.NODE[family],
        "port": L.ECHO_PORT,
        "count": 200,
        "concurrency": 200,
        "max_size": 1 << 20,
        "seed": random.randrange(1 << 30),
        "timeout": 120,
    }
    results = lab.connect(job)
    assert len(results) == 200
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{len(bad)} of 200 failed: {summary(bad)}\n{explain(proxy, bad)}"
    assert sum(r["size"] for r in results) > 50 << 20  # really ~100 MiB each way
    assert all(r["peer"][0] == cell.expected_ip(family) for r in results)


@matrix(MATRIX + TASKS_CELLS)
@family
def test_half_close_the_answer_comes_after_the_clients_eof(proxied, family):
    """The client sends, shuts down writing, and still receives the whole answer, which starts only after its EOF."""
    lab, proxy, cell = proxied
    sizes = [0, 1, 100_000, 3 << 20]
    job = {"dst": L.NODE[family], "port": L.EOF_PORT, "count": 4, "concurrency": 4, "sizes": sizes, "timeout": 60}
    results = lab.connect(job)
    assert all(r["ok"] and r["digest_ok"] for r in results), results
    assert sorted(r["size"] for r in results) == sorted(sizes)
    assert all(r["peer"][0] == cell.expected_ip(family) for r in results)


@matrix(MATRIX + TASKS_CELLS)
@family
def test_port_reuse_after_the_application_closes_first(proxied, family):
    """The application closes first, so the proxy holds a TIME_WAIT (transparent in tproxy mode); the client
    reconnects at once from the same port, 60 times on each of 5 ports. Every connection must go through the proxy
    (the application sees another source port, or in plain nat the node's address) and none may hang."""
    lab, proxy, cell = proxied
    ports = fresh_ports(5)
    job = {"dst": L.NODE[family], "port": L.CLOSE_PORT, "kind": "read", "reuse_ports": ports, "repeat": 60}
    job["timeout"] = 10
    since = len(proxy.log())
    results = lab.connect(job)
    assert len(results) == 300
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{len(bad)} of 300 failed: {summary(bad)}\n{explain(proxy, bad)}"
    assert {r["src"][1] for r in results} == set(ports)
    bypassed = [r for r in results if r["peer"][0] != cell.expected_ip(family)]
    if cell.keeps_client_ip:
        bypassed += [r for r in results if r["peer"][1] == r["src"][1]]
    assert not bypassed, f"{len(bypassed)} of 300 reached the application directly:\n{explain(proxy, bypassed)}"
    if cell.mode == "tproxy":
        # the proxy logged each of the 60 connections of each port, under the client's own port
        wait_logged(proxy, [(L.CLIENT[family], p) for p in ports], since=since)
        log = proxy.log()[since:]
        logged = {p: len(L.proxy_log_names(log, L.CLIENT[family], p)) for p in ports}
        assert logged == dict.fromkeys(ports, 60), logged
    else:
        # nat: conntrack may give a reused source port another one when the new connection's reply tuple would
        # clash with an entry still in TIME_WAIT (README, "The two modes"), so the proxy may log a rewritten port;
        # count the client's connections instead: all 300, and no more (nothing else talks to the proxy here).
        where = f"[{L.CLIENT[family]}]" if family == 6 else L.CLIENT[family]
        pair = re.compile(rf"(?:\bclient=|\"client\":\s*\"){re.escape(where)}:[0-9]+")
        deadline = time.monotonic() + 15
        while True:
            logged = sum(1 for ln in proxy.log()[since:].splitlines() if pair.search(ln))
            if logged >= 300 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert logged == 300, f"the proxy logged {logged} of the client's 300 connections"


@matrix(MATRIX + TASKS_CELLS)
@family
def test_upstream_refuses_client_gets_a_reset_and_the_proxy_keeps_serving(proxied, family):
    """Nothing listens on the application port: each client gets a reset (long before the 30 s connect timeout)."""
    lab, proxy, cell = proxied
    results = lab.connect({"dst": L.NODE[family], "port": L.DOWN_PORT, "kind": "reset", "count": 5, "timeout": 10})
    assert [r["error"] for r in results] == ["ECONNRESET"] * 5, results
    after = lab.connect({"dst": L.NODE[family], "port": L.ECHO_PORT, "count": 20, "concurrency": 10, "sizes": [10]})
    assert all(r["ok"] and r["peer"][0] == cell.expected_ip(family) for r in after), summary(after)
