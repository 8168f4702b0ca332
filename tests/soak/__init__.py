"""The soak (issue 18): mixed load through the real proxy in the lab for N minutes; nothing lost, nothing leaking.

``python -m tests.soak [--minutes N] [--relay shared|tasks] [--out DIR]`` (``just soak``), root. In the lab's client
namespace, from this process (trio; sockets made in the namespace by :mod:`tests.nsclient`):

- 2,000 idle connections opened first and held throughout; each must still echo at the end;
- keep-alive workers: request/echo exchanges of 1-16 KiB on long-lived connections, every reply compared;
- new-connection workers: connect, send 1 KiB, end, read the echo to EOF (IPv4 and IPv6 alternately);
- bulk workers: 4-32 MiB each way, SHA-256 of what was sent and what came back compared;
- every 30 s a reload (SIGHUP after editing the config file) that alternately adds and removes port 9090 from the
  intercepted ports, checked by a probe: the application sees another source port exactly when it is intercepted.

Every 10 s a sample: the proxy's open fds (and pipes among them), RSS, and its counters from /metrics; printed as a
table row and written to ``soak.csv``; ``soak.png`` plots fds, RSS and open connections over time.

Pass when (:func:`verdict`): no failed exchange, connection or probe; every held connection alive at the end; after
the warm-up (the first 2 minutes, or the first third of a shorter run) fds grew by at most ``FD_GROWTH`` and RSS by
less than ``RSS_GROWTH`` (median of the last 3 samples against the first 3 after warm-up); the counters never went
down; ``accepted = closed + open`` in every sample. Every loop is bounded by the run's deadline (and a count).
"""

from __future__ import annotations

import csv
import hashlib
import random
import signal
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from tests import nsclient as NS
from tproxy import lab as L

IDLE_CONNECTIONS = 2000
KEEPALIVE_WORKERS = 8
NEW_CONN_WORKERS = 4
BULK_WORKERS = 2
SAMPLE_EVERY = 10.0
RELOAD_EVERY = 30.0
TOGGLED_PORT = L.DIRECT_PORT  # 9090: the application echoes there; intercepted only in every other reload
FD_GROWTH = 40  # fds: ~1% of the ~4,000 the held connections need; the pipe pool may grow by up to 128 in warm-up
RSS_GROWTH = 0.05
MAX_LOOPS = 10_000_000  # a bound on every worker loop besides the deadline
COLUMNS = (
    "t_s",
    "fds",
    "pipes",
    "rss_kib",
    "open",
    "accepted",
    "closed",
    "bytes",
    "keepalive_reqs",
    "new_conns",
    "bulk_mib",
    "reloads",
    "failures",
)


@attrs.define
class Soak:
    lab: L.Lab
    proxy: L.Proxy
    minutes: float
    out: Path
    relay: str
    idle: int = IDLE_CONNECTIONS
    failures: list[str] = attrs.Factory(list)
    samples: list[dict[str, Any]] = attrs.Factory(list)
    keepalive_reqs: int = 0
    new_conns: int = 0
    bulk_bytes: int = 0
    reloads: int = 0
    t0: float = 0.0
    deadline: float = 0.0

    def fail(self, what: str, e: BaseException | str) -> None:
        msg = f"{time.monotonic() - self.t0:7.1f}s {what}: {e!r}" if not isinstance(e, str) else f"{what}: {e}"
        self.failures.append(msg)
        if len(self.failures) <= 20:
            print("FAILURE", msg, flush=True)

    # -- connections

    async def open(self, port: int, family: int = 4) -> tuple[trio.SocketStream, tuple[str, int], bytes]:
        """A connection from the client namespace, after the application's PEER line: (stream, peer, leftover)."""
        s = NS.socket_in(self.lab.client, socket.AF_INET6 if family == 6 else socket.AF_INET)
        ts = trio.socket.from_stdlib_socket(s)
        try:
            with trio.fail_after(30):
                await ts.connect((L.NODE[family], port))
                stream = trio.SocketStream(ts)
                buf = b""
                while b"\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        raise ConnectionError(f"EOF before the PEER line ({buf!r})")
                    buf += chunk
        except BaseException:
            ts.close()
            raise
        line, _, rest = buf.partition(b"\n")
        _, ip, p = line.decode().split()
        return stream, (ip, int(p)), rest

    @staticmethod
    async def read_exact(stream: trio.SocketStream, n: int, have: bytes = b"") -> bytes:
        buf = bytearray(have)
        while len(buf) < n:
            chunk = await stream.receive_some(max(65536, n - len(buf)))
            if not chunk:
                raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    # -- the loads

    async def hold(self, streams: list, i: int) -> None:
        stream, _, rest = await self.open(L.ECHO_PORT, 4 if i % 2 else 6)
        await stream.send_all(b"x")
        if await self.read_exact(stream, 1, rest) != b"x":
            raise ConnectionError("wrong echo")
        streams.append(stream)

    async def check_held(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(30):
                await stream.send_all(b"y")
                if await self.read_exact(stream, 1) != b"y":
                    raise ConnectionError("wrong echo")
        except Exception as e:
            self.fail("held connection", e)
        finally:
            await stream.aclose()

    async def keepalive(self, k: int) -> None:
        rng = random.Random(k)
        n = 0
        while time.monotonic() < self.deadline and n < MAX_LOOPS:
            try:
                stream, _, rest = await self.open(L.ECHO_PORT, 4 if k % 2 else 6)
                async with stream:
                    while time.monotonic() < self.deadline and n < MAX_LOOPS:
                        data = rng.randbytes(rng.randint(1, 16384))
                        with trio.fail_after(30):
                            await stream.send_all(data)
                            got = await self.read_exact(stream, len(data), rest)
                        rest = b""
                        if got != data:
                            self.fail(f"keep-alive {k}", "reply differs from the request")
                            break
                        n += 1
                        self.keepalive_reqs += 1
                        await trio.sleep(0.01)
            except Exception as e:
                self.fail(f"keep-alive {k}", e)
                await trio.sleep(1)

    async def new_connections(self, k: int) -> None:
        n = 0
        while time.monotonic() < self.deadline and n < MAX_LOOPS:
            n += 1
            data = random.Random(n * 31 + k).randbytes(1024)
            try:
                with trio.fail_after(30):
                    stream, _, rest = await self.open(L.ECHO_PORT, 4 if n % 2 else 6)
                    async with stream:
                        await stream.send_all(data)
                        await stream.send_eof()
                        got = bytearray(rest)
                        while chunk := await stream.receive_some(65536):
                            got += chunk
                if bytes(got) != data:
                    self.fail(f"new connection {k}", f"echo of {len(got)} bytes differs")
                self.new_conns += 1
            except Exception as e:
                self.fail(f"new connection {k}", e)
                await trio.sleep(1)
            await trio.sleep(0.005)

    async def bulk(self, k: int) -> None:
        rng = random.Random(1000 + k)
        n = 0
        while time.monotonic() < self.deadline and n < MAX_LOOPS:
            n += 1
            size = rng.randint(4 << 20, 32 << 20)
            seed = rng.randrange(1 << 30)
            try:
                with trio.fail_after(300):
                    received, same = await self.bulk_once(size, seed, 4 if n % 2 else 6)
                if received != size or not same:
                    self.fail(f"bulk {k}", f"{received} of {size} bytes back, SHA-256 equal: {same}")
                self.bulk_bytes += size
            except Exception as e:
                self.fail(f"bulk {k}", e)
            await trio.sleep(1)

    async def bulk_once(self, size: int, seed: int, family: int) -> tuple[int, bool]:
        """One bulk echo of ``size`` random bytes: (bytes that came back, whether their SHA-256 is the one sent)."""
        sent, got = hashlib.sha256(), hashlib.sha256()
        received = 0
        stream, _, rest = await self.open(L.ECHO_PORT, family)

        async def send() -> None:
            src = random.Random(seed)
            left = size
            while left:
                chunk = src.randbytes(min(left, 262144))
                sent.update(chunk)
                await stream.send_all(chunk)
                left -= len(chunk)
            await stream.send_eof()

        async def receive() -> None:
            nonlocal received
            got.update(rest)
            received = len(rest)
            while chunk := await stream.receive_some(262144):
                got.update(chunk)
                received += len(chunk)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        return received, got.digest() == sent.digest()

    # -- reloads and samples

    def config_text(self, with_toggled: bool) -> str:
        text = L.proxy_config("tproxy", "nftables", relay=self.relay, log_level="warning")
        if with_toggled:
            text = text.replace(f'ports = ["{L.INTERCEPT_PORTS}"]', f'ports = ["{L.INTERCEPT_PORTS}", {TOGGLED_PORT}]')
        return text

    async def probe(self) -> bool:
        """Whether a connection to the toggled port goes through the proxy (the application sees another port)."""
        stream, peer, _ = await self.open(TOGGLED_PORT, 4)
        src = stream.socket.getsockname()
        await stream.aclose()
        return peer[1] != src[1]

    async def reloader(self) -> None:
        on = False
        while time.monotonic() + RELOAD_EVERY < self.deadline:
            await trio.sleep(RELOAD_EVERY)
            on = not on
            self.proxy.config_path.write_text(self.config_text(on))
            self.proxy.proc.send_signal(signal.SIGHUP)
            self.reloads += 1
            end = time.monotonic() + 15
            try:
                while await self.probe() != on:
                    if time.monotonic() > end:
                        self.fail("reload", f"port {TOGGLED_PORT} {'not ' if on else ''}intercepted 15 s after SIGHUP")
                        break
                    await trio.sleep(0.2)
            except Exception as e:
                self.fail("reload probe", e)

    async def sample(self) -> dict[str, Any]:
        m = await trio.to_thread.run_sync(NS.metrics, self.lab.node)
        kinds = NS.fd_kinds(self.proxy.pid)
        row = {
            "t_s": round(time.monotonic() - self.t0, 1),
            "fds": sum(kinds.values()),
            "pipes": kinds["pipe"],
            "rss_kib": NS.rss_kib(self.proxy.pid),
            "open": int(m["tproxy_connections_open"]),
            "accepted": int(m["tproxy_connections_accepted_total"]),
            "closed": int(NS.closed_total(m)),
            "bytes": int(sum(v for k, v in m.items() if k.startswith("tproxy_bytes_relayed_total{"))),
            "keepalive_reqs": self.keepalive_reqs,
            "new_conns": self.new_conns,
            "bulk_mib": self.bulk_bytes >> 20,
            "reloads": self.reloads,
            "failures": len(self.failures),
        }
        return row

    async def sampler(self, writer: Callable[[dict[str, Any]], None]) -> None:
        while True:
            try:
                row = await self.sample()
            except Exception as e:
                self.fail("sample", e)
            else:
                self.samples.append(row)
                writer(row)
            if time.monotonic() + SAMPLE_EVERY > self.deadline + 1:
                return
            await trio.sleep(SAMPLE_EVERY)

    async def run(self) -> None:
        print(f"soak: opening {self.idle} idle connections ...", flush=True)
        held: list = []
        limiter = trio.CapacityLimiter(100)

        async def hold_one(i: int) -> None:
            async with limiter:
                try:
                    await self.hold(held, i)
                except Exception as e:
                    self.fail(f"idle connection {i}", e)

        async with trio.open_nursery() as nursery:
            for i in range(self.idle):
                nursery.start_soon(hold_one, i)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.minutes * 60
        csv_path = self.out / "soak.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            print("  ".join(f"{c:>9}" for c in COLUMNS), flush=True)

            def write(row: dict[str, Any]) -> None:
                w.writerow(row)
                f.flush()
                print("  ".join(f"{row[c]:>9}" for c in COLUMNS), flush=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.sampler, write)
                nursery.start_soon(self.reloader)
                for k in range(KEEPALIVE_WORKERS):
                    nursery.start_soon(self.keepalive, k)
                for k in range(NEW_CONN_WORKERS):
                    nursery.start_soon(self.new_connections, k)
                for k in range(BULK_WORKERS):
                    nursery.start_soon(self.bulk, k)
        if len(held) != self.idle:
            self.fail("idle connections", f"only {len(held)} of {self.idle} opened")
        async with trio.open_nursery() as nursery:
            for stream in held:
                nursery.start_soon(self.check_held, stream)


def verdict(samples: list[dict[str, Any]], failures: list[str], minutes: float) -> list[str]:
    """What failed the pass criteria (empty: passed)."""
    bad = [f"{len(failures)} failures, first: {failures[0]}"] if failures else []
    if len(samples) < 4:
        return [*bad, f"only {len(samples)} samples"]
    for a, b in zip(samples, samples[1:], strict=False):
        for c in ("accepted", "closed", "bytes"):
            if b[c] < a[c]:
                bad.append(f"{c} went down: {a[c]} at {a['t_s']}s, {b[c]} at {b['t_s']}s")
    for s in samples:
        if s["accepted"] != s["closed"] + s["open"]:
            bad.append(f"at {s['t_s']}s accepted {s['accepted']} != closed {s['closed']} + open {s['open']}")
    warm = min(120.0, minutes * 60 / 3)
    after = [s for s in samples if s["t_s"] >= warm]
    if len(after) >= 4:
        first, last = after[:3], after[-3:]
        fd0, fd1 = statistics.median(s["fds"] for s in first), statistics.median(s["fds"] for s in last)
        rss0, rss1 = statistics.median(s["rss_kib"] for s in first), statistics.median(s["rss_kib"] for s in last)
        if fd1 - fd0 > FD_GROWTH:
            bad.append(f"fds grew from {fd0} to {fd1} after warm-up (limit +{FD_GROWTH})")
        if rss1 > rss0 * (1 + RSS_GROWTH):
            bad.append(f"RSS grew from {rss0} KiB to {rss1} KiB after warm-up (limit +{RSS_GROWTH:.0%})")
    else:
        bad.append(f"only {len(after)} samples after the warm-up")
    return bad


def plot(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    for ax, key, label, scale in (
        (axes[0], "fds", "open fds", 1),
        (axes[1], "rss_kib", "RSS (MiB)", 1024),
        (axes[2], "open", "open connections", 1),
    ):
        ax.plot(t, [s[key] / scale for s in samples], marker=".", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        lo, hi = min(s[key] / scale for s in samples), max(s[key] / scale for s in samples)
        ax.set_ylim(lo * 0.9, hi * 1.1 + 1)
    axes[-1].set_xlabel("minutes")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def soak(minutes: float, *, relay: str = "shared", out: Path, idle: int = IDLE_CONNECTIONS) -> tuple[Soak, list[str]]:
    """Run the soak in a lab of its own; returns it and what failed (empty: passed). Writes soak.csv and soak.png."""
    out.mkdir(parents=True, exist_ok=True)
    with L.Lab.up() as lab:
        try:
            # client ports away from the proxy's upstream range (1024-32767), TIME_WAIT reused: the new-connection
            # workers open tens of thousands
            for sysctl in ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=32768 65000"):
                lab.client.run(["sysctl", "-qw", sysctl])
            s = Soak(lab=lab, proxy=None, minutes=minutes, out=out, relay=relay, idle=idle)  # type: ignore[arg-type]
            s.proxy = lab.start_proxy(s.config_text(False))
            trio.run(s.run)
            if s.proxy.proc.poll() is not None:
                s.fail("proxy", f"exited with {s.proxy.proc.returncode}")
            bad = verdict(s.samples, s.failures, minutes)
            if s.samples:
                plot(s.samples, out / "soak.png", f"soak: {minutes:g} min, relay = {relay!r}, {idle} idle connections")
            code = s.proxy.stop()
            if code != 0:
                bad.append(f"the proxy exited with {code} on SIGTERM")
            (out / "proxy.log").write_text(s.proxy.log()[-200_000:])
        finally:
            NS.forget(lab.client)
            NS.forget(lab.node)
    return s, bad
