"""Reload (SIGHUP): what changed between the running config and the file, and what can be applied live.

:func:`plan` is pure: it compares two configs key by key (:func:`flatten`), keeps the running value of every key that
cannot change under open connections (:data:`RESTART_KEYS`), and says whether the rules, the listeners or the serving
settings change. The runner (tproxy/runner.py) applies a plan: new listeners bound first, then the rules, then the old
listeners closed, then the settings for new connections.

Why some keys need a restart: an open connection's upstream socket carries ``routing.mark`` and was bound by the rules
of its ``mode`` / ``preserve_source`` / ``upstream``; replies to it are routed by the fwmark rule of the running mark
and table. Changing any of them live would cut those connections, which a reload must never do; so would dropping an
IP family (its reply-routing rules go), so a reload may add a family but not drop one. ``admin.address`` and
``privileges`` belong to parts of the process that are set up once. ``proxy.upstream_ports`` is the range the port
chooser's reservations live in.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from tproxy import log
from tproxy.config import Config
from tproxy.errors import TproxyError

# The command-line overrides (mode, backend) the process started with; set by the runner, kept by every reload.
OVERRIDES: dict[str, Any] = {}
LISTEN_WAIT = 10.0  # seconds a privileged parent waits for the proxy to listen on a new port before moving the rules

# Keys a reload logs as "needs a restart" and otherwise ignores (the running value stays).
RESTART_KEYS = (
    "mode",
    "routing.mark",
    "routing.upstream_mark",
    "routing.mask",
    "routing.table",
    "proxy.preserve_source",
    "proxy.upstream",
    "proxy.upstream_ports",
    "proxy.relay",
    "admin.address",
    "privileges.user",
    "privileges.group",
)
# Keys that only concern new connections or the log: applied by the server / logger without touching rules.
SETTINGS_KEYS = (
    "proxy.connect_timeout",
    "proxy.idle_timeout",
    "proxy.max_connections",
    "proxy.shutdown_grace",
    "proxy.send_proxy_protocol",
    "listener.proxy_protocol",
    "listener.proxy_protocol_from",
    "listener.proxy_protocol_timeout",
    "proxy.udp_idle_timeout",
    "proxy.udp_max_sessions",
    "log.level",
    "log.format",
)


def _ports(ranges) -> str:
    return "[" + ", ".join(str(r) for r in ranges) + "]"


def flatten(config: Config) -> dict[str, str]:
    """Every key of ``config`` as it would be written in the file, with a display value (for "what changed")."""
    admin = "" if not config.admin.enabled else f"{config.admin.host}:{config.admin.port}"
    return {
        "mode": config.mode,
        "backend": config.backend,
        "listener.address": str(config.listener.address),
        "listener.port": str(config.listener.port),
        "listener.proxy_protocol": config.listener.proxy_protocol,
        "listener.proxy_protocol_from": "[" + ", ".join(str(n) for n in config.listener.proxy_protocol_from) + "]",
        "listener.proxy_protocol_timeout": f"{config.listener.proxy_protocol_timeout:g}",
        "intercept.ports": _ports(config.intercept.ports),
        "intercept.udp_ports": _ports(config.intercept.udp_ports),
        "intercept.interfaces": "[" + ", ".join(config.intercept.interfaces) + "]",
        "intercept.exclude_ports": _ports(config.intercept.exclude_ports),
        "intercept.exclude_cidrs": "[" + ", ".join(str(n) for n in config.intercept.exclude_cidrs) + "]",
        "intercept.ipv4": str(config.intercept.ipv4).lower(),
        "intercept.ipv6": str(config.intercept.ipv6).lower(),
        "routing.mark": f"{config.routing.mark:#x}",
        "routing.upstream_mark": f"{config.routing.upstream_mark:#x}",
        "routing.mask": f"{config.routing.mask:#x}",
        "routing.table": str(config.routing.table),
        "routing.check_interval": f"{config.routing.check_interval:g}",
        "routing.reinstall": str(config.routing.reinstall).lower(),
        "proxy.preserve_source": str(config.preserve_source).lower(),  # the effective value (mode default or set)
        "proxy.upstream": config.proxy.upstream,
        "proxy.connect_timeout": f"{config.proxy.connect_timeout:g}",
        "proxy.idle_timeout": f"{config.proxy.idle_timeout:g}",
        "proxy.max_connections": str(config.proxy.max_connections),
        "proxy.shutdown_grace": f"{config.proxy.shutdown_grace:g}",
        "proxy.upstream_ports": str(config.proxy.upstream_ports),
        "proxy.send_proxy_protocol": config.proxy.send_proxy_protocol,
        "proxy.relay": config.proxy.relay,
        "proxy.udp_idle_timeout": f"{config.proxy.udp_idle_timeout:g}",
        "proxy.udp_max_sessions": str(config.proxy.udp_max_sessions),
        "admin.address": admin,
        "log.level": config.log.level,
        "log.format": config.log.format,
        "privileges.user": config.privileges.user or "",
        "privileges.group": config.privileges.group or "",
    }


@attrs.frozen
class Change:
    key: str
    old: str
    new: str

    def line(self) -> str:
        """``intercept.ports [8080] -> [8080, 9090]``"""
        return f"{self.key} {self.old or '(unset)'} -> {self.new or '(unset)'}"


def diff(old: Config, new: Config) -> list[Change]:
    """The keys whose value differs, in file order."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a[k], b[k]) for k in a if a[k] != b[k]]


def listener_key(config: Config) -> tuple[tuple[int, str, int, bool], ...]:
    """What the listening sockets are: (family, address, port, transparent) per family."""
    transparent = config.needs_routing
    return tuple((f, config.listener.address_for(f), config.listener.port, transparent) for f in config.families)


def udp_listener_key(config: Config) -> tuple[tuple[int, str, int, bool], ...]:
    """The UDP listeners ``config`` needs, keyed like :func:`listener_key`: none without ``intercept.udp_ports``
    (or outside tproxy mode)."""
    if config.mode != "tproxy" or not config.intercept.udp_ports:
        return ()
    return listener_key(config)


@attrs.frozen(kw_only=True)
class Plan:
    """What a reload does. ``config`` is the config to run with: the new one, with :data:`RESTART_KEYS` kept."""

    config: Config
    applied: tuple[Change, ...]  # changes that take effect now
    restart: tuple[Change, ...]  # changes ignored until a restart
    rules: bool  # the rule text or routing differs (install the new rules)
    backend: bool  # the rule backend differs (install the new, then remove the old backend's rules)
    listeners: bool  # the listening sockets differ (bind the new ones, close the old ones)
    settings: bool  # timeouts, limits or logging differ

    @property
    def empty(self) -> bool:
        return not self.applied


def _restart_keys(old: Config, new: Config) -> set[str]:
    """:data:`RESTART_KEYS`, and for this pair of configs: dropping an IP family (its open connections lose the
    reply routing rules of their family), and then ``listener.address`` too (it may be what required the drop)."""
    keys = set(RESTART_KEYS)
    dropped = [f for f in old.families if f not in new.families]
    if dropped:
        keys |= {f"intercept.ipv{f}" for f in dropped} | {"listener.address"}
    return keys


def _keep_running(old: Config, new: Config) -> Config:
    """``new`` with the running value of every key that needs a restart (:func:`_restart_keys`), and where that value
    came from (the running config's source, not the file's); the file's value and source of each such key that
    differs are in ``restart_pending`` (``/config`` shows both)."""
    config = _keep_running_values(old, new)
    running, before, wanted = config.settings(), old.settings(), new.settings()
    origins = dict(new.origins)
    pending = {}
    for key in _restart_keys(old, new):
        if running[key] == before[key]:
            origins.pop(key, None)
            if key in old.origins:
                origins[key] = old.origins[key]
        if wanted[key] != running[key]:
            pending[key] = {"value": wanted[key], "source": new.source_of(key)}
    return attrs.evolve(config, origins=origins, restart_pending=pending)


def _keep_running_values(old: Config, new: Config) -> Config:
    proxy = attrs.evolve(
        new.proxy,
        preserve_source=old.preserve_source,  # the effective value: the running mode decides the default
        upstream=old.proxy.upstream,
        upstream_ports=old.proxy.upstream_ports,
        relay=old.proxy.relay,
    )
    listener, intercept = new.listener, new.intercept
    if any(f not in new.families for f in old.families):
        listener = attrs.evolve(new.listener, address=old.listener.address)
        intercept = attrs.evolve(
            new.intercept, ipv4=old.intercept.ipv4 or new.intercept.ipv4, ipv6=old.intercept.ipv6 or new.intercept.ipv6
        )
    return attrs.evolve(
        new,
        mode=old.mode,
        routing=attrs.evolve(old.routing, check_interval=new.routing.check_interval, reinstall=new.routing.reinstall),
        proxy=proxy,
        admin=old.admin,
        privileges=old.privileges,
        listener=listener,
        intercept=intercept,
    )


def plan(old: Config, new: Config) -> Plan:
    """Compare the running config with a newly loaded one (pure)."""
    changes = diff(old, new)
    keys = _restart_keys(old, new)
    restart = tuple(c for c in changes if c.key in keys)
    applied = tuple(c for c in changes if c.key not in keys)
    config = _keep_running(old, new)
    from tproxy import rules

    backend = config.backend != old.backend
    return Plan(
        config=config,
        applied=applied,
        restart=restart,
        rules=backend or rules.show(config) != rules.show(old),
        backend=backend,
        listeners=listener_key(config) != listener_key(old),
        settings=any(c.key in SETTINGS_KEYS for c in applied),
    )


def load(old: Config, overrides: dict[str, Any]) -> Config:
    """Re-read ``old.file`` with the environment and the command-line overrides the process started with (the
    environment is fixed for the life of the process: ``old.environ``, never ``os.environ`` again).

    Error handling: :class:`~tproxy.errors.ConfigError` (file, key, reason) for anything wrong; nothing else happens.
    """
    return Config.load(old.file, old.environ, mode=overrides.get("mode"), backend=overrides.get("backend"))


def install(old: Config, plan: Plan) -> str:
    """The new rules in, then (backend change) the old backend's rules out.

    Error handling: when the new rules fail (the kernel rejects them, routing fails after they went in),
    :func:`tproxy.rules.install` has put back what was installed; the running config's rules are then installed once
    more (idempotent: it also mends pieces that were missing), so the host is left serving as before; then the error
    is raised.
    """
    from tproxy import rules

    try:
        summary = rules.install(plan.config)
    except Exception:
        try:
            rules.install(old)
        except Exception as e:  # noqa: BLE001 - the first error is the one to report
            log.event("reload_restore_failed", logging.ERROR, error=str(e))
        raise
    if plan.backend:
        from tproxy.backends import get_backend

        try:
            get_backend(old.backend).remove()
        except Exception as e:  # noqa: BLE001 - the new rules are in and working; say what is left behind
            log.event(
                "reload_old_rules_left",
                logging.ERROR,
                backend=old.backend,
                error=str(e),
                hint=f"tproxy rules remove -c {old.source} --backend {old.backend}"
                if old.file
                else f"tproxy rules remove --backend {old.backend}",
            )
    return summary


def failed_line(err: Exception) -> str:
    """The one line an invalid config or a failed apply is reported with."""
    return f"tproxy: reload failed: {err}; keeping the running config"


# ----------------------------------------------------------------------------------------------------------------
# The privileged parent (tproxy/privileges.py): it owns the rules, the unprivileged child serves.


def listening_ports(proc_net_tcp: str) -> set[int]:
    """The local ports in LISTEN state in the text of ``/proc/net/tcp`` or ``/proc/net/tcp6`` (pure)."""
    return {port for port, _inode in socket_entries(proc_net_tcp, listen_only=True)}


def socket_entries(proc_net: str, *, listen_only: bool = False) -> set[tuple[int, int]]:
    """(local port, socket inode) of each socket in the text of ``/proc/net/{tcp,tcp6,udp,udp6}`` (pure);
    ``listen_only``: TCP sockets in LISTEN state only."""
    out = set()
    for line in proc_net.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 9 and (not listen_only or parts[3] == "0A"):
            out.add((int(parts[1].rpartition(":")[2], 16), int(parts[9])))
    return out


def _socket_inodes(pid: int) -> set[int] | None:
    """The inodes of the sockets process ``pid`` holds open; None when it cannot be read (then any socket counts)."""
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        return None
    return inodes


def _listening(ports: set[int], udp_ports: set[int] = frozenset(), pid: int | None = None) -> bool:
    """Whether TCP ``ports`` are listening and UDP ``udp_ports`` bound, by process ``pid``'s own sockets when given
    (a port someone else holds does not count: the proxy's bind failed there)."""
    inodes = _socket_inodes(pid) if pid is not None else None
    for names, want, listen_only in ((("tcp", "tcp6"), ports, True), (("udp", "udp6"), udp_ports, False)):
        found: set[int] = set()
        for name in names:
            try:
                entries = socket_entries(Path(f"/proc/net/{name}").read_text(), listen_only=listen_only)
            except OSError:
                continue
            found |= {port for port, inode in entries if inodes is None or inode in inodes}
        if not want <= found:
            return False
    return True


class ParentReload:
    """SIGHUP in the privileged parent (a signal handler): move the rules with the config, pass the signal on.

    ``config`` is the config whose rules are in force (the parent removes those at the end). An invalid file is left
    to the proxy to report (one line); no rule change: just forward. Otherwise the rules go in before the proxy hears
    of it, except when a listener moves or appears (``listener.*``, or UDP listeners with ``intercept.udp_ports``):
    then the proxy first binds the new ports (keeping the old ones open until its next reload) and the rules follow
    once the proxy (``child``, the serving process, when given) holds every one of them, TCP listening and UDP bound
    (at most :data:`LISTEN_WAIT` seconds; otherwise no rule changes: the proxy's bind failed and it keeps its running
    config too). A SIGHUP arriving meanwhile runs one more reload afterwards.

    Error handling: never raises. Rules the kernel rejects leave the host as it was and print the one failure line;
    the signal is then not forwarded, so proxy and rules stay on the running config.
    """

    def __init__(self, config: Config, forward: Callable[[], None], *, child: int | None = None) -> None:
        self.config = config
        self.forward = forward
        self.child = child
        self._busy = False
        self._again = False

    def __call__(self, signum: int, frame: object) -> None:
        if self._busy:
            self._again = True
            return
        self._busy = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._reload()
        finally:
            self._busy = False

    def _reload(self) -> None:
        old = self.config
        try:
            new = load(old, OVERRIDES)
        except TproxyError:
            self.forward()  # the proxy reports it
            return
        p = plan(old, new)
        if not p.rules:
            self.forward()
            return
        binds = p.listeners or udp_listener_key(p.config) != udp_listener_key(old)
        if binds:
            self.forward()
            ports = {key[2] for key in listener_key(p.config)}
            udp_ports = {key[2] for key in udp_listener_key(p.config)}
            deadline = time.monotonic() + LISTEN_WAIT
            while not _listening(ports, udp_ports, self.child):
                if time.monotonic() > deadline:
                    log.event(
                        "reload_rules",
                        logging.WARNING,
                        installed="nothing: the proxy does not listen on the new port",
                        ports=",".join(str(x) for x in sorted(ports)),
                        udp_ports=",".join(str(x) for x in sorted(udp_ports)),
                    )
                    return
                time.sleep(0.02)
        try:
            summary = install(old, p)
        except Exception as e:  # noqa: BLE001 - the host is as it was; one line
            print(failed_line(e), file=sys.stderr, flush=True)
            return
        self.config = p.config
        log.event("reload_rules", installed=summary, by="privileged parent", pid=os.getpid())
        if not binds:
            self.forward()
