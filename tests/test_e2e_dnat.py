"""End to end, applications the node reaches through a DNAT (root): a container behind a Docker-style published port
(``node:8084 -> container:80`` on a bridge) and an application on another host (``node:8085 -> far:80``, the far
host routing the client's network back through the node, as behind a kube-proxy NodePort). Both must see the
address the proxy connects from (the client's own in tproxy mode and with ``preserve_source``), and each connection
must really go through the proxy: its log names it (in tproxy mode a dead proxy fails open, so an answer alone proves
nothing). The matrix is test_e2e.py's: {tproxy, nat, nat + preserve_source} × {nftables, iptables} × {IPv4, IPv6}.

Why it needs the revised reply routing (README, "What the rules do"): the upstream sockets carry a mark no ip rule
routes, so their SYN leaves towards the container or the other host instead of being swallowed by the local table;
their replies get the routed mark only in the reply direction; and in tproxy mode the client's own flow is kept out
of conntrack, so the published port's DNAT does not rewrite it after TPROXY chose the proxy's socket.
"""

from __future__ import annotations

import pytest

from tests import lab_hosts as H
from tests.lab_fixtures import FAMILIES, MATRIX, Cell, running, wait_logged_results
from tproxy import lab as L

pytestmark = pytest.mark.root

CONTAINER_PORT = 8084  # published: node:8084 -> container:80 (intercepted: 8080-8090)
REMOTE_PORT = 8085  # node:8085 -> far:80
TARGETS = {"container": CONTAINER_PORT, "remote": REMOTE_PORT}


@pytest.fixture(scope="module")
def lab():
    with L.Lab.up() as lab, H.container_host(lab) as ctr, H.far_host(lab, client_route=False) as far:
        with H.app_in(ctr, {H.APP_PORT: "echo"}), H.app_in(far, {H.APP_PORT: "echo"}):
            H.publish(lab, CONTAINER_PORT, H.CONTAINER, bridge="br0")
            H.publish(lab, REMOTE_PORT, H.FAR)
            yield lab


@pytest.fixture(scope="module")
def proxied(lab, request):
    cell: Cell = request.param
    with running(lab, cell) as proxy:
        yield lab, proxy, cell


@pytest.mark.parametrize("proxied", MATRIX, indirect=True, scope="module", ids=str)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"ipv{f}")
@pytest.mark.parametrize("target", TARGETS)
def test_an_application_behind_a_dnat_sees_the_expected_address_through_the_proxy(proxied, family, target):
    lab, proxy, cell = proxied
    since = len(proxy.log())
    job = {"dst": L.NODE[family], "port": TARGETS[target], "count": 4, "concurrency": 4, "sizes": [100, 5000]}
    results = lab.connect(job)
    assert len(results) == 4 and all(r["ok"] for r in results), (results, proxy.log()[-2000:])
    for r in results:
        assert r["peer"][0] == cell.expected_ip(family), r
        if cell.keeps_client_ip:
            assert r["peer"][1] != r["src"][1], f"the application saw the client's own port: not proxied? {r}"
    missing = wait_logged_results(proxy, cell, results, since=since)
    assert not missing, f"the proxy's log does not name {missing}:\n{proxy.log()[-3000:]}"
