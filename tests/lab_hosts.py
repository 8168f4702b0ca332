"""More hosts around the lab's node, for the tests of traffic that is not the node's own: a *far* host behind the node
on a routed link, and a *container* behind a bridge with a Docker-style published port.

Every namespace here is deleted when its block ends (with every process still inside it); the node-side interfaces
go with it, and the routes and rules added to the node and the client are taken out again.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from tproxy import lab as L
from tproxy.netns import Netns, unique_name

FAR = {4: "198.19.5.2", 6: "fd00:19:5::2"}
FAR_GW = {4: "198.19.5.1", 6: "fd00:19:5::1"}
FAR_NET = {4: "198.19.5.0/24", 6: "fd00:19:5::/64"}
CONTAINER = {4: "198.19.17.2", 6: "fd00:19:17::2"}
BRIDGE = {4: "198.19.17.1", 6: "fd00:19:17::1"}
CONTAINER_NET = {4: "198.19.17.0/24", 6: "fd00:19:17::/64"}
APP_PORT = 80  # what the far host and the container listen on


def _new(role: str) -> Netns:
    ns = Netns(unique_name(role))
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    ns.run(["ip", "link", "set", "lo", "up"])
    return ns


def _address(ns: Netns, dev: str, addrs: dict[int, str]) -> None:
    ns.run(["sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"])
    for fam in (4, 6):
        ns.run(["ip", "addr", "add", f"{addrs[fam]}/{L.PREFIX[fam]}", "dev", dev, *(["nodad"] * (fam == 6))])
    ns.run(["ip", "link", "set", dev, "up"])


@contextlib.contextmanager
def far_host(lab: L.Lab, *, client_route: bool = True) -> Iterator[Netns]:
    """A namespace behind the node (node ``veth1`` <-> far ``veth0``), its default route via the node. With
    ``client_route`` the client routes the far network through the node, which then forwards."""
    far = _new("far")
    try:
        lab.node.run(["ip", "link", "add", "veth1", "type", "veth", "peer", "name", "veth0", "netns", far.name])
        _address(lab.node, "veth1", FAR_GW)
        _address(far, "veth0", FAR)
        for fam in (4, 6):
            far.run(["ip", f"-{fam}", "route", "add", "default", "via", FAR_GW[fam]])
            if client_route:
                lab.client.run(["ip", f"-{fam}", "route", "replace", FAR_NET[fam], "via", L.NODE[fam]])
        if client_route:
            lab.node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        yield far
    finally:
        for fam in (4, 6):
            lab.client.run(["ip", f"-{fam}", "route", "del", FAR_NET[fam]], check=False)
        far.delete()


@contextlib.contextmanager
def container_host(lab: L.Lab) -> Iterator[Netns]:
    """A namespace standing in for a container: on a bridge of the node (``br0``, like ``docker0``), its default
    route via the bridge's address."""
    ctr = _new("ctr")
    try:
        lab.node.run(["ip", "link", "add", "br0", "type", "bridge"])
        lab.node.run(["ip", "link", "add", "vctr", "type", "veth", "peer", "name", "eth0", "netns", ctr.name])
        lab.node.run(["ip", "link", "set", "vctr", "master", "br0"])
        lab.node.run(["ip", "link", "set", "vctr", "up"])
        _address(lab.node, "br0", BRIDGE)
        _address(ctr, "eth0", CONTAINER)
        for fam in (4, 6):
            ctr.run(["ip", f"-{fam}", "route", "add", "default", "via", BRIDGE[fam]])
        yield ctr
    finally:
        ctr.delete()
        lab.node.run(["ip", "link", "del", "br0"], check=False)


def publish(lab: L.Lab, port: int, target: dict[int, str], target_port: int = APP_PORT, *, bridge: str = "") -> None:
    """Docker's rules for a published port ``node:port -> target:target_port`` (iptables, nat table): DNAT in
    PREROUTING and in OUTPUT for every local destination address, as ``docker run -p`` installs them (a
    ``bridge`` also gets Docker's MASQUERADE for the container's own outgoing traffic)."""
    for fam, tool in ((4, "iptables"), (6, "ip6tables")):
        dest = f"{target[fam]}:{target_port}" if fam == 4 else f"[{target[fam]}]:{target_port}"
        loopback = "127.0.0.0/8" if fam == 4 else "::1/128"
        lines = ["*nat"]
        if not _has_chain(lab, tool):  # (declaring an existing chain in a --noflush file would flush it)
            lines += [
                ":DOCKER - [0:0]",
                "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
                f"-A OUTPUT ! -d {loopback} -m addrtype --dst-type LOCAL -j DOCKER",
            ]
            if bridge:
                lines.append(f"-A POSTROUTING -s {CONTAINER_NET[fam]} ! -o {bridge} -j MASQUERADE")
        not_from = f"! -i {bridge} " if bridge else ""
        lines += [f"-A DOCKER {not_from}-p tcp -m tcp --dport {port} -j DNAT --to-destination {dest}", "COMMIT", ""]
        lab.node.run([f"{tool}-restore", "-w", "10", "--noflush"], input="\n".join(lines))


def _has_chain(lab: L.Lab, tool: str) -> bool:
    return ":DOCKER " in lab.node.run([f"{tool}-save", "-t", "nat"]).stdout


@contextlib.contextmanager
def app_in(ns: Netns, ports: dict[int, str]) -> Iterator[subprocess.Popen]:
    """The lab application (it answers ``PEER ip port``) in ``ns``, listening on ``ports``; killed by PID after."""
    proc = ns.popen(
        [sys.executable, "-m", "tproxy.lab", "app", *(f"--port={p}:{k}" for p, k in ports.items())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "APP READY"
        yield proc
    finally:
        proc.kill()
        proc.wait()
