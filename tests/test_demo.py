"""``tproxy demo`` as the README runs it: a subprocess, its table, its exit status, nothing left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tproxy import lab as L

pytestmark = pytest.mark.root


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tproxy", "demo", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def lab_names(out: str) -> tuple[str, str]:
    m = re.search(r"client (tpx-cli-\w+) .* node (tpx-node-\w+) ", out)
    assert m, out
    return m.group(1), m.group(2)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_demo_shows_every_mode_right_and_cleans_up(backend):
    args = () if backend == "nftables" else ("--backend", "iptables")
    r = demo(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("tproxy ", "nat "))]
    assert len(rows) == 3 * 2 * 2, r.stdout  # 3 modes x 2 families x 2 connections
    assert all(backend in row and " ok: " in row for row in rows), r.stdout
    client_ip = [row for row in rows if row.startswith("tproxy ")]
    assert all(row.count(L.CLIENT[4]) == 2 or row.count(L.CLIENT[6]) == 2 for row in client_ip), r.stdout
    udp = [ln for ln in r.stdout.splitlines() if ln.startswith("tproxy/udp ")]
    assert len(udp) == 2 * 2, r.stdout  # 2 families x 2 flows, each the client's own address, logged by the proxy
    assert all(backend in row and " ok: the client's address" in row for row in udp), r.stdout
    assert all(row.count(L.CLIENT[4]) == 2 or row.count(L.CLIENT[6]) == 2 for row in udp), r.stdout
    assert "every row is right" in r.stdout
    assert not set(lab_names(r.stdout)) & set(namespaces().split())


def test_demo_keep_leaves_a_working_lab_and_says_how_to_delete_it():
    r = demo("--keep")
    client, node = lab_names(r.stdout)
    m = re.search(r"kill ([\d ]+); ip netns delete", r.stdout)
    pids = [int(p) for p in m.group(1).split()] if m else []
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert m, r.stdout
        assert {client, node} <= set(namespaces().split())
        say = subprocess.run(
            ["ip", "netns", "exec", client, sys.executable, "-m", "tproxy.lab", "say", L.NODE[4], str(L.ECHO_PORT)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        src = re.search(r"from (\S+) (\d+)", say.stdout)
        peer = re.search(r"PEER (\S+) (\d+)", say.stdout)
        assert src and peer, say.stdout + say.stderr
        # the kept proxy is running: the application sees the client's IP, from another port (upstream "original")
        assert peer.group(1) == L.CLIENT[4] and peer.group(2) != src.group(2), say.stdout
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for ns in (client, node):
            L.Netns(ns).delete()
        w = re.search(r"rm -r (/\S+)", r.stdout)
        if w and "tpx-lab-" in w.group(1):
            shutil.rmtree(w.group(1), ignore_errors=True)
    assert not {client, node} & set(namespaces().split())


def test_a_lab_that_cannot_be_built_is_one_line_and_exit_1(tmp_path):
    """``ip netns add`` refused (here by an ``ip`` on PATH that fails): one line naming the cause, no traceback."""
    shim = tmp_path / "ip"
    shim.write_text('#!/bin/sh\necho "ip: refused by the test ($*)" >&2\nexit 1\n')
    shim.chmod(0o755)
    r = subprocess.run(
        [sys.executable, "-m", "tproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("tproxy: cannot build the demo lab: ip: refused by the test (netns add tpx-"), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
