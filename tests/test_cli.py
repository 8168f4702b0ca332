"""The CLI as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tproxy import __version__


def tproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tproxy", *args], capture_output=True, text=True, timeout=60)


def test_version():
    r = tproxy("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tproxy {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("run",),
        ("rules",),
        ("rules", "show"),
        ("rules", "apply"),
        ("rules", "remove"),
        ("check",),
        ("demo",),
    ],
)
def test_help_describes_options(args):
    r = tproxy(*args, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout
    if args and args != ("rules",):
        assert "--" in r.stdout.split("Options")[1]
    if args in {("run",), ("rules", "show"), ("rules", "apply"), ("rules", "remove"), ("check",)}:
        assert "--config" in r.stdout and "--backend" in r.stdout


def test_config_error_is_one_line_exit_2(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("intercept.ports = [8080, 9000, 70000]\n")
    r = tproxy("rules", "show", "-c", str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == f"tproxy: {p}: intercept.ports[2]: 70000 is not a port (1-65535)"
    assert "Traceback" not in r.stderr


def test_missing_file_exit_2(tmp_path):
    r = tproxy("run", "-c", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and r.stderr.strip() == f"tproxy: {tmp_path / 'none.toml'}: no such file"


def test_bad_flag_value_exit_2(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("intercept.ports = [8080]\n")
    r = tproxy("rules", "show", "-c", str(p), "--mode", "bogus")
    assert r.returncode == 2 and "--mode: unknown mode 'bogus'" in r.stderr


def test_usage_error_exit_2():
    assert tproxy("run").returncode == 2
    assert tproxy("nosuchcommand").returncode == 2
