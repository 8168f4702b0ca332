"""conf/tproxy.service: the directives operators rely on, and ``systemd-analyze verify`` where systemd is installed."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "conf" / "tproxy.service"
CONFIG = "-c /etc/tproxy/tproxy.toml"


def directives() -> dict[str, list[str]]:
    """Key -> every value, in order (systemd allows repeated keys, configparser does not)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().replace("\\\n", "").splitlines():  # systemd joins lines ending in a backslash
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_runs_the_split_deployment():
    d = directives()
    assert d["Service.ExecStartPre"] == [f"+/usr/local/bin/tproxy rules apply {CONFIG}"]
    assert d["Service.ExecStart"] == [f"/usr/local/bin/tproxy run --no-rules {CONFIG}"]
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID", f"+/usr/local/bin/tproxy rules apply {CONFIG}"]
    assert d["Service.ExecStopPost"] == [f"+/usr/local/bin/tproxy rules remove {CONFIG}"]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_the_proxy_keeps_only_cap_net_raw():
    d = directives()
    assert d["Service.User"] == ["tproxy"]
    assert d["Service.AmbientCapabilities"] == ["CAP_NET_RAW"]
    assert d["Service.CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert d["Service.NoNewPrivileges"] == ["yes"]
    # only the "+" steps (rules and routes) run with full privileges
    privileged = [v for k, vs in d.items() if k.startswith("Service.Exec") for v in vs if v.startswith("+")]
    assert all(" rules apply " in v or " rules remove " in v for v in privileged)


def test_rules_are_watched_while_the_proxy_runs():
    (loop,) = directives()["Service.ExecStartPost"]
    assert loop.startswith("+/bin/sh -c 'while sleep 5; do ") and loop.endswith("; done &'")
    assert loop.count(" rules check --quiet " + CONFIG) == 1 and loop.count(" rules apply " + CONFIG) == 1


def _watch_body(tproxy: str, config: Path) -> str:
    """One round of the unit's watch loop, as sh runs it (systemd turns $$ into $)."""
    (loop,) = directives()["Service.ExecStartPost"]
    body = loop.removeprefix("+/bin/sh -c 'while sleep 5; do ").removesuffix("; done &'").replace("$$", "$")
    return body.replace("/usr/local/bin/tproxy", tproxy).replace("/etc/tproxy/tproxy.toml", str(config))


@pytest.mark.root
def test_the_watch_loop_puts_flushed_rules_back_but_not_removed_ones(tmp_path):
    from tproxy.netns import netns

    tproxy = str(Path(sys.executable).parent / "tproxy")
    config = tmp_path / "t.toml"
    config.write_text('[intercept]\nports = [8080]\n[proxy]\nupstream = "loopback"\n')
    body = _watch_body(tproxy, config)
    with netns("unit") as ns:
        ns.run([tproxy, "rules", "apply", "-c", str(config)])
        r = ns.run(["sh", "-c", body])
        assert r.stdout == ""  # --quiet: nothing to say every 5 s while all is in place
        ns.run(["nft", "flush", "ruleset"])
        r = ns.run(["sh", "-c", body])
        assert "tproxy rules: missing: nft inet tproxy_rules: rule tproxy/loopback-guard missing" in r.stdout
        assert "tproxy rules installed" in r.stdout
        assert ns.run([tproxy, "rules", "check", "-c", str(config)], check=False).returncode == 0
        ns.run([tproxy, "rules", "remove", "-c", str(config)])
        r = ns.run(["sh", "-c", body])
        assert "removed by the operator" in r.stdout and "installed" not in r.stdout
        assert ns.run([tproxy, "rules", "check", "-c", str(config)], check=False).returncode == 3


def test_stop_timeout_covers_the_default_drain():
    from tproxy.config import Proxy

    timeout = directives()["Service.TimeoutStopSec"][0]
    assert timeout.endswith("s") and float(timeout[:-1]) > Proxy().shutdown_grace


def test_parses_as_ini():
    parser = configparser.RawConfigParser(strict=False)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    tproxy = Path(sys.executable).parent / "tproxy"
    assert tproxy.exists(), f"no tproxy script next to {sys.executable}"
    unit = tmp_path / "tproxy.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tproxy", str(tproxy)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
