"""The lab: a client and a node in network namespaces, an application that says whom it saw, and the real proxy.

Used by ``tproxy demo`` and by the end-to-end tests. Three pieces:

- :class:`Lab` builds the topology: two fresh namespaces (``tpx-cli-…``, ``tpx-node-…``, unique per run, see
  :mod:`tproxy.netns`) joined by a veth pair, with IPv4 in 198.18.0.0/15 and IPv6 in fd00::/8 (``nodad``, usable at
  once), and starts the application in the node namespace.
- The application (``python -m tproxy.lab app``) listens on a few TCP ports, IPv4 and IPv6. On every connection it
  first writes one line naming the peer it saw (``PEER 198.18.0.1 34567\\n``), then behaves as the port's *kind* says:
  ``echo`` echoes until EOF; ``eof`` reads until EOF and only then answers (the echo of everything it read);
  ``close`` closes at once, so the server side closes first.
- The client (``python -m tproxy.lab client``) runs inside the client namespace, reads a JSON job description on stdin
  (many connections per process: the tests open thousands), and prints one JSON result per connection.

Resource handling: :meth:`Lab.up` deletes both namespaces (and so every interface, rule and route in them, and every
process still inside) when the block ends, however it ends, SIGTERM included. Proxies started with
:meth:`Lab.start_proxy` are stopped by PID in the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from tproxy.netns import Netns, unique_name

CLIENT = {4: "198.18.0.1", 6: "fd00:18::1"}
NODE = {4: "198.18.0.2", 6: "fd00:18::2"}
# A second client address, listed in intercept.exclude_cidrs of lab configs: connections from it are never diverted.
EXCLUDED_CLIENT = {4: "198.18.0.11", 6: "fd00:18::11"}
PREFIX = {4: 24, 6: 64}

LISTENER_PORT = 4143
ADMIN = ("127.0.0.1", 4191)
# Application ports. 8080-8090 are intercepted (8090 excluded), 9090 is not; nothing listens on DOWN_PORT.
ECHO_PORT = 8080
EOF_PORT = 8081
CLOSE_PORT = 8082
DOWN_PORT = 8083
EXCLUDED_PORT = 8090
DIRECT_PORT = 9090
APP_PORTS = {ECHO_PORT: "echo", EOF_PORT: "eof", CLOSE_PORT: "close", EXCLUDED_PORT: "echo", DIRECT_PORT: "echo"}
INTERCEPT_PORTS = "8080-8090"

_READY_LINE = "APP READY"


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "tproxy.lab", *args]


# ---------------------------------------------------------------------------------------------------------------
# Configs for the proxy in the lab


def proxy_config(
    mode: str,
    backend: str,
    *,
    preserve_source: bool | None = None,
    upstream: str = "original",
    log_level: str = "info",
    shutdown_grace: float = 2.0,
    connect_timeout: float = 30.0,
    proxy_protocol: str = "off",
    proxy_protocol_from: Sequence[str] = (),
    proxy_protocol_timeout: float | None = None,
    send_proxy_protocol: str = "off",
    relay: str = "shared",
) -> str:
    """TOML text of a lab config: ports 8080-8090 intercepted (8090 excluded), the excluded client addresses."""
    lines = [
        f'mode = "{mode}"',
        f'backend = "{backend}"',
        "",
        "[listener]",
        'address = "0.0.0.0"',
        f"port = {LISTENER_PORT}",
    ]
    if proxy_protocol != "off":
        lines += [
            f'proxy_protocol = "{proxy_protocol}"',
            "proxy_protocol_from = [" + ", ".join(f'"{c}"' for c in proxy_protocol_from) + "]",
        ]
    if proxy_protocol_timeout is not None:
        lines.append(f"proxy_protocol_timeout = {proxy_protocol_timeout}")
    lines += [
        "",
        "[intercept]",
        f'ports = ["{INTERCEPT_PORTS}"]',
        f"exclude_ports = [{EXCLUDED_PORT}]",
        f'exclude_cidrs = ["{EXCLUDED_CLIENT[4]}/32", "{EXCLUDED_CLIENT[6]}/128"]',
        "ipv4 = true",
        "ipv6 = true",
        "",
        "[proxy]",
        f'upstream = "{upstream}"',
        f"connect_timeout = {connect_timeout}",
        f"shutdown_grace = {shutdown_grace}",
        f'relay = "{relay}"',
    ]
    if send_proxy_protocol != "off":
        lines.append(f'send_proxy_protocol = "{send_proxy_protocol}"')
    if preserve_source is not None:
        lines.append(f"preserve_source = {'true' if preserve_source else 'false'}")
    lines += ["", "[admin]", f'address = "{ADMIN[0]}:{ADMIN[1]}"', "", "[log]", f'level = "{log_level}"', ""]
    return "\n".join(lines)


def expected_peer_ip(mode: str, preserve_source: bool | None, family: int, *, upstream: str = "original") -> str:
    """The address the application should see for a connection from :data:`CLIENT` through the proxy."""
    keeps = preserve_source if preserve_source is not None else mode == "tproxy"
    if keeps:
        return CLIENT[family]
    if upstream == "loopback":
        return "127.0.0.1" if family == 4 else "::1"
    return NODE[family]


# ---------------------------------------------------------------------------------------------------------------
# The topology


@attrs.define
class Proxy:
    """A ``tproxy run`` process inside the node namespace; its output (stdout and stderr) goes to ``log_path``."""

    proc: subprocess.Popen
    config_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` (by PID) and wait; SIGKILL if it has not exited after ``timeout``. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@attrs.define
class Lab:
    """A client namespace and a node namespace on one veth link, and the application running in the node."""

    client: Netns
    node: Netns
    workdir: Path
    app: subprocess.Popen | None = None
    proxies: list[Proxy] = attrs.Factory(list)

    # -- building and tearing down

    @classmethod
    @contextlib.contextmanager
    def up(cls, *, app: bool = True, keep: bool = False) -> Iterator[Lab]:
        """Build the lab and yield it; tear it all down when the block ends (unless ``keep`` and no error)."""
        lab = cls.create(app=app)
        ok = False
        try:
            with _sigterm_as_interrupt():
                yield lab
            ok = True
        finally:
            if not (keep and ok):
                lab.destroy()

    @classmethod
    def create(cls, *, app: bool = True) -> Lab:
        client, node = Netns(unique_name("cli")), Netns(unique_name("node"))
        workdir = Path(tempfile.mkdtemp(prefix="tpx-lab-"))
        lab = cls(client=client, node=node, workdir=workdir)
        try:
            lab._build()
            if app:
                lab.start_app()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _build(self) -> None:
        for ns in (self.client, self.node):
            subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
            ns.run(["ip", "link", "set", "lo", "up"])
        self.client.run(
            ["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", self.node.name]
        )
        for ns in (self.client, self.node):
            # no duplicate address detection, link-local included: every address and route is there at once
            ns.run(["sysctl", "-qw", "net.ipv6.conf.veth0.accept_dad=0"])
        for ns, addrs, extra in ((self.client, CLIENT, EXCLUDED_CLIENT), (self.node, NODE, None)):
            for fam in (4, 6):
                for a in (addrs[fam], *((extra[fam],) if extra else ())):
                    cmd = ["ip", "addr", "add", f"{a}/{PREFIX[fam]}", "dev", "veth0"]
                    if fam == 6:
                        cmd.append("nodad")
                        if a != addrs[fam]:  # deprecated: used only when a client binds it explicitly
                            cmd += ["preferred_lft", "0"]
                    ns.run(cmd)
            ns.run(["ip", "link", "set", "veth0", "up"])
        self._wait_settled()

    def _wait_settled(self, timeout: float = 10.0) -> None:
        """Wait until the kernel has finished setting up the link by itself, so that "before" snapshots are final.

        The veth's carrier comes up a moment after ``ip link set up`` (the kernel's link watch runs deferred); only
        then are the IPv4 routes no longer ``linkdown`` and the IPv6 link-local address, its routes and the multicast
        route added. Measured here: none of them were there yet when the last ``ip`` command returned.

        Error handling: raises RuntimeError naming the namespace when the link has not settled after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        for ns in (self.client, self.node):
            while True:
                v4 = ns.run(["ip", "-4", "route", "show", "dev", "veth0"]).stdout
                v6 = ns.run(["ip", "-6", "route", "show", "table", "all", "dev", "veth0"]).stdout
                if v4.strip() and "linkdown" not in v4 and "local fe80::" in v6 and "multicast ff00::/8" in v6:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"veth0 in {ns.name} did not come up within {timeout}s:\n{v4}{v6}")
                time.sleep(0.02)

    def destroy(self) -> None:
        for p in self.proxies:
            with contextlib.suppress(Exception):
                p.stop(signal.SIGKILL, timeout=10)
        self.stop_app()
        for ns in (self.client, self.node):
            ns.delete()
        for f in self.workdir.glob("*"):
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            self.workdir.rmdir()

    # -- the application

    def start_app(self, ports: dict[int, str] | None = None, *, log: Path | None = None) -> None:
        """Start the application in the node namespace and wait until it listens on every port; with ``log``, it
        appends a line per connection there (peer ip, port, local ip, port)."""
        ports = APP_PORTS if ports is None else ports
        args = [f"--port={p}:{kind}" for p, kind in ports.items()] + ([f"--log={log}"] if log else [])
        err_path = self.workdir / "app.err"
        with open(err_path, "ab") as err:
            self.app = self.node.popen(
                _python("app", *args),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        line = self.app.stdout.readline().strip()
        if line != _READY_LINE:
            self.stop_app()
            raise RuntimeError(f"the lab application did not start: {err_path.read_text(errors='replace')[-2000:]}")

    def stop_app(self) -> None:
        if self.app is not None and self.app.poll() is None:
            self.app.kill()
            self.app.wait()
        self.app = None

    # -- the proxy

    def write_config(self, text: str, name: str = "tproxy.toml") -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start_proxy(self, config: str | Path, *, extra: Sequence[str] = (), wait: bool = True) -> Proxy:
        """Run ``tproxy run -c CONFIG`` in the node namespace; with ``wait``, return once /ready says ready.

        ``config`` is TOML text (written to the lab's directory) or a path.
        """
        path = config if isinstance(config, Path) else self.write_config(config, f"tproxy-{len(self.proxies)}.toml")
        log_path = self.workdir / f"proxy-{len(self.proxies)}.log"
        with open(log_path, "wb") as out:
            cmd = [sys.executable, "-m", "tproxy", "run", "-c", str(path), *extra]
            proc = self.node.popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        proxy = Proxy(proc=proc, config_path=path, log_path=log_path)
        self.proxies.append(proxy)
        if wait:
            self.wait_ready(proxy)
        return proxy

    def wait_ready(self, proxy: Proxy, timeout: float = 30) -> None:
        """Poll the admin endpoint's /ready inside the node namespace until it answers 200.

        Error handling: raises RuntimeError with the proxy's output if it exits first or is not ready in time.
        """
        r = self.node.run(_python("wait-ready", f"--pid={proxy.pid}", f"--timeout={timeout}"), check=False)
        if r.returncode != 0:
            proxy.stop(signal.SIGKILL, timeout=10)
            raise RuntimeError(f"tproxy run did not become ready: {r.stdout.strip()}\n--- its output:\n{proxy.log()}")

    def tproxy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``tproxy`` command (``rules remove -c …``) in the node namespace."""
        return self.node.run([sys.executable, "-m", "tproxy", *args], check=check)

    # -- clients

    def connect(self, jobs: dict[str, Any] | list[dict[str, Any]], *, timeout: float = 300) -> list[dict[str, Any]]:
        """Run the batch client in the client namespace (see :func:`client_main` for the job keys)."""
        jobs = [jobs] if isinstance(jobs, dict) else jobs
        r = self.client.run(_python("client"), input=json.dumps(jobs), timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"lab client failed ({r.returncode}): {r.stderr.strip()}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    # -- state of the node namespace

    def snapshot(self) -> str:
        """Every rule, policy-routing rule and route of the node namespace, as text, for before/after comparisons.

        Normalised only where the output varies by itself: iptables-save's timestamp comments, and packet/byte
        counters (iptables-save's and nft's).
        """
        parts = []
        cmds = [
            ["nft", "list", "ruleset"],
            ["iptables-save"],
            ["ip6tables-save"],
            ["ip", "-4", "rule"],
            ["ip", "-6", "rule"],
            ["ip", "-4", "route", "show", "table", "all"],
            ["ip", "-6", "route", "show", "table", "all"],
        ]
        for cmd in cmds:
            r = self.node.run(cmd, check=False)
            out = "\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("#"))
            out = re.sub(r"\[\d+:\d+\]", "[-:-]", out)
            out = re.sub(r"counter packets \d+ bytes \d+", "counter packets - bytes -", out)
            parts.append(f"$ {' '.join(cmd)}\n{out}\n{r.stderr}")
        return "\n".join(parts)

    def describe(self) -> str:
        """How to look around a lab left up by ``--keep``, and how to delete it."""
        pids = " ".join(str(p) for p in [*(x.pid for x in self.proxies if x.proc.poll() is None)] + self._app_pid())
        py = sys.executable
        return "\n".join(
            [
                f"client namespace: {self.client.name}  ({CLIENT[4]}, {CLIENT[6]})",
                f"node namespace:   {self.node.name}  ({NODE[4]}, {NODE[6]}): application on ports "
                + ", ".join(f"{p} ({k})" for p, k in APP_PORTS.items()),
                "",
                f"  ip netns exec {self.node.name} bash          # a shell on the node (nft list ruleset, ss -tn, ...)",
                f"  ip netns exec {self.client.name} {py} -m tproxy.lab say {NODE[4]} {ECHO_PORT} hello",
                "",
                "to delete it:",
                (f"  kill {pids}; " if pids else "  ")
                + f"ip netns delete {self.client.name}; ip netns delete {self.node.name}; rm -r {self.workdir}",
            ]
        )

    def _app_pid(self) -> list[int]:
        return [self.app.pid] if self.app is not None and self.app.poll() is None else []


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so ``finally`` clauses run (main thread only)."""
    try:
        old = signal.getsignal(signal.SIGTERM)
        if old not in (signal.SIG_DFL, None):
            yield
            return

        def handler(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def proxy_log_names(log: str, ip: str, port: int) -> list[str]:
    """The lines of a proxy's output whose ``client`` field is ``ip``:``port``: ``client=198.18.0.1:34567`` or
    ``client=[fd00:18::1]:34567`` (text), ``"client":"198.18.0.1:34567"`` (JSON). The same pair in another field
    (``upstream_src`` keeps the client's IP) does not count."""
    where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    pair = re.compile(rf"(?:\bclient=|\"client\":\s*\"){re.escape(where)}(?![0-9])")
    return [ln for ln in log.splitlines() if pair.search(ln)]


def proxy_log_names_upstream(log: str, client_ip: str, upstream: tuple[str, int]) -> list[str]:
    """The lines of a proxy's output for a connection from ``client_ip`` whose upstream leg left from ``upstream``
    (``upstream_src``, the address the application saw): the same connection as far as the application can tell,
    whatever client port the proxy saw (in nat mode conntrack may have rewritten it)."""
    ip, port = upstream
    where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    cip = f"[{client_ip}]" if ":" in client_ip else client_ip
    up = re.compile(rf"(?:\bupstream_src=|\"upstream_src\":\s*\"){re.escape(where)}(?![0-9])")
    client = re.compile(rf"(?:\bclient=|\"client\":\s*\"){re.escape(cip)}:[0-9]+")
    return [ln for ln in log.splitlines() if up.search(ln) and client.search(ln)]


def proxy_log_names_result(log: str, mode: str, result: dict[str, Any]) -> list[str]:
    """The lines of a proxy's output for one connection of the batch client (its ``src``, and the ``peer`` the
    application saw, if it answered).

    A connection the application answered is named by a line with that upstream source (unique to it) and the
    client's address and port. In nat mode conntrack may give a client port another one (the reply tuple of a
    REDIRECTed connection must be unique, and every intercepted port is redirected to the one listener: a port the
    client used a moment ago towards another intercepted port clashes; README, "The two modes"), so there the
    client's IP is enough. A connection without a ``peer`` is named by its client address and port."""
    src, peer = result["src"], result.get("peer")
    if not peer:
        return proxy_log_names(log, *src)
    lines = proxy_log_names_upstream(log, src[0], peer)
    if mode != "nat":
        lines = [ln for ln in lines if proxy_log_names(ln, *src)]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The application (runs inside the node namespace)


async def _app(ports: dict[int, str], log_path: str | None) -> None:
    import trio

    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    async def handle(stream: trio.SocketStream, kind: str) -> None:
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
            if log:
                log.write(f"{peer[0]} {peer[1]} {local[0]} {local[1]}\n")
            head = f"PEER {peer[0]} {peer[1]}\n".encode()
            if kind == "echo":
                await stream.send_all(head)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
                await stream.aclose()
            elif kind == "eof":
                got = bytearray()
                while data := await stream.receive_some(65536):
                    got += data
                await stream.send_all(head + bytes(got))
                await stream.aclose()
            else:  # close: the server closes first
                await stream.send_all(head)
                await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    listeners: list[tuple[trio.SocketListener, str]] = []
    for port, kind in ports.items():
        for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = trio.socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await s.bind((host, port))
            s.listen(4096)
            listeners.append((trio.SocketListener(s), kind))
    print(_READY_LINE, flush=True)

    async def accept_loop(listener: trio.SocketListener, kind: str, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                    await trio.sleep(0.01)
                    continue
                raise
            nursery.start_soon(handle, stream, kind)

    async with trio.open_nursery() as nursery:
        for listener, kind in listeners:
            nursery.start_soon(accept_loop, listener, kind, nursery)


# ---------------------------------------------------------------------------------------------------------------
# The batch client (runs inside the client namespace)


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _client(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every job; one result per connection.

    A job: ``dst``, ``port`` (required); ``src`` (source address); ``kind``: ``echo`` (send a payload, shut down
    writing, read PEER line and echo until EOF; the payload's SHA-256 is checked), ``read`` (send nothing, read until
    EOF) or ``reset`` (expect the connection to be reset); ``count`` connections, ``concurrency`` at a time;
    ``sizes``: a payload size per connection, or ``max_size`` with ``seed`` for random sizes up to it; ``src_ports``:
    a source port per connection, or ``reuse_ports`` + ``repeat``: each of these ports ``repeat`` times in a row,
    the ports in parallel; ``timeout`` per connection (seconds).
    A result: ``src`` [ip, port], ``peer`` [ip, port] as the application reported it (or null), ``ok``,
    ``error`` (an errno name, "timeout", or a description), ``digest_ok`` (echo), ``rebinds`` (reuse).
    """
    import trio

    results: list[dict[str, Any]] = []

    async def one(job: dict[str, Any], i: int, src_port: int) -> dict[str, Any]:
        dst, port = job["dst"], job["port"]
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        kind = job.get("kind", "echo")
        sizes = job.get("sizes")
        if sizes is not None:
            size = sizes[i % len(sizes)]
        else:
            size = random.Random(job.get("seed", 0) * 1_000_003 + i).randint(0, job.get("max_size", 0))
        res: dict[str, Any] = {"i": i, "src": None, "peer": None, "ok": False, "error": None}
        sock = trio.socket.socket(fam, socket.SOCK_STREAM)
        try:
            with trio.fail_after(job.get("timeout", 20)):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if job.get("src") or src_port:
                    await sock.bind((job.get("src") or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), src_port))
                rebinds = 0
                while True:
                    try:
                        await sock.connect((dst, port))
                        break
                    except OSError as e:
                        # our own previous socket on this port may still wait for the ACK of its FIN
                        if e.errno != errno.EADDRNOTAVAIL or not src_port or rebinds >= 200:
                            raise
                        rebinds += 1
                        sock.close()
                        await trio.sleep(0.005)
                        sock = trio.socket.socket(fam, socket.SOCK_STREAM)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        await sock.bind((job.get("src") or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), src_port))
                if rebinds:
                    res["rebinds"] = rebinds
                res["src"] = list(sock.getsockname()[:2])
                stream = trio.SocketStream(sock)
                data = payload(job.get("seed", 0) * 1_000_003 + i, size) if kind == "echo" else b""
                got = bytearray()

                async def sender() -> None:
                    if data:
                        view = memoryview(data)
                        for off in range(0, len(view), 262144):
                            await stream.send_all(view[off : off + 262144])
                    await stream.send_eof()

                async def receiver() -> None:
                    while chunk := await stream.receive_some(262144):
                        got.extend(chunk)

                if kind in ("read", "reset"):  # (a shutdown after a reset would say ENOTCONN, hiding it)
                    await receiver()
                else:
                    async with trio.open_nursery() as n:
                        n.start_soon(sender)
                        n.start_soon(receiver)
                head, nl, rest = bytes(got).partition(b"\n")
                if nl and head.startswith(b"PEER "):
                    ip, p = head.decode().split()[1:3]
                    res["peer"] = [ip, int(p)]
                if kind == "echo":
                    res["size"] = size
                    res["digest_ok"] = hashlib.sha256(rest).digest() == hashlib.sha256(data).digest()
                    res["ok"] = res["peer"] is not None and res["digest_ok"]
                elif kind == "reset":
                    res["error"] = "no reset"
                else:
                    res["ok"] = res["peer"] is not None
        except Exception as exc:
            e = exc
            while isinstance(e, BaseExceptionGroup):
                e = e.exceptions[0]
            if isinstance(e, trio.TooSlowError):
                res["error"] = "timeout"
            elif isinstance(e, trio.BrokenResourceError | OSError):
                cause = e if isinstance(e, OSError) else e.__cause__
                code = getattr(cause, "errno", None)
                res["error"] = errno.errorcode.get(code, str(cause or e)) if code else str(cause or e)
                if kind == "reset" and res["error"] == "ECONNRESET":
                    res["ok"] = True
            else:
                raise
        finally:
            sock.close()
        return res

    async def run_job(job: dict[str, Any]) -> None:
        limiter = trio.CapacityLimiter(job.get("concurrency", 1))

        async def limited(i: int, src_port: int) -> None:
            async with limiter:
                results.append(await one(job, i, src_port))

        async def chain(ports_i: list[tuple[int, int]]) -> None:
            for i, p in ports_i:
                results.append(await one(job, i, p))

        async with trio.open_nursery() as n:
            if "reuse_ports" in job:
                rp, rep = job["reuse_ports"], job.get("repeat", 1)
                for k, p in enumerate(rp):
                    n.start_soon(chain, [(k * rep + j, p) for j in range(rep)])
            else:
                src_ports = job.get("src_ports") or [0] * job.get("count", 1)
                for i, p in enumerate(src_ports):
                    n.start_soon(limited, i, p)

    for job in jobs:
        await run_job(job)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Entry points: python -m tproxy.lab app|client|wait-ready|say


def _wait_ready(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last = "no answer"
    url = f"http://{ADMIN[0]}:{ADMIN[1]}/ready"
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"the proxy (pid {pid}) exited; last /ready answer: {last}")
            return 1
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return 0
                last = f"{r.status}"
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read().decode(errors='replace').strip()}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    print(f"not ready after {timeout}s; last /ready answer: {last}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    import trio

    parser = argparse.ArgumentParser(prog="python -m tproxy.lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("app", help="the application: PEER line, then echo / answer after EOF / close first")
    a.add_argument("--port", action="append", required=True, help="PORT:KIND, KIND one of echo, eof, close")
    a.add_argument("--log", help="append a line per connection: peer ip, port, local ip, port")
    sub.add_parser("client", help="batch client: JSON jobs on stdin, a JSON line per connection on stdout")
    w = sub.add_parser("wait-ready", help="poll the admin endpoint's /ready while the proxy PID lives")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--timeout", type=float, default=30)
    s = sub.add_parser("say", help="connect, send TEXT, print what the application answers")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("text", nargs="?", default="hello")
    args = parser.parse_args(argv)

    if args.cmd == "app":
        ports = {}
        for spec in args.port:
            p, _, kind = spec.partition(":")
            if kind not in ("echo", "eof", "close"):
                parser.error(f"bad --port {spec!r}")
            ports[int(p)] = kind
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_app, ports, args.log)
        return 0
    if args.cmd == "client":
        jobs = json.load(sys.stdin)
        for r in trio.run(_client, jobs):
            print(json.dumps(r))
        return 0
    if args.cmd == "wait-ready":
        return _wait_ready(args.pid, args.timeout)
    with socket.create_connection((args.host, args.port), timeout=10) as s:
        print("from {} {}".format(*s.getsockname()[:2]))
        s.sendall(args.text.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        while data := s.recv(65536):
            sys.stdout.write(data.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
