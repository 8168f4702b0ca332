"""The lab itself (tproxy/lab.py), without a proxy: topology, application, batch client, configs, log matching."""

from __future__ import annotations

import subprocess

import pytest

from tproxy import lab as L
from tproxy.config import Config


@pytest.mark.parametrize("mode,preserve", [("tproxy", None), ("nat", None), ("nat", True)])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_lab_configs_load(tmp_path, mode, preserve, backend):
    path = tmp_path / "lab.toml"
    path.write_text(L.proxy_config(mode, backend, preserve_source=preserve, upstream="loopback"))
    cfg = Config.from_toml(path)
    assert (cfg.mode, cfg.backend, cfg.proxy.upstream) == (mode, backend, "loopback")
    assert cfg.preserve_source == (mode == "tproxy" or bool(preserve))
    assert cfg.intercept.intercepts(L.ECHO_PORT) and cfg.intercept.intercepts(L.DOWN_PORT)
    assert not cfg.intercept.intercepts(L.EXCLUDED_PORT) and not cfg.intercept.intercepts(L.DIRECT_PORT)
    assert cfg.families == (4, 6)


def test_expected_peer_ip():
    assert L.expected_peer_ip("tproxy", None, 4) == L.CLIENT[4]
    assert L.expected_peer_ip("nat", None, 6) == L.NODE[6]
    assert L.expected_peer_ip("nat", True, 6) == L.CLIENT[6]
    assert L.expected_peer_ip("nat", False, 4, upstream="loopback") == "127.0.0.1"


@pytest.mark.parametrize(
    "line",
    [
        "info connection client=198.18.0.1:34567 original_dst=198.18.0.2:8080 upstream_src=198.18.0.1:2652",
        '{"event":"connection","client":"198.18.0.1:34567","original_dst":"198.18.0.2:8080"}',
        "info connection client=[fd00:18::1]:34567 original_dst=[fd00:18::2]:8080",
        '{"event":"connection","client":"[fd00:18::1]:34567"}',
    ],
)
def test_proxy_log_names_the_client_text_and_json(line):
    ip = "fd00:18::1" if "fd00" in line else "198.18.0.1"
    assert L.proxy_log_names(line, ip, 34567) == [line]


@pytest.mark.parametrize(
    "line",
    [
        "connection client=198.18.0.11:34567 original_dst=198.18.0.2:8080",  # another address, same prefix
        "connection client=198.18.0.1:345670 original_dst=198.18.0.2:8080",  # another port, same prefix
        "connection client=198.18.0.1:4567 original_dst=198.18.0.2:8080",
        "connection client=[fd00:18::11]:34567 original_dst=[fd00:18::2]:8080",
        "info connection client=198.18.0.1:5000 original_dst=198.18.0.2:8080 upstream_src=198.18.0.1:34567",
        "info connection client=198.18.0.1:5000 original_dst=198.18.0.2:8080 bytes_in=34567",
        "info connection client=[fd00:18::1]:5000 original_dst=[fd00:18::2]:8080 upstream_src=[fd00:18::1]:34567",
    ],
)
def test_proxy_log_names_nothing_else(line):
    ip = "fd00:18::1" if "fd00" in line else "198.18.0.1"
    assert L.proxy_log_names(line, ip, 34567) == []


V4, V6, NODE4 = "198.18.0.1", "fd00:18::1", "198.18.0.2"


@pytest.mark.parametrize(
    ("line", "client", "upstream", "named"),
    [
        (f"info connection client={V4}:26581 original_dst={NODE4}:8081 upstream_src={V4}:22320", V4, (V4, 22320), True),
        (f'{{"event":"connection","client":"{V4}:26581","upstream_src":"{V4}:22320"}}', V4, (V4, 22320), True),
        (f"info connection client=[{V6}]:26581 upstream_src=[{V6}]:22320", V6, (V6, 22320), True),
        (f"info connection client={V4}:26581 upstream_src={NODE4}:40000", V4, (NODE4, 40000), True),  # plain nat
        (f"info connection client={V4}:26581 upstream_src={V4}:223201", V4, (V4, 22320), False),  # another port
        (f"info connection client=198.18.0.11:26581 upstream_src={V4}:22320", V4, (V4, 22320), False),  # another IP
        (f"info connection client={V4}:22320 upstream_src={V4}:5000", V4, (V4, 22320), False),  # the client's port
        (f"info connection client={V4}:26581 upstream_src=-", V4, (V4, 22320), False),
    ],
)
def test_proxy_log_names_a_connection_by_the_upstream_source_the_application_saw(line, client, upstream, named):
    assert L.proxy_log_names_upstream(line, client, upstream) == ([line] if named else [])


REWRITTEN = f"info connection client={V4}:26581 original_dst={NODE4}:8081 upstream_src={V4}:22320 outcome=ok"


@pytest.mark.parametrize(
    ("mode", "result", "named"),
    [
        ("nat", {"src": [V4, 61234], "peer": [V4, 22320]}, True),  # conntrack rewrote 61234: the upstream leg tells
        ("tproxy", {"src": [V4, 61234], "peer": [V4, 22320]}, False),  # no rewriting in tproxy mode: a wrong line
        ("tproxy", {"src": [V4, 26581], "peer": [V4, 22320]}, True),
        ("nat", {"src": [V4, 61234], "peer": [V4, 5000]}, False),  # another connection's line
        ("nat", {"src": [V4, 26581], "peer": None}, True),  # no answer: the client's address and port
        ("nat", {"src": [V4, 61234], "peer": None}, False),
    ],
)
def test_proxy_log_names_a_client_result(mode, result, named):
    assert L.proxy_log_names_result(REWRITTEN, mode, result) == ([REWRITTEN] if named else [])


@pytest.mark.root
def test_the_lab_without_a_proxy_connects_directly():
    """Without a proxy the application sees the client's own address and port, in every kind of exchange."""
    with L.Lab.up() as lab:
        names = (lab.client.name, lab.node.name)
        jobs = []
        for fam in (4, 6):
            dst = L.NODE[fam]
            jobs += [
                {"dst": dst, "port": L.ECHO_PORT, "count": 20, "concurrency": 20, "max_size": 1 << 16, "seed": 7},
                {"dst": dst, "port": L.EOF_PORT, "sizes": [200_000]},
                {"dst": dst, "port": L.CLOSE_PORT, "kind": "read", "reuse_ports": [23456], "repeat": 20},
                {"dst": dst, "port": L.DIRECT_PORT, "src": L.EXCLUDED_CLIENT[fam], "sizes": [5]},
            ]
        results = lab.connect(jobs)
        assert len(results) == 2 * (20 + 1 + 20 + 1)
        assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
        assert all(r["peer"] == r["src"] for r in results)
        assert {r["src"][0] for r in results} == {*L.CLIENT.values(), *L.EXCLUDED_CLIENT.values()}
        down = lab.connect({"dst": L.NODE[4], "port": L.DOWN_PORT, "kind": "reset"})
        assert down[0]["error"] == "ECONNREFUSED"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


@pytest.mark.root
def test_the_lab_is_deleted_when_the_block_fails():
    with pytest.raises(ZeroDivisionError), L.Lab.up() as lab:
        names = (lab.client.name, lab.node.name)
        app = lab.app
        1 / 0  # noqa: B018
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert app.poll() is not None


@pytest.mark.root
def test_the_lab_is_settled_when_built():
    """What the kernel adds by itself once the veth carrier is up (IPv6 link-local address and routes, IPv4 routes no
    longer ``linkdown``) is there before the lab is handed out: a "before" snapshot taken at once is final."""
    lab = L.Lab.create(app=False)
    try:
        routes = [
            ns.run(["ip", "-6", "route", "show", "table", "all", "dev", "veth0"]).stdout
            for ns in (lab.node, lab.client)
        ]
        routes += [ns.run(["ip", "-4", "route", "show", "dev", "veth0"]).stdout for ns in (lab.node, lab.client)]
        for v6 in routes[:2]:
            assert "fe80::/64" in v6 and "local fe80::" in v6 and "multicast ff00::/8" in v6, v6
        for v4 in routes[2:]:
            assert v4.strip() and "linkdown" not in v4, v4
    finally:
        lab.destroy()
