"""The rule watcher (tproxy/watch.py), for real (root, in the lab's namespaces): an operator's flush under a running
proxy closes the route_localnet exposure, reports it, and (routing.reinstall) puts the rules back; `tproxy rules
remove` is never undone; the privileged parent heals too, and its child dies with it; `tproxy rules check`."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.test_admin import admin_get, scrape
from tests.test_privileges_netns import assert_client_address_seen_through_proxy, runtime_argv, serving_child, start
from tproxy import watch
from tproxy.lab import Lab, Proxy, proxy_config
from tproxy.netns import Netns, netns
from tproxy.state import STATE_DIR
from tproxy.stats import State, Stats

root = pytest.mark.root  # the lab: namespaces, real rules, a real proxy

INTERVAL = 0.5
FLUSH = {"nftables": ["nft", "flush", "ruleset"], "iptables": ["iptables", "-t", "mangle", "-F"]}


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[list[str], dict[str, str]]]:
    workdir = Path(tempfile.mkdtemp(prefix="tpx-watch-"))
    try:
        yield runtime_argv(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab.up() as lab:
        lab.workdir.chmod(0o755)  # the unprivileged child reads its config from here
        yield lab


def config(
    lab: Lab, backend: str, *, reinstall: bool = True, user: str | None = None, interval: float = INTERVAL
) -> Path:
    text = proxy_config("tproxy", backend, upstream="loopback")  # route_localnet=1 on all, and its guard
    text += f"\n[routing]\ncheck_interval = {interval}\nreinstall = {'true' if reinstall else 'false'}\n"
    if user:
        text += f'\n[privileges]\nuser = "{user}"\n'
    path = lab.write_config(text, f"watch-{backend}-{reinstall}-{user}.toml")
    path.chmod(0o644)
    return path


def route_localnet(lab: Lab) -> str:
    return lab.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()


def wait_for(what: str, pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def inode_of(ns: Netns) -> str:
    return ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()


def rules_check(lab: Lab, conf: Path) -> int:
    return lab.tproxy("rules", "check", "-c", str(conf), check=False).returncode


@root
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_a_flush_is_healed_in_the_safe_order_and_counted(lab, backend):
    conf = config(lab, backend)
    proxy = lab.start_proxy(conf)
    assert admin_get(lab, "/ready") == (200, "ready\n")
    assert route_localnet(lab) == "1" and rules_check(lab, conf) == 0
    m = scrape(lab)
    assert m["tproxy_rules_intact"] == 1 and m["tproxy_rules_reinstalled_total"] == 0

    lab.node.run(FLUSH[backend])
    wait_for("the rules reinstalled", lambda: scrape(lab)["tproxy_rules_reinstalled_total"] == 1)
    assert rules_check(lab, conf) == 0 and route_localnet(lab) == "1"
    assert admin_get(lab, "/ready") == (200, "ready\n") and scrape(lab)["tproxy_rules_intact"] == 1
    log = proxy.log()
    missing = log.index("rules_missing")
    line = log[missing : log.index("\n", missing)]
    assert "tproxy/loopback-guard" in line and "restored=net.ipv4.conf.all.route_localnet" in line, line
    assert missing < log.index("rules_reinstalled")
    assert proxy.stop() == 0, proxy.log()
    assert route_localnet(lab) == "0"


@root
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_nat_mode_rules_are_healed_too(lab, backend):
    text = proxy_config("nat", backend) + f"\n[routing]\ncheck_interval = {INTERVAL}\n"
    conf = lab.write_config(text, f"watch-nat-{backend}.toml")
    proxy = lab.start_proxy(conf)
    lab.node.run(["nft", "flush", "ruleset"] if backend == "nftables" else ["iptables", "-t", "nat", "-F"])
    wait_for("the rules reinstalled", lambda: scrape(lab)["tproxy_rules_reinstalled_total"] == 1)
    assert rules_check(lab, conf) == 0 and admin_get(lab, "/ready") == (200, "ready\n")
    assert proxy.stop() == 0, proxy.log()


@root
def test_without_reinstall_the_exposure_is_closed_and_ready_says_so(lab):
    conf = config(lab, "nftables", reinstall=False)
    proxy = lab.start_proxy(conf)
    lab.node.run(FLUSH["nftables"])
    wait_for("/ready 503", lambda: admin_get(lab, "/ready") == (503, "not ready: rules missing\n"))
    assert route_localnet(lab) == "0"  # back to its saved value: no guard, no route_localnet
    m = scrape(lab)
    assert m["tproxy_rules_intact"] == 0 and m["tproxy_ready"] == 0 and m["tproxy_rules_reinstalled_total"] == 0
    time.sleep(3 * INTERVAL)
    assert rules_check(lab, conf) == 1  # not put back
    lab.tproxy("rules", "apply", "-c", str(conf))  # the operator puts them back: the watcher sees it
    wait_for("/ready 200", lambda: admin_get(lab, "/ready") == (200, "ready\n"))
    assert scrape(lab)["tproxy_rules_intact"] == 1 and route_localnet(lab) == "1"
    assert proxy.stop() == 0, proxy.log()


@root
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_rules_removed_by_the_operator_stay_removed(lab, backend):
    conf = config(lab, backend)
    proxy = lab.start_proxy(conf)
    lab.tproxy("rules", "remove", "-c", str(conf))
    assert route_localnet(lab) == "0"
    wait_for(
        "/ready says removed", lambda: admin_get(lab, "/ready") == (503, "not ready: rules removed by the operator\n")
    )
    time.sleep(4 * INTERVAL)
    assert rules_check(lab, conf) == 3 and route_localnet(lab) == "0"
    assert scrape(lab)["tproxy_rules_reinstalled_total"] == 0
    assert "rules_reinstalled" not in proxy.log()
    lab.tproxy("rules", "apply", "-c", str(conf))  # the next install clears the operator's note
    assert rules_check(lab, conf) == 0
    wait_for("/ready 200", lambda: admin_get(lab, "/ready") == (200, "ready\n"))
    assert proxy.stop() == 0, proxy.log()


@root
def test_a_marker_an_earlier_namespace_left_under_this_inode_is_not_this_ones(lab):
    """`tproxy rules remove` marks the namespace by its inode, which the kernel gives to a new namespace once the old
    one is freed (seen here: a namespace deleted, and the next one created a second later had its inode). The marker
    holds the namespace's cookie too: an earlier namespace's marker must not say "removed by the operator" here."""
    conf = config(lab, "nftables")
    with netns("old") as old:
        for verb in ("apply", "remove"):
            old.run([sys.executable, "-m", "tproxy", "rules", verb, "-c", str(conf)])
        left = (STATE_DIR / f"removed-netns{inode_of(old)}.json").read_bytes()
    here = STATE_DIR / f"removed-netns{inode_of(lab.node)}.json"
    fd = os.open(here, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(left)  # as if that namespace had had this one's inode
    r = lab.tproxy("rules", "check", "-c", str(conf), check=False)
    assert r.returncode == 1 and "missing" in r.stdout, r  # not 3, "removed by the operator"
    proxy = lab.start_proxy(conf)
    lab.node.run(["nft", "flush", "ruleset"])
    wait_for("healed", lambda: scrape(lab)["tproxy_rules_reinstalled_total"] == 1)
    lab.tproxy("rules", "remove", "-c", str(conf))  # this namespace's own marker
    assert rules_check(lab, conf) == 3
    wait_for(
        "/ready says removed", lambda: admin_get(lab, "/ready") == (503, "not ready: rules removed by the operator\n")
    )
    assert proxy.stop() == 0, proxy.log()


@root
def test_no_rules_cannot_verify(lab):
    conf = config(lab, "nftables")
    lab.tproxy("rules", "apply", "-c", str(conf))
    proxy = lab.start_proxy(conf, extra=["--no-rules"])
    assert admin_get(lab, "/ready") == (200, "ready (rules not verified: --no-rules)\n")
    assert "tproxy_rules_intact" not in scrape(lab)
    assert proxy.stop() == 0, proxy.log()
    lab.tproxy("rules", "remove", "-c", str(conf))


@root
def test_the_privileged_parent_heals_and_tells_the_child(lab, runtime):
    argv, env = runtime
    conf = config(lab, "nftables", user="nobody")
    proxy = start(lab, [*argv, "run", "-c", str(conf)], env, conf)
    child = serving_child(proxy.pid)
    lab.node.run(FLUSH["nftables"])
    wait_for("the child reports the reinstall", lambda: scrape(lab)["tproxy_rules_reinstalled_total"] == 1)
    assert rules_check(lab, conf) == 0 and route_localnet(lab) == "1"
    assert admin_get(lab, "/ready") == (200, "ready\n")
    assert_client_address_seen_through_proxy(lab)

    lab.tproxy("rules", "remove", "-c", str(conf))
    wait_for(
        "/ready says removed", lambda: admin_get(lab, "/ready") == (503, "not ready: rules removed by the operator\n")
    )
    time.sleep(3 * INTERVAL)
    assert rules_check(lab, conf) == 3
    assert proxy.stop() == 0, proxy.log()
    assert not Path(f"/proc/{child}").exists()


@root
def test_the_serving_child_dies_with_a_killed_parent(lab, runtime):
    """PR_SET_PDEATHSIG, set after the drop: SIGKILL the privileged parent and the child stops (its grace is 2 s)."""
    argv, env = runtime
    conf = config(lab, "nftables", user="nobody")
    proxy: Proxy = start(lab, [*argv, "run", "-c", str(conf)], env, conf)
    child = serving_child(proxy.pid)
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.proc.wait(10)
    wait_for("the child to exit", lambda: not Path(f"/proc/{child}").exists(), timeout=15)
    r = lab.node.run(["ss", "-Htln", "sport", "= :4191"])
    assert r.stdout.strip() == ""  # nothing serves the admin endpoint (nor the proxy) any more
    lab.tproxy("rules", "remove", "-c", str(conf))


@root
@pytest.mark.parametrize("user", [None, "nobody"])
def test_sighup_checks_at_once(lab, runtime, user):
    """With an hour between checks, a SIGHUP (to the single process, or to the privileged parent) checks now."""
    argv, env = runtime
    conf = config(lab, "nftables", user=user, interval=3600)
    proxy = start(lab, [*argv, "run", "-c", str(conf)], env, conf)
    lab.node.run(FLUSH["nftables"])
    time.sleep(1)
    assert rules_check(lab, conf) == 1
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for("the rules reinstalled", lambda: scrape(lab)["tproxy_rules_reinstalled_total"] == 1, timeout=10)
    assert rules_check(lab, conf) == 0 and admin_get(lab, "/ready") == (200, "ready\n")
    assert proxy.stop() == 0, proxy.log()


# ----------------------------------------------------------------------------------------------------------------
# The pipe between the privileged parent and the serving child (no root needed)


async def test_the_child_applies_what_the_parent_reports():
    r, w = os.pipe()
    reporter = watch.PipeReporter(w)
    stats, state = Stats(), State(rules_intact=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.follow_parent, r, stats, state)
        reporter.send(watch.Report(False, watch.NOTE_MISSING, ("nft inet tproxy_rules: rule tproxy/x missing",)))
        await wait_until(lambda: state.rules_intact is False)
        assert state.rules_note == "rules missing" and stats.rules_reinstalled == 0
        reporter.send(watch.Report(True, "", (), reinstalled=True))
        await wait_until(lambda: state.rules_intact is True)
        assert state.rules_note == "" and stats.rules_reinstalled == 1
        reporter.send(watch.Report(False, watch.NOTE_REMOVED))
        await wait_until(lambda: state.rules_note == watch.NOTE_REMOVED)
        os.close(w)  # the parent is gone: the child's reader ends, the proxy is not stopped by it
    assert stats.rules_reinstalled == 1 and state.rules_intact is False


async def test_a_child_that_does_not_read_never_blocks_the_parent():
    r, w = os.pipe()
    reporter = watch.PipeReporter(w)
    for i in range(20000):  # far more than a pipe holds
        reporter.send(watch.Report(i % 2 == 0, "" if i % 2 == 0 else watch.NOTE_MISSING, reinstalled=i % 2 == 0))
    os.close(r)
    reporter.send(watch.Report(True, reinstalled=True))  # EPIPE: ignored
    os.close(w)


async def wait_until(pred: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not pred():
            await trio.sleep(0.01)
