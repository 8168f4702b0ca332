"""The rules facade: show, install and uninstall the interception rules and the policy routing together.

- :func:`show` touches nothing: the rule file(s), then the routing as ``ip``/``sysctl`` commands.
- :func:`install` is atomic as a whole: rules in one step, then routes and sysctls; if routing fails after the rules
  went in, the rules come out again. Idempotent: installing twice leaves one copy of everything.
- :func:`uninstall` removes everything tproxy installs (rules of either backend's making are found by name), restores
  the sysctls it changed (remembered under /run/tproxy/ across processes), and nothing else.

Error handling: :class:`~tproxy.errors.RulesError` (or its :class:`~tproxy.errors.MissingBinaryError`) with a message
for the operator; a rule file the kernel rejects carries the tool's own message and leaves the host as it was.
Call from a thread under trio (pyroute2's sync API runs its own event loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from tproxy import routing
from tproxy.backends import get_backend
from tproxy.backends.base import STATE_DIR, require_net_admin
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
def _exclusive() -> Iterator[None]:
    """One install/uninstall at a time (say a restarting proxy and `tproxy rules remove`); short, so host-wide."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY)  # a lock on the directory: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install(config: Config) -> str:
    """Install rules, routes and sysctls for ``config``; returns a one-line summary."""
    require_net_admin()
    with _exclusive():
        return _install(config)


def _install(config: Config) -> str:
    backend = get_backend(config.backend)
    text = backend.render(config)
    routing.check(config)
    was_installed = backend.installed()
    backend.apply(text)
    try:
        routing.install(config)
    except BaseException:
        if not was_installed:
            backend.remove()
        raise
    families = "+".join(f"IPv{f}" for f in config.families)
    extra = f", fwmark {config.routing.mark:#x} -> table {config.routing.table}" if config.needs_routing else ""
    return f"tproxy rules installed: {config.mode} mode, {backend.describe()}, {families}{extra}"


def uninstall(config: Config) -> str:
    """Remove our rules (the configured backend's, and any the other backend left) and routes; restore sysctls.
    Safe when nothing is installed."""
    require_net_admin()
    with _exclusive():
        return _uninstall(config)


def _uninstall(config: Config) -> str:
    backend = get_backend(config.backend)
    had_rules = backend.installed()
    backend.remove()
    also = _other_backends_rules(config)
    removed_routing = routing.uninstall(config)
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


def installed(config: Config) -> bool:
    """Whether any of our rules (the configured backend's) or our fwmark rule are present. Needs CAP_NET_ADMIN."""
    require_net_admin()
    return get_backend(config.backend).installed() or routing.installed(config)
