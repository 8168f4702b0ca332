"""nat mode's REDIRECT must run before the host's own DNAT, whichever was installed first (root).

nft runs two nat chains of the same priority newest first, so a published port's DNAT (Docker's, in iptables-nft's
``ip nat`` table at priority ``dstnat``) installed *after* tproxy would take the connection straight to the container,
bypassing the proxy; our chain's priority is ``dstnat - 10``. (The iptables backend jumps to its chain from the first
rule of ``PREROUTING``: later ``-A`` rules come after it.)
"""

from __future__ import annotations

import pytest

from tests import lab_hosts as H
from tests.lab_fixtures import BACKENDS, Cell, running, wait_logged_results
from tproxy import lab as L

pytestmark = pytest.mark.root

PORT = 8086  # published: node:8086 -> container:80


@pytest.fixture(scope="module")
def lab():
    with L.Lab.up() as lab, H.container_host(lab) as ctr, H.app_in(ctr, {H.APP_PORT: "echo"}):
        yield lab


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preserve", (False, True), ids=("nat", "nat+preserve"))
def test_a_published_port_added_after_tproxy_still_goes_through_the_proxy(lab, backend, preserve):
    cell = Cell("nat", preserve, backend)
    for table in ("ip nat", "ip6 nat"):
        lab.node.run(["nft", "delete", "table", *table.split()], check=False)
    try:
        with running(lab, cell) as proxy:
            H.publish(lab, PORT, H.CONTAINER, bridge="br0")  # Docker (re)starting after tproxy
            results = lab.connect([{"dst": L.NODE[f], "port": PORT, "sizes": [100]} for f in (4, 6)])
            assert all(r["ok"] for r in results), results
            for r, fam in zip(results, (4, 6), strict=True):
                assert r["peer"][0] == cell.expected_ip(fam), f"not through the proxy: {r}"
            assert wait_logged_results(proxy, cell, results) == [], proxy.log()[-2000:]
    finally:
        for table in ("ip nat", "ip6 nat"):  # Docker's rules go; what tproxy installed went when it stopped
            lab.node.run(["nft", "delete", "table", *table.split()], check=False)
