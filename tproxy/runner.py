"""``tproxy run``: rules in, serve, rules out.

Order: logging; RLIMIT_NOFILE raised to the hard limit; rules and routes installed (unless ``--no-rules``); the
listening sockets bound; :func:`before_serve` (the one place where privileges are dropped); then the trio run, with
the proxy, the admin endpoint, the signal watcher and the rule watcher (tproxy/watch.py: when this process owns the
rules; behind a privileged parent, the parent's reports instead) in one nursery. SIGTERM/SIGINT stop accepting and
drain for up to ``proxy.shutdown_grace`` seconds; a second signal cancels what is left. SIGHUP reloads the config
file (:class:`Reloader`, tproxy/reload.py), then checks the rules. Whatever happens after the rules went in, they
are removed before the process exits, and signals arriving meanwhile cannot interrupt that (a SIGHUP received while
the rules go in is applied once serving starts; one received while they come out is ignored).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import trio

from tproxy import log, reload, sockets, udp, watch
from tproxy.config import Config
from tproxy.errors import ConfigError, TproxyError
from tproxy.stats import State, Stats

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # stop
RELOAD_SIGNALS = (signal.SIGHUP,)


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
    transparent = config.needs_routing
    out: list[socket.socket] = []
    try:
        for family in config.families:
            out.append(
                sockets.listener(
                    family,
                    config.listener.address_for(family),
                    config.listener.port,
                    transparent=transparent,
                    mark=sockets.listener_mark(config),
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
    previous = {s: signal.signal(s, sigs.handler) for s in SIGNALS + RELOAD_SIGNALS}
    try:
        yield sigs
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


async def _watch_signals(
    server,
    early: _Signals,
    reloader: Reloader | None = None,
    watcher: watch.Watcher | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    async def reload_then_check() -> None:
        if reloader is not None:
            await reloader.reload()
        if watcher is not None:
            watcher.kick()  # SIGHUP also checks the rules, once the reload is done

    with trio.open_signal_receiver(*SIGNALS, *RELOAD_SIGNALS) as received:
        async with trio.open_nursery() as reloads:
            task_status.started()
            count = 0
            pending, early.pending = early.pending, []
            for signum in pending:
                if signum in RELOAD_SIGNALS:
                    reloads.start_soon(reload_then_check)
                    continue
                count += 1
                _on_signal(server, signum, count)
            async for signum in received:
                if signum in RELOAD_SIGNALS:
                    reloads.start_soon(reload_then_check)
                    continue
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


class Reloader:
    """SIGHUP: re-read ``config.source`` (with the command-line overrides), apply what changed, log it.

    Order, so that there is no moment without interception: new listeners bound and accepting; the new rules installed
    (one atomic step per backend; a backend change installs the new backend's rules, then removes the old one's); the
    old listeners closed (what waits in their backlog is still proxied); timeouts, limits and logging for new
    connections. Open connections are never touched. Keys that cannot change live (tproxy/reload.py,
    ``RESTART_KEYS``) are logged as needing a restart and keep their running value.

    Error handling: an invalid file, a listener that cannot be bound, or rules the kernel rejects print one line
    (``tproxy: reload failed: ...; keeping the running config``) and change nothing. Reloads run one at a time.

    Without the rules (``--no-rules``, or behind a privileged parent) the rules move at a moment this process does
    not know: replaced listeners stay open, still accepting, until the next reload (or the stop).

    ``config`` is always the config in force: the runner removes the rules of this one at the end.
    """

    def __init__(
        self,
        config: Config,
        listeners: list[socket.socket],
        state: State,
        *,
        owns_rules: bool,
        overrides: dict[str, Any] | None = None,
        udp_listeners: list[socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.sockets = dict(zip(reload.listener_key(config), listeners, strict=True))
        self.udp_sockets = dict(zip(_udp_keys(config), udp_listeners or [], strict=True))
        self.state = state
        self.owns_rules = owns_rules
        self.overrides = overrides or {}
        self.lingering: dict[tuple, socket.socket] = {}  # replaced listeners kept open until the next reload
        self.udp_lingering: dict[tuple, socket.socket] = {}  # the same for UDP
        self.server = None
        self.serving = trio.Event()  # a SIGHUP received during start-up waits for the server
        self._lock = trio.Lock()

    async def reload(self) -> bool:
        """One reload; True when the new config is in force (possibly with keys waiting for a restart)."""
        async with self._lock:
            return await self._reload()

    def _failed(self, err: Exception) -> bool:
        print(reload.failed_line(err), file=sys.stderr, flush=True)
        return False

    async def _reload(self) -> bool:
        await self.serving.wait()
        server = self.server
        if server is None or server._stopping:
            log.event("reload_ignored", reason="stopping")
            return False
        old = self.config
        t0 = trio.current_time()
        try:
            new = reload.load(old, self.overrides)
        except ConfigError as e:
            return self._failed(e)
        plan = reload.plan(old, new)
        for c in plan.restart:
            log.event("reload", logging.WARNING, key=c.key, old=c.old, new=c.new, applied="no: needs a restart")
        if plan.empty:
            self.config = plan.config  # the same values; /config shows what waits for a restart
            retire, self.lingering = list(self.lingering.values()), {}
            await server.retire_listeners(retire)
            self._retire_udp_lingering(server)
            log.event("reloaded", changes=0, restart_needed=len(plan.restart))
            return True
        # 1. new listeners, accepting before any rule points at them
        keys = reload.listener_key(plan.config)
        fresh: dict[tuple, socket.socket] = {}
        try:
            for key in keys:
                if key in self.lingering:  # moved back: a listener still open from the reload before
                    self.sockets[key] = self.lingering.pop(key)
                elif key not in self.sockets:
                    family, address, port, transparent = key
                    mark = sockets.listener_mark(plan.config)  # (mode and routing.* need a restart: as running)
                    fresh[key] = sockets.listener(family, address, port, transparent=transparent, mark=mark)
            await server.adopt_listeners(list(fresh.values()))
        except (TproxyError, OSError, RuntimeError) as e:
            for s in fresh.values():
                if s not in server.listeners:
                    s.close()
            await server.retire_listeners([s for s in fresh.values() if s in server.listeners])
            return self._failed(e)
        try:
            udp_fresh = await self._bind_udp(server, plan.config)
        except (TproxyError, OSError, RuntimeError) as e:
            await server.retire_listeners(list(fresh.values()))
            return self._failed(e)
        # 2. the rules: in force together with the config they belong to, even if a stop signal comes meanwhile
        with trio.CancelScope(shield=True):
            if plan.rules and self.owns_rules:
                try:
                    summary = await trio.to_thread.run_sync(reload.install, old, plan)
                except Exception as e:  # noqa: BLE001 - the host is as it was; one line, keep running
                    await server.retire_listeners(list(fresh.values()))
                    self._retire_udp(server, udp_fresh)
                    return self._failed(e)
                log.event("reload_rules", installed=summary)
            elif plan.rules:
                log.event("reload_rules", installed="nothing: the rules are applied by a privileged step")
            self.config = plan.config
            self.state.backend = plan.config.backend
        # 3. the old listeners go; 4. settings for new connections
        replaced = {k: s for k, s in self.sockets.items() if k not in keys}
        self.sockets = {k: self.sockets.get(k) or fresh[k] for k in keys}
        retire = list(self.lingering.values())
        self.lingering = {}
        if self.owns_rules:
            retire += replaced.values()
        else:  # the rules move when a privileged step says so: keep accepting on the old port until the next reload
            self.lingering = replaced
        await server.retire_listeners(retire)
        replaced_udp = {k: s for k, s in self.udp_sockets.items() if k not in _udp_keys(plan.config)}
        self._retire_udp_lingering(server)
        if self.owns_rules:
            self._retire_udp(server, replaced_udp)
        else:  # the rules move later: the old UDP listeners receive until the next reload
            for key in replaced_udp:
                self.udp_sockets.pop(key)
            self.udp_lingering = replaced_udp
        server.apply_settings(plan.config)
        if (old.log.level, old.log.format) != (plan.config.log.level, plan.config.log.format):
            log.setup(plan.config.log.level, plan.config.log.format)
        for c in plan.applied:
            log.event("reload", key=c.key, old=c.old, new=c.new)
        log.event(
            "reloaded",
            changes=len(plan.applied),
            restart_needed=len(plan.restart),
            rules="replaced" if plan.rules and self.owns_rules else "unchanged" if not plan.rules else "not ours",
            listeners=",".join(log.addr(a) for a in server.addresses),
            duration_ms=round((trio.current_time() - t0) * 1000, 1),
        )
        return True

    async def _bind_udp(self, server, config: Config) -> dict[tuple, socket.socket]:
        """The UDP listeners ``config`` needs and we do not have yet, bound and receiving (before any rule points at
        them). Raises TproxyError / OSError / RuntimeError with nothing left bound."""
        fresh: dict[tuple, socket.socket] = {}
        if server.udp is None:
            return fresh
        try:
            for key in _udp_keys(config):
                if key in self.udp_lingering:  # moved back: still open, still receiving
                    self.udp_sockets[key] = self.udp_lingering.pop(key)
                elif key not in self.udp_sockets:
                    family, address, port, _transparent = key
                    fresh[key] = sockets.udp_listener(family, address, port)
            await server.udp.adopt(list(fresh.values()))
        except BaseException:
            for s in fresh.values():
                s.close()
            raise
        self.udp_sockets.update(fresh)
        return fresh

    def _retire_udp_lingering(self, server) -> None:
        socks, self.udp_lingering = list(self.udp_lingering.values()), {}
        if server.udp is not None:
            server.udp.retire(socks)

    def _retire_udp(self, server, socks: dict[tuple, socket.socket]) -> None:
        for key in socks:
            self.udp_sockets.pop(key, None)
        if server.udp is not None:
            server.udp.retire(list(socks.values()))


_udp_keys = reload.udp_listener_key


async def _main(
    config: Config,
    listeners: list[socket.socket],
    stats: Stats,
    state: State,
    early: _Signals,
    reloader: Reloader | None = None,
    udp_listeners: list[socket.socket] | None = None,
) -> None:
    from tproxy import privileges
    from tproxy.server import Server

    server = Server(config, listeners, stats, state, udp_listeners=udp_listeners or ())
    if reloader is not None:
        reloader.server = server
    watcher = None
    if reloader is not None and reloader.owns_rules:
        watcher = watch.Watcher(lambda: reloader.config, stats, state, reloader._lock)
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, server, early, reloader, watcher)
        if watcher is not None:
            await nursery.start(watcher.run)
        elif privileges.parent_status_fd is not None:
            await nursery.start(watch.follow_parent, privileges.parent_status_fd, stats, state)
        if config.admin.enabled:
            current = (lambda: reloader.config) if reloader is not None else None  # /config follows reloads
            await _start_admin(nursery, config, stats, state, current)
        await nursery.start(server.serve)
        if reloader is not None:
            reloader.serving.set()
        await server.stopped.wait()
        nursery.cancel_scope.cancel()  # the admin endpoint, the signal watcher and the rule watcher


async def _start_admin(
    nursery: trio.Nursery, config: Config, stats: Stats, state: State, current: Callable[[], Config] | None = None
) -> None:
    try:
        from tproxy.admin import serve_admin
    except ImportError:
        log.event("admin_unavailable", logging.WARNING, reason="tproxy.admin is not installed")
        return
    try:
        await nursery.start(functools.partial(serve_admin, current_config=current), config, stats, state)
    except OSError as e:
        where = f"{config.admin.host}:{config.admin.port}"
        raise TproxyError(f"cannot start the admin endpoint on {where}: {e.strerror or e}") from None


def _operator_error(group: BaseExceptionGroup) -> TproxyError | None:
    """The TproxyError inside a nursery's exception group (one line for the operator), if there is one."""
    match = group.subgroup(lambda e: isinstance(e, TproxyError))
    while isinstance(match, BaseExceptionGroup):
        match = match.exceptions[0]
    return match


def _overrides(config: Config, mode: str | None, backend: str | None) -> dict[str, Any]:
    """The command-line overrides to keep on reload: as given, or else what differs from the file as it is now."""
    out = {k: v for k, v in (("mode", mode), ("backend", backend)) if v is not None}
    try:
        on_disk = Config.load(config.file, config.environ)
    except TproxyError:
        return out
    for key in ("mode", "backend"):
        if key not in out and getattr(on_disk, key) != getattr(config, key):
            out[key] = getattr(config, key)
    return out


def run(config: Config, manage_rules: bool, *, mode: str | None = None, backend: str | None = None) -> int:
    """Install rules (when ``manage_rules``), serve until SIGTERM/SIGINT, remove the rules; returns the exit status.
    SIGHUP reloads ``config.file`` (if any) with the environment the process started with, keeping the command-line
    ``mode``/``backend`` overrides (:class:`Reloader`).

    Error handling: raises TproxyError (PrivilegeError when a capability is missing) for anything that stops the
    proxy from starting; rules installed before the failure are removed first.
    """
    log.setup(config.log.level, config.log.format)
    if config.ignored:
        log.event(
            "environment_ignored", logging.DEBUG, variables=",".join(config.ignored), why="kubernetes service links"
        )
    from tproxy import privileges

    privileges.check_capabilities(config, manage_rules=manage_rules)
    soft, _hard = raise_nofile_limit()
    stats = Stats()
    state = State(mode=config.mode, backend=config.backend)
    installed: str | None = None  # the install summary, while this process owns the rules
    listeners: list[socket.socket] = []
    udp_listeners: list[socket.socket] = []
    overrides = reload.OVERRIDES = _overrides(config, mode, backend)  # (also for a privileged parent's reload)
    reloader: Reloader | None = None
    logs = contextlib.ExitStack()  # the log writer thread, in the process that serves (after any fork), ended last
    with _deferred_signals() as early:
        try:
            if manage_rules:
                from tproxy import rules

                installed = rules.install(config)
            state.rules_installed = True  # with --no-rules, the privileged step installed them
            listeners = bind_listeners(config)
            udp_listeners = udp.bind_listeners(config)
            summary = installed if installed is not None else "nothing (--no-rules)"
            if not before_serve(config, listeners + udp_listeners, manage_rules=installed is not None):
                installed = None  # a privileged parent process removes them (or they were never ours)
            logs.enter_context(log.threaded(stats))
            # watched by this process or by the privileged parent; with --no-rules nobody here can see them
            state.rules_intact = True if installed is not None or privileges.parent_status_fd is not None else None
            log.event(
                "start",
                mode=config.mode,
                backend=config.backend,
                listeners=",".join(log.addr(sockets.sockname(s)) for s in listeners),
                udp_listeners=",".join(log.addr(sockets.sockname(s)) for s in udp_listeners),
                upstream=config.proxy.upstream,
                relay=config.proxy.relay,
                preserve_source=config.preserve_source,
                installed=summary,
                nofile=soft,
            )
            reloader = Reloader(
                config,
                listeners,
                state,
                owns_rules=installed is not None,
                overrides=overrides,
                udp_listeners=udp_listeners,
            )
            gc.freeze()  # what start-up allocated stays out of every later collection (shorter full collections)
            try:
                trio.run(_main, config, listeners, stats, state, early, reloader, udp_listeners)
            except BaseExceptionGroup as group:
                err = _operator_error(group)
                if err is None:
                    raise
                raise err from None
            return 0
        finally:
            if reloader is not None:
                config = reloader.config  # the rules in force are the last reload's
                listeners = [*listeners, *reloader.sockets.values(), *reloader.lingering.values()]
                udp_listeners = [*udp_listeners, *reloader.udp_sockets.values(), *reloader.udp_lingering.values()]
            for s in listeners + udp_listeners:
                s.close()
            with logs:  # (the writer thread ends after the last line, however this ends)
                if installed is not None:
                    from tproxy import rules

                    removed = rules.uninstall(config)
                    log.event("stop", removed=removed, accepted=stats.accepted)
                else:
                    log.event("stop", removed="nothing (not installed by this process)", accepted=stats.accepted)
