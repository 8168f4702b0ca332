"""Socket helpers: the upstream-port chooser (pure logic), listeners, and (root, in a namespace) transparent binds
and SO_ORIGINAL_DST behind a real REDIRECT."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest

from tproxy import sockets
from tproxy.errors import PrivilegeError, TproxyError
from tproxy.netns import netns
from tproxy.sockets import PortChooser

C1, C2 = ("198.18.0.1", 40000), ("198.18.0.3", 40001)
DST, DST2 = ("198.18.0.2", 8080), ("198.18.0.2", 8081)


# -- the chooser


def test_default_range_is_below_client_ephemeral_ports():
    lo, hi = sockets.UPSTREAM_PORTS
    assert 1024 <= lo < hi < 32768  # Linux clients use 32768-60999, Windows/BSD 49152-65535


def test_never_the_port_of_a_live_intercepted_connection_from_that_client_to_that_destination():
    ch = PortChooser(100, 103, rng=random.Random(1))
    for p in (100, 101, 102):
        ch.add_intercepted((C1[0], p), DST)
    assert {ch.choose(C1[0], DST) for _ in range(200)} == {103}
    # the same ports are fine towards another destination, or for another client
    assert {ch.choose(C1[0], DST2) for _ in range(200)} == {100, 101, 102, 103}
    assert {ch.choose(C2[0], DST) for _ in range(200)} == {100, 101, 102, 103}


def test_never_one_of_our_own_live_ports_for_that_client():
    ch = PortChooser(100, 102, rng=random.Random(2))
    ch.reserve(C1[0], 100)
    ch.reserve(C1[0], 101)
    assert {ch.choose(C1[0], DST) for _ in range(100)} == {102}
    assert {ch.choose(C2[0], DST) for _ in range(100)} == {100, 101, 102}
    ch.release(C1[0], 100)
    assert {ch.choose(C1[0], DST) for _ in range(100)} == {100, 102}


def test_excluded_ports_are_not_retried_and_none_when_nothing_is_left():
    ch = PortChooser(100, 101, rng=random.Random(3))
    ch.add_intercepted((C1[0], 100), DST)
    assert ch.choose(C1[0], DST, {101}) is None
    assert ch.choose(C1[0], DST) == 101


def test_state_is_dropped_when_connections_end():
    ch = PortChooser()
    ch.add_intercepted(C1, DST)
    ch.add_intercepted((C1[0], 40002), DST)
    ch.reserve(C1[0], 2000)
    ch.remove_intercepted(C1, DST)
    assert ch.intercepted == {(C1[0], DST[0], DST[1]): {40002}}
    ch.remove_intercepted((C1[0], 40002), DST)
    ch.remove_intercepted((C1[0], 40002), DST)  # twice: harmless
    ch.release(C1[0], 2000)
    ch.release(C1[0], 2000)
    assert ch.intercepted == {} and ch.own == {}


def test_choices_stay_in_range_and_spread():
    ch = PortChooser(rng=random.Random(4))
    got = [ch.choose(C1[0], DST) for _ in range(2000)]
    lo, hi = sockets.UPSTREAM_PORTS
    assert all(lo <= p <= hi for p in got)
    assert len(set(got)) > 1900


def test_bad_range_is_refused():
    with pytest.raises(ValueError):
        PortChooser(2000, 1000)


# -- listeners


def test_ipv4_listener_is_non_blocking_and_listening():
    s = sockets.listener(4, "127.0.0.1", 0, transparent=False)
    try:
        assert s.getblocking() is False
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        s.close()


def test_ipv6_listener_is_v6only():
    s = sockets.listener(6, "::1", 0, transparent=False)
    try:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        s.close()


def test_busy_port_is_one_operator_line_and_no_leaked_fd():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TproxyError, match=rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use"):
            sockets.listener(4, "127.0.0.1", port, transparent=False)
        assert len(os.listdir("/proc/self/fd")) == before


def test_reset_on_close_sends_rst():
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
        sockets.set_reset_on_close(s)
        s.close()
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        c.close()


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_transparent_listener_sets_the_option(family):
    s = sockets.listener(family, "127.0.0.1" if family == 4 else "::1", 0, transparent=True)
    try:
        level, opt = sockets.transparent_option(s.family)
        assert s.getsockopt(level, opt) == 1
    finally:
        s.close()


@pytest.mark.root
def test_transparent_listener_without_cap_net_raw_is_a_privilege_error():
    code = textwrap.dedent(
        """
        from tproxy import sockets
        from tproxy.errors import PrivilegeError
        try:
            sockets.listener(4, "127.0.0.1", 0, transparent=True)
        except PrivilegeError as e:
            print("PrivilegeError:", e)
        """
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PrivilegeError: cannot listen on 127.0.0.1:0: needs CAP_NET_RAW for IP_TRANSPARENT")
    assert PrivilegeError.__name__ in r.stdout


# -- in a namespace: transparent binds, SO_ORIGINAL_DST behind REDIRECT

NS_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from tproxy import sockets
    out = {}
    # a transparent socket may bind an address this namespace does not have; an ordinary one may not
    for fam, addr in ((4, "198.18.9.9"), (6, "fd00:9::9")):
        s = sockets.upstream_socket(sockets.FAMILIES[fam], transparent=True, mark=1, source=(addr, 2345))
        out[f"transparent{fam}"] = list(s.getsockname()[:2])
        out[f"mark{fam}"] = s.getsockopt(socket.SOL_SOCKET, sockets.SO_MARK)
        s.close()
        try:
            sockets.upstream_socket(sockets.FAMILIES[fam], transparent=False, mark=0, source=(addr, 2345))
            out[f"plain{fam}"] = "bound"
        except OSError as e:
            out[f"plain{fam}"] = e.errno
        s = sockets.upstream_socket(sockets.FAMILIES[fam], transparent=True, mark=1, source=(addr, 0), no_port=True)
        out[f"noport{fam}"] = s.getsockname()[1]
        s.close()
    # SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST behind a REDIRECT of locally generated connections
    for fam, host, dst in ((4, "0.0.0.0", "198.18.9.1"), (6, "::", "fd00:9::1")):
        lsock = sockets.listener(fam, host, int(sys.argv[1]), transparent=False)
        lsock.setblocking(True)
        c = socket.create_connection((dst, 5555))
        a, _ = lsock.accept()
        out[f"orig{fam}"] = list(sockets.original_dst_nat(a))
        out[f"name{fam}"] = list(sockets.sockname(a))
        direct = socket.create_connection((dst, int(sys.argv[1])))  # straight to the listener: no NAT
        b, _ = lsock.accept()
        try:
            out[f"direct{fam}"] = list(sockets.original_dst_nat(b))
        except OSError as e:
            out[f"direct{fam}"] = e.errno
        for x in (c, a, direct, b, lsock):
            x.close()
    print(json.dumps(out))
    """
)


@pytest.mark.root
def test_transparent_bind_and_original_dst_in_a_namespace():
    port = 4143
    rules = f"""
    table inet tpxtest {{
      chain out {{
        type nat hook output priority -100; policy accept;
        tcp dport 5555 redirect to :{port}
      }}
    }}
    """
    with netns("sock") as ns:
        ns.run(["ip", "addr", "add", "198.18.9.1/32", "dev", "lo"])
        ns.run(["ip", "addr", "add", "fd00:9::1/128", "dev", "lo", "nodad"])
        ns.run(["nft", "-f", "-"], input=rules)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = ns.run([sys.executable, "-c", NS_SCRIPT, str(port)], cwd=root, check=False)
        assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["transparent4"] == ["198.18.9.9", 2345] and out["transparent6"] == ["fd00:9::9", 2345]
    assert out["mark4"] == out["mark6"] == 1
    assert out["plain4"] == out["plain6"] == 99  # EADDRNOTAVAIL
    assert out["noport4"] == out["noport6"] == 0  # IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect time
    assert out["orig4"] == ["198.18.9.1", 5555] and out["orig6"] == ["fd00:9::1", 5555]
    # REDIRECT rewrote the destination: the socket's own address says the listener, not the original
    assert out["name4"][1] == port and out["name6"][1] == port
    # a connection made straight to the proxy's port has itself as original destination (the loop the server refuses)
    assert out["direct4"] == ["198.18.9.1", port] and out["direct6"] == ["fd00:9::1", port]
