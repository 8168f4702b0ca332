"""Policy routing for replies to spoofed client addresses: fwmark rule, ``local`` default route, sysctls (pyroute2).

For each enabled family: ``ip rule fwmark MARK/MASK lookup TABLE`` (``routing.mark`` / ``routing.mask``) and
``local default dev lo table TABLE``, so that a packet carrying our mark (a diverted packet, or an application's
reply restored from its connection's mark) is delivered locally, to the proxy. Needed in tproxy mode and in nat
mode with ``preserve_source``.

Sysctls: only ``route_localnet=1`` for the IPv4 loopback upstream (see
:func:`tproxy.backends.base.loopback_guard`), on the intercepted interfaces, or on ``all`` when every interface is
intercepted; set after the rules (with their loopback guard) are in, restored before they come out. ``rp_filter``
needs no change (see DESIGN.md, pitfalls). A value we change is remembered in
``/run/tproxy/routing-netns<inode>-mark<M>-table<T>.json`` (:mod:`tproxy.state`, which trusts nothing it reads) and
restored on removal, from any process in the same network namespace; a value that cannot be restored is an error,
and the state stays for a later removal. That file exists for every installed mark and table, so removal also finds
what an earlier config with another ``routing.mark`` / ``routing.table`` installed.

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

from tproxy import state as state_files
from tproxy.backends.base import NEEDS_ROOT, loopback_guard, mark_hex
from tproxy.config import Config
from tproxy.errors import RulesError
from tproxy.state import drop_state, load_state, save_state, state_path

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
    mark, mask, table = mark_hex(config.routing.mark), mark_hex(config.routing.mask), config.routing.table
    out = []
    for f in config.families:
        out.append(f"ip -{f} rule add fwmark {mark}/{mask} lookup {table} priority {RULE_PRIORITY}")
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

    def rule_mask(self, family: int, mark: int, table: int) -> int | None:
        """The fwmask of our rule ``fwmark MARK/MASK lookup TABLE``, or None when there is none. Any mask: an
        install before ``routing.mask`` existed used ``MARK/MARK``, and removal must find that one too."""
        for msg in self.ipr.get_rules(family=AF[family]):
            if msg.get_attr("FRA_FWMARK") == mark and (msg.get_attr("FRA_TABLE") or msg["table"]) == table:
                mask = msg.get_attr("FRA_FWMASK")
                return 0xFFFFFFFF if mask is None else mask
        return None

    def rule_present(self, family: int, mark: int, table: int) -> bool:
        return self.rule_mask(family, mark, table) is not None

    def route_present(self, family: int, table: int) -> bool:
        for msg in self.ipr.get_routes(family=AF[family], table=table):
            if msg["dst_len"] == 0 and msg["type"] == 2 and msg.get_attr("RTA_OIF") == self.lo:  # RTN_LOCAL
                return True
        return False

    def add_rule(self, family: int, mark: int, mask: int, table: int) -> bool:
        """Add the fwmark rule ``MARK/MASK``; False when it was already there (with another mask, it is replaced)."""
        present = self.rule_mask(family, mark, table)
        if present == mask:
            return False
        if present is not None:
            self.del_rule(family, mark, table)
        self.ipr.rule("add", fwmark=mark, fwmask=mask, table=table, family=AF[family], priority=RULE_PRIORITY)
        return True

    def del_rule(self, family: int, mark: int, table: int) -> None:
        for _ in range(16):
            mask = self.rule_mask(family, mark, table)
            if mask is None:
                return
            self.ipr.rule("del", fwmark=mark, fwmask=mask, table=table, family=AF[family])

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
        saved: dict[str, str] = state_files.sysctls(state, path) if state is not None else {}
        for f in config.families:
            try:
                if nl.add_rule(f, mark, config.routing.mask, table):
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
    """Restore the sysctls we changed, then remove our rules and routes (both families). Safe to call twice.

    Also what an install with another ``routing.mark`` / ``routing.table`` left in this namespace (the config was
    edited since), as its state file remembers it.

    Error handling: a sysctl that cannot be restored raises RulesError (:func:`restore_sysctls`) before anything is
    removed, and the state files stay, so a later call can finish.
    """
    done = restore_sysctls(config)
    mark, table = config.routing.mark, config.routing.table
    nl = _netlink()
    try:
        done += _remove(nl, mark, table)
        drop_state(_state_path(mark, table))
        for other_mark, other_table, path in _installed_elsewhere(config):
            if any(nl.rule_present(f, other_mark, other_table) for f in (4, 6)):
                done += [
                    f"{what} (mark {other_mark:#x}, table {other_table})"
                    for what in _remove(nl, other_mark, other_table)
                ]
            drop_state(path)  # removed now, or left by a namespace that no longer exists (inodes are reused)
    finally:
        nl.close()
    return done


def restore_sysctls(config: Config) -> list[str]:
    """Put back every sysctl value an install in this namespace changed (this config's mark and table, and the other
    installs its state files remember); the state files stay. Returns the sysctls written.

    The rules facade calls it first when removing: ``route_localnet`` must be back before its loopback guard goes.

    Error handling: a value that cannot be written (EROFS: a read-only ``/proc/sys``; EPERM: a container) raises
    RulesError naming the sysctl, its value and the one to restore; nothing is removed then. A state file that
    cannot be trusted raises :class:`~tproxy.errors.StateError`.
    """
    own = _state_path(config.routing.mark, config.routing.table)
    done = _restore(own)
    nl = None
    try:
        for other_mark, other_table, path in _installed_elsewhere(config):
            nl = nl or _netlink()
            if any(nl.rule_present(f, other_mark, other_table) for f in (4, 6)):
                done += [f"{key} (mark {other_mark:#x}, table {other_table})" for key in _restore(path)]
    finally:
        if nl is not None:
            nl.close()
    return done


def close_exposure(config: Config) -> list[str]:
    """Put ``route_localnet`` back to its saved value (the watcher, when a piece is missing: the loopback guard may be
    gone). The state file stays, so a reinstall or a removal still knows the old value. Raises like
    :func:`restore_sysctls`."""
    return _restore(_state_path(config.routing.mark, config.routing.table))


def _sysctl_key(path: str) -> str:
    return path.removeprefix(str(SYSCTL_ROOT) + "/").replace("/", ".")


def _restore(path: Path) -> list[str]:
    state = load_state(path)
    if state is None:
        return []
    restored = []
    for p, old in state_files.sysctls(state, path).items():
        key = _sysctl_key(p)
        try:
            current = Path(p).read_text().strip()
        except FileNotFoundError:
            continue  # the interface is gone, and its setting with it
        except OSError as e:
            raise RulesError(f"cannot read {key} ({p}): {e.strerror}") from None
        if current == old:
            continue
        try:
            Path(p).write_text(old + "\n")
        except FileNotFoundError:
            continue
        except OSError as e:
            raise RulesError(
                f"cannot restore {key} = {old} (it is {current}): {p}: {e.strerror}; the rules (with the loopback "
                f"guard) and {path} stay: run `tproxy rules remove` again once it can be written"
            ) from None
        restored.append(key)
    return restored


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


def missing(config: Config) -> list[str]:
    """The routing pieces ``config`` needs that are not in place, one line each: fwmark rules, local routes, sysctls."""
    if not config.needs_routing:
        return []
    mark, table = config.routing.mark, config.routing.table
    out = []
    nl = _netlink()
    try:
        for f in config.families:
            if not nl.rule_present(f, mark, table):
                out.append(f"ip -{f} rule fwmark {mark_hex(mark)}/{mark_hex(mark)} lookup {table} missing")
            if not nl.route_present(f, table):
                out.append(f"ip -{f} route local {DEFAULT_DST[f]} dev lo table {table} missing")
    finally:
        nl.close()
    for s in sysctls(config):
        try:
            value = s.path.read_text().strip()
        except OSError:
            value = "unreadable"
        if value != s.value:
            out.append(f"{s.key} is {value}, not {s.value}")
    return out


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
        hint = ""
        if e.errno == errno.EROFS and path.name == "route_localnet":
            hint = ' (in a container /proc/sys is read-only: use proxy.upstream = "original")'
        raise RulesError(f"cannot write {path}: {e.strerror}{hint}") from None
