"""The benchmark's topology: a client namespace and a node namespace joined by a veth pair, and the applications.

The namespaces and the veth pair are the lab's (:class:`tproxy.lab.Lab`, without its application); the benchmark
runs its own applications in the node and measures over IPv4:

    client ns  veth0 198.18.0.1/24  <-- veth -->  veth0 198.18.0.2/24  node ns
                 198.18.0.21/24 (LB)                iperf3 -s :5201, nginx :8080 (/1k: 1 KiB file, /ip: who am I)
                                                    nginx :8081 the same behind `listen ... proxy_protocol`

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
def topology(workdir: Path) -> Iterator[Topology]:
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
            yield topo
        finally:
            topo.stop_apps()
