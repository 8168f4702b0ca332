"""Stats and State -> the Prometheus text exposition format, version 0.0.4.

Written by hand (no dependency): the format is small and its rules are exact. Every metric family has a ``# HELP``
and a ``# TYPE`` line; counters end in ``_total``; label values escape backslash, double quote and newline; HELP
text escapes backslash and newline. Labelled families always list their known label values (a zero is a sample, so
``rate()`` works from the first scrape); values seen at run time (outcomes, errnos) follow in sorted order.

What the caller can rely on: :func:`render` is pure (reads the objects, touches nothing) and its output ends with a
newline, as the format requires. :func:`render_process` adds the standard ``process_*`` metrics every Prometheus
client library exports (CPU, memory, file descriptors, start time), read from ``/proc/self``; what cannot be read is
left out, never an error.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping

from tproxy import __version__
from tproxy.stats import OUTCOMES, State, Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RELAY_PATHS = ("splice", "copy")
DIRECTIONS = (("in", "bytes_in"), ("out", "bytes_out"))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {format_value(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _by_label(label: str, counts: Mapping[str, int], known: Iterable[str] = ()) -> list[tuple[dict[str, str], int]]:
    known = tuple(known)
    keys = list(known) + sorted(str(k) for k in counts if k not in known)
    return [({label: k}, counts.get(k, 0)) for k in keys]


def render(stats: Stats, state: State, *, version: str = __version__) -> str:
    """The whole exposition for one scrape."""
    w = _Writer()
    w.family(
        "tproxy_info",
        "gauge",
        "Interception mode, rules backend and version of this proxy (always 1).",
        [({"mode": state.mode, "backend": state.backend, "version": version}, 1)],
    )
    w.single(
        "tproxy_ready", "gauge", "1 when rules, routes and every listener are in place and not draining.", state.ready
    )
    w.single("tproxy_draining", "gauge", "1 after SIGTERM/SIGINT while open connections drain.", state.draining)
    w.single("tproxy_connections_accepted_total", "counter", "Connections accepted by the listeners.", stats.accepted)
    w.single("tproxy_connections_open", "gauge", "Connections currently open.", stats.open)
    w.family(
        "tproxy_connections_closed_total",
        "counter",
        "Connections closed, by outcome.",
        _by_label("outcome", stats.closed, OUTCOMES),
    )
    w.family(
        "tproxy_bytes_relayed_total",
        "counter",
        "Bytes relayed: direction in is client to application, out is application to client.",
        [({"direction": d}, getattr(stats, attr)) for d, attr in DIRECTIONS],
    )
    w.family(
        "tproxy_upstream_connect_errors_total",
        "counter",
        "Failed connections to the application, by errno name.",
        _by_label("errno", stats.connect_errors),
    )
    w.single(
        "tproxy_source_port_fallbacks_total",
        "counter",
        "Upstream connections whose source port could not be chosen collision-free and fell back.",
        stats.source_port_fallbacks,
    )
    w.single(
        "tproxy_source_address_fallbacks_total",
        "counter",
        "Upstream connections that could not bind the client's address and used an ordinary source.",
        stats.source_fallbacks,
    )
    w.family(
        "tproxy_relay_path_total",
        "counter",
        "Relayed directions by the path that moved the bytes (splice or copy).",
        _by_label("path", stats.relay_path, RELAY_PATHS),
    )
    w.single(
        "tproxy_max_connections_reached_total",
        "counter",
        "Times accepting paused because proxy.max_connections connections were open.",
        stats.max_connections_waits,
    )
    w.single(
        "tproxy_loops_refused_total",
        "counter",
        "Connections refused because their original destination was the proxy itself.",
        stats.loops_refused,
    )
    w.family(
        "tproxy_proxy_protocol_errors_total",
        "counter",
        "Connections reset for a missing, malformed or late PROXY protocol header, by reason.",
        _by_label("reason", stats.proxy_protocol_errors),
    )
    return w.text()


def render_process(proc: str = "/proc/self") -> str:
    """The standard ``process_*`` families for this process (Linux), as the official client libraries name them."""
    w = _Writer()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    w.single(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        usage.ru_utime + usage.ru_stime,
    )
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(f"{proc}/statm") as f:
            vsize, rss = (int(x) for x in f.read().split()[:2])
        w.single("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize * page)
        w.single("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss * page)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{proc}/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        start = btime + start_ticks / os.sysconf("SC_CLK_TCK")
        w.single("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start)
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        w.single("process_open_fds", "gauge", "Number of open file descriptors.", len(os.listdir(f"{proc}/fd")))
    except OSError:
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        w.single("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft)
    return w.text()
