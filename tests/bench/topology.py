"""The benchmark's topology: a client namespace and a node namespace joined by a veth pair, and the applications.

The namespaces and the veth pair are the lab's (:class:`tproxy.lab.Lab`, without its application); the benchmark
runs its own applications in the node and measures over IPv4:

    client ns  veth0 198.18.0.1/24  <-- veth -->  veth0 198.18.0.2/24  node ns
                 198.18.0.21/24 (LB)                iperf3 -s :5201, nginx :8080 (/1k: 1 KiB file, /ip: who am I)
                                                    nginx :8081 the same behind `listen ... proxy_protocol`
                                                  with --udp: 198.18.0.3/24 too, and on it only (see below)
                                                    dnsmasq :5300 (load), dnsmasq :5301 (query log),
                                                    iperf3 -s :5202 and :5203

The UDP applications (``--udp``, :meth:`Topology.start_udp_apps`) listen on a second node address only, with
SO_REUSEADDR, so that a UDP proxy can listen on the same port numbers on the wildcard address (nginx's stream module
answers a client from its listening port: on the application's port, the client sees the answer come from where it
wrote to) and TPROXY can divert to the proxy's socket rather than the application's (``--on-ip`` the primary address,
which only the wildcard socket matches). iperf3's UDP server is its own instance on :5202: the TCP one holds :5201 on
the wildcard address, and a specific TCP listener on a port a wildcard one holds is refused.

The second client address is a load balancer's (the PROXY protocol subjects run HAProxy in the client namespace,
connecting from it); nginx's port 8081 wants a PROXY header first and answers /ip with the client the header names.

Resource handling: :func:`topology` starts the applications and ends them (by PID), and the lab deletes both
namespaces (and any proxy it started) when the block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tproxy.lab import CLIENT, LB, NODE, Lab
from tproxy.netns import Netns

CLIENT_IP = CLIENT[4]
NODE_IP = NODE[4]
LB_IP = LB[4]
NODE_IF = "veth0"
IPERF_PORT = 5201
HTTP_PORT = 8080
PP_HTTP_PORT = 8081  # nginx with `listen ... proxy_protocol`: a PROXY header first (tproxy's send_proxy_protocol)
LB_PORT = 7080  # HAProxy in the client namespace (the PROXY protocol subjects), on the client's address
PROXY_PORT = 4143
INTERCEPTED = (IPERF_PORT, HTTP_PORT)
UDP_APP_IP = "198.18.0.3"  # the node's second address (--udp): the UDP applications listen there only
DNS_PORT = 5300  # dnsmasq under load (no query log)
DNS_CHECK_PORT = 5301  # dnsmasq logging every query with the client's address and port (the validity check)
UDP_IPERF_PORT = 5202  # iperf3 -u -b 0
UDP_IPERF_RATE_PORT = 5203  # iperf3 -u at a fixed rate: another server, so the first load's stragglers cannot reach it
UDP_PORTS = (DNS_PORT, DNS_CHECK_PORT, UDP_IPERF_PORT, UDP_IPERF_RATE_PORT)
DNS_NAME = "bench.test"
DNS_ANSWER = "198.18.0.9"

# Ephemeral ports. The client uses the Linux default, 32768-60999, set explicitly (tproxy chooses its upstream ports
# below 32768, where clients do not pick theirs: a client range reaching below 32768 makes a new client SYN collide with
# an upstream leg of the proxy's). The node keeps the same default, except for peers that cannot avoid 5-tuple
# collisions between their two legs (HAProxy): they get a disjoint range (BENCH-NOTES.md, pitfalls).
CLIENT_PORTS = "32768 60999"
NODE_PORTS_DEFAULT = "32768 60999"
NODE_PORTS_DISJOINT = "10000 32767"

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 30000; multi_accept on; }}
http {{
    access_log off;
    log_format who '$remote_addr $remote_port $server_addr:$server_port';
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    client_header_timeout 600s;
    sendfile on;
    tcp_nodelay on;
    server {{
        listen {port} reuseport backlog=8192;
        root {dir}/www;
        location = /1k {{ }}
        location = /idle {{ return 204; }}
        location = /ip {{
            access_log {dir}/access.log who;
            default_type text/plain;
            return 200 "$remote_addr $remote_port\\n";
        }}
    }}
    log_format whopp '$proxy_protocol_addr $proxy_protocol_port $server_addr:$server_port';
    server {{
        listen {pp_port} proxy_protocol reuseport backlog=8192;
        root {dir}/www;
        location = /1k {{ }}
        location = /idle {{ return 204; }}
        location = /ip {{
            access_log {dir}/access.log whopp;
            default_type text/plain;
            return 200 "$proxy_protocol_addr $proxy_protocol_port\\n";
        }}
    }}
}}
"""


class Topology:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.client: Netns = lab.client
        self.node: Netns = lab.node
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.udp_iperf: list[subprocess.Popen] = []

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def set_node_ports(self, ports: str) -> None:
        self.node.run(["sysctl", "-qw", f"net.ipv4.ip_local_port_range={ports}"])

    def start_apps(self) -> None:
        self.workdir.chmod(0o755)  # nginx's worker runs unprivileged and must read www/
        www = self.workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "1k").write_bytes(b"x" * 1023 + b"\n")
        conf = self.workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.workdir, port=HTTP_PORT, pp_port=PP_HTTP_PORT))
        out = open(self.workdir / "apps.log", "ab")  # noqa: SIM115 - kept for the processes' lifetime
        self.procs.append(self.node.popen(["nginx", "-c", str(conf), "-p", str(self.workdir)], stdout=out, stderr=out))
        self.procs.append(self.node.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=out, stderr=out))
        wait_listening(self.node, HTTP_PORT)
        wait_listening(self.node, PP_HTTP_PORT)
        wait_listening(self.node, IPERF_PORT)

    @property
    def dns_log(self) -> Path:
        return self.workdir / "dnsmasq-check.log"

    def start_udp_apps(self) -> None:
        """The UDP applications on :data:`UDP_APP_IP` (added to the node's veth here): two dnsmasq (one answering the
        load, one logging queries for the validity check) and an iperf3 server; each binds that address only, with
        SO_REUSEADDR (dnsmasq with ``--bind-interfaces``, iperf3 with ``-B``), and a receive buffer of
        :data:`APP_RCVBUF` (the shim)."""
        self.node.run(["ip", "addr", "add", f"{UDP_APP_IP}/24", "dev", NODE_IF])
        out = open(self.workdir / "udp-apps.log", "ab")  # noqa: SIM115 - kept for the processes' lifetime
        env = ["env", f"LD_PRELOAD={build_shim(self.workdir)}", f"TPX_SHIM_RCVBUF={APP_RCVBUF}"]
        for port, logged in ((DNS_PORT, False), (DNS_CHECK_PORT, True)):
            argv = dnsmasq_argv(port, self.dns_log if logged else None)
            self.procs.append(self.node.popen(env + argv, stdout=out, stderr=out))
        for port in (DNS_PORT, DNS_CHECK_PORT):
            wait_listening_udp(self.node, UDP_APP_IP, port)
        self.start_udp_iperf()

    def start_udp_iperf(self) -> None:
        """The UDP iperf3 servers (on :data:`UDP_APP_IP` only, with the shim's receive buffer)."""
        out = open(self.workdir / "udp-apps.log", "ab")  # noqa: SIM115 - kept for the processes' lifetime
        env = ["env", f"LD_PRELOAD={build_shim(self.workdir)}", f"TPX_SHIM_RCVBUF={APP_RCVBUF}"]
        for port in (UDP_IPERF_PORT, UDP_IPERF_RATE_PORT):
            p = self.node.popen(env + ["iperf3", "-s", "-B", UDP_APP_IP, "-p", str(port)], stdout=out, stderr=out)
            self.udp_iperf.append(p)
            self.procs.append(p)
            wait_listening(self.node, port, proc=p)  # (its UDP socket is bound per test)

    def restart_udp_iperf(self) -> float:
        """Fresh UDP iperf3 servers once the UDP buffers in the node have drained; the seconds that took.

        After a saturated load a proxy still holds a backlog, which it forwards after the test has ended; an iperf3
        server takes the first datagram reaching its next listener for the next test's greeting, answers the wrong
        peer, and that test hangs. So the stragglers are let into the old servers' listeners (stopping the servers
        first would answer each with ICMP port unreachable: nginx then opens a session per datagram, and ran out of
        worker_connections), and the servers are replaced with fresh ones; the fixed-rate load has a port of its own."""
        waited = wait_udp_drained(self.node)
        for p in self.udp_iperf:
            stop_process(p)
            self.procs.remove(p)
        self.udp_iperf.clear()
        self.start_udp_iperf()
        return waited

    def stop_apps(self) -> None:
        for p in self.procs:
            stop_process(p)
        self.procs.clear()


def wait_listening(ns: Netns, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on TCP ``port`` inside ``ns``; raise if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening on :{port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on :{port} in {ns.name} after {timeout:.0f} s")


# An LD_PRELOAD shim for the UDP run, compiled into the work directory (gcc): in every bind() of an inet socket it
# sets IP_TRANSPARENT / IPV6_TRANSPARENT when TPX_SHIM_TRANSPARENT is set (nginx's listeners: TPROXY diverts only to
# transparent sockets, and nginx 1.22 has no `transparent` on `listen`), and forces the receive buffer to
# TPX_SHIM_RCVBUF bytes when set (the applications, which have no option for it: a datagram lost at a rate below
# saturation is then the proxy's, not a burst overflowing the application's default 208 KiB).
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    const char *rcvbuf = getenv("TPX_SHIM_RCVBUF");
    int one = 1, size;
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        if (getenv("TPX_SHIM_TRANSPARENT")) {
            if (addr->sa_family == AF_INET) setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof one);
            else setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof one);
        }
        if (rcvbuf && (size = atoi(rcvbuf)) > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    }
    return real_bind(fd, addr, len);
}
"""
APP_RCVBUF = 8 << 20  # the UDP applications' receive buffers (set by the shim)


def build_shim(workdir: Path) -> Path:
    """Compile :data:`SHIM` into ``workdir`` (once); its path."""
    so = workdir / "tpx_shim.so"
    if not so.exists():
        src = workdir / "tpx_shim.c"
        src.write_text(SHIM)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src), "-ldl"], check=True)
    return so


def dnsmasq_argv(port: int, log: Path | None) -> list[str]:
    """dnsmasq answering ``bench.test A`` itself (no upstream, no hosts file), on :data:`UDP_APP_IP` only; with
    ``log``, every query is logged there with the client's address and port (``--log-queries=extra``)."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll"]
    argv += ["--user=root", "--pid-file", f"--listen-address={UDP_APP_IP}", "--bind-interfaces", f"--port={port}"]
    argv += [f"--address=/{DNS_NAME}/{DNS_ANSWER}", "--cache-size=0"]
    if log is not None:
        argv += ["--log-queries=extra", f"--log-facility={log}"]
    return argv


def queued_bytes(ss_output: str) -> int:
    """The sum of the Recv-Q column of ``ss -Huan`` output (State, Recv-Q, Send-Q, ...). Pure."""
    return sum(int(f[1]) for f in (ln.split() for ln in ss_output.splitlines()) if len(f) > 1 and f[1].isdigit())


def udp_queued(ns: Netns) -> int:
    """Bytes waiting in the receive queues of every UDP socket in ``ns``."""
    return queued_bytes(ns.run(["ss", "-Huan"], check=False).stdout)


def wait_udp_drained(ns: Netns, timeout: float = 10.0) -> float:
    """Wait until no UDP socket in ``ns`` has anything queued, or what is queued has not moved for a second (nginx
    leaves a few datagrams queued until another one arrives); the seconds waited, at most ``timeout``."""
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        q = udp_queued(ns)
        if q == 0 or (q == last and time.monotonic() - since >= 1.0):
            break
        if q != last:
            last, since = q, time.monotonic()
        time.sleep(0.1)
    return time.monotonic() - t0


def wait_listening_udp(
    ns: Netns, ip: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait until a UDP socket is bound to ``ip:port`` inside ``ns``; raise if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run(["ss", "-Hlun", f"sport = :{port}"], check=False).stdout
        if any(len(f) > 3 and f[3] == f"{ip}:{port}" for f in (ln.split() for ln in out.splitlines())):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before binding udp {ip}:{port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing bound to udp {ip}:{port} in {ns.name} after {timeout:.0f} s")


def stop_process(p: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM by PID, SIGKILL after ``grace`` seconds. Only for processes the benchmark started."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()


@contextlib.contextmanager
def topology(workdir: Path, *, udp: bool = False) -> Iterator[Topology]:
    with Lab.up(app=False) as lab:
        # The client reuses its ports at once under the new-connection load (TIME_WAIT): tw_reuse, in its own ns only.
        lab.client.sh(
            f"sysctl -qw net.ipv4.tcp_tw_reuse=1 && sysctl -qw net.ipv4.ip_local_port_range='{CLIENT_PORTS}'"
            " && sysctl -qw net.core.somaxconn=8192"
        )
        lab.node.sh("sysctl -qw net.core.somaxconn=8192 && sysctl -qw net.ipv4.tcp_max_syn_backlog=8192")
        lab.add_client_addresses({4: LB_IP})
        topo = Topology(lab, workdir)
        topo.set_node_ports(NODE_PORTS_DEFAULT)
        try:
            topo.start_apps()
            if udp:
                topo.start_udp_apps()
            yield topo
        finally:
            topo.stop_apps()
