"""iptables: ``iptables-restore --noflush`` / ``ip6tables-restore --noflush`` files with chains of our own.

Our chains (``TPROXY_RAW`` and ``TPROXY_RAW_OUTPUT`` in raw, ``TPROXY_PREROUTING``, ``TPROXY_DIVERT``,
``TPROXY_OUTPUT`` in mangle, ``TPROXY_NAT`` in nat) are jumped to from the built-in chains exactly once: declaring a
chain in a ``--noflush`` file flushes it, and :meth:`apply` leaves out the jump lines that are already in place, so
re-applying replaces our rules without a second jump.

Variant: the host's ``iptables`` is either the nf_tables or the legacy variant (``iptables --version``); we use the
same one and refuse to run when the *other* variant holds rules, since mixing the two breaks both.

Resource handling: iptables-nft creates built-in tables and chains (``ip mangle``, its ``OUTPUT`` chain...) on first
use. :meth:`apply` notes which ones appeared; :meth:`remove` deletes those once they are empty again, so
``nft list ruleset`` and ``iptables-save`` read as before. (The legacy variant cannot unload a table: there, an empty
table stays. Documented, not hidden.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import attrs

from tproxy.backends.base import (
    COMMENT,
    Backend,
    loopback_guard,
    mark_hex,
    port_ranges,
    put_back,
    require_net_admin,
    run,
)
from tproxy.backends.nftables import nft_json
from tproxy.config import Config
from tproxy.errors import MissingBinaryError, RulesError
from tproxy.state import drop_state, load_state, save_state, state_path

PREROUTING = "TPROXY_PREROUTING"
DIVERT = "TPROXY_DIVERT"
OUTPUT = "TPROXY_OUTPUT"
NAT = "TPROXY_NAT"
RAW = "TPROXY_RAW"
RAW_OUTPUT = "TPROXY_RAW_OUTPUT"
OUR_CHAINS = {"mangle": (PREROUTING, DIVERT, OUTPUT), "nat": (NAT,), "raw": (RAW, RAW_OUTPUT)}
PREFIX = {4: "iptables", 6: "ip6tables"}
HEADER = {4: "# iptables-restore --noflush", 6: "# ip6tables-restore --noflush"}
MULTIPORT_MAX = 15  # multiport takes at most 15 ports, a range counting as two
# Wait (bounded) for the xtables lock that Docker, kube-proxy or firewalld may hold, instead of failing at once.
LOCK_WAIT_SECONDS = 10


def restore_argv(family: int, *args: str) -> list[str]:
    """``iptables-restore -w 10 ARGS`` (``ip6tables-restore`` for 6): every restore we run waits for the lock."""
    return [f"{PREFIX[family]}-restore", "-w", str(LOCK_WAIT_SECONDS), *args]


def _c(what: str) -> str:
    return f'-m comment --comment "tproxy/{what}"'


def _port_groups(ranges) -> list[str]:
    groups: list[list[str]] = [[]]
    used = 0
    for item in port_ranges(ranges, ":"):
        cost = 2 if ":" in item else 1
        if used + cost > MULTIPORT_MAX:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += cost
    return [",".join(g) for g in groups]


def _iifs(config: Config) -> list[str]:
    """One match per interface whose packets may be intercepted, each for packets addressed to this host only (on a
    host that forwards, traffic passing through to another machine's port is not ours)."""
    local = "-m addrtype --dst-type LOCAL"
    return [f"-i {i} {local}" for i in config.intercept.interfaces] or [f"! -i lo {local}"]


def _exclusions(config: Config, family: int, chain: str) -> list[str]:
    out = [f"-A {chain} -p tcp --dport {config.listener.port} {_c('listener-port')} -j RETURN"]
    for net in config.intercept.excluded_cidrs(family):
        out.append(f"-A {chain} -s {net} {_c('exclude-cidrs')} -j RETURN")
    for group in _port_groups(config.intercept.exclude_ports) if config.intercept.exclude_ports else []:
        out.append(f"-A {chain} -p tcp -m multiport --dports {group} {_c('exclude-ports')} -j RETURN")
    return out


def _udp_rules(config: Config, target: str, *, chain: str = PREROUTING, what: str = "intercept-udp") -> list[str]:
    """UDP (tproxy mode), as the TCP rules of ``chain``: datagrams to intercepted ports get ``target`` (the TCP
    rules' TPROXY to the same listener port; in the raw table, CT --notrack), same interfaces, local destinations
    only; excluded ports return first (excluded sources already have)."""
    if not config.intercept.udp_ports:
        return []
    out = [
        f"-A {chain} -p udp -m multiport --dports {group} {_c('exclude-ports-udp')} -j RETURN"
        for group in (_port_groups(config.intercept.exclude_ports) if config.intercept.exclude_ports else [])
    ]
    for iif in _iifs(config):
        for group in _port_groups(config.intercept.udp_ports):
            out.append(f"-A {chain} {iif} -p udp -m multiport --dports {group} {_c(what)} {target}")
    return out


def _jump(builtin: str, chain: str) -> str:
    return f"-I {builtin} 1 {_c('jump')} -j {chain}"


def render_family(config: Config, family: int) -> str:
    """The restore file for one family (``iptables-restore --noflush`` for 4, ``ip6tables-restore`` for 6).

    Reply routing as in the nftables backend: the upstream mark saved into the connection mark in OUTPUT, the reply
    mark set only on packets in the reply direction of such a connection (OUTPUT and PREROUTING), and in tproxy mode
    the intercepted client leg kept out of conntrack in the raw table (PREROUTING, and OUTPUT for the proxy's own
    packets on it)."""
    mark, mask = mark_hex(config.routing.mark), mark_hex(config.routing.mask)
    upstream = mark_hex(config.routing.upstream_mark)
    reply = (
        f"-m conntrack --ctdir REPLY -m connmark --mark {upstream}/{mask} {_c('reply-mark')} "
        f"-j MARK --set-xmark {mark}/{mask}"
    )
    mangle_chains: list[str] = []
    mangle_rules: list[str] = []
    jumps: list[str] = []
    lines = [HEADER[family]]

    if config.mode == "tproxy":
        raw = [f":{RAW} - [0:0]", f":{RAW_OUTPUT} - [0:0]", _jump("PREROUTING", RAW), _jump("OUTPUT", RAW_OUTPUT)]
        raw += _exclusions(config, family, RAW)
        for iif in _iifs(config):
            for group in _port_groups(config.intercept.ports):
                raw.append(f"-A {RAW} {iif} -p tcp -m multiport --dports {group} {_c('notrack')} -j CT --notrack")
        raw += _udp_rules(config, "-j CT --notrack", chain=RAW, what="notrack-udp")
        # the client leg's own outgoing packets: the listener's mark, from an address of this host (the upstream legs
        # carry the same mark from the client's address and stay tracked)
        raw.append(
            f"-A {RAW_OUTPUT} -m mark --mark {upstream}/{mask} -m addrtype --src-type LOCAL {_c('notrack-out')} "
            "-j CT --notrack"
        )
        lines += ["*raw", *raw, "COMMIT"]

    pre: list[str] = []
    if family == 4 and loopback_guard(config):
        # to or from 127.0.0.0/8 on anything but lo (route_localnet=1 lifts the kernel's own check; CVE-2020-8558)
        pre += [f"-A {PREROUTING} {d} 127.0.0.0/8 ! -i lo {_c('loopback-guard')} -j DROP" for d in ("-d", "-s")]
    if config.needs_routing:
        pre.append(f"-A {PREROUTING} {reply}")
    if config.mode == "tproxy":
        pre.append(f"-A {PREROUTING} -p tcp ! --syn -m socket --transparent {_c('divert')} -j {DIVERT}")
        pre += _exclusions(config, family, PREROUTING)
        on_ip = "" if config.listener.is_wildcard else f" --on-ip {config.listener.address_for(family)}"
        for iif in _iifs(config):
            for group in _port_groups(config.intercept.ports):
                pre.append(
                    f"-A {PREROUTING} {iif} -p tcp --syn -m multiport --dports {group} {_c('intercept')} "
                    f"-j TPROXY --on-port {config.listener.port}{on_ip} --tproxy-mark {mark}/{mask}"
                )
        pre += _udp_rules(config, f"-j TPROXY --on-port {config.listener.port}{on_ip} --tproxy-mark {mark}/{mask}")
    if pre:
        mangle_chains.append(PREROUTING)
        jumps.append(_jump("PREROUTING", PREROUTING))
        mangle_rules += pre
    if config.mode == "tproxy":
        mangle_chains.append(DIVERT)
        mangle_rules += [
            f"-A {DIVERT} {_c('divert')} -j MARK --set-xmark {mark}/{mask}",
            f"-A {DIVERT} {_c('divert')} -j ACCEPT",
        ]
    if config.needs_routing:
        mangle_chains.append(OUTPUT)
        jumps.append(_jump("OUTPUT", OUTPUT))
        mangle_rules += [
            f"-A {OUTPUT} -m mark --mark {upstream}/{mask} {_c('upstream-mark')} "
            f"-j CONNMARK --set-xmark {upstream}/{mask}",
            f"-A {OUTPUT} {reply}",
        ]

    if mangle_chains:
        lines += ["*mangle", *(f":{c} - [0:0]" for c in mangle_chains), *jumps, *mangle_rules, "COMMIT"]
    if config.mode == "nat":
        nat = [f":{NAT} - [0:0]", _jump("PREROUTING", NAT), *_exclusions(config, family, NAT)]
        if config.listener.is_wildcard:
            target = f"-j REDIRECT --to-ports {config.listener.port}"
        else:
            addr = config.listener.address_for(family)
            target = f"-j DNAT --to-destination {addr if family == 4 else f'[{addr}]'}:{config.listener.port}"
        for iif in _iifs(config):
            for group in _port_groups(config.intercept.ports):
                nat.append(f"-A {NAT} {iif} -p tcp -m multiport --dports {group} {_c('intercept')} {target}")
        lines += ["*nat", *nat, "COMMIT"]
    return "\n".join(lines) + "\n"


def split(text: str) -> dict[int, str]:
    """The per-family files in a rendered text, keyed 4 and 6 (by their header comments)."""
    out: dict[int, list[str]] = {}
    current: int | None = None
    for line in text.splitlines():
        for fam, header in HEADER.items():
            if line == header:
                current = fam
                out[fam] = []
        if current is None:
            if line.strip() and not line.startswith("#"):
                raise RulesError("iptables rule text must start with a '# iptables-restore --noflush' header")
            continue
        out[current].append(line)
    return {f: "\n".join(lines) + "\n" for f, lines in out.items()}


@attrs.frozen
class IptablesSnapshot:
    """What :meth:`IptablesBackend.snapshot` saw: restore files per family, and the state's ``created`` objects."""

    files: dict[int, str]
    created: dict[str, list[list[str]]]


@attrs.frozen
class SavedRule:
    """One rule line of an iptables-save (or -restore) file: ``-A CHAIN SPEC`` or ``-I CHAIN [N] SPEC``."""

    chain: str
    spec: str  # the line after the chain (and an -I position), as written: what identifies the rule to iptables
    args: tuple[str, ...]  # SPEC split as iptables-restore splits it (quotes and backslash escapes undone)
    insert: bool = False  # -I (restore files only; iptables-save always writes -A)

    @property
    def target(self) -> str | None:
        """The chain or target it jumps to (``-j`` / ``-g``), if any."""
        return _option(self.args, "-j") or _option(self.args, "-g")

    @property
    def comment(self) -> str | None:
        return _option(self.args, "--comment")


@attrs.frozen
class SavedTable:
    chains: dict[str, str]  # name -> policy ("-" for a user chain), in file order
    rules: tuple[SavedRule, ...]


def _option(args: tuple[str, ...], flag: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
    return None


def split_args(line: str) -> tuple[str, ...]:
    """Split a rule line as iptables-restore does: whitespace separates, double quotes group, a backslash escapes the
    next character (iptables-save writes ``--comment "a \\"b\\""`` and escapes ``'`` too)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = started = False
    for ch in line:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                out.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(ch)
            started = True
    if quoted or escaped:
        raise RulesError(f"unterminated quote or escape in iptables rule: {line!r}")
    if started:
        out.append("".join(cur))
    return tuple(out)


def parse_rule(line: str) -> SavedRule:
    """One ``-A CHAIN SPEC`` / ``-I CHAIN [N] SPEC`` line."""
    op, _, rest = line.partition(" ")
    chain, _, spec = rest.partition(" ")
    if op not in ("-A", "-I") or not chain:
        raise RulesError(f"not an iptables rule line: {line!r}")
    position, _, after = spec.partition(" ")
    if op == "-I" and position.isdigit():
        spec = after
    return SavedRule(chain=chain, spec=spec, args=split_args(spec), insert=op == "-I")


def _saved_tags(fam: int, text: str) -> Counter[tuple[str, str]]:
    """(where, tag) of every tproxy-tagged rule in an iptables-save output or a restore file of family ``fam``."""
    return Counter(
        (f"{PREFIX[fam]} -t {table}", rule.comment)
        for table, content in parse_save(text).items()
        for rule in content.rules
        if rule.comment and rule.comment.startswith(COMMENT)
    )


def parse_save(text: str) -> dict[str, SavedTable]:
    """``iptables-save`` output (either variant, IPv4 or IPv6) or an ``iptables-restore`` file -> its tables.

    The one reader of that format in tproxy: ``*table``, ``:CHAIN POLICY [counters]``, ``-A``/``-I`` rules,
    ``COMMIT``; ``#`` comments and blank lines are skipped. Anything else raises RulesError (a format we do not
    understand must not read as "no rules").
    """
    chains: dict[str, dict[str, str]] = {}
    rules: dict[str, list[SavedRule]] = {}
    table: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            chains.setdefault(table, {})
            rules.setdefault(table, [])
        elif table is None:
            raise RulesError(f"iptables-save line {n} outside a table: {line!r}")
        elif line.startswith(":") and line[1:].split():
            name, *policy = line[1:].split()
            chains[table][name] = policy[0] if policy else "-"
        elif line.startswith(("-A ", "-I ")):
            rules[table].append(parse_rule(line))
        elif line.strip() == "COMMIT":
            table = None
        else:
            raise RulesError(f"iptables-save line {n} not understood: {line!r}")
    return {name: SavedTable(chains=chains[name], rules=tuple(rules[name])) for name in chains}


def has_rules(save_text: str) -> bool:
    """Whether iptables-save output holds any rule, user chain or non-ACCEPT policy."""
    return any(
        table.rules or any(policy != "ACCEPT" for policy in table.chains.values())
        for table in parse_save(save_text).values()
    )


class IptablesBackend(Backend):
    name = "iptables"

    def __init__(self) -> None:
        self._variant: str | None = None

    # -- pure

    def render(self, config: Config) -> str:
        return "".join(render_family(config, f) for f in config.families)

    # -- the host's iptables

    @property
    def variant(self) -> str:
        """``nf_tables`` or ``legacy``: whichever the host's ``iptables`` command is."""
        if self._variant is None:
            out = run(["iptables", "--version"]).stdout
            if "(nf_tables)" in out:
                self._variant = "nf_tables"
            elif "(legacy)" in out:
                self._variant = "legacy"
            else:
                # iptables before 1.8 knows only the legacy variant and does not say so
                self._variant = "legacy"
        return self._variant

    def describe(self) -> str:
        return f"iptables ({self.variant} variant)"

    def check_not_mixed(self) -> None:
        """Refuse a host whose rules are in the other variant: two rule sets, both evaluated, neither complete."""
        if self.variant == "nf_tables":
            for fam, names in ((4, "/proc/net/ip_tables_names"), (6, "/proc/net/ip6_tables_names")):
                try:
                    loaded = Path(names).read_text().split()
                except OSError:
                    loaded = []
                if loaded and has_rules(run([f"{PREFIX[fam]}-legacy-save"]).stdout):
                    raise RulesError(
                        f"this host's iptables is the nf_tables variant, but {PREFIX[fam]}-legacy holds rules "
                        f"(see {PREFIX[fam]}-legacy-save); mixing the two variants breaks both: move those rules "
                        'or use backend = "nftables"'
                    )
        else:
            try:
                nft_tables = {t.get("family") for t in nft_json(["list", "tables"], "table") or []}
            except MissingBinaryError:  # no nft program (a legacy host need not have one): ask iptables-nft itself
                nft_tables = {"ip", "ip6"}
            for fam in (4, 6):
                if ("ip" if fam == 4 else "ip6") in nft_tables:
                    try:
                        saved = run([f"{PREFIX[fam]}-nft-save"], check=False).stdout
                    except MissingBinaryError:
                        continue  # an iptables without the nf_tables variant: nothing can be mixed in
                    if has_rules(saved):
                        raise RulesError(
                            f"this host's iptables is the legacy variant, but {PREFIX[fam]}-nft holds rules "
                            f"(see {PREFIX[fam]}-nft-save); mixing the two variants breaks both: move those rules "
                            'or use backend = "nftables"'
                        )

    def _save(self, family: int) -> str:
        return run([f"{PREFIX[family]}-save"]).stdout

    def _state_path(self) -> Path:
        return state_path("iptables")

    # -- the interface

    def check(self, text: str) -> None:
        for fam, body in split(text).items():
            run(restore_argv(fam, "--test", "--noflush"), input=body)

    def apply(self, text: str) -> None:
        """Install both families' files (each a restore per family, one commit per table).

        Error handling: the tool's message is in the RulesError; whatever step fails (the second family, a later
        table), what was installed before — our previous rules or none — is put back (:meth:`restore`), and what
        else was there is left as it was.
        """
        require_net_admin()
        self.check_not_mixed()
        self.check(text)
        before = self.snapshot()
        try:
            self._apply(split(text))
        except BaseException as e:
            put_back(lambda: self.restore(before), e)
            raise

    def _apply(self, files: dict[int, str]) -> None:
        state = (load_state(self._state_path()) if self.installed() else None) or {}
        created: dict[str, list[list[str]]] = {k: list(v) for k, v in state.get("created", {}).items()}
        for fam, body in files.items():
            before_objs = self._nft_objects(fam)
            before = self._save(fam)
            try:
                run(restore_argv(fam, "--noflush"), input=self._without_existing_jumps(body, before))
            finally:
                new = sorted(self._nft_objects(fam) - before_objs)
                mine = created.setdefault(str(fam), [])
                mine += [list(o) for o in new if list(o) not in mine]
                save_state(self._state_path(), {"created": created})
        declared = {
            fam: {c for t in parse_save(body).values() for c in t.chains if c.startswith("TPROXY_")}
            for fam, body in files.items()
        }
        for fam in (4, 6):
            self._remove_family(fam, keep=declared.get(fam, set()))

    def snapshot(self) -> IptablesSnapshot | None:
        """Our chains, their rules and the jumps to them (at their positions), per family, as restore files; and
        which built-in tables and chains iptables-nft created for us. None when nothing of ours is installed."""
        require_net_admin()
        if not self.installed():
            return None
        files: dict[int, str] = {}
        for fam in (4, 6):
            lines: list[str] = []
            for name, table in parse_save(self._save(fam)).items():
                ours = [c for c in table.chains if c in OUR_CHAINS.get(name, ())]
                if not ours:
                    continue
                body = [f":{c} - [0:0]" for c in ours]
                position: Counter[str] = Counter()
                for r in table.rules:
                    position[r.chain] += 1
                    if r.chain not in ours and r.target in ours:
                        body.append(f"-I {r.chain} {position[r.chain]} {r.spec}")
                body += [f"-A {r.chain} {r.spec}" for r in table.rules if r.chain in ours]
                lines += [f"*{name}", *body, "COMMIT"]
            if lines:
                files[fam] = "\n".join([HEADER[fam], *lines]) + "\n"
        state = load_state(self._state_path()) or {}
        return IptablesSnapshot(files=files, created=state.get("created", {}))

    def restore(self, snapshot: object) -> None:
        """Our chains as :meth:`snapshot` saw them (every other chain of ours removed, missing jumps put back where
        they were), and the built-in tables and chains iptables-nft created since deleted again where empty."""
        if snapshot is None:
            self.remove()
            return
        assert isinstance(snapshot, IptablesSnapshot)
        self._apply(snapshot.files)
        now = (load_state(self._state_path()) or {}).get("created", {})
        for fam in (4, 6):
            kept = snapshot.created.get(str(fam), [])
            self._drop_created(fam, [o for o in now.get(str(fam), []) if o not in kept])
        save_state(self._state_path(), {"created": snapshot.created})

    def remove(self) -> None:
        require_net_admin()
        # a state file without our chains is left from a namespace that no longer exists (inodes are reused)
        state = (load_state(self._state_path()) if self.installed() else None) or {}
        for fam in (4, 6):
            self._remove_family(fam, keep=set())
            self._drop_created(fam, state.get("created", {}).get(str(fam), []))
        drop_state(self._state_path())

    def installed(self) -> bool:
        for fam in (4, 6):
            for name, table in parse_save(self._save(fam)).items():
                if any(chain in OUR_CHAINS.get(name, ()) for chain in table.chains):
                    return True
        return False

    def rule_tags(self, text: str) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        for fam, body in split(text).items():
            out.update(_saved_tags(fam, body))
        return out

    def installed_tags(self) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        for fam in (4, 6):
            out.update(_saved_tags(fam, self._save(fam)))
        return out

    # -- helpers

    @staticmethod
    def _without_existing_jumps(body: str, save_text: str) -> str:
        """``body`` without its ``-I CHAIN 1`` jumps that ``save_text`` already holds (as ``-A CHAIN`` rules)."""
        saved = {(name, r.chain, r.args) for name, t in parse_save(save_text).items() for r in t.rules}
        out: list[str] = []
        table = ""
        for line in body.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-I "):
                rule = parse_rule(line)
                if (table, rule.chain, rule.args) in saved:
                    continue
            out.append(line)
        return "\n".join(out) + "\n"

    def _remove_family(self, family: int, *, keep: set[str]) -> None:
        """Delete our jumps and chains in one family (except the chains in ``keep``), in one restore."""
        tables = parse_save(self._save(family))
        lines: list[str] = []
        for name, table in tables.items():
            ours = [c for c in table.chains if c in OUR_CHAINS.get(name, ()) and c not in keep]
            if not ours:
                continue
            body = [f"-D {r.chain} {r.spec}" for r in table.rules if r.target in ours and r.chain not in ours]
            body += [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]
            lines += [f"*{name}", *body, "COMMIT"]
        if lines:
            run(restore_argv(family, "--noflush"), input="\n".join(lines) + "\n")

    def _nft_objects(self, family: int) -> set[tuple[str, str]]:
        """The iptables-nft built-in tables ``(table, "")`` and chains ``(table, chain)`` present in nftables.

        Empty for the legacy variant, or when ``nft`` is not installed (then nothing can be cleaned up either).
        """
        if self.variant != "nf_tables":
            return set()
        fam = "ip" if family == 4 else "ip6"
        try:
            tables = nft_json(["list", "tables", fam], "table") or []
            chains = nft_json(["list", "chains", fam], "chain") or []
        except MissingBinaryError:
            return set()
        out = {(t["name"], "") for t in tables if t.get("name") in _BUILTIN_TABLES}
        out |= {
            (c["table"], c["name"])
            for c in chains
            if c.get("table") in _BUILTIN_TABLES and c.get("name") in _BUILTIN_CHAINS
        }
        return out

    def _drop_created(self, family: int, created: list[list[str]]) -> None:
        """Delete the built-in chains and tables iptables-nft created for us, where they are empty again."""
        if not created or self.variant != "nf_tables":
            return
        fam = "ip" if family == 4 else "ip6"
        present = self._nft_objects(family)
        for table, chain in sorted((t, c) for t, c in created if c):
            if (table, chain) not in present:
                continue
            if _empty_base_chain(nft_json(["list", "chain", fam, table, chain], None) or []):
                run(["nft", "delete", "chain", fam, table, chain], check=False)
        present = self._nft_objects(family)
        for table, chain in created:
            if not chain and (table, "") in present and not any(t == table and c for t, c in present):
                run(["nft", "delete", "table", fam, table], check=False)


_BUILTIN_TABLES = ("raw", "mangle", "nat", "filter", "security")


def _empty_base_chain(listing: list[dict]) -> bool:
    """Whether an ``nft -j list chain`` listing (every item, as ``nft_json(..., None)`` returns them) is a base
    chain with policy accept and no rules: what iptables-nft created on first use, and nothing of anyone's since."""
    chains = [o["chain"] for o in listing if "chain" in o]
    rules = [o for o in listing if "rule" in o]
    return len(chains) == 1 and "hook" in chains[0] and chains[0].get("policy") == "accept" and not rules


_BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
