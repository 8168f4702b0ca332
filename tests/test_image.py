"""The container image (conf/Containerfile, `just image`): built from Debian packages, run with podman.

Minutes (mmdebstrap downloads a base system): marked ``image``, left out of the default ``just test`` and run by
``just test-image`` (and CI, .ci/run). Podman runs containers on our machines only with runc and limits no higher
than ours (crun and podman's default limits need cgroup v2 and CAP_SYS_RESOURCE): see ``PODMAN``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy import __version__

pytestmark = [pytest.mark.root, pytest.mark.image]

ROOT = Path(__file__).resolve().parent.parent
TAG = "localhost/tproxy:test-image"
PODMAN = ["podman", "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
UID = 10001


def podman(*args: str, timeout: float = 120, rm: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [*PODMAN, *(["--rm"] if rm else []), "--network", "none", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPROXY_")}
    r = subprocess.run(["just", "image", TAG], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    try:
        yield TAG
    finally:
        subprocess.run(["podman", "rmi", "--force", TAG, "localhost/tproxy-base:bookworm"], capture_output=True)


def test_image_config(image):
    (info,) = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True).stdout)
    assert info["Config"]["User"] == f"{UID}:{UID}"
    assert info["Config"]["Entrypoint"] == ["tproxy"]


def test_version_as_the_default_user_with_no_capabilities(image):
    """The entrypoint runs where NET_RAW is not even in the bounding set (the zero-capability pod): the interpreter's
    file capability has no effective bit, which the kernel would refuse to execute there."""
    r = podman("--cap-drop", "ALL", "--security-opt", "no-new-privileges", image, "--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"tproxy {__version__}"), r.stderr


def test_contents(image):
    script = (
        "id -u; getcap /opt/tproxy/bin/python3; getcap /usr/bin/python3.11; echo; head -1 /opt/tproxy/bin/tproxy; "
        "iptables -V; ip6tables -V; nft --version >/dev/null && echo nft; ls /opt/tproxy/bin | grep -c '^pip' || true"
    )
    r = podman("--entrypoint", "sh", image, "-c", script)
    assert r.returncode == 0, r.stderr
    uid, cap, none, shebang, v4, v6, nft, pips = r.stdout.splitlines()
    assert uid == str(UID)
    assert cap == "/opt/tproxy/bin/python3 cap_net_raw=p"  # the venv's copy only, never Debian's interpreter
    assert none == ""
    assert shebang == "#!/opt/tproxy/bin/python3"
    assert "(nf_tables)" in v4 and "(nf_tables)" in v6 and nft == "nft" and pips == "0"


def test_check_passes_in_the_image(image):
    r = podman("--user", "0", "--privileged", "-e", "TPROXY_INTERCEPT_PORTS=8080", image, "check", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("PASS config valid: environment ") and all(ln.startswith("PASS ") for ln in lines)
    assert any(ln.startswith("PASS rules install and remove") for ln in lines)


def test_the_proxy_serves_with_net_raw_granted_as_a_runtime_grants_it(image):
    """runc gives a non-root container its added capabilities in bounding and permitted, never ambient (podman adds
    ambient ones itself, so the grant is made by setpriv here, which execs the entrypoint directly: anything in
    between would drop the permitted set): the file capability carries NET_RAW across exec, `tproxy run` raises it.
    Stopped from outside, as a kubelet does (a process of uid 0 without CAP_KILL could not signal it)."""
    grant = [
        "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
        "--bounding-set=-all,+net_raw", "--nnp",
    ]  # fmt: skip
    env = ["-e", "TPROXY_INTERCEPT_PORTS=8080", "-e", "TPROXY_ADMIN_ADDRESS="]
    name = "tproxy-test-image-run"
    base = ["--detach", "--name", name, "--user", "0", "--cap-drop", "ALL", "--cap-add", "NET_RAW,SETUID,SETGID"]
    r = podman(*base, *env, "--entrypoint", "setpriv", image, *grant[1:], "tproxy", "run", "--no-rules", rm=False)
    assert r.returncode == 0, r.stderr
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while " start " not in logs and "tproxy:" not in logs and time.monotonic() < deadline:
            time.sleep(0.5)
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True).stderr
        subprocess.run(["podman", "stop", "--time", "10", name], capture_output=True, timeout=60)
        state = subprocess.run(["podman", "inspect", name, "--format", "{{.State.ExitCode}}"], capture_output=True)
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True).stderr
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True, timeout=60)
    assert " start " in logs and "missing CAP_NET_RAW" not in logs, logs
    assert state.stdout.strip() == b"0", logs
