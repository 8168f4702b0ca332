"""Rules that cannot hurt the host (root): what tproxy's rules must leave alone on a host that forwards, and the
``route_localnet`` guard, proven with packets.

Topology: the lab's client and node (:class:`tproxy.lab.Lab`), plus a *far* namespace behind the node on a second
link; the client routes the far network through the node, which forwards. ``tproxy run`` runs in the node with the
default ``intercept.interfaces = []`` (every interface but ``lo``).
"""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.lab_fixtures import MATRIX, Cell, running
from tests.lab_hosts import FAR, app_in, far_host
from tproxy import lab as L

pytestmark = pytest.mark.root


def accepted(lab: L.Lab) -> int:
    """The proxy's ``tproxy_connections_accepted_total``, read from its admin endpoint in the node namespace."""
    url = f"http://{L.ADMIN[0]}:{L.ADMIN[1]}/metrics"
    script = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    text = lab.node.run([sys.executable, "-c", script]).stdout
    m = re.search(r"^tproxy_connections_accepted_total (\d+)", text, flags=re.M)
    assert m, text
    return int(m.group(1))


@pytest.fixture(scope="module")
def lab():
    with L.Lab.up() as lab, far_host(lab) as far, app_in(far, {L.ECHO_PORT: "echo"}):
        yield lab


@pytest.mark.parametrize("cell", MATRIX, ids=str)
@pytest.mark.parametrize("family", (4, 6), ids=lambda f: f"ipv{f}")
def test_traffic_passing_through_is_not_intercepted(lab, cell: Cell, family):
    """Section 1 of issue 13: a connection from the client to the far host's intercepted port passes through the
    node untouched (the far host sees the client's own address *and port*, the proxy accepts nothing), while a
    connection to the node's own address on the same port is still proxied."""
    with running(lab, cell) as proxy:
        before = accepted(lab)
        results = lab.connect({"dst": FAR[family], "port": L.ECHO_PORT, "count": 3, "concurrency": 3, "sizes": [10]})
        assert all(r["ok"] for r in results), results
        for r in results:
            assert r["peer"] == r["src"], f"the far host saw {r['peer']}, not the client's own {r['src']}"
        assert accepted(lab) == before, f"the proxy accepted traffic passing through:\n{proxy.log()[-2000:]}"
        own = lab.connect({"dst": L.NODE[family], "port": L.ECHO_PORT, "sizes": [10]})
        assert own[0]["ok"] and own[0]["peer"][0] == cell.expected_ip(family), own
        assert accepted(lab) == before + 1
        for _ in range(50):
            if L.proxy_log_names_result(proxy.log(), cell.mode, own[0]):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the proxy did not log {own}:\n{proxy.log()[-2000:]}")


# ----------------------------------------------------------------------------------------------------------------
# The route_localnet guard, with packets


_CRAFT = r"""
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dev, mac, src, dst, dport, count = sys.argv[1:]
dst_mac, dport, count = bytes.fromhex(mac.replace(":", "")), int(dport), int(count)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
src_mac = s.getsockname()[4]
for i in range(count):
    tcp = struct.pack("!HHIIBBHHH", 40000 + i, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    addrs = socket.inet_aton(src) + socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), i, 0, 64, 6, 0) + addrs
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.send(dst_mac + src_mac + b"\x08\x00" + ip + tcp)
"""

_PROBE = """
table inet probe {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "veth0" ip daddr 127.0.0.0/8 counter comment "to-loopback"
        iifname "veth0" ip saddr 127.0.0.0/8 counter comment "from-loopback"
    }
}
"""


def _arrived(lab: L.Lab, which: str) -> int:
    """SYNs from the wire that reached the node's input hook (past every prerouting rule), by the probe's counter."""
    listing = lab.node.run(["nft", "list", "table", "inet", "probe"]).stdout
    m = re.search(rf'counter packets (\d+) bytes \d+ comment "{which}"', listing)
    assert m, listing
    return int(m.group(1))


def _send(lab: L.Lab, src: str, dst: str, dport: int, count: int = 3) -> None:
    mac = lab.node.run(["cat", "/sys/class/net/veth0/address"]).stdout.strip()
    lab.client.run([sys.executable, "-c", _CRAFT, "veth0", mac, src, dst, str(dport), str(count)])


def _delete_guard(lab: L.Lab, backend: str) -> None:
    """Take out our guard rules only (as an outside flush of them would), leaving route_localnet as tproxy set it."""
    if backend == "nftables":
        listing = lab.node.run(["nft", "-a", "list", "chain", "inet", "tproxy_rules", "prerouting"]).stdout
        handles = re.findall(r'"tproxy/loopback-guard" # handle (\d+)', listing)
        assert len(handles) == 2, listing
        for h in handles:
            lab.node.run(["nft", "delete", "rule", "inet", "tproxy_rules", "prerouting", "handle", h])
    else:
        rules = [
            ln for ln in lab.node.run(["iptables-save", "-t", "mangle"]).stdout.splitlines() if "loopback-guard" in ln
        ]
        assert len(rules) == 2, rules
        for rule in rules:
            lab.node.sh(f"iptables -t mangle {rule.replace('-A ', '-D ', 1)}")


@pytest.fixture
def guard_lab():
    with L.Lab.up() as lab:
        lab.node.run(["nft", "-f", "-"], input=_PROBE)
        yield lab


@pytest.mark.parametrize("backend", ("nftables", "iptables"))
def test_loopback_guard_drops_packets_to_or_from_127_on_the_wire(guard_lab, backend):
    """Section 2 of issue 13: with ``upstream = "loopback"`` tproxy sets ``route_localnet=1``, which lifts the kernel's
    own martian check; a neighbour's SYN *to* the node's 127.0.0.1 services (the admin endpoint) or *from* a 127/8
    source must still never get past prerouting. Shown to matter: with the guard rules taken out (the sysctl as
    tproxy left it) the same packets do reach the node's input.

    A 127/8 *source* is also refused by the kernel's own source check unless ``accept_local=1`` (some hosts set it,
    e.g. for routing between local addresses); it is set here so that the guard is the only thing in the way."""
    lab = guard_lab
    lab.node.run(["sysctl", "-qw", "net.ipv4.conf.all.accept_local=1", "net.ipv4.conf.veth0.accept_local=1"])
    with running(lab, Cell("tproxy", None, backend, upstream="loopback")):
        assert lab.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"
        _send(lab, L.CLIENT[4], "127.0.0.1", L.ADMIN[1])
        _send(lab, "127.0.0.1", L.NODE[4], L.DIRECT_PORT)
        assert (_arrived(lab, "to-loopback"), _arrived(lab, "from-loopback")) == (0, 0)
        _delete_guard(lab, backend)
        _send(lab, L.CLIENT[4], "127.0.0.1", L.ADMIN[1])
        _send(lab, "127.0.0.1", L.NODE[4], L.DIRECT_PORT)
        assert (_arrived(lab, "to-loopback"), _arrived(lab, "from-loopback")) == (3, 3)


_CRAFT6 = r"""
import socket, struct, sys
dev, mac, src, dst, count = sys.argv[1:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
head = bytes.fromhex(mac.replace(":", "")) + s.getsockname()[4] + b"\x86\xdd"
tcp = struct.pack("!HHIIBBHHH", 40000, 9090, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
for _ in range(int(count)):
    s.send(head + struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + addrs + tcp)
"""

_PROBE6 = """
table inet probe6 {
    chain first {
        type filter hook prerouting priority -450; policy accept;
        iifname "veth0" ip6 daddr ::1 counter comment "to-loopback"
        iifname "veth0" ip6 saddr ::1 counter comment "from-loopback"
        iifname "veth0" ip6 daddr fd00:18::2 tcp dport 9090 counter comment "control"
    }
}
"""


def test_ipv6_needs_no_loopback_guard_the_kernel_drops_1_from_the_wire(guard_lab):
    """Why the guard is IPv4 only (README): a ``::1`` destination or source arriving on any interface but ``lo`` is
    dropped by the kernel before the first netfilter hook, whatever the settings; a control packet does arrive."""
    lab = guard_lab
    lab.node.run(["nft", "-f", "-"], input=_PROBE6)
    mac = lab.node.run(["cat", "/sys/class/net/veth0/address"]).stdout.strip()
    for src, dst in ((L.CLIENT[6], "::1"), ("::1", L.NODE[6]), (L.CLIENT[6], L.NODE[6])):
        lab.client.run([sys.executable, "-c", _CRAFT6, "veth0", mac, src, dst, "3"])
    listing = lab.node.run(["nft", "list", "table", "inet", "probe6"]).stdout
    counts = dict(
        (name, int(n)) for n, name in re.findall(r'counter packets (\d+) bytes \d+ comment "([\w-]+)"', listing)
    )
    assert counts == {"to-loopback": 0, "from-loopback": 0, "control": 3}, listing


# ----------------------------------------------------------------------------------------------------------------
# The cost of notrack, and the rule tproxy check names for it

_STATEFUL_FIREWALL = """
table inet filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        meta l4proto ipv6-icmp accept
        tcp dport { 8080-8090 } ct state new accept
    }
}
"""


@pytest.mark.parametrize("backend", ("nftables", "iptables"))
def test_a_tracked_only_input_policy_drops_intercepted_packets_until_the_checks_rule_is_added(guard_lab, backend):
    """README, "The cost of notrack": tproxy mode keeps the client leg out of conntrack, so a firewall accepting the
    intercepted ports only as ``ct state new`` drops them (the client times out); ``tproxy check`` warns and names a
    rule, and with that rule in place the connection goes through the proxy."""
    lab = guard_lab
    lab.node.run(["nft", "-f", "-"], input=_STATEFUL_FIREWALL)
    cell = Cell("tproxy", None, backend)
    with running(lab, cell) as proxy:
        check = lab.tproxy("check", "-c", str(proxy.config_path), check=False).stdout
        (warn,) = [ln for ln in check.splitlines() if ln.startswith("WARN input policy")]
        fix = warn.split(" \u2014 fix: ")[1]
        assert fix.startswith("nft insert rule inet filter input tcp dport { 8080-8090 } ct state untracked accept")
        job = {"dst": L.NODE[4], "port": L.ECHO_PORT, "sizes": [10], "timeout": 3}
        (dropped,) = lab.connect(job)
        assert not dropped["ok"] and dropped["error"] == "timeout", dropped
        lab.node.run(fix.split())
        (through,) = lab.connect(job)
        assert through["ok"] and through["peer"][0] == L.CLIENT[4] and through["peer"][1] != through["src"][1]
        for _ in range(50):
            if L.proxy_log_names_result(proxy.log(), "tproxy", through):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not logged: {through}\n{proxy.log()[-2000:]}")
