"""Medians, ratios to direct and to HAProxy from the same run, targets, and the table (pure functions)."""

from __future__ import annotations

import statistics

# key: (label, unit, higher_is_better, target against HAProxy as (op, ratio) or absolute as ("abs<=", value));
# the targets are those of the connection-task issue (a task per connection, on the default engine)
METRICS: dict[str, tuple[str, str, bool, tuple[str, float] | None]] = {
    "bulk1_gbps": ("bulk, 1 stream", "Gb/s", True, (">=", 1.0)),
    "bulk4_gbps": ("bulk, 4 streams", "Gb/s", True, (">=", 1.0)),
    "ka_rps": ("keep-alive req/s", "req/s", True, (">=", 1.0)),
    "ka_p50_ms": ("keep-alive p50", "ms", False, None),
    "ka_p99_ms": ("keep-alive p99", "ms", False, ("<=", 1.0)),
    "ka_idle_rps": ("keep-alive req/s, idle conns held", "req/s", True, None),
    "ka_idle_p99_ms": ("keep-alive p99, idle conns held", "ms", False, ("<=", 1.2)),
    "nc_cps": ("new conn/s", "conn/s", True, (">=", 0.9)),
    "nc_p99_ms": ("new conn p99", "ms", False, None),
    "cpu_us_per_req": ("proxy CPU per keep-alive req", "µs", False, ("<=", 1.2)),
    "cpu_user_us_per_req": ("  of which user space", "µs", False, None),
    "cpu_us_per_conn": ("proxy CPU per new conn", "µs", False, ("<=", 1.3)),
    "cpu_user_us_per_conn": ("  of which user space", "µs", False, None),
    "cpu_s_per_gb": ("proxy CPU per GB (bulk)", "s/GB", False, None),
    "kib_per_idle_conn": ("proxy RSS per idle conn", "KiB", False, ("abs<=", 4.0)),
    "idle_lost_or_refused": ("idle conns refused or lost", "conns", False, ("abs<=", 0)),
}

# The UDP run (--udp): targets of the UDP issue, against nginx's stream module (1 worker) of the same rounds. The
# fixed-rate loads run at a fraction (default half) of the subject's own saturated rate of the same round.
UDP_METRICS: dict[str, tuple[str, str, bool, tuple[str, float] | None]] = {
    "dns_qps": ("DNS queries/s, saturated (dnsperf -c 100)", "q/s", True, (">=", 1.0)),
    "dns_avg_ms": ("DNS latency, average, saturated", "ms", False, None),
    "dns_lost": ("DNS queries lost, saturated", "queries", False, None),
    "dns_rate_qps": ("DNS fixed rate below saturation", "q/s", True, None),
    "dns_rate_lost": ("DNS queries lost at the fixed rate", "queries", False, ("abs<=", 0)),
    "cpu_us_per_query": ("proxy CPU per DNS query (2 datagrams)", "µs", False, None),
    "bulk_mbps": ("bulk iperf3 -u -b 0 -l 1400, received", "Mb/s", True, (">=", 1.0)),
    "bulk_lost_pct": ("bulk datagrams lost, saturated", "%", False, None),
    "bulk_rate_mbps": ("bulk fixed rate below saturation", "Mb/s", True, None),
    "bulk_rate_lost": ("bulk datagrams lost at the fixed rate", "datagrams", False, ("abs<=", 0)),
    "cpu_us_per_datagram": ("proxy CPU per bulk datagram (1,400 bytes)", "µs", False, None),
}
COUNT_UNITS = ("conns", "queries", "datagrams")  # counts of failures: printed whole, never as ratios


# Subjects compared with a plain-tproxy subject of the same run instead of HAProxy (the PROXY protocol issue):
# subject -> (baseline subject, metric, minimum ratio, what the pair isolates)
BASELINES: dict[str, tuple[str, str, float, str]] = {
    "lb-tproxy-pp-in": ("lb-tproxy", "nc_cps", 0.9, "header in: HAProxy in front of both, only the header differs"),
    "tproxy-original-pp-out": ("tproxy-original", "nc_cps", 0.95, "header out: send_proxy_protocol v2 to nginx"),
}


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def paired_ratio(values: list, refs: list) -> float | None:
    """Median over rounds of value / reference from the same round (the two ran back to back): robust to the slow
    drifts of a shared machine, which move both. None when no round has both."""
    ratios = [v / r for v, r in zip(values, refs, strict=False) if v is not None and r]
    return statistics.median(ratios) if ratios else None


def summarize(
    runs: dict[str, dict[str, list]], *, peer: str = "haproxy", metrics: dict = METRICS
) -> dict[str, dict[str, dict]]:
    """``runs[subject][metric] = [per-round values]`` (aligned by round) -> medians, and ratios against direct and
    the ``peer`` (the proxy the targets name): ``x_REF`` is the median of the per-round ratios (paired),
    ``x_REF_of_medians`` the ratio of medians; ``target`` by ``metrics``' spec against the peer."""
    med = {s: {m: median(v) for m, v in ms.items()} for s, ms in runs.items()}
    out: dict[str, dict[str, dict]] = {}
    for s, ms in med.items():
        out[s] = {}
        for m, v in ms.items():
            entry = {"median": v, "runs": runs[s][m]}
            for ref in ("direct", peer):
                r = med.get(ref, {}).get(m)
                entry[f"x_{ref}_of_medians"] = (v / r) if (v is not None and r) else None
                entry[f"x_{ref}"] = paired_ratio(runs[s][m], runs.get(ref, {}).get(m, []))
            entry["target"] = check_target(m, v, entry[f"x_{peer}"], metrics)
            out[s][m] = entry
    return out


def check_target(metric: str, value: float | None, x_peer: float | None, metrics: dict = METRICS) -> str | None:
    spec = metrics.get(metric, (None, None, None, None))[3]
    if spec is None or value is None:
        return None
    op, limit = spec
    if op == "abs<=":
        return "met" if value <= limit else "missed"
    if x_peer is None:
        return None
    ok = x_peer >= limit if op == ">=" else x_peer <= limit
    return "met" if ok else "missed"


def baseline_checks(runs: dict[str, dict[str, list]]) -> list[dict]:
    """For each subject of :data:`BASELINES` measured with its baseline: both medians, the median of the per-round
    ratios (:func:`paired_ratio`) and whether it meets the minimum ("met", "missed", or None without a paired
    round)."""
    out = []
    for subj, (base, metric, limit, what) in BASELINES.items():
        if subj not in runs or base not in runs:
            continue
        values, refs = runs[subj].get(metric, []), runs[base].get(metric, [])
        ratio = paired_ratio(values, refs)
        out.append(
            {
                "subject": subj,
                "baseline": base,
                "metric": metric,
                "what": what,
                "median": median(values),
                "baseline_median": median(refs),
                "ratio": ratio,
                "rounds": sum(1 for v, r in zip(values, refs, strict=False) if v is not None and r),
                "limit": limit,
                "target": None if ratio is None else ("met" if ratio >= limit else "missed"),
            }
        )
    return out


def baseline_table(checks: list[dict], invalid: dict[str, str]) -> str:
    """Markdown: one row per :func:`baseline_checks` entry."""
    lines = [
        "| against plain tproxy | subject | median | baseline | median | × baseline | rounds | target |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for c in checks:
        label, unit = METRICS[c["metric"]][:2]
        bad = any(s in invalid for s in (c["subject"], c["baseline"]))
        name = c["subject"] + (" (INVALID)" if c["subject"] in invalid else "")
        base = c["baseline"] + (" (INVALID)" if c["baseline"] in invalid else "")
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}"
        target = f"{'?' if bad else c['target'] or '?'} (>= {c['limit']}× {c['baseline']})"
        lines.append(
            f"| {label} ({unit}): {c['what']} | {name} | {fmt(c['median'], unit)} | {base} |"
            f" {fmt(c['baseline_median'], unit)} | {ratio} | {c['rounds']} | {target} |"
        )
    return "\n".join(lines)


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit in ("req/s", "conn/s", "q/s", *COUNT_UNITS) or abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(
    summary: dict[str, dict[str, dict]],
    subjects: list[str],
    invalid: dict[str, str],
    *,
    peer: str = "haproxy",
    peer_label: str = "HAProxy",
    metrics: dict = METRICS,
) -> str:
    """Markdown: one row per metric and subject, with the ratios and, for tproxy rows, the target."""
    lines = [
        f"| metric | subject | median | × direct | × {peer_label} | target |",  # ratios: medians of per-round ratios
        "|---|---|---:|---:|---:|---|",
    ]
    for m, (label, unit, _, spec) in metrics.items():
        for s in subjects:
            e = summary.get(s, {}).get(m)
            if e is None or (e["median"] is None and s == "direct"):
                continue
            target = ""
            if s.startswith("tproxy") and spec is not None:
                op, lim = spec
                want = f"≤ {fmt(lim, unit)} {unit}" if op == "abs<=" else f"{op} {lim}× {peer_label}"
                target = f"{e['target'] or '?'} ({want})"
            name = s + (" (INVALID)" if s in invalid else "")
            counts = unit in COUNT_UNITS  # a count of failures: ratios mean nothing
            xd = "—" if e["x_direct"] is None or counts else f"{e['x_direct']:.2f}"
            xh = "—" if e[f"x_{peer}"] is None or counts else f"{e[f'x_{peer}']:.2f}"
            lines.append(f"| {label} ({unit}) | {name} | {fmt(e['median'], unit)} | {xd} | {xh} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m tests.bench.report RESULTS.json: the table again, with this module's summarizer
    import json
    import sys

    doc = json.load(open(sys.argv[1]))
    udp = doc.get("settings", {}).get("udp", False)
    metrics, peer, label = (UDP_METRICS, "nginx", "nginx") if udp else (METRICS, "haproxy", "HAProxy")
    runs = {s: {m: [r.get(m) for r in rounds] for m in metrics} for s, rounds in doc["rounds"].items()}
    summary = summarize(runs, peer=peer, metrics=metrics)
    print(table(summary, list(doc["rounds"]), doc.get("invalid", {}), peer=peer, peer_label=label, metrics=metrics))
    checks = baseline_checks(runs)
    if checks:
        print()
        print(baseline_table(checks, doc.get("invalid", {})))
