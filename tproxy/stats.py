"""Counters and state shared by the server (which updates them) and the admin endpoint (which reports them).

Plain attributes and dicts, updated inline on the hot path: no locks (one trio thread), no allocation per event
beyond a dict key the first time an outcome or errno is seen.
"""

from __future__ import annotations

import collections

import attrs

OUTCOMES = ("ok", "reset", "refused", "timeout", "idle", "cancelled")
# Why a datagram was dropped: no session could be opened (max_sessions, upstream_error, loop, no_original_dst), or a
# send would have blocked (would_block) or failed (send_error).
UDP_DROPS = ("max_sessions", "would_block", "send_error", "upstream_error", "loop", "no_original_dst")


@attrs.define
class Stats:
    accepted: int = 0  # connections accepted by the listeners
    open: int = 0  # connections currently open (gauge)
    closed: collections.Counter = attrs.Factory(collections.Counter)  # outcome -> count (see OUTCOMES)
    bytes_in: int = 0  # client -> application
    bytes_out: int = 0  # application -> client
    connect_errors: collections.Counter = attrs.Factory(collections.Counter)  # errno name -> count
    source_port_fallbacks: int = 0  # upstream port could not be chosen collision-free: fell back
    source_fallbacks: int = 0  # could not bind the client's address: used an ordinary source
    relay_path: collections.Counter = attrs.Factory(collections.Counter)  # "splice" | "copy" -> directions ended
    splice_fallbacks: int = 0  # directions that began with splice and fell back to copying
    max_connections_waits: int = 0  # times accepting paused because max_connections was reached
    loops_refused: int = 0  # connections whose original destination was the proxy itself
    log_dropped: int = 0  # log lines dropped because the log writer's queue was full (a slow reader)
    proxy_protocol_errors: collections.Counter = attrs.Factory(collections.Counter)  # reason -> bad PROXY headers
    rules_reinstalled: int = 0  # times the rule watcher put missing rules back
    udp_sessions_open: int = 0  # UDP sessions currently open (gauge)
    udp_sessions: int = 0  # UDP sessions opened
    udp_datagrams_in: int = 0  # client -> application
    udp_datagrams_out: int = 0  # application -> client
    udp_bytes_in: int = 0
    udp_bytes_out: int = 0
    udp_dropped: collections.Counter = attrs.Factory(collections.Counter)  # reason (UDP_DROPS) -> datagrams


@attrs.define
class State:
    """Lifecycle, for /ready: ready once rules, routes and every listener are in place; not while draining, nor
    while the rule watcher finds rules missing."""

    rules_installed: bool = False
    listening: bool = False
    draining: bool = False
    mode: str = ""
    backend: str = ""
    rules_intact: bool | None = None  # None: not verified (--no-rules: the proxy cannot see the rules)
    rules_note: str = ""  # why not intact, for /ready ("rules missing", "removed by the operator")

    @property
    def ready(self) -> bool:
        return self.rules_installed and self.listening and not self.draining and self.rules_intact is not False
