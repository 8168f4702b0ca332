"""The loads, each bounded in time, run from the client namespace; parsers for the tools' output (pure functions).

Every load returns a flat dict of figures; the proxy's CPU seconds consumed during the load are added by the caller.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.bench import topology as T
from tests.bench.subjects import Subject, census_diff, cpu_times, rss_kib, take_census

HOLDER = Path(__file__).with_name("holder.py")

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_duration_ms(text: str) -> float:
    """wrk's latency figures ("512.00us", "1.23ms", "2.00s") in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Requests/sec, p50/p99 (ms), request count and errors from ``wrk --latency`` output."""
    res: dict = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise ValueError(f"wrk output without Requests/sec:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", out, re.M)
    res["requests"] = int(m.group(1)) if m else None
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = parse_duration_ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def parse_iperf(doc: dict) -> dict:
    end = doc["end"]
    recv = end["sum_received"]
    return {"gbps": recv["bits_per_second"] / 1e9, "bytes": int(recv["bytes"])}


def iperf(topo: T.Topology, streams: int, duration: float) -> dict:
    r = topo.client.run(
        ["iperf3", "-c", T.NODE_IP, "-p", str(T.IPERF_PORT), "-t", str(round(duration)), "-P", str(streams), "-J"],
        check=False,
        timeout=duration + 30,
    )
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 failed: {r.stderr.strip() or r.stdout[-500:]}") from None
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    return parse_iperf(doc)


def wrk(
    topo: T.Topology,
    duration: float,
    *,
    close: bool,
    connections: int = 32,
    target: tuple[str, int] = (T.NODE_IP, T.HTTP_PORT),
) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{target[0]}:{target[1]}/1k")
    r = topo.client.run(argv, check=False, timeout=duration + 30)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip()}")
    return parse_wrk(r.stdout)


def whoami(
    topo: T.Topology,
    count: int = 3,
    *,
    target: tuple[str, int] = (T.NODE_IP, T.HTTP_PORT),
    expect: str = T.CLIENT_IP,
) -> dict:
    """What the application sees: its ``/ip`` answer and its access log, for ``count`` fresh connections to
    ``target``; ``ok`` when both name ``expect`` every time."""
    log = topo.access_log
    before = log.stat().st_size if log.exists() else 0
    script = (
        "import http.client,sys\n"
        f"for _ in range({count}):\n"
        f"    c=http.client.HTTPConnection('{target[0]}',{target[1]},timeout=5);c.request('GET','/ip')\n"
        "    print(c.getresponse().read().decode().strip());c.close()\n"
    )
    r = topo.client.run([sys.executable, "-c", script], check=False, timeout=30)
    answers = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    logged: list[str] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if log.exists():
            with open(log) as f:
                f.seek(before)
                logged = [line.split()[0] for line in f if line.strip()]
        if len(logged) >= len(answers):
            break
        time.sleep(0.05)
    ok = len(answers) == count and all(a == expect for a in answers + logged) and len(logged) == count
    return {"ok": ok, "answers": answers, "logged": logged, "error": r.stderr.strip()[-300:] if not answers else ""}


def idle(topo: T.Topology, subject: Subject, n: int, hold: float, busy: float = 0) -> dict:
    """RSS of the proxy with ``n`` idle keep-alive connections held open through it, and whether all survive.

    With ``busy`` > 0, a keep-alive load of that many seconds runs while they are held: the tail latency of a proxy
    whose heap holds ``n`` connections (a garbage collector's full pass costs in proportion to it).
    """
    pids = subject.pids()
    census0 = take_census(subject)
    rss0 = rss_kib(pids)
    p = topo.client.popen(
        [sys.executable, str(HOLDER), T.NODE_IP, str(T.HTTP_PORT), str(n), "256"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line1 = p.stdout.readline()
        if not line1:
            raise RuntimeError("idle holder died in phase 1")
        ph1 = json.loads(line1)
        time.sleep(1.0)
        rss1 = rss_kib(subject.pids())
        time.sleep(max(0.0, hold - 1.0))
        rss2 = rss_kib(subject.pids())
        census1 = take_census(subject) if census0 else None
        loaded = wrk(topo, busy, close=False) if busy > 0 else None
        p.stdin.write("go\n")
        p.stdin.flush()
        line2 = p.stdout.readline()
        ph2 = json.loads(line2) if line2 else {"answered": 0, "lost": {"holder died": ph1["held"]}}
    finally:
        if p.poll() is None:
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    held = ph1["held"]
    res = {
        "idle_n": n,
        "idle_held": held,
        "idle_refused": n - held,
        "idle_open_failures": ph1["failed"],
        "idle_open_seconds": round(ph1["seconds"], 2),
        "idle_answered_after_hold": ph2["answered"],
        "idle_lost": held - ph2["answered"],
        "idle_lost_reasons": ph2["lost"],
    }
    if loaded is not None:
        res["ka_idle_rps"] = loaded["rps"]
        res["ka_idle_p99_ms"] = loaded["p99_ms"]
    if subject.is_proxy and held:
        res["rss_base_kib"] = rss0
        res["rss_held_kib"] = max(rss1, rss2)
        res["kib_per_idle_conn"] = (max(rss1, rss2) - rss0) / held
        if census0 and census1:
            res["census"] = census_diff(census0, census1, held)
    return res


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def cpu_during(subject: Subject, fn, *args, **kw) -> tuple[dict, float | None]:
    """Run a load; return its figures and the proxy's CPU seconds (utime+stime) spent meanwhile.

    The split is added to the figures as ``cpu_user_s`` and ``cpu_sys_s``, and how busy the whole machine was
    (all cores, every process: other users of the machine included) as ``machine_busy``.
    """
    pids = subject.pids() if subject.is_proxy else []
    b0, t0 = machine_busy()
    if not pids:
        res = fn(*args, **kw)
        b1, t1 = machine_busy()
        res["machine_busy"] = round((b1 - b0) / max(1, t1 - t0), 2)
        return res, None
    u0, s0 = cpu_times(pids)
    res = fn(*args, **kw)
    u1, s1 = cpu_times(pids)
    b1, t1 = machine_busy()
    res["machine_busy"] = round((b1 - b0) / max(1, t1 - t0), 2)
    res["cpu_user_s"], res["cpu_sys_s"] = round(u1 - u0, 2), round(s1 - s0, 2)
    return res, (u1 - u0) + (s1 - s0)


# ----------------------------------------------------------------------------------------------------------------
# UDP (--udp): dnsperf against dnsmasq, iperf3 -u, the query-log check


def parse_dnsperf(out: str) -> dict:
    """Queries sent, completed and lost, queries per second and the average latency (ms) from dnsperf's statistics.

    Error handling: ValueError when the output has no statistics (dnsperf failed before it ran)."""
    res: dict = {}
    for key, label in (("sent", "Queries sent"), ("completed", "Queries completed"), ("lost", "Queries lost")):
        m = re.search(rf"^\s*{label}:\s+(\d+)", out, re.M)
        if not m:
            raise ValueError(f"dnsperf output without {label!r}:\n{out[-1500:]}")
        res[key] = int(m.group(1))
    m = re.search(r"^\s*Queries per second:\s+([\d.]+)", out, re.M)
    if not m:
        raise ValueError(f"dnsperf output without 'Queries per second':\n{out[-1500:]}")
    res["qps"] = float(m.group(1))
    m = re.search(r"^\s*Average Latency \(s\):\s+([\d.]+)", out, re.M)
    res["avg_ms"] = float(m.group(1)) * 1e3 if m else None
    m = re.search(r"^\s*Response codes:\s+(.*)$", out, re.M)
    codes = dict(re.findall(r"([A-Z]+) (\d+)", m.group(1))) if m else {}
    res["noerror"] = int(codes.get("NOERROR", 0))
    return res


CLIENT_BUF_KIB = 4096  # dnsperf's socket buffers (-b, KiB; capped at net.core.rmem_max): its answers must not overflow


def dnsperf(
    topo: T.Topology, duration: float, *, clients: int = 100, outstanding: int = 500, rate: float | None = None
) -> dict:
    """dnsperf from the client namespace to dnsmasq (``bench.test A``): ``clients`` sockets (source ports), at most
    ``outstanding`` queries in flight; with ``rate``, at most that many queries per second (an open-loop load below
    saturation). A query unanswered after 2 s counts as lost."""
    qfile = topo.workdir / "dnsperf-queries.txt"
    if not qfile.exists():
        qfile.write_text(f"{T.DNS_NAME} A\n")
    argv = ["dnsperf", "-s", T.UDP_APP_IP, "-p", str(T.DNS_PORT), "-d", str(qfile), "-c", str(clients)]
    argv += ["-q", str(outstanding), "-l", str(round(duration)), "-t", "2", "-b", str(CLIENT_BUF_KIB)]
    if rate is not None:
        argv += ["-Q", str(round(rate))]
    r = topo.client.run(argv, check=False, timeout=duration + 30)
    return parse_dnsperf(r.stdout + r.stderr)


def parse_iperf_udp(doc: dict, length: int) -> dict:
    """An ``iperf3 -u -J`` client's result: datagrams sent, lost (the server's count), the rate the server received
    (Mb/s, from the datagrams that arrived), the sending rate and the loss in percent."""
    end = doc["end"]
    s = end["sum"]
    seconds = s["seconds"] or 1.0
    packets, lost = int(s["packets"]), int(s["lost_packets"])
    return {
        "packets": packets,
        "lost": lost,
        "received": packets - lost,
        "lost_percent": float(s["lost_percent"]),
        "sent_mbps": s["bits_per_second"] / 1e6,
        "recv_mbps": (packets - lost) * length * 8 / seconds / 1e6,
    }


def iperf_udp(topo: T.Topology, duration: float, *, rate_mbps: float | None = None, length: int = 1400) -> dict:
    """``iperf3 -u -l LENGTH`` from the client namespace to a UDP iperf3 server: ``-b 0`` (as fast as the client
    can send) or ``rate_mbps`` (to the other server, :data:`~tests.bench.topology.UDP_IPERF_RATE_PORT`)."""
    rate = "0" if rate_mbps is None else f"{rate_mbps:.1f}M"
    port = T.UDP_IPERF_PORT if rate_mbps is None else T.UDP_IPERF_RATE_PORT
    argv = ["iperf3", "-c", T.UDP_APP_IP, "-p", str(port), "-u", "-b", rate, "-l", str(length)]
    argv += ["-t", str(round(duration)), "-J"]
    r = topo.client.run(argv, check=False, timeout=duration + 30)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 -u failed: {r.stderr.strip() or r.stdout[-500:]}") from None
    if "error" in doc:
        raise RuntimeError(f"iperf3 -u: {doc['error']}")
    return parse_iperf_udp(doc, length)


def parse_dnsmasq_log(text: str, name: str = T.DNS_NAME) -> list[tuple[str, int]]:
    """The clients (address, port) of the ``A`` queries for ``name`` in a ``--log-queries=extra`` log, in order."""
    out = []
    for m in re.finditer(rf"^.*?\s(\S+)/(\d+) query\[A\] {re.escape(name)} from \S+$", text, re.M):
        out.append((m.group(1), int(m.group(2))))
    return out


DNS_CHECK = r"""
import json, socket, struct, sys
ip, port, name, answer, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((ip, port))  # connected: an answer from any other source than ip:port is not accepted
    res = {"port": s.getsockname()[1], "ok": False}
    try:
        s.send(struct.pack("!HHHHHH", 0x4242 + i, 0x0100, 1, 0, 0, 0) + q)
        data = s.recv(4096)
        res["ok"] = data[:2] == struct.pack("!H", 0x4242 + i) and socket.inet_aton(answer) in data
    except OSError as e:
        res["error"] = str(e)
    print(json.dumps(res), flush=True)
    s.close()
"""


def dns_check(topo: T.Topology, *, through_proxy: bool, count: int = 3) -> dict:
    """``count`` queries from fresh *connected* sockets to the logging dnsmasq; ``ok`` when every one was answered
    (so the answer came from the address and port the client wrote to), the query log names the client's own address
    for each, and the port it names is the client's own (``through_proxy`` false: nothing in between) or another one
    (true: a proxy's upstream leg, so the datagrams went through the proxy and not straight to the application)."""
    log = topo.dns_log
    before = log.stat().st_size if log.exists() else 0
    argv = [sys.executable, "-c", DNS_CHECK, T.UDP_APP_IP, str(T.DNS_CHECK_PORT), T.DNS_NAME, T.DNS_ANSWER, str(count)]
    r = topo.client.run(argv, check=False, timeout=30)
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    logged: list[tuple[str, int]] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if log.exists():
            with open(log) as f:
                f.seek(before)
                logged = parse_dnsmasq_log(f.read())
        if len(logged) >= count:
            break
        time.sleep(0.05)
    ports = [a["port"] for a in answers]
    ok = len(answers) == count and all(a["ok"] for a in answers) and len(logged) == count
    ok = ok and all(ip == T.CLIENT_IP for ip, _ in logged)
    same_port = [lp == p for (_, lp), p in zip(logged, ports, strict=False)]
    ok = ok and (not any(same_port) if through_proxy else all(same_port))
    return {"ok": ok, "answers": answers, "logged": logged, "error": r.stderr.strip()[-300:]}
