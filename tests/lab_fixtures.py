"""Shared pieces of the end-to-end tests: the matrix cells, running a proxy for a cell, reading its log.

The tests themselves are in tests/test_e2e*.py; the lab (namespaces, application, batch client) is tproxy/lab.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import re
import time
from collections.abc import Iterator

import attrs

from tproxy import lab as L

MODES = (("tproxy", None), ("nat", False), ("nat", True))  # (mode, preserve_source)
BACKENDS = ("nftables", "iptables")
FAMILIES = (4, 6)


@attrs.frozen
class Cell:
    """One proxy configuration of the matrix: mode × preserve_source × backend (× upstream)."""

    mode: str
    preserve: bool | None
    backend: str
    upstream: str = "original"
    relay: str = "shared"

    @property
    def keeps_client_ip(self) -> bool:
        return self.preserve if self.preserve is not None else self.mode == "tproxy"

    def config(self, **kw) -> str:
        return L.proxy_config(
            self.mode, self.backend, preserve_source=self.preserve, upstream=self.upstream, relay=self.relay, **kw
        )

    def expected_ip(self, family: int) -> str:
        return L.expected_peer_ip(self.mode, self.preserve, family, upstream=self.upstream)

    def __str__(self) -> str:
        mode = f"{self.mode}+preserve" if self.preserve else self.mode
        up = "" if self.upstream == "original" else f"-{self.upstream}"
        relay = "" if self.relay == "shared" else f"-{self.relay}"
        return f"{mode}-{self.backend}{up}{relay}"


MATRIX = [Cell(m, p, b) for m, p in MODES for b in BACKENDS]
# The reference relay engine ("tasks") on two cells (the engine does not depend on mode or backend): the integrity
# tests (exact bytes, half-close, resets, port reuse) run on it as on the default engine.
TASKS_CELLS = [Cell("tproxy", None, "nftables", relay="tasks"), Cell("nat", True, "iptables", relay="tasks")]


def lab_for_module() -> Iterator[L.Lab]:
    """Body of a module-scoped ``lab`` fixture: one lab per test module."""
    with L.Lab.up() as lab:
        yield lab


@contextlib.contextmanager
def running(lab: L.Lab, cell: Cell, **kw) -> Iterator[L.Proxy]:
    """``tproxy run`` for ``cell`` in the lab's node namespace, ready; SIGTERM (then SIGKILL) when the block ends."""
    proxy = lab.start_proxy(cell.config(**kw))
    try:
        yield proxy
    finally:
        proxy.stop()


def wait_logged(
    proxy: L.Proxy, pairs: list[tuple[str, int]], *, since: int = 0, timeout: float = 15
) -> list[tuple[str, int]]:
    """Wait until the proxy's log (from offset ``since``) names every (ip, port) in ``pairs``; return those it
    never named.

    A proxy may log a connection when it ends, a moment after the client saw the end: poll, bounded.
    """
    deadline = time.monotonic() + timeout
    while True:
        log = proxy.log()[since:]
        missing = [(ip, port) for ip, port in pairs if not L.proxy_log_names(log, ip, port)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def wait_logged_results(proxy: L.Proxy, cell: Cell, results: list[dict], *, since: int = 0, timeout: float = 15):
    """:func:`wait_logged` for the lab client's results: those the proxy's log never named
    (:func:`tproxy.lab.proxy_log_names_result`: in nat mode a rewritten client port is allowed)."""
    deadline = time.monotonic() + timeout
    while True:
        log = proxy.log()[since:]
        missing = [r for r in results if not L.proxy_log_names_result(log, cell.mode, r)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


_unused_ports: list[int] = []


def fresh_ports(n: int) -> list[int]:
    """``n`` distinct client source ports from the ephemeral ranges of Linux, Windows and BSD (32768-65535), none
    used before by the test run (so no TIME_WAIT of an earlier test is in the way), in random order.

    The ports the node itself listens on are left out: no upstream socket could be bound to them.
    """
    if not _unused_ports:
        taken = {*L.APP_PORTS, L.DOWN_PORT, L.LISTENER_PORT, L.ADMIN[1]}
        _unused_ports.extend(p for p in range(32768, 65536) if p not in taken)
        random.shuffle(_unused_ports)
    if len(_unused_ports) < n:
        raise RuntimeError(f"the test run used up its client ports ({n} more wanted)")
    out = _unused_ports[-n:]
    del _unused_ports[-n:]
    return out


def add_operator_rules(lab: L.Lab) -> None:
    """Rules, a policy rule and a route someone else put in the node namespace: tproxy must leave them untouched."""
    lab.node.run(["nft", "-f", "-"], input=_OPERATOR_NFT)
    for cmd in ("iptables", "ip6tables"):
        lab.node.run([cmd, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"])
        lab.node.run([cmd, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "ACCEPT"])
        lab.node.run([cmd, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "9999", "-j", "RETURN"])
    for fam in ("-4", "-6"):
        lab.node.run(["ip", fam, "rule", "add", "fwmark", "0x100", "lookup", "200", "priority", "500"])
    lab.node.run(["ip", "-4", "route", "add", "blackhole", "192.0.2.0/24", "table", "200"])
    lab.node.run(["ip", "-6", "route", "add", "blackhole", "2001:db8::/32", "table", "200"])


_OPERATOR_NFT = """\
table inet operator {
    chain input {
        type filter hook input priority 10; policy accept;
        tcp dport 9 accept comment "someone else's rule"
    }
}
"""


def explain(proxy: L.Proxy, bad: list[dict], limit: int = 5) -> str:
    """For an assertion message: the failed connections and what the proxy's log says about each of them."""
    log = proxy.log()
    out = []
    for r in bad[:limit]:
        out.append(f"client result: {r}")
        if r.get("src"):
            out += [f"    proxy: {ln}" for ln in L.proxy_log_names(log, *r["src"])] or ["    proxy: (nothing)"]
        if r.get("peer") and r.get("src") and r["peer"][1] != r["src"][1]:
            out += [f"    proxy, upstream: {ln}" for ln in L.proxy_log_names(log, *r["peer"])]
    return "\n".join(out)


_CT_TUPLE = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def node_conntrack(lab: L.Lab, proto: str) -> list[tuple[tuple[str, int, str, int], ...]]:
    """The node namespace's conntrack entries of ``proto`` ("tcp", "udp"), each as its (original, reply) tuples of
    (src, sport, dst, dport), addresses normalized (``conntrack -L``, both families)."""
    out = []
    for family in ("ipv4", "ipv6"):
        text = lab.node.run(["conntrack", "-L", "-p", proto, "-f", family], check=False).stdout
        for line in text.splitlines():
            tuples = _CT_TUPLE.findall(line)
            if tuples:
                out.append(
                    tuple(
                        (str(ipaddress.ip_address(s)), int(sp), str(ipaddress.ip_address(d)), int(dp))
                        for s, d, sp, dp in tuples[:2]
                    )
                )
    return out


def entries_of(entries: list[tuple[tuple[str, int, str, int], ...]], a: tuple[str, int], b: tuple[str, int]):
    """The entries of the flow between ``a`` and ``b`` (ip, port), in either orientation."""
    ab = (str(ipaddress.ip_address(a[0])), a[1], str(ipaddress.ip_address(b[0])), b[1])
    ba = (ab[2], ab[3], ab[0], ab[1])
    return [e for e in entries if ab in e or ba in e]
