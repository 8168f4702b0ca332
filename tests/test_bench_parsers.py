"""The benchmark's pure parts (tests/bench/loads.py parsers, tests/bench/report.py): what `just bench` prints is only
as right as these. The benchmark itself is never part of `just test`."""

from __future__ import annotations

import pytest

from tests.bench import loads, report

WRK_OUTPUT = """\
Running 3s test @ http://198.18.0.2:8080/1k
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.41ms  512.33us  12.05ms   88.12%
    Req/Sec    21.09k     1.02k   23.11k    71.00%
  Latency Distribution
     50%    1.35ms
     75%    1.61ms
     90%    1.93ms
     99%    2.83ms
  63270 requests in 3.00s, 70.21MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:  21088.74
Transfer/sec:     23.40MB
"""


@pytest.mark.parametrize(
    ("text", "ms"),
    [("512.00us", 0.512), ("1.23ms", 1.23), ("2.00s", 2000.0), ("1.50m", 90_000.0), (" 7ms ", 7.0)],
)
def test_wrk_durations_are_read_in_milliseconds(text, ms):
    assert loads.parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "12", "1.2h", "abc ms"])
def test_a_malformed_wrk_duration_is_an_error(text):
    with pytest.raises(ValueError, match="not a wrk duration"):
        loads.parse_duration_ms(text)


def test_wrk_output_gives_rate_percentiles_count_and_errors():
    r = loads.parse_wrk(WRK_OUTPUT)
    assert r == {
        "rps": 21088.74,
        "requests": 63270,
        "p50_ms": pytest.approx(1.35),
        "p99_ms": pytest.approx(2.83),
        "socket_errors": 3,
        "non2xx": 3,
    }


def test_wrk_output_without_errors_counts_none():
    clean = "\n".join(ln for ln in WRK_OUTPUT.splitlines() if "errors" not in ln and "Non-2xx" not in ln)
    r = loads.parse_wrk(clean)
    assert r["socket_errors"] == 0 and r["non2xx"] == 0


def test_wrk_output_without_a_rate_is_an_error():
    with pytest.raises(ValueError, match="Requests/sec"):
        loads.parse_wrk("unable to connect to 198.18.0.2:8080 Connection refused\n")


def test_iperf_figures_are_what_the_receiver_got():
    doc = {
        "end": {
            "sum_sent": {"bits_per_second": 9e9, "bytes": 1},
            "sum_received": {"bits_per_second": 12.5e9, "bytes": 4687500000},
        }
    }
    assert loads.parse_iperf(doc) == {"gbps": 12.5, "bytes": 4687500000}


def test_ratios_pair_rounds_and_skip_missing_ones():
    # round 2 of the subject failed (None); round 3 of the reference measured 0 (no ratio)
    assert report.paired_ratio([10, None, 30, 8], [5, 7, 0, 8]) == 1.5  # median of 2.0 and 1.0
    assert report.paired_ratio([None], [1]) is None


def test_summary_ratios_and_targets():
    runs = {
        "direct": {"nc_cps": [20_000, 18_000, 19_000]},
        "haproxy": {"nc_cps": [8_000, 7_000, 9_000], "cpu_us_per_conn": [100, 110, 120]},
        "tproxy-original": {"nc_cps": [6_000, 6_300, 6_300], "cpu_us_per_conn": [140, 140, 140]},
        "slow": {"nc_cps": [6_000, 5_000, 6_000], "kib_per_idle_conn": [9.0, 9.0, 9.0]},
    }
    s = report.summarize(runs)
    t = s["tproxy-original"]
    assert t["nc_cps"]["median"] == 6_300
    assert t["nc_cps"]["x_haproxy"] == pytest.approx(0.75)  # median of 0.75, 0.9, 0.7
    assert t["nc_cps"]["x_haproxy_of_medians"] == pytest.approx(6_300 / 8_000)
    assert t["nc_cps"]["target"] == "missed"  # >= 0.9x HAProxy
    assert t["cpu_us_per_conn"]["x_haproxy"] == pytest.approx(140 / 110)  # median of 1.4, 1.27, 1.17
    assert t["cpu_us_per_conn"]["target"] == "met"  # <= 1.3x HAProxy
    assert s["slow"]["kib_per_idle_conn"]["target"] == "missed"  # absolute: <= 4 KiB
    assert s["direct"]["nc_cps"]["x_direct"] == 1.0 and s["haproxy"]["nc_cps"]["target"] == "met"


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (None, "", "—"),
        (6506.4, "conn/s", "6,506"),
        (0, "conns", "0"),
        (129.4, "µs", "129"),
        (35.27, "µs", "35.3"),
        (0.418, "s/GB", "0.42"),
    ],
)
def test_figures_are_printed_with_sensible_precision(value, unit, text):
    assert report.fmt(value, unit) == text
