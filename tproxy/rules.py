"""The rules facade: show, install and uninstall the interception rules and the policy routing together.

- :func:`show` touches nothing: the rule file(s), then the routing as ``ip``/``sysctl`` commands.
- :func:`install` is atomic as a whole: rules in one step, then routes, then sysctls; whatever step fails, what was
  installed before is what remains (the previous rules of ours, or none; routes and sysctls as they were), also when
  it replaces an earlier install (``tproxy rules apply`` again, a reload, the watcher). Idempotent: installing twice
  leaves one copy of everything.
- :func:`uninstall` restores the sysctls it changed (remembered under /run/tproxy/ across processes), then removes
  everything tproxy installs (rules of either backend's making are found by name), and nothing else.
- :func:`missing` says which pieces are not in place (the watcher, ``tproxy rules check``).

Order, so that ``route_localnet=1`` never exists without its loopback guard: rules (with the guard) before routes
before sysctls on the way in; sysctls restored before anything comes out.

Error handling: :class:`~tproxy.errors.RulesError` (or its :class:`~tproxy.errors.MissingBinaryError`) with a message
for the operator; a rule file the kernel rejects carries the tool's own message and leaves the host as it was.
Call from a thread under trio (pyroute2's sync API runs its own event loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tproxy import routing, sockets, state
from tproxy.backends import get_backend
from tproxy.backends.base import put_back, require_net_admin
from tproxy.config import BACKENDS, Config
from tproxy.errors import MissingBinaryError


def show(config: Config) -> str:
    """What :func:`install` would install, as text a user could apply by hand. Pure."""
    text = get_backend(config.backend).render(config)
    cmds = routing.commands(config)
    if cmds:
        text += "\n# routing\n" + "\n".join(cmds) + "\n"
    else:
        text += "\n# routing: none needed (nat mode without preserve_source)\n"
    return text


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One install/uninstall at a time (say a restarting proxy and `tproxy rules remove`); short, so host-wide."""
    fd = os.open(
        state.ensure_dir(), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    )  # a lock on the directory: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install(config: Config, *, lock: bool = True) -> str:
    """Install rules (the loopback guard among them), then routes, then sysctls for ``config``; returns a one-line
    summary. Clears an operator's earlier ``tproxy rules remove`` (:func:`removed_by_operator`). ``lock=False``: the
    caller already holds :func:`exclusive`."""
    require_net_admin()
    with exclusive() if lock else contextlib.nullcontext():
        summary = _install(config)
        state.drop_state(_removed_path())
        return summary


def _install(config: Config) -> str:
    backend = get_backend(config.backend)
    text = backend.render(config)
    routing.check(config)
    before = backend.snapshot()
    backend.apply(text)  # (itself all or nothing)
    try:
        routing.install(config)  # (undoes its own steps when one fails)
    except BaseException as e:
        put_back(lambda: backend.restore(before), e)
        raise
    families = "+".join(f"IPv{f}" for f in config.families)
    extra = f", fwmark {config.routing.mark:#x} -> table {config.routing.table}" if config.needs_routing else ""
    return f"tproxy rules installed: {config.mode} mode, {backend.describe()}, {families}{extra}"


def uninstall(config: Config, *, by_operator: bool = False) -> str:
    """Restore the sysctls, then remove our rules (the configured backend's, and any the other backend left) and
    routes. Safe when nothing is installed. ``by_operator`` (``tproxy rules remove``) records that the operator took
    them out, so that a watcher does not put them back (:func:`removed_by_operator`) until the next install.

    Error handling: a sysctl that cannot be restored raises RulesError naming it, with nothing removed (the loopback
    guard never goes while ``route_localnet`` is still 1) and the state kept, so a later removal can finish.
    """
    require_net_admin()
    with exclusive():
        if by_operator:
            marker = {"removed_by": "tproxy rules remove", "at": time.time(), "netns_cookie": sockets.netns_cookie()}
            state.save_state(_removed_path(), marker)
        return _uninstall(config)


def _uninstall(config: Config) -> str:
    backend = get_backend(config.backend)
    restored = routing.restore_sysctls(config)  # before the guard goes
    had_rules = backend.installed()
    backend.remove()
    also = _other_backends_rules(config)
    removed_routing = restored + routing.uninstall(config)
    if not had_rules and not also and not removed_routing:
        return f"tproxy rules: nothing to remove ({backend.describe()})"
    return (
        f"tproxy rules removed: {backend.describe()}"
        + "".join(f", {name}" for name in also)
        + (f", routing: {', '.join(removed_routing)}" if removed_routing else "")
    )


def _other_backends_rules(config: Config) -> list[str]:
    """Remove our rules of the backend(s) ``config`` does not name: left by an earlier run with another ``backend``
    (the config was edited, or ``--backend`` given once). A backend whose programs are not installed has none."""
    removed = []
    for name in BACKENDS:
        if name == config.backend:
            continue
        other = get_backend(name)
        try:
            if not other.installed():
                continue
        except MissingBinaryError:
            continue
        other.remove()
        removed.append(other.describe())
    return removed


def _removed_path() -> Path:
    return state.state_path("removed")


def removed_by_operator() -> bool:
    """Whether ``tproxy rules remove`` ran in this network namespace since the last install: a watcher then reports
    the rules as removed by the operator and never puts them back.

    The marker is named by the namespace's inode, which the kernel gives to a new namespace once the old one is
    freed; it also holds the namespace's cookie (:func:`~tproxy.sockets.netns_cookie`, never reused), and a marker
    whose cookie is another namespace's was left by a namespace that no longer exists: it says nothing about this one.
    A marker without a cookie (a kernel without cookies) is honoured."""
    marker = state.load_state(_removed_path())
    if marker is None:
        return False
    cookie = marker.get("netns_cookie")
    if isinstance(cookie, int) and not isinstance(cookie, bool):
        return cookie == sockets.netns_cookie()
    return True


def missing(config: Config) -> list[str]:
    """Every piece ``config`` needs that is not in place, one line each (empty: all there): rules of the configured
    backend (the loopback guard among them), fwmark rules, local routes, ``route_localnet``. Needs CAP_NET_ADMIN."""
    require_net_admin()
    backend = get_backend(config.backend)
    return backend.missing(backend.render(config)) + routing.missing(config)


def installed(config: Config) -> bool:
    """Whether any of our rules (the configured backend's) or our fwmark rule are present. Needs CAP_NET_ADMIN."""
    require_net_admin()
    return get_backend(config.backend).installed() or routing.installed(config)
