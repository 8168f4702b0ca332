"""The rule watcher: the rules stay in place, or the proxy says they are not (and puts them back).

An operator's routine (``nft flush ruleset`` in ``/etc/nftables.conf``, a firewalld reload, ``iptables -t mangle -F``)
removes tproxy's rules and leaves ``route_localnet=1`` without its loopback guard. Whatever process manages the
rules — the single root ``tproxy run``, or the privileged parent (tproxy/privileges.py) — calls :func:`check` every
``routing.check_interval`` seconds and on SIGHUP. When a piece is missing (:func:`tproxy.rules.missing`), in this
order:

1. the exposure is closed: ``route_localnet`` goes back to its saved value;
2. a warning is logged and the report goes out (``/ready`` 503 ``not ready: rules missing``,
   ``tproxy_rules_intact 0``; the privileged parent writes it to the serving child over a pipe, :class:`PipeReporter`
   and :func:`follow_parent`);
3. with ``routing.reinstall = true`` everything goes in again in the safe order (rules with the guard, routes, then
   the sysctl), counted in ``tproxy_rules_reinstalled_total``.

Never against the operator: after ``tproxy rules remove`` (it records that it ran), the report is ``rules removed by
the operator`` and nothing is put back until the next install.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import attrs
import trio

from tproxy import log
from tproxy.config import Config
from tproxy.errors import TproxyError
from tproxy.stats import State, Stats

NOTE_MISSING = "rules missing"
NOTE_REMOVED = "rules removed by the operator"


@attrs.frozen
class Report:
    intact: bool
    note: str = ""
    missing: tuple[str, ...] = ()
    reinstalled: bool = False


def check(config: Config, on_missing: Callable[[Report], None] = lambda r: None) -> Report:
    """One check, and the healing (see the module docstring); ``on_missing`` hears of a missing piece after the
    exposure is closed and before anything is reinstalled. Blocking, needs CAP_NET_ADMIN: from a thread under trio.

    Error handling: never raises for the host's state (a reinstall that fails is logged and reported as missing);
    a :class:`~tproxy.errors.TproxyError` while looking (an untrusted state file) is raised.
    """
    from tproxy import routing, rules

    with rules.exclusive():
        if rules.removed_by_operator():
            return Report(False, NOTE_REMOVED)
        missing = tuple(rules.missing(config))
        if not missing:
            return Report(True)
        try:
            restored = routing.close_exposure(config)
        except TproxyError as e:
            log.event("rules_exposure_open", logging.ERROR, error=str(e))
            restored = []
        log.event(
            "rules_missing",
            logging.WARNING,
            missing="; ".join(missing),
            restored=",".join(restored) or "nothing",
            action="reinstall" if config.routing.reinstall else "none (routing.reinstall = false)",
        )
        on_missing(Report(False, NOTE_MISSING, missing))
        if not config.routing.reinstall:
            return Report(False, NOTE_MISSING, missing)
        try:
            summary = rules.install(config, lock=False)
        except TproxyError as e:
            log.event("rules_reinstall_failed", logging.ERROR, error=str(e))
            return Report(False, NOTE_MISSING, missing)
        log.event("rules_reinstalled", installed=summary)
        return Report(True, "", missing, reinstalled=True)


def apply(report: Report, stats: Stats, state: State) -> None:
    state.rules_intact = report.intact
    state.rules_note = report.note
    if report.reinstalled:
        stats.rules_reinstalled += 1


class Watcher:
    """The watcher as a trio task in the single root process (``await nursery.start(watcher.run)``).

    ``current`` returns the config in force; ``lock`` is the reloader's, so that a check never sees the rules half
    way through a reload. :meth:`kick` runs a check now (after a SIGHUP's reload).
    """

    def __init__(self, current: Callable[[], Config], stats: Stats, state: State, lock: trio.Lock) -> None:
        self.current = current
        self.stats = stats
        self.state = state
        self.lock = lock
        self._kicked = trio.Event()

    def kick(self) -> None:
        self._kicked.set()

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.current().routing.check_interval):
                await self._kicked.wait()
            self._kicked = trio.Event()
            async with self.lock:
                await self.check_once()

    async def check_once(self) -> None:
        def heard(report: Report) -> None:
            trio.from_thread.run_sync(apply, report, self.stats, self.state)

        try:
            report = await trio.to_thread.run_sync(check, self.current(), heard)
        except Exception as e:  # noqa: BLE001 - a failed check must never stop the proxy; say why, try again
            log.event("rules_check_failed", logging.ERROR, error=str(e) if isinstance(e, TproxyError) else repr(e))
            return
        apply(report, self.stats, self.state)


class PipeReporter:
    """The privileged parent's side of the pipe to the serving child: one JSON line per change of the report."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reinstalled = 0
        self._last: tuple | None = None
        os.set_blocking(fd, False)

    def send(self, report: Report) -> None:
        self.reinstalled += report.reinstalled
        now = (report.intact, report.note, self.reinstalled)
        if now == self._last:
            return
        line = json.dumps({"intact": report.intact, "note": report.note, "reinstalled": self.reinstalled}) + "\n"
        try:
            os.write(self.fd, line.encode())
            self._last = now
        except (BlockingIOError, BrokenPipeError):
            pass  # a child that does not read (or is gone) must never stall the parent


async def follow_parent(fd: int, stats: Stats, state: State, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The serving child's side: apply each report of the privileged parent to ``state`` and ``stats``."""
    stream = trio.lowlevel.FdStream(fd)
    task_status.started()
    buf = b""
    async with stream:
        while chunk := await stream.receive_some(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                    state.rules_intact = msg["intact"]
                    state.rules_note = msg["note"]
                    stats.rules_reinstalled = msg["reinstalled"]
                except (ValueError, KeyError, TypeError):
                    log.event("rules_report_bad", logging.ERROR, line=line[:200].decode(errors="replace"))
    log.event("rules_manager_gone", logging.WARNING, reason="the privileged parent closed its pipe")
