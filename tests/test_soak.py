"""The soak (tests/soak, ``just soak``): its 60-second version through the real proxy, and its pass criteria."""

from __future__ import annotations

import csv

import pytest

from tests.soak import COLUMNS, FD_GROWTH, soak, verdict


def _samples(n: int = 13) -> list[dict]:
    """A 2-minute run, flat: samples every 10 s, 100 connections accepted and closed between two samples."""
    rows = []
    for i in range(n):
        row = dict.fromkeys(COLUMNS, 0)
        row.update(t_s=i * 10.0, fds=4040, rss_kib=60000, open=2010, accepted=2010 + i * 100, closed=i * 100)
        row["bytes"] = i * 1000
        rows.append(row)
    return rows


def test_verdict_passes_a_flat_run():
    assert verdict(_samples(), [], 2) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({(5, "accepted"): 0, (5, "closed"): -2010}, "accepted went down"),
        ({(5, "open"): 2011}, "accepted 2510 != closed 500 + open 2011"),
        ({(i, "fds"): 4040 + FD_GROWTH + 1 for i in range(10, 13)}, "fds grew"),
        ({(i, "rss_kib"): 63100 for i in range(10, 13)}, "RSS grew"),
    ],
)
def test_verdict_catches(change, expected):
    rows = _samples()
    for (i, key), value in change.items():
        rows[i][key] = value
    bad = verdict(rows, [], 2)
    assert any(expected in line for line in bad), bad


def test_verdict_fails_on_a_failure():
    assert verdict(_samples(), ["12.0s bulk 0: digest differs"], 2) == [
        "1 failures, first: 12.0s bulk 0: digest differs"
    ]


@pytest.mark.root
def test_soak_60_seconds(tmp_path):
    """The soak for one minute (2,000 held connections, every load, two samples per reload): it passes, and it wrote
    its CSV and plot."""
    s, bad = soak(1.0, out=tmp_path)
    assert not bad, "\n".join(bad + s.failures[:10])
    with open(tmp_path / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 6 and rows[-1]["failures"] == "0"
    assert s.keepalive_reqs > 0 and s.new_conns > 0 and s.bulk_bytes > 0 and s.reloads >= 1
    assert (tmp_path / "soak.png").stat().st_size > 1000
