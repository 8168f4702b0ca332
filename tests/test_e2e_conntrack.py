"""Conntrack in tproxy mode (root): the intercepted client leg is kept out of conntrack in *both* directions.

Raw prerouting notracks the client's packets; the proxy's own packets on that leg (SYN-ACK, data, FIN from the
accepted socket, the node's address as source) carry the listener's mark and are notracked in raw output. Were they
tracked, conntrack would create entries in the reverse orientation (node -> client) mid-stream, CLOSE_WAIT and
TIME_WAIT for minutes, and another transparent proxy on the same ports after tproxy stops would meet them (README,
"What the rules do"). The upstream legs (the client's address as source, the same mark) must stay tracked: their
connection mark routes the application's replies.
"""

from __future__ import annotations

import pytest

from tests.lab_fixtures import (
    FAMILIES,
    Cell,
    entries_of,
    fresh_ports,
    lab_for_module,
    node_conntrack,
    running,
    wait_logged_results,
)
from tproxy import lab as L

pytestmark = pytest.mark.root

CELLS = [Cell("tproxy", None, "nftables"), Cell("tproxy", None, "iptables")]


@pytest.fixture(scope="module")
def lab():
    yield from lab_for_module()


cells = pytest.mark.parametrize("cell", CELLS, ids=str)
family = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"ipv{f}")


@cells
@family
def test_a_burst_leaves_no_conntrack_entry_for_the_client_leg_and_keeps_the_upstream_legs(lab, cell, family):
    ports = fresh_ports(60)
    with running(lab, cell) as proxy:
        job = {"dst": L.NODE[family], "port": L.ECHO_PORT, "src_ports": ports, "concurrency": 20, "sizes": [100]}
        results = lab.connect(job)
        assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
        assert all(r["peer"][0] == L.CLIENT[family] and r["peer"][1] != r["src"][1] for r in results), results[:3]
        assert wait_logged_results(proxy, cell, results) == []
        entries = node_conntrack(lab, "tcp")
    server = (L.NODE[family], L.ECHO_PORT)
    client_legs = [e for r in results for e in entries_of(entries, tuple(r["src"]), server)]
    assert client_legs == [], f"{len(client_legs)} conntrack entries for client legs, e.g. {client_legs[:3]}"
    # the upstream legs (client address, the port the application saw) are tracked: the reading is not vacuous
    untracked = [r["peer"] for r in results if not entries_of(entries, tuple(r["peer"]), server)]
    assert untracked == [], f"upstream legs without a conntrack entry: {untracked[:5]} of {len(results)}"


_DROP_INVALID = """\
table inet operator_invalid {
    chain input {
        type filter hook input priority 10; policy accept;
        ct state invalid drop comment "a common firewall rule"
    }
}
"""


@cells
def test_a_client_port_reused_right_after_tproxy_stopped_reaches_the_application(lab, cell):
    """The symptom: an entry left by the proxy's packets (reverse orientation, not yet closed) makes a new SYN from
    the same client port, straight to the application once tproxy is gone, invalid, and a firewall dropping invalid
    packets (common) drops it until the entry expires."""
    ports = fresh_ports(20)
    job = {"dst": L.NODE[4], "port": L.ECHO_PORT, "src_ports": ports, "concurrency": 20, "sizes": [100]}
    lab.node.run(["nft", "-f", "-"], input=_DROP_INVALID)
    try:
        with running(lab, cell) as proxy:
            results = lab.connect(job)
            assert all(r["ok"] and r["peer"][1] != r["src"][1] for r in results), results[:3]
            assert wait_logged_results(proxy, cell, results) == []
        again = lab.connect({**job, "timeout": 3})
    finally:
        lab.node.run(["nft", "delete", "table", "inet", "operator_invalid"])
    assert all(r["ok"] for r in again), [r for r in again if not r["ok"]][:3]
    assert all(r["peer"] == r["src"] for r in again), again[:3]  # directly: the proxy is gone
