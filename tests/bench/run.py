"""``python -m tests.bench [--quick] [--json PATH]``: every subject under every load, in interleaved rounds.

Each round runs each subject once, in a rotated order (round-robin), so slow drifts of the shared machine fall on all
subjects alike; the table reports medians over rounds and ratios against direct and HAProxy from the same run.
A subject's figures are marked INVALID when the application did not see the client's own address, or when the loads
did not go through the proxy (it spent no CPU: tproxy mode fails open when nothing listens).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.bench import loads, profile, report
from tests.bench import topology as T
from tests.bench.subjects import NGINX_STREAM_MODULE, REPO, Direct, HAProxy, LbTproxy, NginxUdp, Subject, Tproxy

HOT_PATH = ("relay.py", "server.py", "sockets.py", "log.py", "runner.py", "stats.py", "udp.py")
SETTLE = 0.5  # seconds between loads, for sockets of the previous load to drain
PROFILED = ("keepalive", "newconn", "dns", "udp_bulk")  # the loads --profile samples py-spy under
SHOWN = ("bulk1_gbps", "ka_rps", "ka_p99_ms", "nc_cps")  # the figures printed after each subject's round


def make_subjects(
    names: list[str] | None, experiments: bool = False, proxy_protocol: bool = False
) -> tuple[list[Subject], list[str]]:
    """The subjects of the run: the default ones, plus the PROXY protocol ones with ``proxy_protocol``; ``names``
    picks among all of them (the opt-in ones included), in the default order."""
    notes: list[str] = []
    subjects: list[Subject] = [Direct(), HAProxy()]
    opt_in: list[Subject] = []
    if (REPO / "tproxy" / "runner.py").exists():
        subjects += [
            Tproxy("tproxy", "original"),
            Tproxy("tproxy", "original", relay="tasks"),
            Tproxy("tproxy", "loopback"),
            Tproxy("nat", "original"),
        ]
        base = os.environ.get("TPX_BENCH_BASE", "")  # an A/B run: a checkout of another commit, run as ...@base
        if base:
            subjects.append(Tproxy("tproxy", "original", src=base))
        if experiments:
            subjects += [
                Tproxy("tproxy", "original", gc="threshold=50000,freeze=2", label="gc"),
                Tproxy("tproxy", "original", log_level="warning", label="nolog"),
            ]
        # PROXY protocol (issue 14): header in behind the same load balancer with and without it; header out
        opt_in = [LbTproxy(header=False), LbTproxy(header=True), Tproxy("tproxy", "original", send_proxy_protocol="v2")]
    else:
        notes.append("tproxy subjects skipped: tproxy/runner.py has not landed (`tproxy run` does not work yet)")
    if names:
        subjects = [s for s in subjects + opt_in if s.name in names]
    elif proxy_protocol:
        subjects += opt_in
    return subjects, notes


def make_udp_subjects(names: list[str] | None) -> tuple[list[Subject], list[str]]:
    """The subjects of the UDP run (``--udp``): direct, nginx's stream module and tproxy-original, each under the UDP
    loads only; ``names`` picks among them and the opt-in ``tproxy-original-tasks`` (the replies read by each
    session's task instead of the shared reader) and ``nginx-remote-port`` (``proxy_bind $remote_addr:$remote_port``,
    which shares one conntrack entry between nginx's two legs: see the README)."""
    notes: list[str] = []
    subjects: list[Subject] = [Direct(), NginxUdp()]
    opt_in: list[Subject] = [NginxUdp(bind="$remote_addr:$remote_port")]
    if (REPO / "tproxy" / "udp.py").exists():
        subjects.append(Tproxy("tproxy", "original", udp=True))
        opt_in.append(Tproxy("tproxy", "original", relay="tasks", udp=True))
        base = os.environ.get("TPX_BENCH_BASE", "")
        if base:
            subjects.append(Tproxy("tproxy", "original", src=base, udp=True))
    else:
        notes.append("tproxy subjects skipped: tproxy/udp.py has not landed")
    if names:
        subjects = [s for s in subjects + opt_in if s.name in names]
    return subjects, notes


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        lines = (r.stdout or r.stderr).strip().splitlines()
        return lines[0] if lines else "missing"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": version(["haproxy", "-v"]),
        "nginx": version(["nginx", "-v"]),
        "iperf3": version(["iperf3", "--version"]),
        "wrk": version(["wrk", "-v"]),
        "dnsperf": version(["sh", "-c", "dnsperf -h 2>&1 | grep -m1 Version"]),
        "dnsmasq": version(["dnsmasq", "--version"]),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def code_version() -> str:
    """The git commit and a hash of the proxy's hot-path sources as they are on disk now: the working tree changes
    under a long run when others commit, and each proxy process runs what was on disk when it started."""
    h = hashlib.sha256()
    for f in sorted((REPO / "tproxy" / n) for n in HOT_PATH):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    paths = [f"tproxy/{n}" for n in HOT_PATH]
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", *paths], capture_output=True, text=True
    )
    return f"{r.stdout.strip() or '?'}{'+dirty' if dirty.stdout.strip() else ''} src:{h.hexdigest()[:10]}"


def pauses_by_phase(pauses: list, phases: dict[str, tuple[float, float]]) -> dict:
    """Garbage-collector pauses over 2 ms (from the probe) that ended during each load: count, max and total ms."""
    out = {}
    for name, (t0, t1) in phases.items():
        ms = [p[2] for p in pauses if t0 <= p[0] <= t1]
        gens = sorted({p[1] for p in pauses if t0 <= p[0] <= t1})
        out[name] = {"count": len(ms), "max_ms": max(ms, default=0.0), "total_ms": round(sum(ms), 1), "gens": gens}
    return out


def rules_left(topo: T.Topology) -> str:
    """Whatever rules or policy routes are left in the node namespace (it must be clean between subjects)."""
    left = []
    r = topo.node.run(["nft", "list", "ruleset"], check=False)
    structural = ("table ", "chain ", "}", "type ", "policy ")
    if any(ln.strip() and not ln.strip().startswith(structural) for ln in r.stdout.splitlines()):
        left.append(r.stdout.strip())
    r = topo.node.run(["ip", "rule", "show"], check=False)
    extra = [
        ln for ln in r.stdout.splitlines() if "lookup" in ln and not any(t in ln for t in ("local", "main", "default"))
    ]
    left += extra
    return "\n".join(left)


def profiled(subj: Subject, args: argparse.Namespace, load: str, fn, *a, **kw):
    """``loads.cpu_during`` under py-spy when ``--profile DIR`` is given and the subject is tproxy; the load's
    wall-clock span goes to ``args.phases`` (to place the proxy's garbage-collector pauses)."""
    t0 = time.time()
    try:
        return _profiled(subj, args, load, fn, *a, **kw)
    finally:
        args.phases[load] = (t0, time.time())


def _stop(subj: Subject, topo: T.Topology, args: argparse.Namespace, figs: dict) -> None:
    """After a subject's loads (TCP or UDP): stop it, keep its probe's GC figures, and flush any rule it left."""
    subj.stop(topo)
    if getattr(subj, "probe", None):
        figs["gc"] = subj.probe["gc"]
        figs["gc_pauses_by_load"] = pauses_by_phase(subj.probe.get("pauses", []), args.phases)
    left = rules_left(topo)
    if left:
        figs["rules_left_behind"] = left
        print(f"  ! {subj.name} left rules behind in the node namespace; flushing:\n{left}", file=sys.stderr)
        topo.node.sh("nft flush ruleset; ip rule del fwmark 0x1/0x1 lookup 100; ip route flush table 100", check=False)


def _profiled(subj: Subject, args: argparse.Namespace, load: str, fn, *a, **kw):
    spy = None
    if args.profile and load in PROFILED and (subj.name.startswith("tproxy") or "-tproxy" in subj.name) and subj.proc:
        out = args.profile / f"{subj.name}-{load}-r{args.round + 1}.txt"
        spy = profile.start(subj.proc.pid, args.duration, out)
    try:
        return loads.cpu_during(subj, fn, *a, **kw)
    finally:
        profile.finish(spy)


def run_subject(topo: T.Topology, subj: Subject, args: argparse.Namespace) -> tuple[dict, str | None]:
    """One subject under every load. Returns (figures, reason it is invalid or None)."""
    figs: dict = {"code": code_version()}
    args.phases = {}
    invalid = None
    subj.start(topo)
    try:
        who = loads.whoami(topo, target=subj.target, expect=subj.sees)
        figs["whoami"] = who
        if not who["ok"]:
            invalid = f"the application did not see {subj.sees}: answers {who['answers']} log {who['logged']}"
        d = args.duration
        none = ({"gbps": None, "bytes": 0, "machine_busy": None, "cpu_user_s": None, "cpu_sys_s": None}, 0.0)
        b1, c1 = b4, c4 = none
        if "bulk" in subj.loads:
            b1, c1 = profiled(subj, args, "bulk1", loads.iperf, topo, 1, d)
            time.sleep(SETTLE)
            b4, c4 = profiled(subj, args, "bulk4", loads.iperf, topo, 4, d)
            time.sleep(SETTLE)
        ka, cka = profiled(subj, args, "keepalive", loads.wrk, topo, d, close=False, target=subj.target)
        time.sleep(SETTLE)
        nc, cnc = profiled(subj, args, "newconn", loads.wrk, topo, d, close=True, target=subj.target)
        time.sleep(SETTLE)
        figs.update(
            bulk1_gbps=b1["gbps"],
            bulk4_gbps=b4["gbps"],
            ka_rps=ka["rps"],
            ka_p50_ms=ka["p50_ms"],
            ka_p99_ms=ka["p99_ms"],
            nc_cps=nc["rps"],
            nc_p99_ms=nc["p99_ms"],
            machine_busy={
                "bulk1": b1["machine_busy"],
                "bulk4": b4["machine_busy"],
                "keepalive": ka["machine_busy"],
                "newconn": nc["machine_busy"],
            },
            wrk_errors={"keepalive": ka["socket_errors"] + ka["non2xx"], "newconn": nc["socket_errors"] + nc["non2xx"]},
        )
        for load, r in (("keep-alive", ka), ("new-connection", nc)):
            bad = r["non2xx"] + r["socket_errors"]
            if r["non2xx"] or bad > 0.01 * (r["requests"] or 0):
                invalid = invalid or f"{load} load: {r['non2xx']} non-2xx answers, {r['socket_errors']} socket errors"
        if subj.is_proxy:
            bulk_bytes = b1["bytes"] + b4["bytes"]
            figs["cpu_s_per_gb"] = (c1 + c4) / (bulk_bytes / 1e9) if bulk_bytes else None
            figs["cpu_us_per_req"] = cka / ka["requests"] * 1e6 if ka["requests"] else None
            figs["cpu_us_per_conn"] = cnc / nc["requests"] * 1e6 if nc["requests"] else None
            figs["cpu_user_us_per_req"] = ka["cpu_user_s"] / ka["requests"] * 1e6 if ka["requests"] else None
            figs["cpu_user_us_per_conn"] = nc["cpu_user_s"] / nc["requests"] * 1e6 if nc["requests"] else None
            figs["cpu_seconds"] = {
                name: {"total": round(c, 2), "user": r["cpu_user_s"], "sys": r["cpu_sys_s"]}
                for name, c, r in (("bulk1", c1, b1), ("bulk4", c4, b4), ("keepalive", cka, ka), ("newconn", cnc, nc))
            }
            if not figs["cpu_us_per_req"] or figs["cpu_us_per_req"] < 1.0:
                invalid = invalid or "the keep-alive load did not go through the proxy (it spent no CPU)"
        if args.idle and "idle" in subj.loads:
            idle, cidle = profiled(subj, args, "idle", loads.idle, topo, subj, args.idle, args.hold, busy=args.duration)
            figs["machine_busy"]["idle"] = idle.pop("machine_busy", None)
            if cidle is not None:
                figs["cpu_seconds"]["idle"] = {
                    "total": round(cidle, 2),
                    "user": idle.pop("cpu_user_s"),
                    "sys": idle.pop("cpu_sys_s"),
                }
            figs.update(idle)
            figs["idle_lost_or_refused"] = idle["idle_refused"] + idle["idle_lost"]
        if subj.is_proxy and subj.proc is not None and subj.proc.poll() is not None:
            invalid = invalid or f"the proxy exited during the loads (status {subj.proc.returncode})"
    finally:
        _stop(subj, topo, args, figs)
    return figs, invalid


def run_udp_subject(topo: T.Topology, subj: Subject, args: argparse.Namespace) -> tuple[dict, str | None]:
    """One subject under the UDP loads: the query-log check, dnsperf saturated then at ``args.udp_fraction`` of the
    rate it reached, iperf3 -u -b 0 then at that fraction of what the server received. Returns (figures, reason it
    is invalid or None)."""
    figs: dict = {"code": code_version()}
    args.phases = {}
    invalid = None
    subj.start(topo)
    try:
        chk = loads.dns_check(topo, through_proxy=subj.is_proxy)
        figs["dns_check"] = chk
        if not chk["ok"]:
            how = "through the proxy" if subj.is_proxy else "directly"
            invalid = f"the application did not see {T.CLIENT_IP} {how}: answers {chk['answers']} log {chk['logged']}"
        d, frac = args.duration, args.udp_fraction
        drained: dict[str, float] = {}

        def settle(load: str) -> None:  # a saturated load leaves backlogs in the node's UDP buffers
            if load.startswith("udp_bulk"):
                drained[load] = round(topo.restart_udp_iperf(), 1)
            else:
                drained[load] = round(T.wait_udp_drained(topo.node), 1)
            time.sleep(SETTLE)

        errors: dict[str, str] = {}

        def attempt(load: str, fn, *a, **kw) -> tuple[dict | None, float | None]:
            # a load that fails (iperf3 hangs when the proxy loses its greeting) is recorded; the others still run
            try:
                return profiled(subj, args, load, fn, *a, **kw)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                errors[load] = str(e).strip().splitlines()[0][:200]
                return None, None

        dns, cdns = attempt("dns", loads.dnsperf, topo, d)
        settle("dns")
        dnsr = None
        if dns is not None:
            dnsr, _ = attempt("dns_rate", loads.dnsperf, topo, d, rate=max(100.0, dns["qps"] * frac))
            settle("dns_rate")
        bulk, cbulk = attempt("udp_bulk", loads.iperf_udp, topo, d)
        settle("udp_bulk")
        bulkr = None
        if bulk is not None:
            rate = max(1.0, bulk["recv_mbps"] * frac)
            bulkr, _ = attempt("udp_bulk_rate", loads.iperf_udp, topo, d, rate_mbps=rate)
            settle("udp_bulk_rate")
        figs["drain_s"] = drained
        if errors:
            figs["load_errors"] = errors

        def get(r: dict | None, key: str):
            return None if r is None else r[key]

        figs.update(
            dns_qps=get(dns, "qps"),
            dns_avg_ms=get(dns, "avg_ms"),
            dns_lost=get(dns, "lost"),
            dns_rate_qps=get(dnsr, "qps"),
            dns_rate_lost=get(dnsr, "lost"),
            bulk_mbps=get(bulk, "recv_mbps"),
            bulk_lost_pct=get(bulk, "lost_percent"),
            bulk_rate_mbps=get(bulkr, "recv_mbps"),
            bulk_rate_lost=get(bulkr, "lost"),
            udp_loads={"dns": dns, "dns_rate": dnsr, "bulk": bulk, "bulk_rate": bulkr},
            machine_busy={k: get(r, "machine_busy") for k, r in (("dns", dns), ("dns_rate", dnsr), ("bulk", bulk))},
        )
        for load, r in (("saturated", dns), ("fixed-rate", dnsr)):
            if r is not None and r["noerror"] != r["completed"]:
                invalid = invalid or f"DNS {load} load: {r['completed'] - r['noerror']} answers were not NOERROR"
        if subj.is_proxy:
            figs["cpu_us_per_query"] = cdns / dns["completed"] * 1e6 if dns and dns["completed"] else None
            figs["cpu_us_per_datagram"] = cbulk / bulk["received"] * 1e6 if bulk and bulk["received"] else None
            figs["cpu_seconds"] = {
                name: {"total": round(c, 2), "user": r["cpu_user_s"], "sys": r["cpu_sys_s"]}
                for name, c, r in (("dns", cdns, dns), ("bulk", cbulk, bulk))
                if r is not None
            }
            if dns is not None and (not figs["cpu_us_per_query"] or figs["cpu_us_per_query"] < 0.5):
                invalid = invalid or "the DNS load did not go through the proxy (it spent no CPU)"
            if subj.proc is not None and subj.proc.poll() is not None:
                invalid = invalid or f"the proxy exited during the loads (status {subj.proc.returncode})"
    finally:
        _stop(subj, topo, args, figs)
    return figs, invalid


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round, short loads (under ~3 minutes)")
    p.add_argument("--json", type=Path, help="results file (default bench-results/bench-<timestamp>.json)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 4; --quick: 1)")
    p.add_argument("--duration", type=float, help="seconds per load (default 8; --quick: 3)")
    p.add_argument("--idle", type=int, help="idle connections held (default 10,000 or what the fd limit allows)")
    p.add_argument("--hold", type=float, help="seconds the idle connections are held (default 5; --quick: 2)")
    p.add_argument("--subjects", help="comma-separated subset, e.g. direct,haproxy,tproxy-original")
    p.add_argument(
        "--profile", type=Path, help="py-spy the tproxy subjects under keep-alive and new-conn loads into DIR"
    )
    p.add_argument(
        "--experiments",
        action="store_true",
        help="add tproxy-original variants: +gc (collector tuned by the probe), +nolog (log level warning)",
    )
    p.add_argument(
        "--census",
        action="store_true",
        help="tracemalloc in the tproxy subjects (slows them: figures are not comparable) and a census of Python"
        " objects per idle connection",
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="add the PROXY protocol subjects: lb-tproxy, lb-tproxy-pp-in (HAProxy in front, without and with"
        " send-proxy-v2), tproxy-original-pp-out (send_proxy_protocol to nginx); keep-alive and new-conn loads only",
    )
    p.add_argument(
        "--udp",
        action="store_true",
        help="the UDP run instead: direct, nginx (stream module) and tproxy-original under dnsperf (DNS-sized"
        " request/response, 100 client ports) and iperf3 -u -b 0 -l 1400, each saturated and at a fixed rate below",
    )
    p.add_argument(
        "--udp-fraction",
        type=float,
        default=0.5,
        help="the UDP fixed-rate loads run at this fraction of the subject's saturated rate (default 0.5)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs and logs)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.hold = args.hold or (2.0 if args.quick else 5.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    missing = [b for b in ("iperf3", "wrk", "haproxy", "nginx", "iptables-restore", "nft") if not shutil.which(b)]
    if args.udp:
        missing += [b for b in ("dnsperf", "dnsmasq", "gcc") if not shutil.which(b)]
        if not Path(NGINX_STREAM_MODULE).exists():
            missing.append("libnginx-mod-stream")
    if missing:
        print(f"bench: missing {', '.join(missing)} (run `just bench-deps`)", file=sys.stderr)
        return 2
    if args.profile:
        if profile.py_spy() is None:
            print("bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
    hard = raise_nofile()
    notes: list[str] = []
    # A proxy holds two sockets per relayed connection, and the hard RLIMIT_NOFILE cannot be raised here.
    fit = max(100, (hard - 1200) // 2 // 100 * 100)
    if args.idle is None:
        args.idle = min(2000 if args.quick else 10_000, fit)
        if args.idle < (2000 if args.quick else 10_000) and not args.udp:
            notes.append(
                f"idle connections capped at {args.idle:,}: the hard RLIMIT_NOFILE is {hard:,} (no CAP_SYS_RESOURCE "
                "to raise it) and a proxy holds two sockets per connection"
            )
    names = args.subjects.split(",") if args.subjects else None
    if args.udp:
        subjects, more = make_udp_subjects(names)
    else:
        subjects, more = make_subjects(names, args.experiments, args.proxy_protocol)
    if args.census:
        notes.append("--census: tracemalloc runs in the tproxy subjects, their figures are not comparable")
        for s in subjects:
            if isinstance(s, Tproxy):
                s.census = True
    notes += more
    started = dt.datetime.now(dt.UTC)
    out = args.json or REPO / "bench-results" / f"bench-{started:%Y%m%dT%H%M%SZ}.json"
    command = "python -m tests.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    what = "UDP loads" if args.udp else f"{args.idle:,} idle connections"
    print(
        f"bench: {len(subjects)} subjects × {args.rounds} round(s), {args.duration:g} s per load, {what};"
        f" results -> {out}"
    )
    for n in notes:
        print(f"  note: {n}")

    metrics = report.UDP_METRICS if args.udp else report.METRICS
    peer, peer_label = ("nginx", "nginx") if args.udp else ("haproxy", "HAProxy")
    shown = ("dns_qps", "dns_rate_lost", "bulk_mbps", "bulk_rate_lost") if args.udp else SHOWN
    run_one = run_udp_subject if args.udp else run_subject
    runs: dict[str, dict[str, list]] = {s.name: {} for s in subjects}
    details: dict[str, list] = {s.name: [] for s in subjects}
    invalid: dict[str, str] = {}
    failed: dict[str, list[str]] = {}  # rounds that raised: left out of the medians, reported
    workdir = Path(tempfile.mkdtemp(prefix="tpx-bench-"))
    t0 = time.monotonic()
    try:
        with T.topology(workdir, udp=args.udp) as topo:
            for rnd in range(args.rounds):
                args.round = rnd
                order = subjects[rnd % len(subjects) :] + subjects[: rnd % len(subjects)]
                for subj in order:
                    ts = time.monotonic()
                    try:
                        figs, bad = run_one(topo, subj, args)
                    except Exception as e:  # one round failing must not lose the other rounds' or subjects' figures
                        traceback.print_exc()
                        figs, bad = {"error": f"{type(e).__name__}: {e}"}, None
                        failed.setdefault(subj.name, []).append(f"round {rnd + 1}: {type(e).__name__}: {e}")
                    if bad:
                        invalid.setdefault(subj.name, bad)
                    details[subj.name].append(figs)
                    for m in metrics:
                        runs[subj.name].setdefault(m, []).append(figs.get(m))
                    short = ", ".join(f"{m}={report.fmt(figs.get(m))}" for m in shown)
                    print(
                        f"  round {rnd + 1} {subj.name:<22} {time.monotonic() - ts:5.1f} s  {short}"
                        + (f"  INVALID: {bad}" if bad else "")
                        + "".join(f"  FAILED {k}: {v}" for k, v in figs.get("load_errors", {}).items()),
                        flush=True,
                    )
                    for k, v in figs.get("load_errors", {}).items():
                        failed.setdefault(subj.name, []).append(f"round {rnd + 1} {k}: {v}")
    finally:
        if args.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = report.summarize(runs, peer=peer, metrics=metrics)
    names = [s.name for s in subjects]
    text = report.table(summary, names, invalid, peer=peer, peer_label=peer_label, metrics=metrics)
    checks = report.baseline_checks(runs)
    if checks:
        text += "\n\n" + report.baseline_table(checks, invalid)
    finished = dt.datetime.now(dt.UTC)
    versions = sorted({r.get("code", "?") for rs in details.values() for r in rs})
    print()
    print(text)
    print(f"tproxy code measured: {', '.join(versions)}" + ("  (CHANGED DURING THE RUN)" if len(versions) > 1 else ""))
    for s, why in invalid.items():
        print(f"INVALID {s}: {why}")
    for s, why in failed.items():
        print(f"FAILED ROUNDS OR LOADS {s} (left out of the medians): " + "; ".join(why))
    for s, rounds in details.items():
        gcs = [r["gc"] for r in rounds if r.get("gc")]
        if gcs:
            parts = []
            for g in ("0", "1", "2"):
                count = sum(x[g]["count"] for x in gcs)
                worst = max(x[g]["max_ms"] for x in gcs)
                over = sum(x[g]["over_1ms"] for x in gcs)
                parts.append(f"gen{g} {count:,} (max {worst:.1f} ms, {over} over 1 ms)")
            print(f"gc pauses {s} (whole process lifetimes): " + "; ".join(parts))
            by = [r.get("gc_pauses_by_load") for r in rounds if r.get("gc_pauses_by_load")]
            if by:
                loads_seen = list(by[0])
                print(
                    "  pauses over 2 ms during each load (all rounds: count, max): "
                    + ", ".join(
                        f"{ld} {sum(b[ld]['count'] for b in by if ld in b)}, "
                        f"{max((b[ld]['max_ms'] for b in by if ld in b), default=0):.0f} ms"
                        for ld in loads_seen
                    )
                )
    for s, rounds in details.items():
        for r in rounds:
            if r.get("census"):
                c = r["census"]
                print(
                    f"census {s}: {c['traced_bytes_per_conn'] / 1024:.1f} KiB traced Python memory per idle connection"
                )
                print(
                    "  objects per connection: " + ", ".join(f"{t} {n:.2f}" for t, n in c["objects_per_conn"].items())
                )
                for site, b in list(c["bytes_per_conn_by_site"].items())[:12]:
                    print(f"  {b:8.0f} B/conn  {site}")
                break
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "command": command,
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "idle_connections": args.idle,
            "hold_s": args.hold,
            "wrk": "-t1 -c32 --latency (new conn: -H 'Connection: close')",
            "client_ports": T.CLIENT_PORTS,
            "udp": args.udp,
            "udp_fraction": args.udp_fraction if args.udp else None,
            "dnsperf": "-c 100 -q 500 -t 2, bench.test A (fixed rate: -Q)" if args.udp else None,
            "iperf3_udp": "-u -b 0 -l 1400 (fixed rate: -b)" if args.udp else None,
        },
        "subjects": {s.name: s.describe() for s in subjects},
        "code": sorted({r.get("code", "?") for rs in details.values() for r in rs}),
        "notes": notes,
        "invalid": invalid,
        "failed_rounds": failed,
        "summary": summary,
        "baselines": checks,
        "rounds": details,
        "table": text,
        "finished": finished.isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.profile:
        for f in sorted(args.profile.glob("*.txt")):
            print()
            print(profile.summarize(f, top=12))
    print(f"\nbench: {time.monotonic() - t0:.0f} s; results written to {out}")
    return 1 if invalid or failed else 0
