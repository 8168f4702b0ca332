"""Stats and State -> Prometheus metrics, read back with prometheus-client's own parsers (text 0.0.4 and OpenMetrics):
names, types, labels and HELP of every family, values, content negotiation, where the /proc reads run, and counters
that never go down under real load."""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.test_server import echo_app, exchange, make_config, start_app, start_proxy, stop
from tests.trio_helpers import bounded
from tproxy import metrics
from tproxy.stats import OUTCOMES, State, Stats

OPENMETRICS = "application/openmetrics-text; version=1.0.0"

# name (as the 0.0.4 text declares it) -> (type, label names, HELP): the contract with dashboards and alerts
FAMILIES = {
    "tproxy_info": (
        "gauge",
        ("backend", "mode", "version"),
        "Interception mode, rules backend and version of this proxy (always 1).",
    ),
    "tproxy_ready": ("gauge", (), "1 when rules, routes and every listener are in place and not draining."),
    "tproxy_draining": ("gauge", (), "1 after SIGTERM/SIGINT while open connections drain."),
    "tproxy_connections_accepted_total": ("counter", (), "Connections accepted by the listeners."),
    "tproxy_connections_open": ("gauge", (), "Connections currently open."),
    "tproxy_connections_closed_total": ("counter", ("outcome",), "Connections closed, by outcome."),
    "tproxy_bytes_relayed_total": (
        "counter",
        ("direction",),
        "Bytes relayed: direction in is client to application, out is application to client.",
    ),
    "tproxy_upstream_connect_errors_total": (
        "counter",
        ("errno",),
        "Failed connections to the application, by errno name.",
    ),
    "tproxy_source_port_fallbacks_total": (
        "counter",
        (),
        "Upstream connections whose source port could not be chosen collision-free and fell back.",
    ),
    "tproxy_source_address_fallbacks_total": (
        "counter",
        (),
        "Upstream connections that could not bind the client's address and used an ordinary source.",
    ),
    "tproxy_relay_path_total": (
        "counter",
        ("path",),
        "Relayed directions by the path that moved the bytes (splice or copy).",
    ),
    "tproxy_splice_fallbacks_total": (
        "counter",
        (),
        "Relayed directions that began with splice and fell back to copying.",
    ),
    "tproxy_max_connections_reached_total": (
        "counter",
        (),
        "Times accepting paused because proxy.max_connections connections were open.",
    ),
    "tproxy_loops_refused_total": (
        "counter",
        (),
        "Connections refused because their original destination was the proxy itself.",
    ),
    "tproxy_log_lines_dropped_total": (
        "counter",
        (),
        "Log lines dropped because the log writer's queue was full (a slow log reader).",
    ),
    "tproxy_proxy_protocol_errors_total": (
        "counter",
        ("reason",),
        "Connections dropped for a missing or invalid PROXY protocol header, by reason.",
    ),
    "tproxy_rules_reinstalled_total": (
        "counter",
        (),
        "Times the rules watcher found rules missing and installed them again.",
    ),
    "tproxy_rules_intact": ("gauge", (), metrics.RULES_INTACT_HELP),
    "tproxy_udp_sessions_open": ("gauge", (), "UDP sessions currently open."),
    "tproxy_udp_sessions_total": ("counter", (), "UDP sessions opened."),
    "tproxy_udp_datagrams_total": (
        "counter",
        ("direction",),
        "UDP datagrams relayed: direction in is client to application, out is application to client.",
    ),
    "tproxy_udp_bytes_total": (
        "counter",
        ("direction",),
        "UDP payload bytes relayed: direction in is client to application, out is application to client.",
    ),
    "tproxy_udp_dropped_total": (
        "counter",
        ("reason",),
        "UDP datagrams dropped, by reason (max_sessions, would_block, send_error, upstream_error, loop, "
        "no_original_dst).",
    ),
}


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
        splice_fallbacks=3,
        max_connections_waits=8,
        loops_refused=9,
        log_dropped=11,
        proxy_protocol_errors=collections.Counter({"timeout": 2, "bad signature": 1}),
        rules_reinstalled=12,
        udp_sessions_open=13,
        udp_sessions=14,
        udp_datagrams_in=15,
        udp_datagrams_out=16,
        udp_bytes_in=17,
        udp_bytes_out=18,
        udp_dropped=collections.Counter({"max_sessions": 19, "would_block": 20}),
    )


def ready_state(**kw) -> State:
    return State(rules_installed=True, listening=True, mode="tproxy", backend="nftables", **kw)


def text(stats: Stats, state: State, accept: str = "", version: str = "9.9.9") -> str:
    body, _ = metrics.render(stats, state, accept=accept, version=version)
    return body.decode()


def declared(exposition: str) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Family name as the 0.0.4 text declares it -> (type, sorted label names, HELP), parsed by prometheus-client."""
    out = {}
    for fam in parse_text(exposition):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels}
        out[name] = (fam.type, tuple(sorted(labels)), fam.documentation)
    return out


def samples(exposition: str, *, openmetrics: bool = False) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted label items) -> value."""
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in parse(exposition) for s in fam.samples}


def test_every_family_keeps_its_name_type_labels_and_help():
    got = declared(text(known_stats(), ready_state(rules_intact=True)))
    assert got == FAMILIES


def test_values():
    m = samples(text(known_stats(), ready_state(rules_intact=True)))
    assert m[("tproxy_info", (("backend", "nftables"), ("mode", "tproxy"), ("version", "9.9.9")))] == 1
    assert m[("tproxy_ready", ())] == 1 and m[("tproxy_draining", ())] == 0
    assert m[("tproxy_connections_accepted_total", ())] == 7
    assert m[("tproxy_connections_open", ())] == 2
    closed = {dict(k[1])["outcome"]: v for k, v in m.items() if k[0] == "tproxy_connections_closed_total"}
    assert closed == {"ok": 3, "reset": 1, "refused": 0, "timeout": 0, "idle": 1, "cancelled": 0}
    assert m[("tproxy_bytes_relayed_total", (("direction", "in"),))] == 1234
    assert m[("tproxy_bytes_relayed_total", (("direction", "out"),))] == 56789012345
    assert m[("tproxy_upstream_connect_errors_total", (("errno", "ECONNREFUSED"),))] == 4
    assert m[("tproxy_upstream_connect_errors_total", (("errno", "ETIMEDOUT"),))] == 1
    assert m[("tproxy_source_port_fallbacks_total", ())] == 5
    assert m[("tproxy_source_address_fallbacks_total", ())] == 6
    assert m[("tproxy_relay_path_total", (("path", "splice"),))] == 10
    assert m[("tproxy_relay_path_total", (("path", "copy"),))] == 2
    assert m[("tproxy_splice_fallbacks_total", ())] == 3
    assert m[("tproxy_max_connections_reached_total", ())] == 8
    assert m[("tproxy_loops_refused_total", ())] == 9
    assert m[("tproxy_log_lines_dropped_total", ())] == 11
    assert m[("tproxy_proxy_protocol_errors_total", (("reason", "bad signature"),))] == 1
    assert m[("tproxy_proxy_protocol_errors_total", (("reason", "timeout"),))] == 2
    assert m[("tproxy_rules_reinstalled_total", ())] == 12
    assert m[("tproxy_rules_intact", ())] == 1
    assert m[("tproxy_udp_sessions_open", ())] == 13 and m[("tproxy_udp_sessions_total", ())] == 14
    assert m[("tproxy_udp_datagrams_total", (("direction", "in"),))] == 15
    assert m[("tproxy_udp_datagrams_total", (("direction", "out"),))] == 16
    assert m[("tproxy_udp_bytes_total", (("direction", "in"),))] == 17
    assert m[("tproxy_udp_bytes_total", (("direction", "out"),))] == 18
    assert m[("tproxy_udp_dropped_total", (("reason", "max_sessions"),))] == 19
    assert m[("tproxy_udp_dropped_total", (("reason", "would_block"),))] == 20
    assert m[("tproxy_udp_dropped_total", (("reason", "loop"),))] == 0


def test_openmetrics_has_the_same_samples():
    body, content_type = metrics.render(known_stats(), ready_state(rules_intact=False), accept=OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    om = samples(body.decode(), openmetrics=True)
    assert om == samples(text(known_stats(), ready_state(rules_intact=False), version=metrics.__version__))
    assert om[("tproxy_rules_intact", ())] == 0


def test_plain_text_is_the_default():
    for accept in ("", "*/*", "text/plain", "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"):
        body, content_type = metrics.render(Stats(), State(), accept=accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8" == metrics.CONTENT_TYPE
        assert not body.endswith(b"# EOF\n")


def test_rules_intact_has_no_sample_when_not_verified():
    exposition = text(Stats(), State())
    assert "# TYPE tproxy_rules_intact gauge\n" in exposition
    assert not [k for k in samples(exposition) if k[0] == "tproxy_rules_intact"]
    parsed = {f.name: f for f in parse_openmetrics(metrics.render(Stats(), State(), accept=OPENMETRICS)[0].decode())}
    assert parsed["tproxy_rules_intact"].samples == []


def test_rules_intact_is_absent_when_this_process_cannot_see_the_rules():
    m = samples(text(Stats(), State(rules_installed=True, listening=True)))
    assert ("tproxy_rules_intact", ()) not in m and m[("tproxy_rules_reinstalled_total", ())] == 0
    assert m[("tproxy_ready", ())] == 1
    m = samples(text(Stats(), State(rules_installed=True, listening=True, rules_intact=True)))
    assert m[("tproxy_rules_intact", ())] == 1 and m[("tproxy_ready", ())] == 1


def test_fresh_stats_list_every_known_label_with_zero():
    m = samples(text(Stats(), State()))
    for outcome in OUTCOMES:
        assert m[("tproxy_connections_closed_total", (("outcome", outcome),))] == 0
    assert m[("tproxy_relay_path_total", (("path", "splice"),))] == 0
    assert m[("tproxy_relay_path_total", (("path", "copy"),))] == 0
    assert m[("tproxy_ready", ())] == 0
    assert not [k for k in m if k[0] in ("tproxy_upstream_connect_errors_total", "tproxy_proxy_protocol_errors_total")]
    families = declared(text(Stats(), State()))
    assert {"tproxy_upstream_connect_errors_total", "tproxy_proxy_protocol_errors_total"} <= set(families)


def test_unknown_outcome_follows_known_ones_sorted():
    exposition = text(Stats(closed=collections.Counter({"zzz": 1, "aaa": 2, "ok": 1})), State())
    fam = next(f for f in parse_text(exposition) if f.name == "tproxy_connections_closed")
    assert [s.labels["outcome"] for s in fam.samples] == [*OUTCOMES, "aaa", "zzz"]


def test_draining_is_not_ready():
    m = samples(text(Stats(), ready_state(draining=True)))
    assert m[("tproxy_ready", ())] == 0 and m[("tproxy_draining", ())] == 1


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_label_values_round_trip(accept):
    weird = 'we"ird\\back\nslash'
    stats = Stats(connect_errors=collections.Counter({'E"ODD\\': 1}))
    m = samples(text(stats, State(mode="tproxy", backend=weird), accept=accept), openmetrics=bool(accept))
    assert m[("tproxy_info", (("backend", weird), ("mode", "tproxy"), ("version", "9.9.9")))] == 1
    assert m[("tproxy_upstream_connect_errors_total", (("errno", 'E"ODD\\'),))] == 1


async def test_scrape_adds_the_process_families():
    body, content_type = await metrics.scrape(known_stats(), ready_state())
    assert content_type == metrics.CONTENT_TYPE
    got = declared(body.decode())
    assert {k: v for k, v in got.items() if k.startswith("tproxy_")} == FAMILIES
    assert {k: v[0] for k, v in got.items() if k.startswith("process_")} == {
        "process_cpu_seconds_total": "counter",
        "process_virtual_memory_bytes": "gauge",
        "process_resident_memory_bytes": "gauge",
        "process_start_time_seconds": "gauge",
        "process_open_fds": "gauge",
        "process_max_fds": "gauge",
    }
    m = samples(body.decode())
    assert m[("process_resident_memory_bytes", ())] > 0
    assert m[("process_open_fds", ())] >= 3
    with open("/proc/stat") as f:
        boot = float(next(line.split()[1] for line in f if line.startswith("btime ")))
    assert boot <= m[("process_start_time_seconds", ())] <= time.time()
    om_body, _ = await metrics.scrape(known_stats(), ready_state(), OPENMETRICS)
    assert {f.name for f in parse_openmetrics(om_body.decode())} >= {"process_open_fds", "process_cpu_seconds"}


async def test_fd_listing_never_runs_in_the_trio_thread(monkeypatch):
    trio_thread = threading.current_thread()
    listed_in: list[threading.Thread] = []
    real_listdir = os.listdir

    def spy(path="."):
        if str(path).endswith("/fd"):
            listed_in.append(threading.current_thread())
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", spy)
    body, _ = await metrics.scrape(Stats(), State())
    assert listed_in, "process_open_fds was not read through os.listdir: this test no longer watches it"
    assert trio_thread not in listed_in
    assert b"\nprocess_open_fds " in body


def test_process_families_leave_out_what_cannot_be_read(tmp_path):
    assert metrics.process_families(str(tmp_path / "none")) == []


@bounded
async def test_counters_never_go_down_under_load():
    """A real proxy over loopback: scrape, relay traffic, scrape again; every ``_total`` sample is >= before."""

    async def totals(stats: Stats, state: State) -> dict[tuple[str, tuple], float]:
        body, _ = await metrics.scrape(stats, state)
        return {k: v for k, v in samples(body.decode()).items() if k[0].endswith("_total")}

    async with trio.open_nursery() as n:
        app = await start_app(n, echo_app)
        server, stats, state = await start_proxy(n, make_config(), app)
        before = await totals(stats, state)
        host, port = server.addresses[0]

        async def client(i: int) -> None:
            async with await trio.open_tcp_stream(host, port) as s:
                data = os.urandom(1000 * (i + 1))
                assert await exchange(s, data) == data

        for _ in range(3):
            async with trio.open_nursery() as clients:
                for i in range(20):
                    clients.start_soon(client, i)
            during = await totals(stats, state)
            assert all(during.get(k, 0) >= v for k, v in before.items()), {
                k: (v, during.get(k)) for k, v in before.items() if during.get(k, 0) < v
            }
            before = during
        await stop(server, n)
    assert before[("tproxy_connections_accepted_total", ())] == 60
    assert before[("tproxy_bytes_relayed_total", (("direction", "in"),))] == 3 * sum(1000 * (i + 1) for i in range(20))
