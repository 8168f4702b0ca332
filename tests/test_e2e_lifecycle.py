"""End to end, the proxy's lifecycle: what SIGTERM and SIGKILL leave behind, per backend.

"Before" and "after" are the node namespace's whole ``nft list ruleset``, ``iptables-save``, ``ip6tables-save``,
``ip rule`` (both families), ``ip route show table all`` (both families) and the sysctls tproxy may change, compared
as text (only iptables-save's timestamps and packet counters are blanked). Each test gets its own lab.
"""

from __future__ import annotations

import signal

import pytest

from tests.lab_fixtures import BACKENDS, Cell, add_operator_rules, running, wait_logged_results
from tproxy import lab as L

pytestmark = pytest.mark.root

SIGTERM_CELLS = [Cell(m, p, b) for m, p in (("tproxy", None), ("nat", False), ("nat", True)) for b in BACKENDS] + [
    Cell("tproxy", None, b, "loopback") for b in BACKENDS
]


@pytest.fixture
def lab():
    with L.Lab.up() as lab:
        yield lab


def snapshot(lab: L.Lab) -> str:
    sysctls = lab.node.run(["sh", "-c", "sysctl net.ipv4.conf net.ipv4.ip_forward net.ipv6.conf | sort"])
    return lab.snapshot() + "\n$ sysctl\n" + sysctls.stdout


def proxied_ok(lab: L.Lab, proxy: L.Proxy, cell: Cell) -> None:
    """A connection per family goes through ``proxy`` and the application sees the expected address."""
    since = len(proxy.log())
    results = lab.connect([{"dst": L.NODE[f], "port": L.ECHO_PORT, "sizes": [10]} for f in (4, 6)])
    for r, fam in zip(results, (4, 6), strict=True):
        assert r["ok"] and r["peer"][0] == cell.expected_ip(fam), r
    assert not wait_logged_results(proxy, cell, results, since=since), proxy.log()


@pytest.mark.parametrize("cell", SIGTERM_CELLS, ids=str)
def test_sigterm_exits_0_and_leaves_the_namespace_as_it_was(lab, cell):
    before = snapshot(lab)
    proxy = lab.start_proxy(cell.config())
    try:
        during = snapshot(lab)
        assert during != before, "tproxy run is ready but installed nothing"
        proxied_ok(lab, proxy, cell)
    finally:
        status = proxy.stop(signal.SIGTERM)
    assert status == 0, proxy.log()
    after = snapshot(lab)
    assert after == before, _diff(before, after)


@pytest.mark.parametrize(
    "cell", [Cell("tproxy", None, b) for b in BACKENDS] + [Cell("nat", True, b) for b in BACKENDS], ids=str
)
def test_sigkill_then_restart_has_no_duplicates_and_rules_remove_restores(lab, cell):
    """Someone else's rules, policy rule and route are in the namespace too: tproxy must leave them alone."""
    add_operator_rules(lab)
    before = snapshot(lab)
    first = lab.start_proxy(cell.config())
    running_state = snapshot(lab)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert snapshot(lab) == running_state, "rules should survive a SIGKILL (nothing ran to remove them)"

    second = lab.start_proxy(first.config_path)
    try:
        again = snapshot(lab)
        assert again == running_state, "a restart over left-over rules changed them:\n" + _diff(running_state, again)
        proxied_ok(lab, second, cell)
    finally:
        second.stop(signal.SIGKILL)

    lab.tproxy("rules", "remove", "-c", str(first.config_path))
    after = snapshot(lab)
    assert after == before, _diff(before, after)
    # and removing again is harmless
    lab.tproxy("rules", "remove", "-c", str(first.config_path))
    assert snapshot(lab) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_application_down_client_gets_a_reset_and_the_proxy_keeps_serving(lab, backend):
    """The application itself stops (not just one port): every client gets a reset, and once it is back the same
    proxy serves again."""
    cell = Cell("tproxy", None, backend)
    with running(lab, cell) as proxy:
        proxied_ok(lab, proxy, cell)
        lab.stop_app()
        jobs = [{"dst": L.NODE[f], "port": L.ECHO_PORT, "kind": "reset", "count": 5, "timeout": 10} for f in (4, 6)]
        results = lab.connect(jobs)
        assert [r["error"] for r in results] == ["ECONNRESET"] * 10, results
        lab.start_app()
        proxied_ok(lab, proxy, cell)
        assert proxy.proc.poll() is None


def _diff(a: str, b: str) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), "before", "after", lineterm=""))
