"""The subjects measured side by side: direct (no interception), HAProxy in transparent mode, and tproxy.

The PROXY protocol subjects (opt-in: ``--proxy-protocol`` or ``--subjects``) run only the keep-alive and
new-connection loads, against their own target: ``lb-tproxy`` and ``lb-tproxy-pp-in`` put the same HAProxy in front
of tproxy (in the client namespace, connecting from the load balancer's address), the second with ``send-proxy-v2``
and tproxy reading the header; ``tproxy-pp-out`` is ``tproxy-original`` with ``send_proxy_protocol = "v2"`` towards
nginx's ``proxy_protocol`` port.

Each subject sets itself up in the node namespace (process, rules, sysctls), tells which PIDs to measure, and tears
everything down again, so the next subject starts from the same clean namespace. Rules the harness installs (HAProxy's)
are installed only inside the benchmark's own node namespace.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

from tests.bench import topology as T

REPO = Path(__file__).resolve().parents[2]
PROBE_DIR = Path(__file__).resolve().parent / "probe"

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}
    pidfile {dir}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind :{port} transparent
    maxconn {maxconn}
    default_backend be
backend be
    option splice-request
    option splice-response
    source 0.0.0.0 usesrc clientip
    server orig 0.0.0.0
"""

# The kernel recipe of DESIGN.md (divert rule without SYNs), plus the rule HAProxy needs because it cannot set SO_MARK
# on its upstream socket: every locally generated TCP packet with a non-local source is a transparent upstream leg.
HAPROXY_RULES = """\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:BENCH_DIVERT - [0:0]
-A PREROUTING -p tcp ! --syn -m socket --transparent -j BENCH_DIVERT
-A PREROUTING -i {iface} -p tcp -m multiport --dports {ports} -j TPROXY --on-port {proxy} --on-ip 0.0.0.0 \
--tproxy-mark 0x1/0x1
-A BENCH_DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A BENCH_DIVERT -j ACCEPT
-A OUTPUT -p tcp -m addrtype ! --src-type LOCAL -j MARK --set-xmark 0x1/0xffffffff
-A OUTPUT -m connmark --mark 0x1 -j CONNMARK --restore-mark
-A OUTPUT -m mark --mark 0x1 -j CONNMARK --save-mark
COMMIT
"""


UNUSED_TCP_PORT = 5399  # the UDP subject's intercept.ports (it must name one; nothing listens there)
ALL_LOADS = ("bulk", "keepalive", "newconn", "idle")
UDP_LOADS = ("udp",)  # the UDP subjects (--udp) run only the UDP loads (tests/bench/loads.py: dnsperf, iperf3 -u)


# One worker (as HAProxy gets one thread); root, for IP_TRANSPARENT in the worker (proxy_bind ... transparent).
# multi_accept: without it a UDP listener reads one datagram per (edge-triggered) epoll event, so under load it falls
# behind, and its backlog stays queued after the load until new datagrams arrive.
# `proxy_bind $remote_addr`, not `$remote_addr:$remote_port`: see tests/bench/README.md. Sessions idle out after 60 s
# (tproxy's default udp_idle_timeout); responses unlimited per session (nginx's default), as tproxy's sessions. The
# listeners keep the default receive buffer: with `rcvbuf=32m` (8 MiB here, net.core.rmem_max) nginx 1.22 was wedged
# after a saturated iperf3 -u load, its worker spinning at 60-80% of a core with 5-6 MB left in the listener's queue,
# never forwarded (tests/bench/README.md).
NGINX_UDP_CONF = """\
load_module {module};
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx-udp.pid;
error_log {dir}/nginx-udp-error.log warn;
worker_rlimit_nofile 15000;
events {{ worker_connections 10000; multi_accept on; }}
stream {{
    proxy_bind {bind} transparent;
    proxy_timeout 60s;
{servers}
}}
"""
NGINX_UDP_SERVER = "    server {{ listen {port} udp; proxy_pass {app}:{port}; }}"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# TPROXY to nginx's wildcard socket (--on-ip the node's primary address: the application's socket, bound to the
# second address, does not match it), on the application's own port (--on-port 0). nginx cannot set SO_MARK on its
# upstream socket: every locally generated UDP datagram with a non-local source is its transparent upstream leg.
NGINX_UDP_RULES = """\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i {iface} -p udp -d {app} -m multiport --dports {ports} -j TPROXY --on-port 0 --on-ip {node} \
--tproxy-mark 0x1/0x1
-A OUTPUT -p udp -m addrtype ! --src-type LOCAL -j MARK --set-xmark 0x1/0xffffffff
-A OUTPUT -m connmark --mark 0x1 -j CONNMARK --restore-mark
-A OUTPUT -m mark --mark 0x1 -j CONNMARK --save-mark
COMMIT
"""


class Subject:
    name = "?"
    is_proxy = True
    node_ports = T.NODE_PORTS_DEFAULT
    target = (T.NODE_IP, T.HTTP_PORT)  # where the HTTP loads connect (from the client namespace)
    sees = T.CLIENT_IP  # the client address the application must see
    loads = ALL_LOADS

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def describe(self) -> str:
        return self.name

    def start(self, topo: T.Topology) -> None:
        raise NotImplementedError

    def stop(self, topo: T.Topology) -> None:
        if self.proc is not None:
            T.stop_process(self.proc)
            self.proc = None

    def pids(self) -> list[int]:
        """The proxy's process and its descendants (CPU and RSS are summed over them)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return process_tree(self.proc.pid)


class Direct(Subject):
    name = "direct"
    is_proxy = False

    def describe(self) -> str:
        return "direct: no interception (the physical limit of this topology)"

    def start(self, topo: T.Topology) -> None:
        topo.set_node_ports(self.node_ports)


class HAProxy(Subject):
    name = "haproxy"
    node_ports = T.NODE_PORTS_DISJOINT

    def describe(self) -> str:
        return (
            "HAProxy (Debian) 1 thread, splice forced, bind transparent + usesrc clientip;"
            " extra mangle OUTPUT mark rule;"
            f" node ephemeral ports {self.node_ports} (disjoint from the client's)"
        )

    def start(self, topo: T.Topology) -> None:
        topo.set_node_ports(self.node_ports)
        rules = HAPROXY_RULES.format(iface=T.NODE_IF, ports=",".join(map(str, T.INTERCEPTED)), proxy=T.PROXY_PORT)
        topo.node.run(["iptables-restore"], input=rules)
        topo.node.sh("ip rule add fwmark 0x1/0x1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100")
        cfg = topo.workdir / "haproxy.cfg"
        # HAProxy refuses to start when maxconn * 2 + maxpipes * 2 exceeds the hard RLIMIT_NOFILE it cannot raise.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxpipes = 500
        maxconn = (hard - 20 - 2 * maxpipes) // 2
        cfg.write_text(HAPROXY_CFG.format(dir=topo.workdir, port=T.PROXY_PORT, maxconn=maxconn, maxpipes=maxpipes))
        log = open(topo.workdir / "haproxy.log", "ab")  # noqa: SIM115
        self.proc = topo.node.popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log)
        T.wait_listening(topo.node, T.PROXY_PORT, proc=self.proc)

    def stop(self, topo: T.Topology) -> None:
        super().stop(topo)
        topo.node.sh(
            "iptables -t mangle -F && iptables -t mangle -X && nft delete table ip mangle"
            " && ip rule del fwmark 0x1/0x1 lookup 100 && ip route flush table 100",
            check=False,
        )


class NginxUdp(Subject):
    """nginx 1.22 with the stream module (Debian's libnginx-mod-stream), 1 worker, as a transparent UDP proxy in front
    of the UDP applications: ``listen PORT udp`` on the wildcard address, ``proxy_bind $remote_addr transparent``, and
    the rules of :data:`NGINX_UDP_RULES`. nginx 1.22 has ``transparent`` for proxy_bind but not for ``listen``, and
    TPROXY diverts only to sockets with IP_TRANSPARENT: the benchmark's LD_PRELOAD shim
    (:data:`~tests.bench.topology.SHIM`) sets it in every bind()."""

    loads = UDP_LOADS

    def __init__(self, bind: str = "$remote_addr") -> None:
        super().__init__()
        self.bind = bind
        self.name = "nginx" if bind == "$remote_addr" else "nginx-remote-port"

    def describe(self) -> str:
        return (
            f"nginx 1.22 stream, 1 worker, listen PORT udp (wildcard; IP_TRANSPARENT by an LD_PRELOAD shim),"
            f" proxy_bind {self.bind} transparent; TPROXY --on-ip {T.NODE_IP} --on-port 0; extra mangle OUTPUT mark"
            " rule for UDP with a non-local source"
        )

    def start(self, topo: T.Topology) -> None:
        topo.set_node_ports(self.node_ports)
        shim = T.build_shim(topo.workdir)
        rules = NGINX_UDP_RULES.format(
            iface=T.NODE_IF, app=T.UDP_APP_IP, ports=",".join(map(str, T.UDP_PORTS)), node=T.NODE_IP
        )
        topo.node.run(["iptables-restore"], input=rules)
        topo.node.sh("ip rule add fwmark 0x1/0x1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100")
        servers = "\n".join(NGINX_UDP_SERVER.format(port=p, app=T.UDP_APP_IP) for p in T.UDP_PORTS)
        conf = topo.workdir / "nginx-udp.conf"
        conf.write_text(
            NGINX_UDP_CONF.format(module=NGINX_STREAM_MODULE, dir=topo.workdir, bind=self.bind, servers=servers)
        )
        log = open(topo.workdir / "nginx-udp.log", "ab")  # noqa: SIM115
        argv = ["env", f"LD_PRELOAD={shim}", "TPX_SHIM_TRANSPARENT=1", "nginx", "-c", str(conf)]
        argv += ["-p", str(topo.workdir), "-e", str(topo.workdir / "nginx-udp-error.log")]
        self.proc = topo.node.popen(argv, stdout=log, stderr=log)
        try:
            for port in T.UDP_PORTS:
                T.wait_listening_udp(topo.node, "0.0.0.0", port, proc=self.proc)
        except BaseException:
            self.stop(topo)
            raise

    def stop(self, topo: T.Topology) -> None:
        super().stop(topo)
        topo.node.sh(
            "iptables -t mangle -F && iptables -t mangle -X && nft delete table ip mangle"
            " && ip rule del fwmark 0x1/0x1 lookup 100 && ip route flush table 100",
            check=False,
        )


class Tproxy(Subject):
    """tproxy run as a real process in the node namespace, installing and removing its own rules."""

    def __init__(
        self,
        mode: str,
        upstream: str,
        backend: str = "nftables",
        *,
        log_level: str = "info",
        gc: str = "",
        label: str = "",
        relay: str = "shared",
        src: str = "",
        send_proxy_protocol: str = "off",
        proxy_protocol_from: str = "",
        udp: bool = False,
    ) -> None:
        super().__init__()
        self.udp = udp  # the UDP subject (--udp): intercepts the UDP applications' ports, runs only the UDP loads
        self.send_proxy_protocol = send_proxy_protocol
        self.proxy_protocol_from = proxy_protocol_from  # a CIDR: listener.proxy_protocol = "v2" from it
        self.ports = T.INTERCEPTED
        self.relay = relay
        self.src = src  # another checkout's tree to run instead of this one (an A/B run against a baseline)
        self.mode = mode
        self.upstream = upstream
        self.backend = backend
        self.log_level = log_level
        self.gc = gc
        self.lab_proxy = None
        self.status: int | None = None
        self.probe: dict | None = None
        self.census = False  # set by --census: tracemalloc in the proxy (slow), object census during the idle test
        self.starts = 0
        self.name = f"tproxy-{upstream}" if mode == "tproxy" else f"tproxy-nat-{upstream}"
        if relay != "shared":
            self.name += f"-{relay}"
        if src:
            self.name += "@base"
        if label:
            self.name += f"+{label}"
        if send_proxy_protocol != "off":  # towards nginx's proxy_protocol port only: iperf3 would not read a header
            self.name += "-pp-out"
            self.ports = (T.PP_HTTP_PORT,)
            self.target = (T.NODE_IP, T.PP_HTTP_PORT)
            self.loads = ("keepalive", "newconn")
        if udp:
            self.ports = (UNUSED_TCP_PORT,)  # intercept.ports must name one: nothing listens there
            self.loads = UDP_LOADS

    def describe(self) -> str:
        src = "preserve_source = true" if self.mode == "nat" else "client IP kept"
        text = (
            f"tproxy mode={self.mode} upstream={self.upstream} backend={self.backend} relay={self.relay} ({src}),"
            f" log level {self.log_level}; node ephemeral ports {self.node_ports} (overlapping the client's: no"
            " disjoint-range crutch)"
        )
        if self.send_proxy_protocol != "off":
            text += f"; send_proxy_protocol = {self.send_proxy_protocol} to nginx :{T.PP_HTTP_PORT} (proxy_protocol)"
        if self.proxy_protocol_from:
            text += f"; proxy_protocol = v2 from {self.proxy_protocol_from}"
        if self.udp:
            text += f"; intercept.udp_ports = {list(T.UDP_PORTS)} (the UDP applications on {T.UDP_APP_IP})"
        if self.gc:
            text += f"; EXPERIMENT: garbage collector {self.gc} (set by the benchmark's probe, not by tproxy)"
        return text

    def config_text(self, topo: T.Topology) -> str:
        lines = [
            f'mode = "{self.mode}"',
            f'backend = "{self.backend}"',
            "[listener]",
            f"port = {T.PROXY_PORT}",
        ]
        if self.proxy_protocol_from:
            lines += ['proxy_protocol = "v2"', f'proxy_protocol_from = ["{self.proxy_protocol_from}"]']
        lines += [
            "[intercept]",
            f"ports = [{', '.join(map(str, self.ports))}]",
            *([f"udp_ports = [{', '.join(map(str, T.UDP_PORTS))}]"] if self.udp else []),
            f'interfaces = ["{T.NODE_IF}"]',
            "ipv6 = false",
            "[proxy]",
            f'upstream = "{self.upstream}"',
            "max_connections = 20000",
            "shutdown_grace = 2",
        ]
        if self.relay != "shared":
            lines.append(f'relay = "{self.relay}"')
        if self.send_proxy_protocol != "off":
            lines.append(f'send_proxy_protocol = "{self.send_proxy_protocol}"')
        if self.mode == "nat":
            lines.append("preserve_source = true")
        lines += ["[admin]", 'address = "127.0.0.1:4191"', "[log]", f'level = "{self.log_level}"']
        return "\n".join(lines) + "\n"

    def environment(self) -> dict[str, str]:
        """What the proxy process gets in its environment: the probe (tests/bench/probe/sitecustomize.py, recording
        garbage-collector pauses) on PYTHONPATH and its settings; with ``src``, that checkout's tree first (and
        PYTHONSAFEPATH: ``python -m`` would put the working directory, this checkout, before PYTHONPATH)."""
        pypath = os.pathsep.join(p for p in (str(PROBE_DIR), self.src, os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": pypath, "TPX_BENCH_PROBE_OUT": str(self.probe_out), "TPX_BENCH_GC": self.gc}
        env["TPX_BENCH_CENSUS"] = "1" if self.census else ""
        if self.src:
            env["PYTHONSAFEPATH"] = "1"
        return env

    def start(self, topo: T.Topology) -> None:
        """Start ``tproxy run`` through the lab and wait until its /ready says rules, routes and listeners are up."""
        topo.set_node_ports(self.node_ports)
        self.starts += 1
        self.probe = None
        self.probe_out = topo.workdir / f"{self.name}-probe-{self.starts}.json"
        env = self.environment()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.lab_proxy = topo.lab.start_proxy(self.config_text(topo), wait=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.proc = self.lab_proxy.proc

    def stop(self, topo: T.Topology) -> None:
        if self.lab_proxy is not None:
            self.status = self.lab_proxy.stop(timeout=15)
            with open(topo.workdir / f"{self.name}.log", "a") as f:
                f.write(self.lab_proxy.log())
            self.lab_proxy = None
            try:
                self.probe = json.loads(self.probe_out.read_text())
            except (OSError, ValueError):
                self.probe = None
        self.proc = None


LB_HAPROXY_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
    pidfile {dir}/lb-haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen lb
    bind {client}:{port}
    maxconn {maxconn}
    source {source}:0
    server app {node}:{app_port} {send}
"""


class LbTproxy(Tproxy):
    """tproxy-original behind a load balancer: HAProxy in the client namespace, 1 thread, connecting from
    :data:`~tests.bench.topology.LB_IP` to nginx's port, which tproxy intercepts. With ``header``, HAProxy sends a
    PROXY v2 header and tproxy reads it (``proxy_protocol_from`` the load balancer), so the application sees the
    client; without, it sees the load balancer. The two differ only by the header: the pair measures reading it."""

    target = (T.CLIENT_IP, T.LB_PORT)
    loads = ("keepalive", "newconn")

    def __init__(self, header: bool) -> None:
        super().__init__("tproxy", "original", proxy_protocol_from=f"{T.LB_IP}/32" if header else "")
        self.header = header
        self.name = "lb-tproxy-pp-in" if header else "lb-tproxy"
        self.sees = T.CLIENT_IP if header else T.LB_IP
        self.lb: subprocess.Popen | None = None

    def describe(self) -> str:
        send = "send-proxy-v2" if self.header else "no header"
        return f"HAProxy (1 thread, client namespace, from {T.LB_IP}, {send}) in front of: " + super().describe()

    def start(self, topo: T.Topology) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        cfg = topo.workdir / "lb-haproxy.cfg"
        cfg.write_text(
            LB_HAPROXY_CFG.format(
                dir=topo.workdir,
                maxconn=(hard - 20) // 2,
                client=T.CLIENT_IP,
                port=T.LB_PORT,
                source=T.LB_IP,
                node=T.NODE_IP,
                app_port=T.HTTP_PORT,
                send="send-proxy-v2" if self.header else "",
            )
        )
        log = open(topo.workdir / "lb-haproxy.log", "ab")  # noqa: SIM115
        self.lb = topo.client.popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log)
        try:
            T.wait_listening(topo.client, T.LB_PORT, proc=self.lb)
            super().start(topo)
        except BaseException:
            self.stop(topo)
            raise

    def stop(self, topo: T.Topology) -> None:
        try:
            super().stop(topo)
        finally:
            if self.lb is not None:
                T.stop_process(self.lb)
                self.lb = None


def take_census(subject: Subject, timeout: float = 20.0) -> dict | None:
    """Ask the probe in a tproxy process for an object census (SIGUSR2); None for other subjects or on timeout."""
    if not getattr(subject, "census", False) or subject.proc is None:
        return None
    path = Path(str(subject.probe_out) + ".census.json")
    path.unlink(missing_ok=True)
    os.kill(subject.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    return None


def census_diff(before: dict, after: dict, n: int, top: int = 20) -> dict:
    """Objects and traced bytes per connection: (after - before) / n, the largest first."""
    types = {t: (after["types"].get(t, 0) - before["types"].get(t, 0)) / n for t in after["types"]}
    sites = {s: (after["sites"].get(s, 0) - before["sites"].get(s, 0)) / n for s in after["sites"]}
    return {
        "traced_bytes_per_conn": (after["traced_bytes"] - before["traced_bytes"]) / n,
        "objects_per_conn": dict(sorted(types.items(), key=lambda kv: -kv[1])[:top]),
        "bytes_per_conn_by_site": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:top]),
    }


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    return sum(cpu_times(pids))


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total
