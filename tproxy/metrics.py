"""Stats and State -> Prometheus metrics, through prometheus-client.

The hot path keeps plain integer increments on :class:`~tproxy.stats.Stats`; nothing here runs until a scrape.
:class:`StatsCollector` is a prometheus-client custom collector that reads ``Stats`` and ``State`` when asked and
builds the metric families; the library does the exposition formats (Prometheus text 0.0.4 by default, OpenMetrics
when the scraper's ``Accept`` header asks for it) and their escaping rules.

Labelled families always list their known label values (a zero is a sample, so ``rate()`` works from the first
scrape); values seen at run time (outcomes, errnos, reasons) follow in sorted order. ``tproxy_rules_intact`` has no
sample while the rules are not verified (``State.rules_intact is None``: ``--no-rules``, or before the first check),
so an alert on ``tproxy_rules_intact == 0`` never fires on a proxy that cannot see its rules.

The standard ``process_*`` families come from prometheus-client's ``ProcessCollector``. It lists ``/proc/self/fd``
for ``process_open_fds``: 20,000 entries at 10,000 connections, far too slow for the event loop. :func:`scrape` runs
that collector in a worker thread (``trio.to_thread.run_sync``); the ``tproxy_*`` families are read in the trio
thread, so they are one consistent snapshot without locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from tproxy import __version__
from tproxy.stats import OUTCOMES, UDP_DROPS, State, Stats

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

RELAY_PATHS = ("splice", "copy")
DIRECTIONS = (("in", "bytes_in"), ("out", "bytes_out"))
RULES_INTACT_HELP = (
    "1 when the rules watcher last found this proxy's rules in place, 0 when it found them missing; "
    "no sample when not verified."
)


def _by_label(counts: Mapping[str, int], known: Iterable[str] = ()) -> list[tuple[str, int]]:
    known = tuple(known)
    keys = list(known) + sorted(str(k) for k in counts if k not in known)
    return [(k, counts.get(k, 0)) for k in keys]


def _counter(name: str, help_text: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _labelled(family: CounterMetricFamily, samples: Iterable[tuple[str, int]]) -> CounterMetricFamily:
    for label, value in samples:
        family.add_metric([label], value)
    return family


class StatsCollector:
    """A prometheus-client collector over ``Stats`` and ``State``: every ``collect()`` reads them afresh.

    Pure: reads the objects, touches nothing else; cheap enough for the event loop (a few dozen samples).
    """

    def __init__(self, stats: Stats, state: State, *, version: str = __version__) -> None:
        self.stats = stats
        self.state = state
        self.version = version

    def collect(self) -> list[Metric]:
        stats, state = self.stats, self.state
        info = GaugeMetricFamily(
            "tproxy_info",
            "Interception mode, rules backend and version of this proxy (always 1).",
            labels=["mode", "backend", "version"],
        )
        info.add_metric([state.mode, state.backend, self.version], 1)
        intact = GaugeMetricFamily(
            "tproxy_rules_intact",
            RULES_INTACT_HELP,
        )
        if state.rules_intact is not None:
            intact.add_metric([], int(state.rules_intact))
        return [
            info,
            _gauge(
                "tproxy_ready", "1 when rules, routes and every listener are in place and not draining.", state.ready
            ),
            _gauge("tproxy_draining", "1 after SIGTERM/SIGINT while open connections drain.", state.draining),
            _counter("tproxy_connections_accepted_total", "Connections accepted by the listeners.", stats.accepted),
            _gauge("tproxy_connections_open", "Connections currently open.", stats.open),
            _labelled(
                CounterMetricFamily(
                    "tproxy_connections_closed_total", "Connections closed, by outcome.", labels=["outcome"]
                ),
                _by_label(stats.closed, OUTCOMES),
            ),
            _labelled(
                CounterMetricFamily(
                    "tproxy_bytes_relayed_total",
                    "Bytes relayed: direction in is client to application, out is application to client.",
                    labels=["direction"],
                ),
                [(d, getattr(stats, attr)) for d, attr in DIRECTIONS],
            ),
            _labelled(
                CounterMetricFamily(
                    "tproxy_upstream_connect_errors_total",
                    "Failed connections to the application, by errno name.",
                    labels=["errno"],
                ),
                _by_label(stats.connect_errors),
            ),
            _counter(
                "tproxy_source_port_fallbacks_total",
                "Upstream connections whose source port could not be chosen collision-free and fell back.",
                stats.source_port_fallbacks,
            ),
            _counter(
                "tproxy_source_address_fallbacks_total",
                "Upstream connections that could not bind the client's address and used an ordinary source.",
                stats.source_fallbacks,
            ),
            _labelled(
                CounterMetricFamily(
                    "tproxy_relay_path_total",
                    "Relayed directions by the path that moved the bytes (splice or copy).",
                    labels=["path"],
                ),
                _by_label(stats.relay_path, RELAY_PATHS),
            ),
            _counter(
                "tproxy_splice_fallbacks_total",
                "Relayed directions that began with splice and fell back to copying.",
                stats.splice_fallbacks,
            ),
            _counter(
                "tproxy_max_connections_reached_total",
                "Times accepting paused because proxy.max_connections connections were open.",
                stats.max_connections_waits,
            ),
            _counter(
                "tproxy_loops_refused_total",
                "Connections refused because their original destination was the proxy itself.",
                stats.loops_refused,
            ),
            _counter(
                "tproxy_log_lines_dropped_total",
                "Log lines dropped because the log writer's queue was full (a slow log reader).",
                stats.log_dropped,
            ),
            _labelled(
                CounterMetricFamily(
                    "tproxy_proxy_protocol_errors_total",
                    "Connections dropped for a missing or invalid PROXY protocol header, by reason.",
                    labels=["reason"],
                ),
                _by_label(stats.proxy_protocol_errors),
            ),
            _counter(
                "tproxy_rules_reinstalled_total",
                "Times the rules watcher found rules missing and installed them again.",
                stats.rules_reinstalled,
            ),
            intact,
            *_udp_families(stats),
        ]


def _udp_families(stats: Stats) -> list[Metric]:
    return [
        _gauge("tproxy_udp_sessions_open", "UDP sessions currently open.", stats.udp_sessions_open),
        _counter("tproxy_udp_sessions_total", "UDP sessions opened.", stats.udp_sessions),
        _labelled(
            CounterMetricFamily(
                "tproxy_udp_datagrams_total",
                "UDP datagrams relayed: direction in is client to application, out is application to client.",
                labels=["direction"],
            ),
            [("in", stats.udp_datagrams_in), ("out", stats.udp_datagrams_out)],
        ),
        _labelled(
            CounterMetricFamily(
                "tproxy_udp_bytes_total",
                "UDP payload bytes relayed: direction in is client to application, out is application to client.",
                labels=["direction"],
            ),
            [("in", stats.udp_bytes_in), ("out", stats.udp_bytes_out)],
        ),
        _labelled(
            CounterMetricFamily(
                "tproxy_udp_dropped_total",
                "UDP datagrams dropped, by reason (max_sessions, would_block, send_error, upstream_error, loop, "
                "no_original_dst).",
                labels=["reason"],
            ),
            _by_label(stats.udp_dropped, UDP_DROPS),
        ),
    ]


class _Collected:
    """Families already collected, in the shape prometheus-client's encoders read (anything with ``collect()``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def process_families(proc: str = "/proc") -> list[Metric]:
    """The standard ``process_*`` families (CPU, memory, fds, start time); what cannot be read is left out.

    Blocking: reads ``/proc/self`` and lists ``/proc/self/fd``. Call it off the event loop (:func:`scrape` does).
    """
    return list(ProcessCollector(proc=proc, registry=None).collect())


def render(stats: Stats, state: State, *, accept: str = "", version: str = __version__) -> tuple[bytes, str]:
    """The ``tproxy_*`` families alone, encoded as ``accept`` asks: (body, content type). Pure; for tests and tools."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_Collected(StatsCollector(stats, state, version=version).collect())), content_type


async def scrape(stats: Stats, state: State, accept: str = "", *, version: str = __version__) -> tuple[bytes, str]:
    """One whole scrape, ``tproxy_*`` then ``process_*``, encoded as ``accept`` asks: (body, content type).

    The ``Accept`` header picks the format as prometheus-client does: OpenMetrics for
    ``application/openmetrics-text``, else Prometheus text 0.0.4. The ``/proc`` reads run in a worker thread.
    """
    own = StatsCollector(stats, state, version=version).collect()
    process = await trio.to_thread.run_sync(process_families)
    encoder, content_type = choose_encoder(accept)
    return encoder(_Collected(own + process)), content_type
