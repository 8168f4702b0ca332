"""Policy routing: the commands `rules show` prints (pure), and (root) install/uninstall with pyroute2 inside a fresh
network namespace: idempotent, exact removal, sysctls restored from another process, rollback on failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import golden_gen
from tproxy import routing
from tproxy.config import Config
from tproxy.netns import Netns, netns

REPO = Path(__file__).parent.parent


def cfg(**doc) -> Config:
    base = {"intercept": {"ports": [8080]}}
    for k, v in doc.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return Config.from_dict(base)


def test_commands_tproxy_both_families():
    assert routing.commands(cfg()) == [
        "ip -4 rule add fwmark 0x1000/0x3000 lookup 100 priority 32000",
        "ip -4 route add local 0.0.0.0/0 dev lo table 100",
        "ip -6 rule add fwmark 0x1000/0x3000 lookup 100 priority 32000",
        "ip -6 route add local ::/0 dev lo table 100",
    ]


def test_commands_follow_mark_table_and_families():
    c = cfg(routing={"mark": 256, "table": 4242}, intercept={"ipv4": False})
    assert routing.commands(c) == [
        "ip -6 rule add fwmark 0x100/0x2100 lookup 4242 priority 32000",
        "ip -6 route add local ::/0 dev lo table 4242",
    ]


def test_plain_nat_needs_no_routing_but_preserve_source_does():
    assert routing.commands(cfg(mode="nat")) == []
    assert routing.commands(cfg(mode="nat", proxy={"preserve_source": True}))[0].startswith("ip -4 rule add")


def test_route_localnet_only_for_the_ipv4_loopback_upstream_with_spoofing():
    assert routing.sysctls(cfg()) == []
    assert routing.sysctls(cfg(proxy={"upstream": "loopback"}, intercept={"ipv4": False})) == []
    assert routing.sysctls(cfg(mode="nat", proxy={"upstream": "loopback"})) == []
    all_ifaces = routing.sysctls(cfg(proxy={"upstream": "loopback"}))
    assert [s.command() for s in all_ifaces] == ["sysctl -w net.ipv4.conf.all.route_localnet=1"]
    listed = routing.sysctls(cfg(proxy={"upstream": "loopback"}, intercept={"interfaces": ["eth0", "eth0.10"]}))
    assert [s.command() for s in listed] == [
        "sysctl -w net.ipv4.conf.eth0.route_localnet=1",
        "sysctl -w net/ipv4/conf/eth0.10/route_localnet=1",
    ]
    assert listed[1].path == Path("/proc/sys/net/ipv4/conf/eth0.10/route_localnet")


def test_show_ends_with_the_routing():
    from tproxy import rules

    text = rules.show(golden_gen.config("tproxy-loopback", "nftables"))
    tail = text.split("\n# routing\n", 1)[1].splitlines()
    assert tail == [*routing.commands(golden_gen.config("tproxy-loopback", "nftables"))]
    assert tail[-1] == "sysctl -w net.ipv4.conf.all.route_localnet=1"


# ----------------------------------------------------------------------------------------------------------------
# root: pyroute2 for real, in a namespace (a child process, so the test process never touches the host's routing)


def in_ns(ns: Netns, doc: dict, action: str) -> dict:
    """Run routing.<action>(config) in ``ns`` in a fresh process; returns its result and errors as JSON."""
    script = f"""
import json, sys
from tproxy import routing
from tproxy.config import Config
from tproxy.errors import TproxyError
c = Config.from_dict(json.loads({json.dumps(json.dumps(doc))}))
try:
    print(json.dumps({{"ok": routing.{action}(c)}}))
except TproxyError as e:
    print(json.dumps({{"error": str(e)}}))
"""
    r = ns.run([sys.executable, "-c", script], cwd=str(REPO))
    return json.loads(r.stdout)


def state(ns: Netns) -> dict[str, str]:
    return {
        "rule4": ns.run(["ip", "-4", "rule"]).stdout,
        "rule6": ns.run(["ip", "-6", "rule"]).stdout,
        "route4": ns.run(["ip", "-4", "route", "show", "table", "all"]).stdout,
        "route6": ns.run(["ip", "-6", "route", "show", "table", "all"]).stdout,
        "sysctl": ns.run(["sysctl", "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.dummy0.route_localnet"]).stdout,
    }


@pytest.fixture
def ns():
    with netns("rout") as n:
        n.run(["ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1"])  # no dummy module here
        for dev in ("dummy0", "dummy1"):
            n.run(["ip", "link", "set", dev, "addrgenmode", "none"])
            n.run(["ip", "link", "set", dev, "up"])
        yield n


DOC = {"intercept": {"ports": [8080]}, "routing": {"mark": 0x10, "table": 4242}, "proxy": {"upstream": "loopback"}}


@pytest.mark.root
def test_install_twice_then_uninstall_is_exact(ns):
    before = state(ns)
    assert in_ns(ns, DOC, "install")["ok"] == [
        "rule ipv4",
        "route ipv4",
        "rule ipv6",
        "route ipv6",
        "net.ipv4.conf.all.route_localnet",
    ]
    after = state(ns)
    assert "32000:\tfrom all fwmark 0x10/0x2010 lookup 4242" in after["rule4"]
    assert "32000:\tfrom all fwmark 0x10/0x2010 lookup 4242" in after["rule6"]
    assert "local default dev lo table 4242 proto static scope host" in after["route4"]
    assert "local default dev lo table 4242 proto static metric 1024" in after["route6"]
    assert "net.ipv4.conf.all.route_localnet = 1" in after["sysctl"]
    assert in_ns(ns, DOC, "install")["ok"] == []  # already there: nothing added
    assert state(ns) == after
    assert in_ns(ns, DOC, "installed")["ok"] is True
    # a different process removes it, and knows the old sysctl value from the state file
    removed = in_ns(ns, DOC, "uninstall")["ok"]
    assert "net.ipv4.conf.all.route_localnet" in removed
    assert state(ns) == before
    assert in_ns(ns, DOC, "uninstall")["ok"] == []
    assert in_ns(ns, DOC, "installed")["ok"] is False


@pytest.mark.root
def test_a_sysctl_already_set_is_left_as_it_was(ns):
    ns.run(["sysctl", "-w", "net.ipv4.conf.all.route_localnet=1"])
    before = state(ns)
    assert "net.ipv4.conf.all.route_localnet" not in in_ns(ns, DOC, "install")["ok"]
    assert "net.ipv4.conf.all.route_localnet" not in in_ns(ns, DOC, "uninstall")["ok"]
    assert state(ns) == before and "route_localnet = 1" in before["sysctl"]


@pytest.mark.root
def test_listed_interfaces_get_route_localnet_not_all(ns):
    doc = {**DOC, "intercept": {"ports": [8080], "interfaces": ["dummy0"], "ipv6": False}}
    before = state(ns)
    assert in_ns(ns, doc, "install")["ok"] == ["rule ipv4", "route ipv4", "net.ipv4.conf.dummy0.route_localnet"]
    s = state(ns)["sysctl"]
    assert "net.ipv4.conf.dummy0.route_localnet = 1" in s and "net.ipv4.conf.all.route_localnet = 0" in s
    assert state(ns)["rule6"] == before["rule6"]
    in_ns(ns, doc, "uninstall")
    assert state(ns) == before


@pytest.mark.root
def test_failure_rolls_back_rules_and_routes(ns):
    doc = {**DOC, "intercept": {"ports": [8080], "interfaces": ["dummy0", "nosuch0"]}}
    before = state(ns)
    err = in_ns(ns, doc, "install")["error"]
    assert "intercept.interfaces: interface 'nosuch0' does not exist" in err
    assert state(ns) == before  # dummy0's route_localnet, the rules and the routes were all undone
    assert in_ns(ns, doc, "installed")["ok"] is False


@pytest.mark.root
def test_stale_state_from_a_dead_namespace_is_ignored(ns):
    """Namespace inodes are reused: a state file whose rule is gone must not restore stale values."""
    inode = ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
    path = Path(f"/run/tproxy/routing-netns{inode}-mark16-table4242.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"sysctls": {"/proc/sys/net/ipv4/conf/all/route_localnet": "1"}}))
    try:
        before = state(ns)
        in_ns(ns, DOC, "install")
        in_ns(ns, DOC, "uninstall")
        assert state(ns) == before and "all.route_localnet = 0" in before["sysctl"]
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.root
def test_nat_without_preserve_source_installs_no_routing(ns):
    before = state(ns)
    assert in_ns(ns, {"mode": "nat", "intercept": {"ports": [8080]}}, "install")["ok"] == []
    assert state(ns) == before


@pytest.mark.root
def test_uninstall_after_mark_and_table_were_edited_removes_the_old_ones_too(ns):
    """Installed with one mark and table, then the config was edited (another mark and table) before the removal:
    the old fwmark rules, routes and sysctl still come out, and the namespace reads as before."""
    before = state(ns)
    in_ns(ns, DOC, "install")
    edited = {**DOC, "routing": {"mark": 0x20, "table": 4343}}
    removed = in_ns(ns, edited, "uninstall")["ok"]
    assert "rule ipv4 (mark 0x10, table 4242)" in removed and "route ipv6 (mark 0x10, table 4242)" in removed
    assert "net.ipv4.conf.all.route_localnet (mark 0x10, table 4242)" in removed
    assert state(ns) == before
    assert in_ns(ns, DOC, "uninstall")["ok"] == []


@pytest.mark.root
def test_a_rule_of_another_mask_is_replaced_on_install_and_found_on_removal(ns):
    """Installs before ``routing.mask`` existed left ``fwmark M/M``; an install replaces it with ``M/MASK`` (one rule
    per family, never two), and an uninstall finds either."""
    before = state(ns)
    doc = {**DOC, "proxy": {}}
    for fam in ("-4", "-6"):
        ns.run(["ip", fam, "rule", "add", "fwmark", "0x10/0x10", "lookup", "4242", "priority", "32000"])
    assert "rule ipv4" in in_ns(ns, doc, "install")["ok"]
    rules = state(ns)["rule4"]
    assert rules.count("fwmark") == 1 and "fwmark 0x10/0x2010 lookup 4242" in rules, rules
    assert in_ns(ns, doc, "uninstall")["ok"][:1] == ["rule ipv4"]
    assert state(ns) == before
    for fam in ("-4", "-6"):
        ns.run(["ip", fam, "rule", "add", "fwmark", "0x10/0x10", "lookup", "4242", "priority", "32000"])
    assert "rule ipv4" in in_ns(ns, doc, "uninstall")["ok"]
    assert state(ns) == before
