"""The benchmark's pure parts (tests/bench/loads.py parsers, tests/bench/report.py): what `just bench` prints is only
as right as these. The benchmark itself is never part of `just test`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import loads, report
from tests.bench.subjects import Tproxy

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


def test_the_proxy_protocol_subjects_are_compared_with_plain_tproxy_of_the_same_rounds():
    runs = {
        "lb-tproxy": {"nc_cps": [3_000, 2_000, 3_000, 3_000]},
        "lb-tproxy-pp-in": {"nc_cps": [2_850, 2_000, None, 2_400]},  # round 3 failed: left out
        "tproxy-original": {"nc_cps": [5_000, 5_000, 4_000, 4_000]},
        "tproxy-original-pp-out": {"nc_cps": [4_900, 4_500, 3_900, 3_600]},
    }
    by = {c["subject"]: c for c in report.baseline_checks(runs)}
    pp_in = by["lb-tproxy-pp-in"]
    assert pp_in["baseline"] == "lb-tproxy" and pp_in["rounds"] == 3
    assert pp_in["ratio"] == pytest.approx(0.95)  # median of 0.95, 1.0, 0.8
    assert pp_in["median"] == 2_400 and pp_in["baseline_median"] == 3_000
    assert pp_in["target"] == "met"  # >= 0.9
    out = by["tproxy-original-pp-out"]
    assert out["ratio"] == pytest.approx((0.9 + 0.975) / 2)  # median of 0.98, 0.9, 0.975, 0.9
    assert out["target"] == "missed"  # >= 0.95


def test_a_proxy_protocol_subject_without_its_baseline_or_a_paired_round_has_no_verdict():
    assert report.baseline_checks({"lb-tproxy-pp-in": {"nc_cps": [1]}, "tproxy-original": {"nc_cps": [1]}}) == []
    (c,) = report.baseline_checks({"lb-tproxy-pp-in": {"nc_cps": [1, None]}, "lb-tproxy": {"nc_cps": [None, 2]}})
    assert c["ratio"] is None and c["target"] is None and c["rounds"] == 0


def test_the_baseline_table_names_both_subjects_the_ratio_and_an_invalid_side():
    runs = {"lb-tproxy": {"nc_cps": [3_000]}, "lb-tproxy-pp-in": {"nc_cps": [2_400]}}
    text = report.baseline_table(report.baseline_checks(runs), {"lb-tproxy": "the proxy exited"})
    row = text.splitlines()[-1]
    assert "| lb-tproxy-pp-in | 2,400 | lb-tproxy (INVALID) | 3,000 | 0.80 | 1 | ? (>= 0.9× lb-tproxy) |" in row


def test_the_proxy_protocol_subjects_are_opt_in():
    from tests.bench.run import make_subjects

    pp = {"lb-tproxy", "lb-tproxy-pp-in", "tproxy-original-pp-out"}
    default = {s.name for s in make_subjects(None)[0]}
    assert "tproxy-original" in default and not default & pp
    assert {s.name for s in make_subjects(None, proxy_protocol=True)[0]} == default | pp
    picked = make_subjects(["tproxy-original", "lb-tproxy-pp-in"])[0]
    assert [s.name for s in picked] == ["tproxy-original", "lb-tproxy-pp-in"]


def test_the_proxy_protocol_subjects_configs_are_valid_and_differ_from_their_baselines_only_by_the_header():
    import tomllib

    from tests.bench import subjects as S
    from tests.bench import topology as T
    from tproxy.config import Config

    def doc(subject):
        return tomllib.loads(subject.config_text(None))

    plain, pp_in = doc(S.LbTproxy(header=False)), doc(S.LbTproxy(header=True))
    assert pp_in["listener"].pop("proxy_protocol") == "v2"
    assert pp_in["listener"].pop("proxy_protocol_from") == [f"{T.LB_IP}/32"]
    assert pp_in == plain
    base, out = doc(S.Tproxy("tproxy", "original")), doc(S.Tproxy("tproxy", "original", send_proxy_protocol="v2"))
    assert out["proxy"].pop("send_proxy_protocol") == "v2"
    assert out["intercept"].pop("ports") == [T.PP_HTTP_PORT]  # only nginx's proxy_protocol port: not iperf3's
    base["intercept"].pop("ports")
    assert out == base
    for text in (
        S.LbTproxy(header=True).config_text(None),
        S.Tproxy("tproxy", "original", send_proxy_protocol="v2").config_text(None),
    ):
        Config.from_dict(tomllib.loads(text))  # raises on a bad key or value


# ----------------------------------------------------------------------------------------------------------------
# The UDP run (--udp)

DNSPERF_OUTPUT = """\
DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 198.18.0.3 -p 5300 -d q.txt -c 100 -q 500 -l 3 -t 2
[Status] Sending queries (to 198.18.0.3:5300)
[Status] Started at: Tue Dec  1 06:15:00 2026
[Status] Stopping after 3.000000 seconds
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         152345
  Queries completed:    152300 (99.97%)
  Queries lost:         45 (0.03%)

  Response codes:       NOERROR 152290 (99.99%), SERVFAIL 10 (0.01%)
  Average packet size:  request 28, response 44
  Run time (s):         3.001234
  Queries per second:   50746.123456

  Average Latency (s):  0.001234 (min 0.000050, max 0.012000)
  Latency StdDev (s):   0.000321

"""


def test_dnsperf_statistics_give_counts_rate_latency_and_noerror_answers():
    r = loads.parse_dnsperf(DNSPERF_OUTPUT)
    assert r == {
        "sent": 152345,
        "completed": 152300,
        "lost": 45,
        "qps": pytest.approx(50746.123456),
        "avg_ms": pytest.approx(1.234),
        "noerror": 152290,
    }


def test_dnsperf_output_without_statistics_is_an_error():
    with pytest.raises(ValueError, match="Queries sent"):
        loads.parse_dnsperf("[Fatal] bind: Address already in use\n")


def test_iperf_udp_figures_are_what_the_server_received():
    doc = {
        "end": {
            "sum": {
                "seconds": 2.0,
                "bits_per_second": 800e6,
                "packets": 100_000,
                "lost_packets": 25_000,
                "lost_percent": 25.0,
            }
        }
    }
    r = loads.parse_iperf_udp(doc, 1400)
    assert r["packets"] == 100_000 and r["lost"] == 25_000 and r["received"] == 75_000
    assert r["recv_mbps"] == pytest.approx(75_000 * 1400 * 8 / 2.0 / 1e6)  # 420 Mb/s, not the 800 sent
    assert r["sent_mbps"] == pytest.approx(800) and r["lost_percent"] == 25.0


DNSMASQ_LOG = """\
Dec  1 06:15:00 dnsmasq[4242]: started, version 2.89 cache disabled
Dec  1 06:15:01 dnsmasq[4242]: 1 198.18.0.1/40404 query[A] bench.test from 198.18.0.1
Dec  1 06:15:01 dnsmasq[4242]: 1 198.18.0.1/40404 config bench.test is 198.18.0.9
Dec  1 06:15:01 dnsmasq[4242]: 2 198.18.0.1/1234 query[AAAA] bench.test from 198.18.0.1
Dec  1 06:15:01 dnsmasq[4242]: 3 198.18.0.1/2222 query[A] other.test from 198.18.0.1
Dec  1 06:15:01 dnsmasq[4242]: 4 198.18.0.2/50000 query[A] bench.test from 198.18.0.2
"""


def test_the_query_log_names_each_clients_address_and_port():
    assert loads.parse_dnsmasq_log(DNSMASQ_LOG) == [("198.18.0.1", 40404), ("198.18.0.2", 50000)]
    assert loads.parse_dnsmasq_log("") == []


def test_udp_targets_are_against_nginx_and_lost_datagrams_are_counts():
    runs = {
        "direct": {"dns_qps": [90_000, 80_000], "dns_rate_lost": [0, 0]},
        "nginx": {"dns_qps": [40_000, 50_000], "bulk_mbps": [900, 1000], "dns_rate_lost": [0, 0]},
        "tproxy-original": {"dns_qps": [44_000, 45_000], "bulk_mbps": [800, 900], "dns_rate_lost": [0, 3]},
    }
    s = report.summarize(runs, peer="nginx", metrics=report.UDP_METRICS)
    t = s["tproxy-original"]
    assert t["dns_qps"]["x_nginx"] == pytest.approx((1.1 + 0.9) / 2) and t["dns_qps"]["target"] == "met"
    assert t["bulk_mbps"]["x_nginx"] == pytest.approx((800 / 900 + 0.9) / 2) and t["bulk_mbps"]["target"] == "missed"
    assert t["dns_rate_lost"]["median"] == 1.5 and t["dns_rate_lost"]["target"] == "missed"  # must be 0
    text = report.table(s, list(runs), {}, peer="nginx", peer_label="nginx", metrics=report.UDP_METRICS)
    assert "| × nginx |" in text.splitlines()[0]
    assert "| DNS queries/s, saturated (dnsperf -c 100) (q/s) | tproxy-original | 44,500 | 0.53 | 1.00 | met" in text
    lost = [ln for ln in text.splitlines() if ln.startswith("| DNS queries lost at the fixed rate")]
    assert lost[-1].endswith("| tproxy-original | 2 | — | — | missed (≤ 0 queries) |")


def test_the_udp_subjects_and_their_config():
    import tomllib

    from tests.bench import topology as T
    from tests.bench.run import make_udp_subjects
    from tproxy.config import Config

    subjects = make_udp_subjects(None)[0]
    assert [s.name for s in subjects] == ["direct", "nginx", "tproxy-original"]
    assert [s.name for s in make_udp_subjects(["nginx-remote-port", "direct"])[0]] == ["direct", "nginx-remote-port"]
    doc = tomllib.loads(subjects[2].config_text(None))
    assert doc["intercept"]["udp_ports"] == list(T.UDP_PORTS) and doc["mode"] == "tproxy"
    assert doc["intercept"]["ports"] == [5399]  # no TCP application listens there
    assert Config.from_dict(doc).intercept.udp_ports  # a valid config


def test_a_base_subject_runs_the_base_checkout_not_this_one(tmp_path):
    # TPX_BENCH_BASE: `python -m tproxy`, started from this checkout, must import the base's tree; without
    # PYTHONSAFEPATH the working directory (this checkout) came first and both sides of an A/B ran the same code
    base = tmp_path / "base"
    (base / "tproxy").mkdir(parents=True)
    (base / "tproxy" / "__init__.py").write_text("")
    (base / "tproxy" / "__main__.py").write_text("print(__file__)\n")
    subject = Tproxy("tproxy", "original", src=str(base))
    subject.probe_out = tmp_path / "probe.json"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **subject.environment()}
    r = subprocess.run([sys.executable, "-m", "tproxy"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(base / "tproxy" / "__main__.py"), r.stderr
    assert subject.name == "tproxy-original@base"


def test_the_udp_backlog_is_the_sum_of_the_receive_queues():
    from tests.bench import topology as T

    ss = (
        "UNCONN 6287616 0         0.0.0.0:5202     0.0.0.0:*\n"
        "UNCONN 0      0         198.18.0.3:5300      0.0.0.0:*\n"
        "ESTAB  1536   0         198.18.0.1:41821   198.18.0.3:5301\n"
    )
    assert T.queued_bytes(ss) == 6287616 + 1536
    assert T.queued_bytes("") == 0
