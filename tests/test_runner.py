"""The runner: file-descriptor limit, listeners, deferred signals; and (root, in the lab) ``tproxy run`` draining on
SIGTERM, a second signal skipping the grace, and start-up failures that leave nothing behind."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tproxy import lab as L
from tproxy import runner
from tproxy.config import Config
from tproxy.errors import TproxyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nofile_soft_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert runner.raise_nofile_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def nat_config(port: int, **top) -> Config:
    doc = {
        "mode": "nat",
        "listener": {"address": "0.0.0.0", "port": port},
        "intercept": {"ports": [3000]},
        "admin": {"address": ""},
        **top,
    }
    return Config.from_dict(doc)


def test_one_listener_per_family_ipv6_only_on_ipv6():
    socks = runner.bind_listeners(nat_config(free_port()))
    try:
        assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
        assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert socks[0].getsockname()[1] == socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def test_a_failed_second_listener_closes_the_first():
    port = free_port()
    with socket.socket(socket.AF_INET6) as busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        busy.bind(("::", port))
        busy.listen(1)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TproxyError, match=rf"cannot listen on \[::\]:{port}"):
            runner.bind_listeners(nat_config(port))
        assert len(os.listdir("/proc/self/fd")) == before


def test_signals_outside_the_trio_run_are_deferred_not_fatal():
    with runner._deferred_signals() as early:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert early.pending == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# -- root: the real `tproxy run` in the lab

HOLD_CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    f = s.makefile("rb")
    peer = f.readline()            # the application's PEER line
    s.sendall(b"one\\n")
    assert f.readline() == b"one\\n"
    print("held", flush=True)
    sys.stdin.readline()           # the test says when to go on
    try:
        s.sendall(b"two\\n")
        got = f.readline()
        s.shutdown(socket.SHUT_WR)
        rest = f.read()
        print("done", got.decode().strip(), len(rest), flush=True)
    except OSError as e:
        print("error", type(e).__name__, flush=True)
    """
)


def hold_connection(lab: L.Lab) -> subprocess.Popen:
    p = lab.client.popen(
        [sys.executable, "-c", HOLD_CLIENT, L.NODE[4], str(L.ECHO_PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def wait_for(proxy: L.Proxy, text: str, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in proxy.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{proxy.log()}"
        assert proxy.proc.poll() is None, f"the proxy exited:\n{proxy.log()}"
        time.sleep(0.05)


def snapshot(lab: L.Lab) -> str:
    """The node's rules and routes, without the kernel's own link-local routes (they appear when they please)."""
    return "\n".join(line for line in lab.snapshot().splitlines() if "fe80::" not in line)


@pytest.fixture
def lab():
    with L.Lab.up() as lab:
        yield lab


@pytest.mark.root
def test_sigterm_lets_an_open_connection_finish_then_exits_0(lab):
    before = snapshot(lab)
    proxy = lab.start_proxy(L.proxy_config("tproxy", "nftables", shutdown_grace=300.0))
    client = hold_connection(lab)
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(proxy, "draining")
    assert proxy.proc.poll() is None  # still serving the open connection
    client.stdin.write("go\n")
    client.stdin.flush()
    assert client.stdout.readline().split() == ["done", "two", "0"]
    client.wait(30)
    assert proxy.proc.wait(60) == 0
    log = proxy.log()
    assert "outcome=ok" in log and " stop " in log
    assert snapshot(lab) == before


@pytest.mark.root
def test_second_signal_skips_the_grace(lab):
    before = snapshot(lab)
    proxy = lab.start_proxy(L.proxy_config("nat", "iptables", shutdown_grace=300.0))
    client = hold_connection(lab)
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(proxy, "draining")
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(60) == 0  # long before the 300 s grace
    log = proxy.log()
    assert "stopping_now signal=SIGINT" in log and "outcome=cancelled" in log
    client.stdin.write("go\n")
    client.stdin.flush()
    client.stdout.readline()
    client.wait(30)
    assert snapshot(lab) == before


@pytest.mark.root
def test_listener_port_taken_exits_1_and_removes_the_rules(lab):
    before = snapshot(lab)
    blocker = lab.node.popen(
        [
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', 4143)); s.listen(); "
            "print('up', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert blocker.stdout.readline().strip() == "up"
        path = lab.write_config(L.proxy_config("tproxy", "nftables"))
        r = lab.tproxy("run", "-c", str(path), check=False)
    finally:
        blocker.kill()
        blocker.wait()
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("tproxy: ")]
    assert errors == ["tproxy: cannot listen on 0.0.0.0:4143: Address already in use"], r.stderr
    assert snapshot(lab) == before


@pytest.mark.root
def test_without_cap_net_raw_one_line_and_exit_1(lab):
    path = lab.write_config(L.proxy_config("tproxy", "nftables"))
    os.chmod(lab.workdir, 0o755)
    os.chmod(path, 0o644)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    r = lab.node.run(
        [*cmd, sys.executable, "-m", "tproxy", "run", "-c", str(path), "--no-rules"], check=False, cwd=ROOT
    )
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("tproxy: ")]
    assert len(lines) == 1 and "CAP_NET_RAW" in lines[0], r.stderr


def test_operator_error_is_found_inside_nested_exception_groups():
    err = TproxyError("cannot start the admin endpoint")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [err]), KeyError("x")])
    assert runner._operator_error(group) is err
    assert runner._operator_error(ExceptionGroup("g", [ValueError("v")])) is None


@pytest.mark.root
def test_admin_port_taken_is_one_line_and_the_rules_come_out(lab):
    before = snapshot(lab)
    blocker = lab.node.popen(
        [
            sys.executable,
            "-c",
            f"import socket,sys; s=socket.socket(); s.bind(('{L.ADMIN[0]}', {L.ADMIN[1]})); s.listen(); "
            "print('up', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert blocker.stdout.readline().strip() == "up"
        path = lab.write_config(L.proxy_config("nat", "nftables"))
        r = lab.tproxy("run", "-c", str(path), check=False)
    finally:
        blocker.kill()
        blocker.wait()
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"tproxy: cannot start the admin endpoint on {L.ADMIN[0]}:{L.ADMIN[1]}: Address already in use"
    )
    assert "Traceback" not in r.stderr
    assert snapshot(lab) == before
