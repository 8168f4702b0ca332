"""Policy routing for replies to spoofed client addresses: fwmark rule, ``local`` default route, sysctls (pyroute2).

For each enabled family: ``ip rule fwmark MARK/MARK lookup TABLE`` and ``local default dev lo table TABLE``, so that a
packet carrying our mark (a diverted packet, or an application's reply restored from its connection's mark) is
delivered locally, to the proxy. Needed in tproxy mode and in nat mode with ``preserve_source``.

Sysctls: only ``route_localnet=1`` for the IPv4 loopback upstream (see :func:`backends.base.loopback_guard`), on the
intercepted interfaces, or on ``all`` when every interface is intercepted. ``rp_filter`` needs no change (see
DESIGN.md, pitfalls). A value we change is remembered in ``/run/tproxy/routing-netns<inode>-mark<M>-table<T>.json``
and restored on removal, from any process in the same network namespace. That file exists for every installed mark
and table, so removal also finds what an earlier config with another ``routing.mark`` / ``routing.table`` installed.

Error handling: every failure raises :class:`~tproxy.errors.RulesError`; :func:`install` first undoes what it did.
Resource handling: ``IPRoute`` works in the calling process's network namespace. It runs an asyncio loop of its own:
call these functions from a thread (``trio.to_thread.run_sync``) or outside trio.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable
from pathlib import Path

import attrs

from tproxy.backends.base import NEEDS_ROOT, drop_state, load_state, loopback_guard, mark_hex, save_state, state_path
from tproxy.config import Config
from tproxy.errors import RulesError

SYSCTL_ROOT = Path("/proc/sys")
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
DEFAULT_DST = {4: "0.0.0.0/0", 6: "::/0"}
RULE_PRIORITY = 32000  # what pyroute2 picks by default; said explicitly so `rules show` prints the same


@attrs.frozen
class Sysctl:
    key: str  # for messages: net.ipv4.conf.eth0.route_localnet
    parts: tuple[str, ...]  # the path under /proc/sys; an interface name stays whole even with a dot in it
    value: str

    @property
    def path(self) -> Path:
        return SYSCTL_ROOT.joinpath(*self.parts)

    def command(self) -> str:
        if any("." in p for p in self.parts):
            return f"sysctl -w {'/'.join(self.parts)}={self.value}"
        return f"sysctl -w {'.'.join(self.parts)}={self.value}"


def sysctls(config: Config) -> list[Sysctl]:
    """The sysctls ``config`` needs (pure)."""
    if not loopback_guard(config):
        return []
    ifaces = config.intercept.interfaces or ("all",)
    return [
        Sysctl(key=f"net.ipv4.conf.{i}.route_localnet", parts=("net", "ipv4", "conf", i, "route_localnet"), value="1")
        for i in ifaces
    ]


def commands(config: Config) -> list[str]:
    """The routing as ``ip``/``sysctl`` commands a user could paste (pure)."""
    if not config.needs_routing:
        return []
    mark, table = mark_hex(config.routing.mark), config.routing.table
    out = []
    for f in config.families:
        out.append(f"ip -{f} rule add fwmark {mark}/{mark} lookup {table} priority {RULE_PRIORITY}")
        out.append(f"ip -{f} route add local {DEFAULT_DST[f]} dev lo table {table}")
    out += [s.command() for s in sysctls(config)]
    return out


def _state_path(mark: int, table: int) -> Path:
    """What one install (mark, table) did in this namespace: the sysctl values it changed. It exists while our rule
    for that mark and table is installed, so removal finds it even after ``routing.mark`` or ``routing.table`` were
    edited in the config."""
    return state_path("routing", f"mark{mark}", f"table{table}")


def _installed_elsewhere(config: Config) -> list[tuple[int, int, Path]]:
    """(mark, table, state path) of the other installs this namespace's state files remember."""
    own = _state_path(config.routing.mark, config.routing.table)
    pattern = re.compile(r"-mark(\d+)-table(\d+)\.json$")
    out = []
    for path in sorted(own.parent.glob(own.name.split("-mark", 1)[0] + "-mark*-table*.json")):
        m = pattern.search(path.name)
        if m and path != own:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return out


def _netlink_error(e: Exception, what: str) -> RulesError:
    code = getattr(e, "code", None)
    if code == errno.EPERM:
        return RulesError(f"{NEEDS_ROOT}: {what}")
    return RulesError(f"{what}: {e}")


class _Netlink:
    """The few rule/route operations we need, each idempotent, over one IPRoute socket."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.lo = self.ipr.link_lookup(ifname="lo")[0]

    def close(self) -> None:
        self.ipr.close()

    def rule_present(self, family: int, mark: int, table: int) -> bool:
        for msg in self.ipr.get_rules(family=AF[family]):
            if (
                msg.get_attr("FRA_FWMARK") == mark
                and msg.get_attr("FRA_FWMASK") == mark
                and (msg.get_attr("FRA_TABLE") or msg["table"]) == table
            ):
                return True
        return False

    def route_present(self, family: int, table: int) -> bool:
        for msg in self.ipr.get_routes(family=AF[family], table=table):
            if msg["dst_len"] == 0 and msg["type"] == 2 and msg.get_attr("RTA_OIF") == self.lo:  # RTN_LOCAL
                return True
        return False

    def add_rule(self, family: int, mark: int, table: int) -> bool:
        """Add the fwmark rule; False when it was already there."""
        if self.rule_present(family, mark, table):
            return False
        self.ipr.rule("add", fwmark=mark, fwmask=mark, table=table, family=AF[family], priority=RULE_PRIORITY)
        return True

    def del_rule(self, family: int, mark: int, table: int) -> None:
        for _ in range(16):
            if not self.rule_present(family, mark, table):
                return
            self.ipr.rule("del", fwmark=mark, fwmask=mark, table=table, family=AF[family])

    def _route(self, op: str, family: int, table: int) -> None:
        """``local default dev lo table T``: IPv4 needs scope host (else EINVAL), IPv6 the family (DESIGN.md)."""
        if family == 4:
            self.ipr.route(op, dst="0.0.0.0/0", type="local", scope="host", table=table, oif=self.lo)
        else:
            self.ipr.route(op, dst="default", family=socket.AF_INET6, type="local", table=table, oif=self.lo)

    def add_route(self, family: int, table: int) -> bool:
        if self.route_present(family, table):
            return False
        self._route("add", family, table)
        return True

    def del_route(self, family: int, table: int) -> None:
        for _ in range(16):
            if not self.route_present(family, table):
                return
            self._route("del", family, table)


def _netlink() -> _Netlink:
    try:
        return _Netlink()
    except Exception as e:  # pyroute2 raises NetlinkError / OSError
        raise _netlink_error(e, "cannot open a netlink socket") from None


def installed(config: Config) -> bool:
    """Whether our fwmark rule is present for any enabled family."""
    nl = _netlink()
    try:
        return any(nl.rule_present(f, config.routing.mark, config.routing.table) for f in config.families)
    finally:
        nl.close()


def check(config: Config) -> None:
    """Raise the RulesError :func:`install` would raise for a sysctl it cannot set (an interface that does not exist),
    touching nothing: the rules facade calls it before the rules go in, so such a config changes nothing at all
    (a rule set replaced and then left in place by a failed routing step would be half of the new config)."""
    for s in sysctls(config):
        _read_sysctl(s, config)


def install(config: Config) -> list[str]:
    """Add rules, routes and sysctls for ``config``; idempotent. Returns what was newly done (for the summary).

    Error handling: on any failure, what this call added or changed is undone before RulesError is raised.
    """
    if not config.needs_routing:
        return []
    mark, table = config.routing.mark, config.routing.table
    undo: list[Callable[[], None]] = []
    done: list[str] = []
    nl = _netlink()
    path = _state_path(mark, table)
    prev_state = None
    try:
        state = load_state(path)
        if state is not None and not any(nl.rule_present(f, mark, table) for f in (4, 6)):
            state = None  # left by a namespace that no longer exists (inodes are reused)
        prev_state = state
        saved: dict[str, str] = dict((state or {}).get("sysctls", {}))
        for f in config.families:
            try:
                if nl.add_rule(f, mark, table):
                    undo.append(lambda f=f: nl.del_rule(f, mark, table))
                    done.append(f"rule ipv{f}")
                if nl.add_route(f, table):
                    undo.append(lambda f=f: nl.del_route(f, table))
                    done.append(f"route ipv{f}")
            except RulesError:
                raise
            except Exception as e:
                raise _netlink_error(e, f"adding the IPv{f} fwmark rule/local route (table {table})") from None
        for s in sysctls(config):
            old = _read_sysctl(s, config)
            if old == s.value:
                continue
            if str(s.path) not in saved:
                saved[str(s.path)] = old
                save_state(path, {"sysctls": saved})
            _write_sysctl(s.path, s.value)
            undo.append(lambda s=s, old=old: _write_sysctl(s.path, old))
            done.append(s.key)
        save_state(path, {"sysctls": saved})  # also when empty: it says this mark and table are installed
        return done
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception:
                pass
        if prev_state is None:
            drop_state(path)
        else:
            save_state(path, prev_state)
        raise
    finally:
        nl.close()


def uninstall(config: Config) -> list[str]:
    """Remove our rules and routes (both families) and restore the sysctls we changed. Safe to call twice.

    Also what an install with another ``routing.mark`` / ``routing.table`` left in this namespace (the config was
    edited since), as its state file remembers it.
    """
    mark, table = config.routing.mark, config.routing.table
    nl = _netlink()
    try:
        done = _remove(nl, mark, table)
        done += _restore_and_forget(_state_path(mark, table))
        for other_mark, other_table, path in _installed_elsewhere(config):
            if any(nl.rule_present(f, other_mark, other_table) for f in (4, 6)):
                removed = _remove(nl, other_mark, other_table) + _restore_and_forget(path)
                done += [f"{what} (mark {other_mark:#x}, table {other_table})" for what in removed]
            else:
                drop_state(path)  # left by a namespace that no longer exists (inodes are reused)
    finally:
        nl.close()
    return done


def _remove(nl: _Netlink, mark: int, table: int) -> list[str]:
    done = []
    for f in (4, 6):
        try:
            if nl.rule_present(f, mark, table):
                nl.del_rule(f, mark, table)
                done.append(f"rule ipv{f}")
            if nl.route_present(f, table):
                nl.del_route(f, table)
                done.append(f"route ipv{f}")
        except Exception as e:
            raise _netlink_error(e, f"removing the IPv{f} fwmark rule/local route (table {table})") from None
    return done


def _restore_and_forget(path: Path) -> list[str]:
    state = load_state(path) or {}
    restored = []
    for p, old in state.get("sysctls", {}).items():
        try:
            Path(p).write_text(old + "\n")
            restored.append(p.removeprefix(str(SYSCTL_ROOT) + "/").replace("/", "."))
        except OSError:
            pass  # the interface is gone, and its setting with it
    drop_state(path)
    return restored


def _read_sysctl(s: Sysctl, config: Config) -> str:
    try:
        return s.path.read_text().strip()
    except FileNotFoundError:
        iface = s.parts[3]
        where = ": ".join(config.where("intercept.interfaces"))
        raise RulesError(
            f'{where}: interface {iface!r} does not exist (needed to set {s.key} for proxy.upstream = "loopback")'
        ) from None
    except OSError as e:
        raise RulesError(f"cannot read {s.path}: {e.strerror}") from None


def _write_sysctl(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n")
    except PermissionError:
        raise RulesError(f"{NEEDS_ROOT}: cannot write {path}") from None
    except OSError as e:
        raise RulesError(f"cannot write {path}: {e.strerror}") from None
