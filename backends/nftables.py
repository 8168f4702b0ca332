"""nftables: one ``nft -f`` file with a table of our own, ``inet tproxy_rules`` (IPv4 and IPv6 share it).

The file declares the table, deletes it and declares it again with its chains, so ``nft -f`` replaces it in a single
transaction: re-applying is idempotent and there is never a moment with half the rules. ("tproxy" itself is an nft
keyword, hence the table's name.) Removal deletes the table; nothing outside it is ever touched.
"""

from __future__ import annotations

import json
from collections import Counter

from tproxy.backends.base import (
    Backend,
    keep_mask,
    loopback_guard,
    mark_hex,
    port_ranges,
    require_net_admin,
    run,
    tags,
)
from tproxy.config import Config
from tproxy.errors import RulesError

TABLE = "tproxy_rules"
FAMILY = "inet"
NFPROTO = {4: "ipv4", 6: "ipv6"}
IPKW = {4: "ip", 6: "ip6"}


def json_objects(text: str, kind: str | None) -> list[dict]:
    """The objects of one ``kind`` ("table", "chain", "rule", ...) in ``nft -j`` output, as nft's JSON schema
    (libnftables-json(5)) spells them: ``{"family": "inet", "name": "tproxy_rules", ...}`` for a table. With
    ``kind=None``, every item but the metainfo, each still wrapped (``{"rule": {...}}``).

    Pure. Empty output (nothing listed) is no objects; anything that is not nft's JSON raises RulesError.
    """
    if not text.strip():
        return []
    try:
        items = json.loads(text)["nftables"]
        if kind is None:
            return [dict(item) for item in items if "metainfo" not in item]
        return [item[kind] for item in items if kind in item]
    except (ValueError, KeyError, TypeError) as e:
        raise RulesError(f"nft -j printed something that is not its JSON schema ({e}): {text[:80]!r}") from None


def nft_json(args: list[str], kind: str | None) -> list[dict] | None:
    """``nft -j ARGS``, the objects of ``kind`` in its output; ``None`` when nft fails (e.g. no such table).

    Error handling: a permission error raises (as :func:`require_net_admin` words it), never reads as "nothing".
    """
    r = run(["nft", "-j", *args], check=False)
    if r.returncode != 0:
        if "Operation not permitted" in r.stderr:
            require_net_admin()
        return None
    return json_objects(r.stdout, kind)


def _comment(what: str) -> str:
    return f'comment "tproxy/{what}"'


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _iif(config: Config) -> str:
    """The interfaces whose packets may be intercepted, and only those addressed to this host: on a host that
    forwards (Docker and CNI bridges, routers) traffic passing through to another machine's port is not ours."""
    ifaces = config.intercept.interfaces
    if not ifaces:
        return 'iifname != "lo" fib daddr type local'
    return "iifname " + _set([f'"{i}"' for i in ifaces]) + " fib daddr type local"


def _exclusions(config: Config, family: int) -> list[str]:
    """RETURN rules, in order: the listener port, excluded sources, excluded destination ports."""
    fam = f"meta nfproto {NFPROTO[family]}"
    out = [f"{fam} tcp dport {config.listener.port} return {_comment('listener-port')}"]
    cidrs = config.intercept.excluded_cidrs(family)
    if cidrs:
        out.append(f"{fam} {IPKW[family]} saddr {_set([str(n) for n in cidrs])} return {_comment('exclude-cidrs')}")
    if config.intercept.exclude_ports:
        ports = _set(port_ranges(config.intercept.exclude_ports, "-"))
        out.append(f"{fam} tcp dport {ports} return {_comment('exclude-ports')}")
    return out


def _udp_rules(config: Config, family: int, action: str, what: str = "intercept-udp") -> list[str]:
    """UDP (tproxy mode), as the TCP rules of its chain: every datagram to an intercepted port gets ``action`` (the
    TCP rules' tproxy to the listener port with the same mark; in raw prerouting, notrack), on the same interfaces,
    for local destinations only; excluded ports return first (excluded sources already have). No divert rule: the
    proxy never holds a socket a client's datagram could match."""
    if not config.intercept.udp_ports:
        return []
    fam = f"meta nfproto {NFPROTO[family]}"
    out = []
    if config.intercept.exclude_ports:
        ports = _set(port_ranges(config.intercept.exclude_ports, "-"))
        out.append(f"{fam} udp dport {ports} return {_comment('exclude-ports-udp')}")
    udp_ports = _set(port_ranges(config.intercept.udp_ports, "-"))
    out.append(f"{fam} {_iif(config)} udp dport {udp_ports} {action} {_comment(what)}")
    return out


def _ports(config: Config) -> str:
    return _set(port_ranges(config.intercept.ports, "-"))


def _guard() -> list[str]:
    """Drop 127.0.0.0/8 as destination *or* source on every interface but ``lo`` (CVE-2020-8558: with
    ``route_localnet=1`` the kernel itself no longer does). IPv6 needs none: the kernel drops ``::1`` arriving on any
    other interface whatever the settings."""
    return [
        f'iifname != "lo" meta nfproto ipv4 ip {d} 127.0.0.0/8 drop {_comment("loopback-guard")}'
        for d in ("daddr", "saddr")
    ]


def _listener(config: Config, family: int) -> str:
    """The listener as an nft ``to`` argument: ``:PORT`` for a wildcard, else ``ADDR:PORT`` / ``[ADDR]:PORT``."""
    port = config.listener.port
    if config.listener.is_wildcard:
        return f":{port}"
    addr = config.listener.address_for(family)
    return f"{addr if family == 4 else f'[{addr}]'}:{port}"


def _tproxy_to(config: Config, family: int) -> str:
    return f"tproxy {IPKW[family]} to {_listener(config, family)}"


def _redirect_to(config: Config, family: int) -> str:
    if config.listener.is_wildcard:
        return f"redirect to {_listener(config, family)}"
    return f"dnat {IPKW[family]} to {_listener(config, family)}"


def _chain(name: str, hook: str, rules: list[str]) -> list[str]:
    return [f"\tchain {name} {{", f"\t\t{hook}", *(f"\t\t{r}" for r in rules), "\t}"]


class NftablesBackend(Backend):
    name = "nftables"

    def render(self, config: Config) -> str:
        """The table for ``config``; reply routing as in README, "What the rules do" (DESIGN.md, "Reply routing,
        revised"): the upstream sockets' own mark is saved into the connection mark (output), and only packets in
        the reply direction of such a connection get the routed reply mark (output and prerouting); in tproxy mode
        the intercepted client leg is kept out of conntrack (raw prerouting for its incoming packets, raw output for
        the proxy's, which carry the upstream mark from an address of this host), so no NAT of the host applies to it
        and no conntrack entry outlives it."""
        mark, mask, keep = mark_hex(config.routing.mark), mark_hex(config.routing.mask), keep_mask(config)
        upstream = mark_hex(config.routing.upstream_mark)
        setmark = f"meta mark set meta mark & {keep} | {mark}"
        reply = f"ct direction reply ct mark & {mask} == {upstream} {setmark} {_comment('reply-mark')}"
        chains: list[list[str]] = []

        if config.mode == "tproxy":
            raw: list[str] = []
            for f in config.families:
                fam = f"meta nfproto {NFPROTO[f]}"
                raw += _exclusions(config, f)
                raw.append(f"{fam} {_iif(config)} tcp dport {_ports(config)} notrack {_comment('notrack')}")
                raw += _udp_rules(config, f, "notrack", "notrack-udp")
            chains.append(_chain("raw_prerouting", "type filter hook prerouting priority raw; policy accept;", raw))
            # the client leg's own outgoing packets (the listener's mark, from an address of this host; the upstream
            # legs carry the same mark from the client's address and stay tracked)
            out = [
                f"meta nfproto {NFPROTO[f]} meta mark & {mask} == {upstream} fib saddr type local notrack "
                f"{_comment('notrack-out')}"
                for f in config.families
            ]
            chains.append(_chain("raw_output", "type filter hook output priority raw; policy accept;", out))

        prerouting: list[str] = []
        if loopback_guard(config):
            prerouting += _guard()
        if config.needs_routing:
            prerouting += [f"meta nfproto {NFPROTO[f]} {reply}" for f in config.families]
        if config.mode == "tproxy":
            for f in config.families:
                fam = f"meta nfproto {NFPROTO[f]}"
                prerouting.append(
                    f"{fam} tcp flags & (syn | ack) != syn socket transparent 1 {setmark} accept {_comment('divert')}"
                )
            for f in config.families:
                fam = f"meta nfproto {NFPROTO[f]}"
                prerouting += _exclusions(config, f)
                prerouting.append(
                    f"{fam} {_iif(config)} tcp dport {_ports(config)} tcp flags & (syn | ack) == syn "
                    f"{_tproxy_to(config, f)} {setmark} accept {_comment('intercept')}"
                )
                prerouting += _udp_rules(config, f, f"{_tproxy_to(config, f)} {setmark} accept")
        if prerouting:
            chains.append(
                _chain("prerouting", "type filter hook prerouting priority mangle; policy accept;", prerouting)
            )

        if config.needs_routing:
            output = []
            for f in config.families:
                fam = f"meta nfproto {NFPROTO[f]}"
                output.append(
                    f"{fam} meta mark & {mask} == {upstream} ct mark set ct mark & {keep} | {upstream} "
                    f"{_comment('upstream-mark')}"
                )
                output.append(f"{fam} {reply}")
            chains.append(_chain("output", "type route hook output priority mangle; policy accept;", output))

        if config.mode == "nat":
            nat: list[str] = []
            for f in config.families:
                fam = f"meta nfproto {NFPROTO[f]}"
                nat += _exclusions(config, f)
                nat.append(
                    f"{fam} {_iif(config)} tcp dport {_ports(config)} {_redirect_to(config, f)} {_comment('intercept')}"
                )
            # before the host's own DNAT (a published port's): the proxy's upstream connection meets that one
            hook = "type nat hook prerouting priority dstnat - 10; policy accept;"
            chains.append(_chain("nat_prerouting", hook, nat))

        families = ",".join(f"ipv{f}" for f in config.families)
        lines = [
            f"# tproxy: mode={config.mode} families={families} mark={mark} upstream_mark={upstream} mask={mask} "
            "(nft -f FILE replaces the table atomically)",
            f"table {FAMILY} {TABLE} {{",
            "}",
            f"delete table {FAMILY} {TABLE}",
            f"table {FAMILY} {TABLE} {{",
        ]
        for i, chain in enumerate(chains):
            if i:
                lines.append("")
            lines += chain
        lines.append("}")
        return "\n".join(lines) + "\n"

    def check(self, text: str) -> None:
        run(["nft", "-c", "-f", "-"], input=text)

    def apply(self, text: str) -> None:
        require_net_admin()
        run(["nft", "-f", "-"], input=text)

    def remove(self) -> None:
        require_net_admin()
        if self.installed():
            run(["nft", "delete", "table", FAMILY, TABLE])

    def snapshot(self) -> str | None:
        """Our table as ``nft list table`` prints it (text ``nft -f`` reads back), or None when there is none."""
        require_net_admin()
        if not self.installed():
            return None
        return run(["nft", "list", "table", FAMILY, TABLE]).stdout

    def restore(self, snapshot: object) -> None:
        """Replace our table with ``snapshot`` in one transaction, as :meth:`apply` does; None: delete it."""
        if snapshot is None:
            self.remove()
            return
        assert isinstance(snapshot, str)
        self.apply(f"table {FAMILY} {TABLE} {{\n}}\ndelete table {FAMILY} {TABLE}\n{snapshot}")

    def installed(self) -> bool:
        tables = nft_json(["list", "tables", FAMILY], "table") or []
        return any(t.get("family") == FAMILY and t.get("name") == TABLE for t in tables)

    def rule_tags(self, text: str) -> Counter[tuple[str, str]]:
        where = f"nft {FAMILY} {TABLE}"
        return Counter((where, t) for line in text.splitlines() if not line.startswith("#") for t in tags(line))

    def installed_tags(self) -> Counter[tuple[str, str]]:
        r = run(["nft", "list", "table", FAMILY, TABLE], check=False)
        return self.rule_tags(r.stdout) if r.returncode == 0 else Counter()
