"""``tproxy check``: preflight the host for a config, one line per check, each failure with its fix.

Checks, in order: the config is valid; this process holds the capabilities the rules and the proxy need; the
backend's programs are installed and of the expected variant; the kernel supports every feature the mode uses; the
whole rule set installs and comes out again; the listener (TCP, and UDP with ``intercept.udp_ports``) and admin
ports are free; nothing of an earlier run is left behind (our nft table or iptables chains, fwmark rules or routes in
our table); ``src_valid_mark`` is off.

Kernel support is asked of the kernel, not read from files: each feature is loaded as a tiny rule set into a
throwaway network namespace (:mod:`tproxy.netns`), so a module the kernel can autoload counts as present and a
missing one fails with the tool's own message. The last kernel check runs ``tproxy rules apply`` and ``tproxy rules
remove`` with the real config inside such a namespace.

What the caller can rely on: :func:`run_checks` prints ``PASS <name>[: detail]`` or ``FAIL <name>: <reason> — fix:
<how>`` per check and returns the exit status: 0 only when every check passed, 2 when the config is invalid (the
other checks need it, so none follow), 1 otherwise. It never raises for a problem of the host or the config, and it
changes nothing outside the namespaces it creates and deletes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import attrs

from tproxy.config import ENV_PREFIX, Config
from tproxy.errors import TproxyError

TIMEOUT = 20  # seconds for any one program we run
DASH = "\u2014"
_FAMILY_NAME = {4: "IPv4", 6: "IPv6"}
_SAVE = {4: "iptables", 6: "ip6tables"}


@attrs.frozen
class Result:
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    warn: bool = False  # ok for the exit status, but printed as WARN with its fix: what we found may be harmless

    def line(self) -> str:
        if self.warn:
            return f"WARN {self.name}: {self.detail} {DASH} fix: {self.fix}"
        if self.ok:
            return f"PASS {self.name}" + (f": {self.detail}" if self.detail else "")
        return f"FAIL {self.name}: {self.detail} {DASH} fix: {self.fix}"


def warned(name: str, reason: str, fix: str) -> Result:
    return Result(name, True, reason, fix, warn=True)


def passed(name: str, detail: str = "") -> Result:
    return Result(name, True, detail)


def failed(name: str, reason: str, fix: str) -> Result:
    return Result(name, False, reason, fix)


def run_checks(
    config_path: str | Path | None,
    *,
    mode: str | None = None,
    backend: str | None = None,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run every check for the config at ``config_path`` overridden by the ``TPROXY_`` variables of ``environ``
    (none when not given) and ``mode``/``backend``; print; exit status."""
    out = out or sys.stdout
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        print(result.line(), file=out, flush=True)

    try:
        config = Config.load(config_path, environ or {}, mode=mode, backend=backend)
    except TproxyError as e:
        key = getattr(e, "key", "")
        source = getattr(e, "source", "")
        if source.startswith("--"):
            fix = f"correct the {source} flag"
        elif source == "environment":
            fix = f"correct the variable {key}" if key else "set TPROXY_INTERCEPT_PORTS or give -c a config file"
        elif key:
            fix = f"correct {key} in {source}"
        else:
            fix = "give -c a readable TOML file (example: conf/tproxy.toml)"
        emit(failed("config valid", str(e), fix + "; the other checks need a valid config"))
        return 2
    families = "+".join(_FAMILY_NAME[f] for f in config.families)
    emit(
        passed(
            "config valid",
            f"{config_path or 'environment'} (mode {config.mode}, backend {config.backend}, {families}, "
            f"relay {config.proxy.relay})"
            + (
                f"; from the environment: {', '.join(config.from_environment().values())}"
                if config.from_environment()
                else ""
            ),
        )
    )

    for check in CHECKS:
        try:
            for result in check(config, config_path):
                emit(result)
        except Exception as e:  # a check that crashes is a failed check, never a traceback
            emit(failed(check.__name__.removeprefix("check_"), f"the check itself failed: {e!r}", "report this bug"))
    return 0 if all(r.ok for r in results) else 1


# ----------------------------------------------------------------------------------------------------------------
# Privileges


def check_capabilities(config: Config, config_path: object) -> Iterator[Result]:
    from tproxy.privileges import CAP_NET_ADMIN, ProcessCredentials, cap_name, cap_set, required_capabilities

    creds = ProcessCredentials.of()
    have, permitted = cap_set(creds.effective), cap_set(creds.permitted)
    need = {CAP_NET_ADMIN: "installing the interception rules and routes"}
    need.update(required_capabilities(config, binds_listener=True))
    for cap, why in need.items():
        name = cap_name(cap)
        if cap in have:
            yield passed(f"privilege {name}", why)
        elif cap in permitted and cap != CAP_NET_ADMIN:  # (file capabilities: `tproxy run` raises it)
            yield passed(f"privilege {name}", f"{why} (permitted; `tproxy run` makes it effective)")
        elif cap == CAP_NET_ADMIN:
            yield failed(
                f"privilege {name}",
                f"not in this process's effective capabilities; needed for {why}",
                "run `tproxy check` and `tproxy rules apply` as root (the proxy itself can then run with "
                "`tproxy run --no-rules` and only CAP_NET_RAW)",
            )
        else:
            low = name[4:].lower()
            yield failed(
                f"privilege {name}",
                f"not in this process's effective capabilities; needed because {why}",
                f"run as root, or grant it: systemd AmbientCapabilities={name}, or "
                f"`setpriv --inh-caps=+{low} --ambient-caps=+{low} ...`",
            )


# ----------------------------------------------------------------------------------------------------------------
# Programs


def _run(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=TIMEOUT)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else ""


def _install(pkg: str) -> str:
    return f"apt-get install {pkg}"


def needed_programs(config: Config) -> list[tuple[str, str]]:
    """(program, Debian package) the backend runs, plus ``ip`` for these checks' namespaces."""
    progs = [("ip", "iproute2")]
    if config.backend == "nftables":
        progs.append(("nft", "nftables"))
    else:
        for f in config.families:
            progs += [(f"{_SAVE[f]}-restore", "iptables"), (f"{_SAVE[f]}-save", "iptables")]
    return progs


def check_programs(config: Config, config_path: object) -> Iterator[Result]:
    for prog, pkg in needed_programs(config):
        path = shutil.which(prog)
        if path is None:
            yield failed(f"program {prog}", "not found in PATH", _install(pkg))
            continue
        version = _run([prog, "-V" if prog == "ip" else "--version"])
        detail = _first_line(version.stdout or version.stderr)
        if version.returncode != 0:
            yield failed(
                f"program {prog}", f"{path} does not run: {detail}", f"reinstall it: {_install(pkg)} --reinstall"
            )
        else:
            yield passed(f"program {prog}", detail)
    if config.backend == "iptables" and shutil.which("iptables"):
        yield _iptables_variant()


def _iptables_variant() -> Result:
    from tproxy.backends.iptables import IptablesBackend

    backend = IptablesBackend()
    name = "iptables variant"
    try:
        variant = backend.variant
        backend.check_not_mixed()
    except TproxyError as e:
        other = "legacy" if "nf_tables variant" in str(e) else "nft"
        return failed(
            name,
            str(e),
            f"use the variant that holds the host's rules (update-alternatives --set iptables "
            f'/usr/sbin/iptables-{other}), or move the rules, or use backend = "nftables"',
        )
    return passed(name, f"{variant}, and the other variant holds no rules")


# ----------------------------------------------------------------------------------------------------------------
# Kernel support: each feature loaded into a throwaway namespace


@attrs.frozen
class Feature:
    name: str
    tool: str  # "nft" | "iptables" | "ip6tables" | "ip"
    text: str  # rule file (nft -f / *-restore) or one `ip` command per line
    fix: str


def features(config: Config) -> list[tuple[int, Feature]]:
    """The kernel features ``config`` relies on, each as a minimal rule set, per family."""
    mark = f"{config.routing.mark:#x}"
    port = config.listener.port
    table = config.routing.table
    out: list[tuple[int, Feature]] = []
    for fam in config.families:

        def add(name: str, tool: str, text: str, fix: str, fam: int = fam) -> None:
            out.append((fam, Feature(name, tool, text, fix)))

        def modules(mods: str, conf: str) -> str:
            return f"load the module (modprobe {mods}) or use a kernel built with {conf}"

        if config.backend == "nftables":
            ipkw = "ip" if fam == 4 else "ip6"

            def nft(hook: str, rule: str, ipkw: str = ipkw) -> str:
                return f"table {ipkw} tproxy_check {{\n\tchain c {{\n\t\t{hook}\n\t\t{rule}\n\t}}\n}}\n"

            pre = "type filter hook prerouting priority mangle; policy accept;"
            if config.mode == "tproxy":
                rule = f"tcp dport 9 tcp flags & (syn | ack) == syn tproxy to :{port} meta mark set {mark} accept"
                fix = modules(f"nft_tproxy nf_tproxy_ipv{fam}", "CONFIG_NFT_TPROXY") + ', or use mode = "nat"'
                add("nft tproxy", "nft", nft(pre, rule), fix)
                rule = f"tcp flags & (syn | ack) != syn socket transparent 1 meta mark set {mark} accept"
                add("nft socket transparent", "nft", nft(pre, rule), modules("nft_socket", "CONFIG_NFT_SOCKET"))
            if config.needs_routing:
                hook = "type route hook output priority mangle; policy accept;"
                rule = f"ct mark & {mark} == {mark} meta mark set ct mark ct mark set meta mark"
                fix = modules("nft_ct nf_conntrack", "CONFIG_NFT_CT and CONFIG_NF_CONNTRACK_MARK")
                add("nft ct mark", "nft", nft(hook, rule), fix)
            if config.mode == "nat":
                hook = "type nat hook prerouting priority dstnat; policy accept;"
                fix = modules("nft_redir nft_nat nf_nat", "CONFIG_NFT_REDIR")
                add("nft redirect", "nft", nft(hook, f"tcp dport 9 redirect to :{port}"), fix)
        else:
            tool = _SAVE[fam]
            c = '-m comment --comment "tproxy/check"'
            if config.mode == "tproxy":
                text = f"*mangle\n-A PREROUTING -p tcp --dport 9 --syn {c} -j TPROXY --on-port {port} "
                text += f"--tproxy-mark {mark}/{mark}\nCOMMIT\n"
                fix = modules(f"xt_TPROXY nf_tproxy_ipv{fam} xt_comment", "CONFIG_NETFILTER_XT_TARGET_TPROXY")
                add("iptables TPROXY target", tool, text, fix + ', or use mode = "nat"')
                text = f"*mangle\n-A PREROUTING -p tcp ! --syn -m socket --transparent {c} "
                text += f"-j MARK --set-xmark {mark}/{mark}\nCOMMIT\n"
                fix = modules(f"xt_socket nf_socket_ipv{fam}", "CONFIG_NETFILTER_XT_MATCH_SOCKET")
                add("iptables socket match", tool, text, fix)
            if config.needs_routing:
                text = f"*mangle\n-A OUTPUT -m connmark --mark {mark}/{mark} {c} -j CONNMARK --restore-mark\n"
                text += f"-A OUTPUT -m mark --mark {mark}/{mark} {c} -j CONNMARK --save-mark\nCOMMIT\n"
                fix = modules("xt_connmark xt_mark", "CONFIG_NETFILTER_XT_CONNMARK and CONFIG_NF_CONNTRACK_MARK")
                add("iptables connmark", tool, text, fix)
            if config.mode == "nat":
                text = f"*nat\n-A PREROUTING -p tcp --dport 9 {c} -j REDIRECT --to-ports {port}\nCOMMIT\n"
                fix = modules("xt_REDIRECT nf_nat", "CONFIG_NETFILTER_XT_TARGET_REDIRECT")
                add("iptables REDIRECT target", tool, text, fix)
        if config.needs_routing:
            dst = "0.0.0.0/0" if fam == 4 else "::/0"
            text = f"-{fam} rule add fwmark {mark}/{mark} lookup {table}\n"
            text += f"-{fam} route add local {dst} dev lo table {table}\n"
            fix = f"use a kernel built with CONFIG_IP{'' if fam == 4 else 'V6'}_MULTIPLE_TABLES"
            add("policy routing (fwmark rule, local route)", "ip", text, fix)
    return out


def _load(ns, feature: Feature) -> str | None:
    """Load ``feature`` into namespace ``ns``; the tool's error text, or None when the kernel took it."""
    if feature.tool == "ip":
        for line in feature.text.splitlines():
            r = ns.run(["ip", *line.split()], check=False, timeout=TIMEOUT)
            if r.returncode != 0:
                return f"ip {line}: {_first_line(r.stderr or r.stdout)}"
        return None
    if feature.tool == "nft":
        argv = ["nft", "-f", "-"]
    else:
        argv = [f"{feature.tool}-restore", "-w", "10", "--noflush"]  # the xtables lock is shared by all namespaces
    r = ns.run(argv, input=feature.text, check=False, timeout=TIMEOUT)
    if r.returncode != 0:
        return _first_line(r.stderr or r.stdout) or f"exit status {r.returncode}"
    cleanup = ["nft", "flush", "ruleset"] if feature.tool == "nft" else [f"{feature.tool}-restore", "-w", "10"]
    ns.run(cleanup, input="" if feature.tool != "nft" else None, check=False, timeout=TIMEOUT)
    return None


@contextlib.contextmanager
def _probe_namespace() -> Iterator[object]:
    from tproxy.netns import netns

    with netns("chk") as ns:
        yield ns


def check_kernel(config: Config, config_path: object) -> Iterator[Result]:
    missing = [prog for prog, _ in needed_programs(config) if shutil.which(prog) is None]
    if missing:
        yield failed("kernel support", f"cannot ask the kernel without {', '.join(missing)}", "install it (see above)")
        return
    try:
        ctx = _probe_namespace()
        ns = ctx.__enter__()
    except (subprocess.CalledProcessError, OSError) as e:
        reason = getattr(e, "stderr", None) or str(e)
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        yield failed(
            "kernel support",
            f"cannot create a throwaway network namespace to ask the kernel: {_first_line(str(reason))}",
            "run `tproxy check` as root",
        )
        return
    try:
        by_name: dict[str, list[tuple[int, Feature, str | None]]] = {}
        for fam, feature in features(config):
            by_name.setdefault(feature.name, []).append((fam, feature, _load(ns, feature)))
        for name, tries in by_name.items():
            fams = ", ".join(_FAMILY_NAME[f] for f, _, _ in tries)
            bad = [(f, feat, err) for f, feat, err in tries if err is not None]
            if not bad:
                yield passed(f"kernel {name}", fams)
            else:
                f, feat, err = bad[0]
                fix = feat.fix + ("" if f == 4 else "; or set intercept.ipv6 = false")
                yield failed(f"kernel {name}", f"{_FAMILY_NAME[f]}: the kernel refused it: {err}", fix)
    finally:
        ctx.__exit__(None, None, None)
    with _probe_namespace() as ns:
        yield _rules_roundtrip(ns, config, config_path)


def _rules_roundtrip(ns, config: Config, config_path: object) -> Result:
    """The real rule set and routes, installed and removed by `tproxy rules` inside the throwaway namespace.

    ``intercept.interfaces`` get veth interfaces of the same names there: ``route_localnet`` is set on them for the
    loopback upstream, and the host's interfaces are not in the namespace.
    """
    name = "rules install and remove"
    for i, iface in enumerate(config.intercept.interfaces):  # not in the namespace: stand-ins of the same names
        peer = ["peer", "name", f"tpxchk{i}"]
        ns.run(["ip", "link", "add", iface, "type", "veth", *peer], check=False, timeout=TIMEOUT)
    base = [sys.executable, "-m", "tproxy", "rules"]
    flags = ["-c", str(config_path)] if config_path else []
    flags += ["--mode", config.mode, "--backend", config.backend]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | dict(config.environ)
    applied = ns.run([*base, "apply", *flags], check=False, timeout=60, env=env)
    removed = ns.run([*base, "remove", *flags], check=False, timeout=60, env=env)
    if applied.returncode != 0:
        return failed(
            name,
            f"`tproxy rules apply` failed in a throwaway namespace: {_first_line(applied.stderr or applied.stdout)}",
            "see the kernel and program checks above; `tproxy rules show -c FILE` prints what would be installed",
        )
    if removed.returncode != 0:
        return failed(
            name,
            f"`tproxy rules remove` failed in a throwaway namespace: {_first_line(removed.stderr or removed.stdout)}",
            "report this bug (the rules were installed but could not be removed)",
        )
    return passed(name, f"in a throwaway namespace: {_first_line(applied.stdout)}")


# ----------------------------------------------------------------------------------------------------------------
# Ports


def _who_listens(port: int, *, udp: bool = False) -> str:
    if shutil.which("ss") is None:
        return ""
    r = _run(["ss", "-Hulnp" if udp else "-Htlnp", f"sport = :{port}"])
    users = sorted({part for line in r.stdout.splitlines() for part in line.split() if part.startswith("users:")})
    return f" (held by {', '.join(users)})" if users else ""


def port_free(family: int, host: str, port: int, *, transparent: bool = False, udp: bool = False) -> str | None:
    """None if ``host:port`` can be bound for listening now; else the reason.

    ``transparent``: bind as the tproxy listener does (IP_TRANSPARENT, so a non-local address is allowed), when this
    process may set it. ``udp``: a UDP port, bound as the UDP listener binds it (without SO_REUSEADDR: any socket on
    that port, wildcard or not, makes its bind fail).
    """
    from tproxy import sockets

    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with socket.socket(af, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        if not udp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            with contextlib.suppress(PermissionError):
                sockets.set_transparent(s)
        try:
            s.bind((host, port))
            if not udp:
                s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"in use{_who_listens(port, udp=udp)}"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this host"
            if e.errno == errno.EACCES:
                return "permission denied (a port below net.ipv4.ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE)"
            return os.strerror(e.errno or 0) or str(e)
    return None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_ports(config: Config, config_path: object) -> Iterator[Result]:
    port = config.listener.port
    for fam in config.families:
        host = config.listener.address_for(fam)
        name = f"listener {_hostport(host, port)} free"
        reason = port_free(fam, host, port, transparent=config.needs_routing)
        if reason is None:
            yield passed(name)
        else:
            yield failed(
                name,
                reason,
                "stop what holds it (an earlier tproxy? `ss -tlnp 'sport = :PORT'`), or change listener.port",
            )
    if config.mode == "tproxy" and config.intercept.udp_ports:  # the UDP listeners share the TCP one's address
        for fam in config.families:
            host = config.listener.address_for(fam)
            name = f"udp listener {_hostport(host, port)} free"
            reason = port_free(fam, host, port, transparent=True, udp=True)
            if reason is None:
                yield passed(name)
            else:
                yield failed(
                    name,
                    reason,
                    "stop what holds it (an earlier tproxy? `ss -ulnp 'sport = :PORT'`), or change listener.port "
                    "(intercept.udp_ports uses it for UDP too)",
                )
    if config.admin.enabled:
        host, aport = config.admin.host, config.admin.port
        name = f"admin {_hostport(host, aport)} free"
        fam = 6 if ":" in host else 4
        reason = port_free(fam, host, aport)
        if reason is None:
            yield passed(name)
        else:
            yield failed(name, reason, 'stop what holds it, or change admin.address ("" disables the endpoint)')


# ----------------------------------------------------------------------------------------------------------------
# Leftovers of an earlier run, and sysctls that defeat the recipe


def _ip_json(args: Sequence[str]) -> list[dict]:
    r = _run(["ip", "-j", *args])
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return json.loads(r.stdout)


def leftover_routing(config: Config) -> list[str]:
    """Policy-routing entries that would clash: rules for our fwmark or table, routes in our table."""
    table = str(config.routing.table)
    found = []
    for fam in (4, 6):
        for rule in _ip_json([f"-{fam}", "rule", "show"]):
            mark = rule.get("fwmark")
            ours = mark is not None and int(str(mark), 0) & config.routing.mask
            if str(rule.get("table")) == table or ours:
                desc = f"fwmark {mark}" + (f"/{rule['fwmask']}" if "fwmask" in rule else "") if mark else "from all"
                found.append(f"{_FAMILY_NAME[fam]} rule `{desc} lookup {rule.get('table')}`")
        routes = _ip_json([f"-{fam}", "route", "show", "table", table])
        if routes:
            found.append(f"{_FAMILY_NAME[fam]} routes in table {table} ({len(routes)})")
    return found


def _leftover_rules(config: Config) -> list[str]:
    from tproxy.backends import get_backend

    found = []
    for name in ("nftables", "iptables"):
        if name == "iptables" and config.backend != "iptables" and shutil.which("iptables") is None:
            continue
        if name == "nftables" and shutil.which("nft") is None:
            continue
        backend = get_backend(name)
        if backend.installed():
            found.append(f"{backend.describe()} rules of tproxy")
    return found


def check_leftovers(config: Config, config_path: object) -> Iterator[Result]:
    name = "no leftover tproxy rules or routes"
    try:
        found = _leftover_rules(config)
    except TproxyError as e:
        yield failed(name, f"cannot list the rules: {e}", "run `tproxy check` as root")
        return
    found += leftover_routing(config)
    if not found:
        yield passed(name)
    else:
        remove = "tproxy rules remove" + (f" -c {config_path}" if config_path else "")
        yield failed(
            name,
            "; ".join(found),
            f"a tproxy is running or an earlier one was killed: stop it, or `{remove}`; "
            "if the rule or table is not tproxy's, choose another routing.mark / routing.table",
        )


def src_valid_mark_on(
    conf_dir: Path = Path("/proc/sys/net/ipv4/conf"), names: Iterable[str] | None = None
) -> list[str]:
    """The interfaces (and ``all``) whose ``src_valid_mark`` is 1."""
    on = []
    for entry in sorted(conf_dir.iterdir()) if names is None else [conf_dir / n for n in names]:
        with contextlib.suppress(OSError, ValueError):
            if int((entry / "src_valid_mark").read_text()) != 0:
                on.append(entry.name)
    return on


def check_sysctls(config: Config, config_path: object) -> Iterator[Result]:
    if not config.needs_routing or 4 not in config.families:
        return
    name = "net.ipv4.conf.*.src_valid_mark off"
    on = src_valid_mark_on()
    if not on:
        yield passed(name)
    else:
        keys = ", ".join(f"net.ipv4.conf.{n}.src_valid_mark=1" for n in on)
        yield failed(
            name,
            f"{keys}: fwmarked replies to the local table become martians and vanish without a counter "
            "(VPN tools such as wg-quick set it)",
            " ; ".join(f"sysctl -w net.ipv4.conf.{n}.src_valid_mark=0" for n in on)
            + " (and find what sets it at boot)",
        )


# ----------------------------------------------------------------------------------------------------------------
# Sharing the host: other software's packet marks, an input policy that accepts only tracked packets

_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")


def _bits(number: int) -> int:
    """The mark bits a number in a rule stands for: a mask with most bits set keeps bits (``mark & 0xffffcfff``), so
    it is read as its complement; a full ``0xffffffff`` stands for none."""
    number &= 0xFFFFFFFF
    return ~number & 0xFFFFFFFF if bin(number).count("1") > 16 else number


def _not_ours_nft(nft_text: str) -> Iterator[str]:
    table = ""
    for line in nft_text.splitlines():
        if line.startswith("table "):
            table = line.split("{")[0].strip()
        if table != "table inet tproxy_rules" and '"tproxy/' not in line:
            yield line.strip()


def _not_ours_save(save_text: str) -> Iterator[str]:
    for line in save_text.splitlines():
        if line.startswith("-A ") and "tproxy/" not in line and " TPROXY_" not in line:
            yield line


def foreign_mark_uses(
    mask: int, nft_text: str = "", save_texts: Sequence[str] = (), ip_rules: Sequence[dict] = (), table: int = 0
) -> list[str]:
    """Rules of other software that read or write any bit of ``mask``: nft and iptables-save lines mentioning a
    mark, and ``ip rule`` entries with an fwmark (other than ours, in ``table``). A heuristic over rule text: it
    finds the numbers a rule gives with a mark, so a rule written with symbolic names would be missed."""
    found = []
    lines = [*_not_ours_nft(nft_text), *(ln for t in save_texts for ln in _not_ours_save(t))]
    for line in lines:
        if "mark" not in line:
            continue
        after = line[line.index("mark") :]
        used = 0
        for number in _HEX.findall(after):
            used |= _bits(int(number, 16))
        if used & mask:
            found.append(f"`{line}` (bits {used & mask:#x})")
    for rule in ip_rules:
        if "fwmark" not in rule or str(rule.get("table")) == str(table):
            continue
        mark = int(str(rule["fwmark"]), 0)
        used = _bits(int(str(rule["fwmask"]), 0)) if "fwmask" in rule else mark
        if used & mask:
            desc = f"fwmark {rule['fwmark']}" + (f"/{rule['fwmask']}" if "fwmask" in rule else "")
            found.append(f"ip rule `{desc} lookup {rule.get('table')}` (bits {used & mask:#x})")
    return found


def _host_rules() -> tuple[str, list[str]]:
    """``nft list ruleset`` and the iptables-save outputs of this host (empty where a program is missing)."""
    nft = ""
    if shutil.which("nft"):
        r = _run(["nft", "list", "ruleset"])
        nft = r.stdout if r.returncode == 0 else ""
    saves = []
    for prog in ("iptables-save", "ip6tables-save"):
        if shutil.which(prog):
            r = _run([prog])
            saves.append(r.stdout if r.returncode == 0 else "")
    return nft, saves


def check_marks(config: Config, config_path: object) -> Iterator[Result]:
    if not config.needs_routing:
        return
    r = config.routing
    name = f"packet mark bits {r.mask:#x} not used by other rules"
    nft, saves = _host_rules()
    rules = [rule for fam in (4, 6) for rule in _ip_json([f"-{fam}", "rule", "show"])]
    found = foreign_mark_uses(r.mask, nft, saves, rules, r.table)
    if not found:
        yield passed(name, f"reply mark {r.mark:#x}, upstream mark {r.upstream_mark:#x}")
        return
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    yield warned(
        name,
        f"rules already on this host use our bits: {'; '.join(found[:3])}{more}",
        f"choose routing.mark / routing.upstream_mark / routing.mask bits nobody else uses in {config_path} "
        '(README, "Marks"), or confirm those rules never meet tproxy\'s traffic',
    )


def established_only_inputs(nft_text: str = "", save_texts: Sequence[str] = ()) -> list[str]:
    """Input chains that drop by default and accept by conntrack state but never ``untracked``: they drop the
    intercepted client packets that tproxy mode keeps out of conntrack (``notrack``)."""
    found = []
    chain, hooked, policy_drop, stateful, untracked = "", False, False, False, False

    def close() -> None:
        if hooked and policy_drop and stateful and not untracked:
            # iptables-nft's own tables are the iptables commands' to change
            iptables = {"table ip filter chain INPUT": "iptables", "table ip6 filter chain INPUT": "ip6tables"}
            found.append(f"{iptables[chain]} filter INPUT" if chain in iptables else chain)

    table = ""
    for line in nft_text.splitlines():
        text = line.strip()
        if text.startswith("table "):
            table = text.split("{")[0].strip()
        elif text.startswith("chain "):
            close()
            chain = f"{table} chain {text.split()[1]}"
            hooked = policy_drop = stateful = untracked = False
        elif text.startswith("type ") and " hook input " in f"{text} ":
            hooked, policy_drop = True, "policy drop" in text
        elif "ct state" in text and " accept" in f" {text}":
            stateful = True
            untracked = untracked or "untracked" in text
    close()
    for fam, save in zip(("iptables", "ip6tables"), save_texts, strict=False):
        if f"{fam} filter INPUT" in found or ":INPUT DROP" not in save:
            continue
        rules = [ln for ln in save.splitlines() if ln.startswith("-A INPUT ")]
        stateful = any(("--ctstate" in ln or "--state" in ln) and "-j ACCEPT" in ln for ln in rules)
        if stateful and not any("UNTRACKED" in ln for ln in rules):
            found.append(f"{fam} filter INPUT")
    return found


def check_input_policy(config: Config, config_path: object) -> Iterator[Result]:
    if config.mode != "tproxy":
        return
    name = "input policy accepts the intercepted (untracked) packets"
    nft, saves = _host_rules()
    found = established_only_inputs(nft, saves)
    if not found:
        yield passed(name)
        return
    ports = ", ".join(str(p) for p in config.intercept.ports)
    dports = ",".join(str(p).replace("-", ":") for p in config.intercept.ports)
    fixes = []
    for chain in found:
        if chain.startswith("table "):
            family_table, _, name_ = chain.removeprefix("table ").partition(" chain ")
            fixes.append(f"nft insert rule {family_table} {name_} tcp dport {{ {ports} }} ct state untracked accept")
        else:
            tool = chain.split()[0]
            fixes.append(
                f"{tool} -I INPUT -p tcp -m multiport --dports {dports} -m conntrack --ctstate UNTRACKED -j ACCEPT"
            )
    yield warned(
        name,
        f"{', '.join(found)} drop by default and accept by conntrack state, never `untracked`: tproxy mode keeps the "
        "intercepted client packets out of conntrack (notrack), so they would be dropped",
        " ; ".join(fixes),
    )


CHECKS: tuple[Callable[[Config, object], Iterable[Result]], ...] = (
    check_capabilities,
    check_programs,
    check_kernel,
    check_ports,
    check_leftovers,
    check_sysctls,
    check_marks,
    check_input_policy,
)
