"""conf/kubernetes/pod-*.yaml, run as a kubelet and runc would run them, without a cluster (root).

The pod is a network namespace (the lab's node; the client namespace stands for everything outside the pod, the
kubelet's probes included). Each container runs its manifest's exact args and environment (the ConfigMap through
envFrom, and what the kubelet adds) with exactly what the runtime grants: the manifest's uid and gid, the added
capabilities in the bounding and permitted sets and never the ambient set (ambient ones would let a manifest pass
that a kubelet would break), no_new_privs for allowPrivilegeEscalation: false, a read-only root and /proc/sys, an
emptyDir at /run where the manifest mounts one. The image's entrypoint is stood in for by a copy of this host's
interpreter carrying the image's file capability (cap_net_raw+p) and tproxy on PYTHONPATH: the image itself is tested
in tests/test_image.py.

What it cannot show: scheduling, the CNI plugin's own rules, the image registry, the kubelet's restart back-off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_kubernetes import SIDECAR, ZERO, Pod
from tests.test_privileges_netns import file_capable_copy, runtime_argv
from tproxy.lab import CLIENT, NODE, Lab
from tproxy.netns import Netns

pytestmark = pytest.mark.root

APP_PORT = 8080
IMAGE_PATH = "/opt/tproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what a kubelet adds to every container's environment, whatever enableServiceLinks says
KUBELET_ENV = {
    "HOSTNAME": "echo-5d9c7b6f4-abcde",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_SERVICE_PORT_HTTPS": "443",
    "KUBERNETES_PORT": "tcp://10.96.0.1:443",
}
# the container's mounts: /proc/sys and / read-only; /run a fresh tmpfs (an emptyDir, or the image's empty /run)
MOUNTS = """
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount -t tmpfs -o mode=0755 tmpfs /run
[ "$RUN_RW" = 1 ] || mount -o remount,ro /run
[ "$ROOT_RO" = 1 ] && mount -o remount,bind,ro /
exec "$@"
"""


@pytest.fixture(scope="module")
def entrypoint() -> Iterator[tuple[list[str], dict[str, str]]]:
    """The image's `tproxy` entrypoint, stood in for: a cap_net_raw+p interpreter and tproxy on PYTHONPATH."""
    workdir = Path(tempfile.mkdtemp(prefix="tpx-pod-"))
    try:
        argv, env = runtime_argv(workdir, force_copy=True)
        yield file_capable_copy(argv, workdir, "cap_net_raw+p"), {"PYTHONPATH": env["PYTHONPATH"]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def grant(container: dict) -> list[str]:
    """setpriv's arguments for the container's securityContext, as runc applies it to a process it execs."""
    sc = container["securityContext"]
    caps = sc.get("capabilities", {})
    assert caps.get("drop") == ["ALL"]  # (anything else would need the runtime's default set here)
    bounding = "".join(f",+{c.lower()}" for c in caps.get("add", []))
    argv = ["setpriv", f"--reuid={sc['runAsUser']}", f"--regid={sc['runAsGroup']}", "--clear-groups"]
    argv += ["--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set=-all{bounding}"]
    if sc.get("allowPrivilegeEscalation") is False:
        argv.append("--nnp")
    return argv


def container_argv(pod: Pod, container: dict, entry: list[str], extra_env: dict[str, str]) -> tuple[list, dict]:
    """argv and environment that run ``container`` in the pod's namespace as the runtime would."""
    assert "command" not in container  # the image's entrypoint, then the manifest's args
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert mounts <= {"/run"}, mounts
    env = {"PATH": IMAGE_PATH, **KUBELET_ENV, **pod.env(container), **extra_env}
    env["RUN_RW"] = "1" if "/run" in mounts else "0"
    env["ROOT_RO"] = "1" if container["securityContext"].get("readOnlyRootFilesystem") else "0"
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", MOUNTS, "sh"]
    return [*argv, *grant(container), *entry, *container["args"]], env


def run_container(ns: Netns, pod: Pod, container: dict, entry, extra_env, **overrides) -> subprocess.CompletedProcess:
    argv, env = container_argv(pod, container, entry, {**extra_env, **overrides})
    return ns.run(argv, check=False, env=env, cwd="/", timeout=60)


def probe(ns: Netns, url: str) -> tuple[int, str]:
    code = (
        "import sys, urllib.request as u, urllib.error as e\n"
        "try:\n r = u.urlopen(sys.argv[1], timeout=1); print(r.status, r.read().decode().strip())\n"
        "except e.HTTPError as x: print(x.code, x.read().decode().strip())\n"
        "except OSError as x: print(0, x)\n"
    )
    out = ns.run(["python3", "-c", code, url], check=False, timeout=10).stdout.strip()
    status, _, body = out.partition(" ")
    return int(status or 0), body


def wait_probe(ns: Netns, url: str, spec: dict, proc: subprocess.Popen, log: Path) -> int:
    """A kubelet's httpGet probe: every periodSeconds, success on 2xx/3xx, give up after failureThreshold."""
    for attempt in range(1, spec.get("failureThreshold", 3) + 1):
        status, _ = probe(ns, url)
        if 200 <= status < 400:
            return attempt
        if proc.poll() is not None:
            raise AssertionError(f"the container exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(spec.get("periodSeconds", 10))
    raise AssertionError(f"probe {url} failed {spec.get('failureThreshold', 3)} times")


def host_state() -> str:
    cmds = [
        ["nft", "list", "ruleset"],
        ["iptables-save"],
        ["ip6tables-save"],
        ["ip", "-4", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "-4", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
    ]  # (not /run/tproxy: other tests on this machine write there; the containers had a /run of their own)
    out = []
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        out.append("\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if not ln.startswith("#")))
    return "\n".join(out)


def metric(ns: Netns, name: str) -> float:
    status, body = probe(ns, f"http://{NODE[4]}:4191/metrics")
    assert status == 200
    (value,) = [ln.split()[-1] for ln in body.splitlines() if ln.startswith(name + " ")]
    return float(value)


# The zero-capability pod's application: reads the PROXY v2 header tproxy sends first, answers "<header's source>
# <connection's peer>". (nginx in the manifest; here a few lines, so that the test reads the header itself.)
PP_APP = r"""
import ipaddress, socket, struct, sys
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
def exactly(c, n):
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", int(sys.argv[1])))
srv.listen(16)
print("APP READY", flush=True)
while True:
    c, peer = srv.accept()
    with c:
        head = exactly(c, 16)
        body = exactly(c, struct.unpack("!H", head[14:16])[0])
        size = {0x11: 4, 0x21: 16}[head[13]] if head[:12] == SIG and head[12] == 0x21 else 0
        source = ipaddress.ip_address(body[:size]) if size else "no-header"
        address = ipaddress.ip_address(peer[0])
        address = getattr(address, "ipv4_mapped", None) or address
        c.sendall(f"{source} {address}\n".encode())
"""

CLIENT_LINE = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
    data = b""
    while not data.endswith(b"\n"):
        more = c.recv(100)
        if not more:
            break
        data += more
print(data.decode().strip())
"""


def echo_app(lab: Lab) -> None:
    lab.start_app({APP_PORT: "echo"})


def echo_app_sees_the_client(lab: Lab) -> None:
    jobs = [{"dst": NODE[f], "port": APP_PORT, "kind": "echo", "sizes": [4096]} for f in (4, 6)]
    results = lab.connect(jobs)
    assert [r["ok"] for r in results] == [True, True], results
    assert [r["peer"][0] for r in results] == [CLIENT[4], CLIENT[6]], results


def pp_app(lab: Lab) -> None:
    lab.app = lab.node.popen(
        ["python3", "-c", PP_APP, str(APP_PORT)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert lab.app.stdout.readline().strip() == "APP READY"


def pp_app_sees_the_client_in_the_header(lab: Lab) -> None:
    for f in (4, 6):
        line = lab.client.run(["python3", "-c", CLIENT_LINE, NODE[f], str(APP_PORT)], timeout=30).stdout.strip()
        assert line == f"{CLIENT[f]} {NODE[f]}", line  # the client in the header; the pod's own address connects


VARIANTS = {
    "pod-sidecar": (SIDECAR, "tproxy mode", "0000000000002000", echo_app, echo_app_sees_the_client),
    "pod-zero-capability": (ZERO, "nat mode", "0000000000000000", pp_app, pp_app_sees_the_client_in_the_header),
}


@pytest.mark.parametrize("variant", ["pod-sidecar", "pod-zero-capability"])
def test_the_pod_runs_as_the_manifest_says(entrypoint, variant):
    manifest, installed, cap_eff, start_app, app_sees_the_client = VARIANTS[variant]
    entry, extra_env = entrypoint
    pod = Pod(manifest)
    before = host_state()
    lab = Lab.create(app=False)
    sidecar = None
    try:
        # a tproxy pod configured with "loopback": it needs route_localnet, and /proc/sys is read-only in a container;
        # one clear line, and nothing is left behind
        if pod.config(pod.proxy).mode == "tproxy":
            empty = lab.snapshot()
            loopback = run_container(lab.node, pod, pod.rules, entry, extra_env, TPROXY_PROXY_UPSTREAM="loopback")
            assert loopback.returncode == 1, loopback
            assert loopback.stderr.strip().splitlines() == [
                "tproxy: cannot write /proc/sys/net/ipv4/conf/all/route_localnet: Read-only file system"
                ' (in a container /proc/sys is read-only: use proxy.upstream = "original")'
            ], loopback
            assert lab.snapshot() == empty

        # the rules init container: exits 0; run again (a restarted pod re-runs it), the same rules
        first = run_container(lab.node, pod, pod.rules, entry, extra_env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith(f"tproxy rules installed: {installed}, nftables"), first.stdout
        rules_once = lab.snapshot()
        again = run_container(lab.node, pod, pod.rules, entry, extra_env)
        assert again.returncode == 0, again.stderr
        assert lab.snapshot() == rules_once

        # the native sidecar, until its startupProbe passes (probed from outside the pod, like the kubelet)
        argv, env = container_argv(pod, pod.proxy, entry, extra_env)
        log_path = lab.workdir / "sidecar.log"
        with open(log_path, "wb") as log:
            sidecar = lab.node.popen(argv, env=env, cwd="/", stdout=log, stderr=subprocess.STDOUT)
        port = pod.proxy["ports"][0]["containerPort"]
        startup = pod.proxy["startupProbe"]
        wait_probe(lab.client, f"http://{NODE[4]}:{port}{startup['httpGet']['path']}", startup, sidecar, log_path)
        assert probe(lab.client, f"http://{NODE[4]}:{port}/live")[0] == 200
        served = [int(p) for p in lab.node.run(["ip", "netns", "pids", lab.node.name]).stdout.split()]
        status = {
            k: v.strip()
            for k, _, v in (ln.partition(":") for ln in Path(f"/proc/{sidecar.pid}/status").read_text().splitlines())
        }
        assert sidecar.pid in served
        assert status["Uid"].split()[0] == str(pod.proxy["securityContext"]["runAsUser"])
        assert (status["CapEff"], status["CapAmb"], status["NoNewPrivs"]) == (cap_eff, "0" * 16, "1")

        # the application, then a client outside the pod: the application sees the client's own address
        start_app(lab)
        accepted = metric(lab.client, "tproxy_connections_accepted_total")
        app_sees_the_client(lab)
        assert metric(lab.client, "tproxy_connections_accepted_total") - accepted == 2

        # pod deletion: the kubelet stops the application, then the sidecar (SIGTERM); the namespace goes
        lab.stop_app()
        sidecar.terminate()
        assert sidecar.wait(timeout=40) == 0, log_path.read_text()
        events = [json.loads(ln).get("event") for ln in log_path.read_text().splitlines() if ln.startswith("{")]
        assert "start" in events and "stop" in events, log_path.read_text()
    finally:
        if sidecar is not None and sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
        lab.destroy()
    assert lab.node.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert host_state() == before
