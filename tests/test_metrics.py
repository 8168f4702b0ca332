"""The Prometheus text exposition (format 0.0.4) rendered from Stats and State: exact text and the format's rules."""

from __future__ import annotations

import collections
import re
import time

from tproxy import metrics
from tproxy.stats import OUTCOMES, State, Stats

EXPECTED = """\
# HELP tproxy_info Interception mode, rules backend and version of this proxy (always 1).
# TYPE tproxy_info gauge
tproxy_info{mode="tproxy",backend="nftables",version="9.9.9"} 1
# HELP tproxy_ready 1 when rules, routes and every listener are in place and not draining.
# TYPE tproxy_ready gauge
tproxy_ready 1
# HELP tproxy_draining 1 after SIGTERM/SIGINT while open connections drain.
# TYPE tproxy_draining gauge
tproxy_draining 0
# HELP tproxy_connections_accepted_total Connections accepted by the listeners.
# TYPE tproxy_connections_accepted_total counter
tproxy_connections_accepted_total 7
# HELP tproxy_connections_open Connections currently open.
# TYPE tproxy_connections_open gauge
tproxy_connections_open 2
# HELP tproxy_connections_closed_total Connections closed, by outcome.
# TYPE tproxy_connections_closed_total counter
tproxy_connections_closed_total{outcome="ok"} 3
tproxy_connections_closed_total{outcome="reset"} 1
tproxy_connections_closed_total{outcome="refused"} 0
tproxy_connections_closed_total{outcome="timeout"} 0
tproxy_connections_closed_total{outcome="idle"} 1
tproxy_connections_closed_total{outcome="cancelled"} 0
# HELP tproxy_bytes_relayed_total Bytes relayed: direction in is client to application, out is application to client.
# TYPE tproxy_bytes_relayed_total counter
tproxy_bytes_relayed_total{direction="in"} 1234
tproxy_bytes_relayed_total{direction="out"} 56789012345
# HELP tproxy_upstream_connect_errors_total Failed connections to the application, by errno name.
# TYPE tproxy_upstream_connect_errors_total counter
tproxy_upstream_connect_errors_total{errno="ECONNREFUSED"} 4
tproxy_upstream_connect_errors_total{errno="ETIMEDOUT"} 1
# HELP tproxy_source_port_fallbacks_total Upstream connections whose source port could not be chosen \
collision-free and fell back.
# TYPE tproxy_source_port_fallbacks_total counter
tproxy_source_port_fallbacks_total 5
# HELP tproxy_source_address_fallbacks_total Upstream connections that could not bind the client's address \
and used an ordinary source.
# TYPE tproxy_source_address_fallbacks_total counter
tproxy_source_address_fallbacks_total 6
# HELP tproxy_relay_path_total Relayed directions by the path that moved the bytes (splice or copy).
# TYPE tproxy_relay_path_total counter
tproxy_relay_path_total{path="splice"} 10
tproxy_relay_path_total{path="copy"} 2
# HELP tproxy_max_connections_reached_total Times accepting paused because proxy.max_connections connections \
were open.
# TYPE tproxy_max_connections_reached_total counter
tproxy_max_connections_reached_total 8
# HELP tproxy_loops_refused_total Connections refused because their original destination was the proxy itself.
# TYPE tproxy_loops_refused_total counter
tproxy_loops_refused_total 9
# HELP tproxy_proxy_protocol_errors_total Connections reset for a missing, malformed or late PROXY protocol \
header, by reason.
# TYPE tproxy_proxy_protocol_errors_total counter
tproxy_proxy_protocol_errors_total{reason="bad_signature"} 2
tproxy_proxy_protocol_errors_total{reason="timeout"} 1
"""


def known_stats() -> Stats:
    return Stats(
        accepted=7,
        open=2,
        closed=collections.Counter({"ok": 3, "reset": 1, "idle": 1}),
        bytes_in=1234,
        bytes_out=56789012345,
        connect_errors=collections.Counter({"ETIMEDOUT": 1, "ECONNREFUSED": 4}),
        source_port_fallbacks=5,
        source_fallbacks=6,
        relay_path=collections.Counter({"copy": 2, "splice": 10}),
        max_connections_waits=8,
        loops_refused=9,
        proxy_protocol_errors=collections.Counter({"timeout": 1, "bad_signature": 2}),
    )


def ready_state() -> State:
    return State(rules_installed=True, listening=True, mode="tproxy", backend="nftables")


def test_exact_text():
    assert metrics.render(known_stats(), ready_state(), version="9.9.9") == EXPECTED


def test_fresh_stats_list_every_known_label_with_zero():
    text = metrics.render(Stats(), State(), version="0")
    for outcome in OUTCOMES:
        assert f'tproxy_connections_closed_total{{outcome="{outcome}"}} 0\n' in text
    assert 'tproxy_relay_path_total{path="splice"} 0\n' in text
    assert 'tproxy_relay_path_total{path="copy"} 0\n' in text
    assert "tproxy_ready 0\n" in text
    assert "tproxy_upstream_connect_errors_total{" not in text  # no errno seen yet: no sample, family still declared
    assert "# TYPE tproxy_upstream_connect_errors_total counter\n" in text
    assert "tproxy_proxy_protocol_errors_total{" not in text
    assert "# TYPE tproxy_proxy_protocol_errors_total counter\n" in text


def test_unknown_outcome_follows_known_ones_sorted():
    stats = Stats(closed=collections.Counter({"zzz": 1, "aaa": 2, "ok": 1}))
    lines = [ln for ln in metrics.render(stats, State()).splitlines() if ln.startswith("tproxy_connections_closed")]
    assert [ln.split('"')[1] for ln in lines] == [*OUTCOMES, "aaa", "zzz"]


def test_draining_is_not_ready():
    state = ready_state()
    state.draining = True
    text = metrics.render(Stats(), state)
    assert "tproxy_ready 0\n" in text and "tproxy_draining 1\n" in text


def test_label_values_are_escaped():
    state = State(mode="tproxy", backend='we"ird\\back\nslash')
    text = metrics.render(Stats(), state, version="1")
    assert 'tproxy_info{mode="tproxy",backend="we\\"ird\\\\back\\nslash",version="1"} 1\n' in text


def test_help_is_escaped():
    assert metrics.escape_help("a\\b\nc") == "a\\\\b\\nc"
    assert metrics.escape_label_value('a"b') == 'a\\"b'


def test_format_value():
    assert metrics.format_value(3) == "3"
    assert metrics.format_value(True) == "1"
    assert metrics.format_value(0.5) == "0.5"
    assert metrics.format_value(float("inf")) == "+Inf"
    assert metrics.format_value(float("-inf")) == "-Inf"
    assert metrics.format_value(float("nan")) == "NaN"


# The 0.0.4 grammar, strictly: comment lines, then samples whose name belongs to the last declared family.
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? (-?[0-9.e+]+|[+-]Inf|NaN)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


def check_grammar(text: str) -> dict[str, str]:
    """Assert ``text`` is valid 0.0.4 exposition; returns family name -> type."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    declared: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if m := _HELP.match(line):
            assert m.group(1) not in declared, f"family declared twice: {line}"
            current = m.group(1)
        elif m := _TYPE.match(line):
            assert m.group(1) == current, f"TYPE without HELP first: {line}"
            declared[current] = m.group(2)
            if m.group(2) == "counter":
                assert current.endswith("_total"), f"counter not named *_total: {current}"
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a valid sample line: {line!r}"
            assert m.group(1) == current and current in declared, f"sample outside its family: {line}"
    return declared


def test_output_follows_the_grammar():
    stats = known_stats()
    stats.connect_errors['E"ODD\\'] = 1
    assert len(check_grammar(metrics.render(stats, ready_state()))) == 14


def test_process_metrics():
    text = metrics.render_process()
    assert check_grammar(text) == {
        "process_cpu_seconds_total": "counter",
        "process_virtual_memory_bytes": "gauge",
        "process_resident_memory_bytes": "gauge",
        "process_start_time_seconds": "gauge",
        "process_open_fds": "gauge",
        "process_max_fds": "gauge",
    }
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if not ln.startswith("#")}
    assert values["process_resident_memory_bytes"] > 0
    assert values["process_open_fds"] >= 3
    with open("/proc/stat") as f:
        boot = float(next(line.split()[1] for line in f if line.startswith("btime ")))
    assert boot <= values["process_start_time_seconds"] <= time.time()


def test_process_metrics_leave_out_what_cannot_be_read(tmp_path):
    declared = check_grammar(metrics.render_process(str(tmp_path / "none")))
    assert "process_open_fds" not in declared and "process_resident_memory_bytes" not in declared
    assert "process_cpu_seconds_total" in declared
