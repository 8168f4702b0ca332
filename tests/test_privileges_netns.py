"""Least privilege, for real (root, in network namespaces): the proxy serves as uid 65534 with only CAP_NET_RAW.

- split deployment: ``tproxy rules apply`` as root, then ``tproxy run --no-rules`` under ``setpriv`` with only
  CAP_NET_RAW; without it, one clear line and exit status 1;
- privileged parent: ``[privileges] user = "nobody"``; the serving child runs as nobody with only CAP_NET_RAW, and
  SIGTERM to the parent leaves the namespace's rules and routes as they were before start.

Every case checks that the application saw the client's own address *and* that the connections went through the
proxy (its accepted counter), since in tproxy mode a connection that bypasses a dead proxy also keeps the client IP.

The unprivileged process must be able to read the interpreter and the installed package: :func:`runtime_argv` checks,
and where the checkout is not readable by that uid (a clone under /root, mode 700) it runs from a world-readable copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

import tproxy
from tproxy.lab import CLIENT, ECHO_PORT, NODE, Lab, Proxy, proxy_config
from tproxy.privileges import ProcessCredentials

pytestmark = pytest.mark.root

NOBODY = 65534
NET_RAW_ONLY = 0x2000  # 1 << CAP_NET_RAW
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
WITH_NET_RAW = ["--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw"]
WITHOUT_CAPS = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
PROBE = "import tproxy.cli, tproxy.runner, tproxy.server, tproxy.privileges, trio, pyroute2, typer, attrs"


def runtime_argv(workdir: Path, *, force_copy: bool = False) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run ``python -m tproxy`` readable by uid 65534.

    The checkout and its venv when that uid can import everything from them (``/work/main``, Debian's interpreter);
    otherwise a world-readable copy of the installed packages and of tproxy under ``workdir``, run by the venv's base
    interpreter with ``PYTHONPATH``.
    """
    env = dict(os.environ)
    if not force_copy:
        probe = subprocess.run([*SETPRIV, sys.executable, "-c", PROBE], capture_output=True, text=True, cwd="/")
        if probe.returncode == 0:
            return [sys.executable, "-m", "tproxy"], env
    base = os.path.realpath(sys.executable)
    site = Path(sysconfig.get_paths()["purelib"])
    src = Path(tproxy.__file__).resolve().parent.parent
    dst = workdir / "runtime"
    skip = shutil.ignore_patterns("__pycache__", "*.pth", "__editable__*", "pip", "ruff", "_pytest", "pytest")
    shutil.copytree(site, dst / "site", ignore=skip)
    pycache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(src / "tproxy", dst / "src" / "tproxy", ignore=pycache)
    if (src / "backends").is_dir():  # a checkout: backends/ installs as tproxy.backends
        shutil.copytree(src / "backends", dst / "src" / "tproxy" / "backends", ignore=pycache, dirs_exist_ok=True)
    for d in (workdir, *(p for p in dst.rglob("*") if p.is_dir()), dst):
        d.chmod(0o755)
    for f in dst.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    env["PYTHONPATH"] = f"{dst / 'src'}:{dst / 'site'}"
    argv = [base, "-s", "-m", "tproxy"]
    probe = subprocess.run([*SETPRIV, base, "-s", "-c", PROBE], capture_output=True, text=True, cwd="/", env=env)
    if probe.returncode != 0:
        pytest.fail(f"uid {NOBODY} cannot run tproxy even from a world-readable copy ({base}): {probe.stderr.strip()}")
    return argv, env


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[list[str], dict[str, str]]]:
    workdir = Path(tempfile.mkdtemp(prefix="tpx-priv-"))
    try:
        yield runtime_argv(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab.up() as lab:
        lab.workdir.chmod(0o755)  # the unprivileged proxy reads its config from here
        yield lab


def start(lab: Lab, argv: list[str], env: dict[str, str], config: Path, *, wait: bool = True, **kw) -> Proxy:
    log_path = lab.workdir / f"proxy-{len(lab.proxies)}.log"
    with open(log_path, "wb") as out:
        proc = lab.node.popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd="/", **kw
        )
    proxy = Proxy(proc=proc, config_path=config, log_path=log_path)
    lab.proxies.append(proxy)
    if wait:
        lab.wait_ready(proxy)
    return proxy


def accepted(lab: Lab) -> int:
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:4191/metrics', timeout=10).read().decode())"
    text = lab.node.run([sys.executable, "-c", code]).stdout
    (value,) = [s.value for f in parse_text(text) for s in f.samples if s.name == "tproxy_connections_accepted_total"]
    return int(value)


def assert_client_address_seen_through_proxy(lab: Lab) -> None:
    """One connection per family: the application saw the client's own address, and the proxy accepted both."""
    before = accepted(lab)
    results = lab.connect([{"dst": NODE[fam], "port": ECHO_PORT, "kind": "echo", "sizes": [4096]} for fam in (4, 6)])
    assert [r["ok"] for r in results] == [True, True], results
    assert sorted(r["peer"][0] for r in results) == sorted([CLIENT[4], CLIENT[6]]), results
    assert accepted(lab) - before == 2


def rules_and_routes(lab: Lab) -> str:
    """The node's rules and routes, less the IPv6 link-local ones: the kernel adds those by itself once the veth's
    link-local address has passed DAD, which may happen while a test runs."""
    return "\n".join(line for line in lab.snapshot().splitlines() if "fe80:" not in line)


def serving_child(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_split_deployment_serves_as_nobody_with_only_net_raw(lab, runtime, backend):
    argv, env = runtime
    config = lab.write_config(proxy_config("tproxy", backend))
    config.chmod(0o644)
    lab.tproxy("rules", "apply", "-c", str(config))
    proxy = start(lab, [*SETPRIV, *WITH_NET_RAW, *argv, "run", "--no-rules", "-c", str(config)], env, config)

    creds = ProcessCredentials.of(proxy.pid)
    assert creds.uids == (NOBODY,) * 4 and creds.gids == (NOBODY,) * 4
    assert creds.effective == creds.permitted == NET_RAW_ONLY
    assert_client_address_seen_through_proxy(lab)

    assert proxy.stop() == 0, proxy.log()
    lab.tproxy("rules", "remove", "-c", str(config))


@pytest.mark.parametrize(("mode", "preserve_source"), [("tproxy", None), ("nat", True)])
def test_split_deployment_without_net_raw_fails_at_start(lab, runtime, mode, preserve_source):
    argv, env = runtime
    config = lab.write_config(proxy_config(mode, "nftables", preserve_source=preserve_source))
    config.chmod(0o644)
    r = lab.node.run(
        [*SETPRIV, *WITHOUT_CAPS, *argv, "run", "--no-rules", "-c", str(config)], check=False, env=env, cwd="/"
    )
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tproxy: missing CAP_NET_RAW: "), lines
    assert "IP_TRANSPARENT" in lines[0]


def test_unprivileged_run_that_would_install_rules_fails_at_start(lab, runtime):
    argv, env = runtime
    config = lab.write_config(proxy_config("tproxy", "nftables"))
    config.chmod(0o644)
    before = rules_and_routes(lab)
    r = lab.node.run([*SETPRIV, *WITH_NET_RAW, *argv, "run", "-c", str(config)], check=False, env=env, cwd="/")
    assert r.returncode == 1, r
    assert r.stderr.startswith("tproxy: missing CAP_NET_ADMIN: installing the interception rules"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert rules_and_routes(lab) == before


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_privileged_parent_drops_the_proxy_and_removes_rules_after_it(lab, runtime, backend):
    argv, env = runtime
    config = lab.write_config(proxy_config("tproxy", backend) + '\n[privileges]\nuser = "nobody"\n')
    before = rules_and_routes(lab)
    parent = start(lab, [*argv, "run", "-c", str(config)], env, config)
    child = serving_child(parent.pid)

    assert ProcessCredentials.of(parent.pid).uids[1] == 0
    creds = ProcessCredentials.of(child)
    assert creds.uids == (NOBODY,) * 4 and creds.groups == (creds.gids[0],)
    assert creds.effective == creds.permitted == creds.bounding == NET_RAW_ONLY
    assert creds.inheritable == creds.ambient == 0 and creds.no_new_privs
    assert rules_and_routes(lab) != before  # the rules are in
    assert_client_address_seen_through_proxy(lab)

    assert parent.stop(signal.SIGTERM) == 0, parent.log()
    assert not Path(f"/proc/{child}").exists()
    assert rules_and_routes(lab) == before


def test_privileged_parent_in_nat_mode_keeps_no_capability(lab, runtime):
    argv, env = runtime
    config = lab.write_config(proxy_config("nat", "nftables") + '\n[privileges]\nuser = "nobody"\n')
    before = rules_and_routes(lab)
    parent = start(lab, [*argv, "run", "-c", str(config)], env, config)
    creds = ProcessCredentials.of(serving_child(parent.pid))
    assert creds.uids[1] == NOBODY and creds.effective == creds.permitted == creds.bounding == 0
    results = lab.connect({"dst": NODE[4], "port": ECHO_PORT, "kind": "echo", "sizes": [100]})
    assert results[0]["ok"] and results[0]["peer"][0] == NODE[4], results  # nat: the proxy's own address
    assert parent.stop(signal.SIGTERM) == 0, parent.log()
    assert rules_and_routes(lab) == before


def test_privileged_parent_ctrl_c_reaches_the_proxy_once(lab, runtime):
    """A terminal's Ctrl-C signals the whole foreground process group. The proxy has a process group of its own, so
    it gets SIGINT once, through the parent (a second signal would cut its drain short), and still stops cleanly."""
    argv, env = runtime
    config = lab.write_config(proxy_config("tproxy", "nftables") + '\n[privileges]\nuser = "nobody"\n')
    before = rules_and_routes(lab)
    parent = start(lab, [*argv, "run", "-c", str(config)], env, config, start_new_session=True)
    child = serving_child(parent.pid)
    assert os.getpgid(parent.pid) == parent.pid and os.getpgid(child) == child
    os.killpg(parent.pid, signal.SIGINT)
    assert parent.proc.wait(30) == 0, parent.log()
    assert rules_and_routes(lab) == before


def test_privileged_parent_removes_rules_when_the_proxy_is_killed(lab, runtime):
    argv, env = runtime
    config = lab.write_config(proxy_config("tproxy", "iptables") + '\n[privileges]\nuser = "nobody"\n')
    before = rules_and_routes(lab)
    parent = start(lab, [*argv, "run", "-c", str(config)], env, config)
    os.kill(serving_child(parent.pid), signal.SIGKILL)
    assert parent.proc.wait(30) == 128 + signal.SIGKILL, parent.log()
    assert "proxy_killed" in parent.log()
    assert rules_and_routes(lab) == before


# As a container runtime (runc) starts a non-root container with NET_RAW added: bounding and permitted, never ambient
# or inheritable; no_new_privs for allowPrivilegeEscalation: false. execve keeps NET_RAW only through the interpreter's
# file capability (the image: `setcap cap_net_raw+p`, no effective bit), and `tproxy run` raises it to effective.
AS_A_RUNTIME = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all,+net_raw", "--nnp"]


@pytest.fixture(scope="module")
def copied_runtime() -> Iterator[tuple[list[str], dict[str, str]]]:
    """The base interpreter with PYTHONPATH (a copy of it elsewhere would lose a venv)."""
    workdir = Path(tempfile.mkdtemp(prefix="tpx-priv-"))
    try:
        yield runtime_argv(workdir, force_copy=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def file_capable_copy(argv: list[str], workdir: Path, caps: str) -> list[str]:
    """``argv`` with its interpreter replaced by a copy carrying the file capabilities ``caps``."""
    copy = workdir / f"python-{caps.replace('+', '-').replace('=', '-')}"
    shutil.copy2(os.path.realpath(argv[0]), copy)
    copy.chmod(0o755)
    subprocess.run(["setcap", caps, str(copy)], check=True)
    return [str(copy), *argv[1:]]


def test_as_a_kubernetes_runtime_the_interpreters_file_capability_serves(lab, copied_runtime):
    argv, env = copied_runtime
    argv = file_capable_copy(argv, lab.workdir, "cap_net_raw+p")
    config = lab.write_config(proxy_config("tproxy", "nftables"))
    config.chmod(0o644)
    lab.tproxy("rules", "apply", "-c", str(config))
    proxy = start(lab, [*SETPRIV, *AS_A_RUNTIME, *argv, "run", "--no-rules", "-c", str(config)], env, config)

    creds = ProcessCredentials.of(proxy.pid)
    assert creds.uids == (NOBODY,) * 4 and creds.no_new_privs
    assert creds.effective == creds.permitted == NET_RAW_ONLY and creds.ambient == creds.inheritable == 0
    assert_client_address_seen_through_proxy(lab)
    assert proxy.stop() == 0, proxy.log()
    lab.tproxy("rules", "remove", "-c", str(config))


def test_as_a_kubernetes_runtime_without_the_file_capability_net_raw_is_lost(lab, copied_runtime):
    """The control: the same grant and a plain interpreter fail at start (so the test above proves the file cap)."""
    argv, env = copied_runtime
    config = lab.write_config(proxy_config("tproxy", "nftables"))
    config.chmod(0o644)
    r = lab.node.run([*SETPRIV, *AS_A_RUNTIME, *argv, "run", "--no-rules", "-c", str(config)], check=False, env=env)
    assert r.returncode == 1 and r.stderr.startswith("tproxy: missing CAP_NET_RAW: "), r


def test_the_permitted_only_file_capability_runs_without_net_raw_in_the_bounding_set(lab, copied_runtime):
    """Why no effective bit: with cap_net_raw+ep the kernel refuses to execute the interpreter where NET_RAW is not in
    the bounding set (capabilities drop ALL: the zero-capability pod); with +p it runs."""
    argv, env = copied_runtime
    no_caps = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--nnp"]
    plus_p = file_capable_copy(argv, lab.workdir, "cap_net_raw+p")
    plus_ep = file_capable_copy(argv, lab.workdir, "cap_net_raw+ep")
    ok = lab.node.run([*SETPRIV, *no_caps, *plus_p, "--version"], check=False, env=env, cwd="/")
    assert ok.returncode == 0 and ok.stdout.startswith("tproxy "), ok
    refused = lab.node.run([*SETPRIV, *no_caps, *plus_ep, "--version"], check=False, env=env, cwd="/")
    assert refused.returncode == 126 and "Operation not permitted" in refused.stderr, refused
