"""Network namespaces for the lab, the demo and the tests: unique names, always deleted.

Resource handling: :func:`netns` deletes the namespace (and so every interface, rule and route inside it, and
tproxy's state files under /run/tproxy that name it) when the block ends, whether it ends normally, by an exception
or by KeyboardInterrupt. Processes started inside with :meth:`Netns.popen` are the caller's to end;
:meth:`Netns.delete` kills what is left in the namespace by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence

from tproxy.errors import StateError
from tproxy.state import forget_netns

PREFIX = "tpx-"


class Netns:
    """A named network namespace (``ip netns``), with helpers to run commands inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside; text output captured. Raises CalledProcessError (with stderr) when ``check``."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.argv(cmd), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], **kw)

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd), **kw)

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def delete(self) -> None:
        """Kill what runs inside (by PID), drop tproxy's state files of the namespace (``tproxy rules remove`` leaves
        one), then delete it. (The files go first: once deleted, its inode may be another namespace's.)"""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, StateError):
            forget_netns(os.stat(f"/run/netns/{self.name}").st_ino)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def unique_name(role: str) -> str:
    """``tpx-<role>-<random>``: two runs (or two tests) never collide; at most 15 characters for veth names."""
    return f"{PREFIX}{role[:4]}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def netns(role: str = "ns") -> Iterator[Netns]:
    """A fresh namespace with ``lo`` up, deleted when the block ends."""
    ns = Netns(unique_name(role))
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield ns
    finally:
        ns.delete()
