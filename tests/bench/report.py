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


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def paired_ratio(values: list, refs: list) -> float | None:
    """Median over rounds of value / reference from the same round (the two ran back to back): robust to the slow
    drifts of a shared machine, which move both. None when no round has both."""
    ratios = [v / r for v, r in zip(values, refs, strict=False) if v is not None and r]
    return statistics.median(ratios) if ratios else None


def summarize(runs: dict[str, dict[str, list]]) -> dict[str, dict[str, dict]]:
    """``runs[subject][metric] = [per-round values]`` (aligned by round) -> medians, and ratios against direct and
    haproxy: ``x_REF`` is the median of the per-round ratios (paired), ``x_REF_of_medians`` the ratio of medians."""
    med = {s: {m: median(v) for m, v in ms.items()} for s, ms in runs.items()}
    out: dict[str, dict[str, dict]] = {}
    for s, ms in med.items():
        out[s] = {}
        for m, v in ms.items():
            entry = {"median": v, "runs": runs[s][m]}
            for ref in ("direct", "haproxy"):
                r = med.get(ref, {}).get(m)
                entry[f"x_{ref}_of_medians"] = (v / r) if (v is not None and r) else None
                entry[f"x_{ref}"] = paired_ratio(runs[s][m], runs.get(ref, {}).get(m, []))
            entry["target"] = check_target(m, v, entry["x_haproxy"])
            out[s][m] = entry
    return out


def check_target(metric: str, value: float | None, x_haproxy: float | None) -> str | None:
    spec = METRICS.get(metric, (None, None, None, None))[3]
    if spec is None or value is None:
        return None
    op, limit = spec
    if op == "abs<=":
        return "met" if value <= limit else "missed"
    if x_haproxy is None:
        return None
    ok = x_haproxy >= limit if op == ">=" else x_haproxy <= limit
    return "met" if ok else "missed"


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit in ("req/s", "conn/s", "conns") or abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(summary: dict[str, dict[str, dict]], subjects: list[str], invalid: dict[str, str]) -> str:
    """Markdown: one row per metric and subject, with the ratios and, for tproxy rows, the target."""
    lines = [
        "| metric | subject | median | × direct | × HAProxy | target |",  # ratios: medians of per-round ratios
        "|---|---|---:|---:|---:|---|",
    ]
    for m, (label, unit, _, spec) in METRICS.items():
        for s in subjects:
            e = summary.get(s, {}).get(m)
            if e is None or (e["median"] is None and s == "direct"):
                continue
            target = ""
            if s.startswith("tproxy") and spec is not None:
                op, lim = spec
                want = f"≤ {fmt(lim)} {unit}" if op == "abs<=" else f"{op} {lim}× HAProxy"
                target = f"{e['target'] or '?'} ({want})"
            name = s + (" (INVALID)" if s in invalid else "")
            counts = unit == "conns"  # a count of failures: ratios mean nothing
            xd = "—" if e["x_direct"] is None or counts else f"{e['x_direct']:.2f}"
            xh = "—" if e["x_haproxy"] is None or counts else f"{e['x_haproxy']:.2f}"
            lines.append(f"| {label} ({unit}) | {name} | {fmt(e['median'], unit)} | {xd} | {xh} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m tests.bench.report RESULTS.json: the table again, with this module's summarizer
    import json
    import sys

    doc = json.load(open(sys.argv[1]))
    runs = {s: {m: [r.get(m) for r in rounds] for m in METRICS} for s, rounds in doc["rounds"].items()}
    print(table(summarize(runs), list(doc["rounds"]), doc.get("invalid", {})))
