"""``tproxy run``: rules in, serve, rules out.

Order: logging; RLIMIT_NOFILE raised to the hard limit; rules and routes installed (unless ``--no-rules``); the
listening sockets bound; :func:`before_serve` (the one place where privileges are dropped); then the trio run, with
the proxy, the admin endpoint and the signal watcher in one nursery. SIGTERM/SIGINT stop accepting and drain for up
to ``proxy.shutdown_grace`` seconds; a second signal cancels what is left. Whatever happens after the rules went in,
they are removed before the process exits, and signals arriving meanwhile cannot interrupt that.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import signal
import socket
from collections.abc import Iterator

import trio

from tproxy import log, sockets
from tproxy.config import Config
from tproxy.errors import TproxyError
from tproxy.stats import State, Stats

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def before_serve(config: Config, listeners: list[socket.socket], *, manage_rules: bool) -> bool:
    """The hook between binding the listeners and serving: the privileges step (tproxy/privileges.py) drops to
    ``privileges.user`` keeping CAP_NET_RAW, possibly behind a privileged parent that keeps the rules. Returns whether
    this process still owns the rules and routes (removes them at the end)."""
    from tproxy import privileges

    return privileges.before_serve(config, listeners, manage_rules=manage_rules)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after. Never raises."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def bind_listeners(config: Config) -> list[socket.socket]:
    """One listening socket per family in ``config.families``.

    Error handling: raises PrivilegeError (no CAP_NET_RAW for IP_TRANSPARENT) or TproxyError (cannot bind); sockets
    bound so far are closed.
    """
    transparent = config.mode == "tproxy" or config.preserve_source
    out: list[socket.socket] = []
    try:
        for family in config.families:
            out.append(
                sockets.listener(
                    family, config.listener.address_for(family), config.listener.port, transparent=transparent
                )
            )
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class _Signals:
    """Signals that arrive outside the trio run (while rules are installed or removed) are remembered, not fatal."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def handler(self, signum: int, frame: object) -> None:
        self.pending.append(signum)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[_Signals]:
    sigs = _Signals()
    previous = {s: signal.signal(s, sigs.handler) for s in SIGNALS}
    try:
        yield sigs
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


async def _watch_signals(server, early: _Signals, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*SIGNALS) as received:
        task_status.started()
        count = 0
        for signum in early.pending:
            count += 1
            _on_signal(server, signum, count)
        early.pending.clear()
        async for signum in received:
            count += 1
            _on_signal(server, signum, count)


def _on_signal(server, signum: int, count: int) -> None:
    name = signal.Signals(signum).name
    if count == 1:
        log.event("stopping", signal=name, open=server.stats.open, grace_s=server.grace)
        server.shutdown()
    else:
        log.event("stopping_now", signal=name, open=server.stats.open)
        server.skip_grace()


async def _main(config: Config, listeners: list[socket.socket], stats: Stats, state: State, early: _Signals) -> None:
    from tproxy.server import Server

    server = Server(config, listeners, stats, state)
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, server, early)
        if config.admin.enabled:
            await _start_admin(nursery, config, stats, state)
        await server.serve()
        nursery.cancel_scope.cancel()  # the admin endpoint and the signal watcher


async def _start_admin(nursery: trio.Nursery, config: Config, stats: Stats, state: State) -> None:
    try:
        from tproxy.admin import serve_admin
    except ImportError:
        log.event("admin_unavailable", logging.WARNING, reason="tproxy.admin is not installed")
        return
    try:
        await nursery.start(serve_admin, config, stats, state)
    except OSError as e:
        where = f"{config.admin.host}:{config.admin.port}"
        raise TproxyError(f"cannot start the admin endpoint on {where}: {e.strerror or e}") from None


def _operator_error(group: BaseExceptionGroup) -> TproxyError | None:
    """The TproxyError inside a nursery's exception group (one line for the operator), if there is one."""
    match = group.subgroup(lambda e: isinstance(e, TproxyError))
    while isinstance(match, BaseExceptionGroup):
        match = match.exceptions[0]
    return match


def run(config: Config, manage_rules: bool) -> int:
    """Install rules (when ``manage_rules``), serve until SIGTERM/SIGINT, remove the rules; returns the exit status.

    Error handling: raises TproxyError (PrivilegeError when a capability is missing) for anything that stops the
    proxy from starting; rules installed before the failure are removed first.
    """
    log.setup(config.log.level, config.log.format)
    from tproxy import privileges

    privileges.check_capabilities(config, manage_rules=manage_rules)
    soft, _hard = raise_nofile_limit()
    stats = Stats()
    state = State(mode=config.mode, backend=config.backend)
    installed: str | None = None  # the install summary, while this process owns the rules
    listeners: list[socket.socket] = []
    with _deferred_signals() as early:
        try:
            if manage_rules:
                from tproxy import rules

                installed = rules.install(config)
            state.rules_installed = True  # with --no-rules, the privileged step installed them
            listeners = bind_listeners(config)
            summary = installed if installed is not None else "nothing (--no-rules)"
            if not before_serve(config, listeners, manage_rules=installed is not None):
                installed = None  # a privileged parent process removes them (or they were never ours)
            log.event(
                "start",
                mode=config.mode,
                backend=config.backend,
                listeners=",".join(log.addr(sockets.sockname(s)) for s in listeners),
                upstream=config.proxy.upstream,
                preserve_source=config.preserve_source,
                installed=summary,
                nofile=soft,
            )
            gc.freeze()  # what start-up allocated stays out of every later collection (shorter full collections)
            try:
                trio.run(_main, config, listeners, stats, state, early)
            except BaseExceptionGroup as group:
                err = _operator_error(group)
                if err is None:
                    raise
                raise err from None
            return 0
        finally:
            for s in listeners:
                s.close()
            if installed is not None:
                from tproxy import rules

                removed = rules.uninstall(config)
                log.event("stop", removed=removed, accepted=stats.accepted)
            else:
                log.event("stop", removed="nothing (not installed by this process)", accepted=stats.accepted)
