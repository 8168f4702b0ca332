"""Configuration from the environment (tproxy/config.py, Config.load): every key as a TPROXY_ variable, the
precedence flags > environment > file > defaults, errors naming the variable, Kubernetes' service links ignored."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from tproxy import reload
from tproxy.admin import config_document
from tproxy.check import run_checks
from tproxy.config import _KINDS, _SCHEMA, Config, env_name
from tproxy.errors import ConfigError

# A value other than the default for every key (so that a key the environment failed to set would show)
FULL = {
    "mode": "tproxy",  # (the default: UDP needs tproxy mode; test_precedence sets mode from the environment)
    "backend": "iptables",
    "listener": {
        "address": "0.0.0.0",
        "port": 4000,
        "proxy_protocol": "v2",
        "proxy_protocol_from": ["198.18.0.0/24", "fd00:1::/64"],
        "proxy_protocol_timeout": 2.0,
    },
    "intercept": {
        "ports": [8080, "9000-9100"],
        "udp_ports": [53, "5000-5010"],
        "interfaces": ["eth0", "veth1"],
        "exclude_ports": [9050],
        "exclude_cidrs": ["198.18.0.0/24", "fd00:1::/64"],
        "ipv4": True,
        "ipv6": False,
    },
    "routing": {
        "mark": 0x10000,
        "upstream_mark": 0x20000,
        "mask": 0x30000,
        "table": 42,
        "check_interval": 2.5,
        "reinstall": False,
    },
    "proxy": {
        "preserve_source": True,
        "upstream": "loopback",
        "connect_timeout": 2.5,
        "idle_timeout": 60,
        "max_connections": 7,
        "shutdown_grace": 1.5,
        "upstream_ports": "2000-3000",
        "send_proxy_protocol": "v1",
        "relay": "tasks",
        "udp_idle_timeout": 9.5,
        "udp_max_sessions": 11,
    },
    "admin": {"address": "0.0.0.0:4191"},
    "log": {"level": "debug", "format": "json"},
    "privileges": {"user": "1000", "group": "1000"},
}


def as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def full_environment() -> dict[str, str]:
    env = {}
    for section, values in FULL.items():
        if not isinstance(values, dict):
            env[env_name(section)] = as_text(values)
            continue
        for key, value in values.items():
            env[env_name(f"{section}.{key}")] = as_text(value)
    return env


def schema_keys() -> set[str]:
    return {f"{t}.{k}" if t else k for t, ks in _SCHEMA.items() for k in ks if not (t == "" and k in _SCHEMA)}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def env_error(env: dict[str, str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(path, env)
    assert info.value.exit_code == 2
    return str(info.value)


# -- every key


def test_every_key_of_the_schema_has_a_variable_and_a_kind():
    assert set(_KINDS) == schema_keys(), "give every key of _SCHEMA its kind in tproxy/config.py's _KINDS"
    assert {
        k
        for section, values in FULL.items()
        for k in ([section] if not isinstance(values, dict) else [f"{section}.{key}" for key in values])
    } == schema_keys(), "FULL must set every key (to a value other than its default)"


def test_the_environment_alone_gives_the_same_config_as_the_file(tmp_path):
    from_file = Config.from_dict(json.loads(json.dumps(FULL)))
    env = full_environment()
    from_env = Config.load(None, env)
    assert attrs.evolve(from_env, source="", file="") == attrs.evolve(from_file, source="", file="")
    assert from_env.file is None and from_env.source == "environment"
    assert {from_env.source_of(k) for k in schema_keys()} == {"environment"}
    assert from_env.from_environment() == {k: env_name(k) for k in sorted(schema_keys())}
    assert dict(from_env.environ) == env


def test_variable_names():
    assert env_name("mode") == "TPROXY_MODE"
    assert env_name("intercept.ports") == "TPROXY_INTERCEPT_PORTS"
    assert env_name("proxy.idle_timeout") == "TPROXY_PROXY_IDLE_TIMEOUT"
    assert env_name("intercept.ports[2]") == "TPROXY_INTERCEPT_PORTS"


# -- the text of a variable


def test_lists_are_comma_separated_and_trimmed():
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": " 80 ,443, 9000-9100", "TPROXY_INTERCEPT_INTERFACES": "eth0"})
    assert [str(r) for r in c.intercept.ports] == ["80", "443", "9000-9100"]
    assert c.intercept.interfaces == ("eth0",)


def test_an_empty_list_variable_is_an_empty_list(tmp_path):
    path = write(tmp_path, "[intercept]\nports = [80]\nexclude_ports = [81]\n")
    c = Config.load(path, {"TPROXY_INTERCEPT_EXCLUDE_PORTS": ""})
    assert c.intercept.exclude_ports == () and c.source_of("intercept.exclude_ports") == "environment"


def test_a_list_variable_replaces_the_file_list_whole(tmp_path):
    path = write(tmp_path, "[intercept]\nports = [80, 81]\n")
    assert [str(r) for r in Config.load(path, {"TPROXY_INTERCEPT_PORTS": "82"}).intercept.ports] == ["82"]


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), (" true\n", True)])
def test_booleans(text, value):
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_PROXY_PRESERVE_SOURCE": text})
    assert c.proxy.preserve_source is value


@pytest.mark.parametrize("text", ["yes", "True", "1", "", "on"])
def test_a_boolean_is_true_or_false_only(text):
    msg = env_error({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_INTERCEPT_IPV6": text})
    assert msg == f"environment: TPROXY_INTERCEPT_IPV6: {text!r} is not a boolean (true or false)"


def test_integers_as_the_file_spells_them():
    c = Config.load(
        None, {"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_ROUTING_MARK": "0x1000", "TPROXY_ROUTING_TABLE": "7"}
    )
    assert (c.routing.mark, c.routing.table) == (0x1000, 7)


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("TPROXY_ROUTING_TABLE", "0o17", 15),
        ("TPROXY_ROUTING_TABLE", "0b101", 5),
        ("TPROXY_ROUTING_TABLE", "1_000", 1000),
        ("TPROXY_ROUTING_TABLE", "+5", 5),
        ("TPROXY_PROXY_IDLE_TIMEOUT", "7", 7.0),
        ("TPROXY_PROXY_IDLE_TIMEOUT", "0x10", 16.0),  # (the file takes an integer for seconds too)
        ("TPROXY_PROXY_IDLE_TIMEOUT", "1_000.5", 1000.5),
        ("TPROXY_PROXY_IDLE_TIMEOUT", "1e3", 1000.0),
    ],
)
def test_numbers_as_toml_writes_them(name, text, value):
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", name: text})
    assert (c.routing.table if "TABLE" in name else c.proxy.idle_timeout) == value


@pytest.mark.parametrize(
    "name, text",
    [
        *(("TPROXY_ROUTING_TABLE", t) for t in ("٨٠", "８０", "0X10", "-0x10", "+0x10", "0x", "1__0", "010", "1.0")),
        *(("TPROXY_PROXY_IDLE_TIMEOUT", t) for t in (".5", "5.", "Infinity", "1e", "٨٠", "1_e3")),
    ],
)
def test_numbers_toml_would_not_read_are_refused(name, text):
    """Found by the environment fuzzer: Python's int() and float() read "٨٠" (Arabic-Indic digits) as 80, "0X10",
    ".5" and "Infinity"; the README promises integers as TOML writes them."""
    kind = "an integer" if "TABLE" in name else "a number"
    assert env_error({"TPROXY_INTERCEPT_PORTS": "80", name: text}) == f"environment: {name}: {text!r} is not {kind}"


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("TPROXY_LISTENER_PORT", "80x", "'80x' is not an integer"),
        ("TPROXY_LISTENER_PORT", "", "'' is not an integer"),
        ("TPROXY_PROXY_IDLE_TIMEOUT", "1h", "'1h' is not a number"),
    ],
)
def test_text_that_is_not_the_kind_of_the_key(name, text, reason):
    assert env_error({"TPROXY_INTERCEPT_PORTS": "80", name: text}) == f"environment: {name}: {reason}"


# -- the loader's own checks, naming the variable


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TPROXY_INTERCEPT_PORTS": "80x"}, "TPROXY_INTERCEPT_PORTS: '80x' is not a port or a \"lo-hi\" range"),
        ({"TPROXY_INTERCEPT_PORTS": "80,,81"}, "TPROXY_INTERCEPT_PORTS: empty port range"),
        ({"TPROXY_INTERCEPT_PORTS": "70000"}, "TPROXY_INTERCEPT_PORTS: 70000 is not a port (1-65535)"),
        ({"TPROXY_INTERCEPT_PORTS": ""}, "TPROXY_INTERCEPT_PORTS: must name at least one port or range"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_MODE": "redirect"}, "TPROXY_MODE: unknown value 'redirect'"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_LISTENER_PORT": "0"}, "TPROXY_LISTENER_PORT: 0 is not a port"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_LISTENER_PORT": "80"}, "TPROXY_LISTENER_PORT: 80 is inside"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_INTERCEPT_INTERFACES": "lo"}, "TPROXY_INTERCEPT_INTERFACES: lo can"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_ADMIN_ADDRESS": "4191"}, "TPROXY_ADMIN_ADDRESS: '4191' is not HOST"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_PROXY_IDLE_TIMEOUT": "-1"}, "TPROXY_PROXY_IDLE_TIMEOUT: -1.0 must"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_PROXY_IDLE_TIMEOUT": "nan"}, "TPROXY_PROXY_IDLE_TIMEOUT: nan must"),
        ({}, "TPROXY_INTERCEPT_PORTS: required key is missing"),
    ],
)
def test_the_loaders_checks_name_the_variable(env, expected):
    msg = env_error(env)
    assert msg.startswith("environment: " + expected), msg
    assert "\n" not in msg


def test_a_bad_file_key_still_names_the_file(tmp_path):
    path = write(tmp_path, '[intercept]\nports = ["80x"]\n')
    assert env_error({"TPROXY_MODE": "nat"}, path).startswith(f"{path}: intercept.ports[0]: ")


def test_a_missing_required_key_with_a_file_names_the_file(tmp_path):
    path = write(tmp_path, 'mode = "nat"\n')
    assert env_error({}, path).startswith(f"{path}: intercept.ports: required key is missing")


def test_a_cross_key_check_names_the_side_that_came_from_the_environment(tmp_path):
    path = write(tmp_path, "[intercept]\nports = [80]\n")
    assert env_error({"TPROXY_LISTENER_PORT": "80"}, path).startswith("environment: TPROXY_LISTENER_PORT: 80 is")
    path = write(tmp_path, "[listener]\nport = 80\n")
    assert env_error({"TPROXY_INTERCEPT_PORTS": "80"}, path).startswith(f"{path}: listener.port: 80 is inside")


@pytest.mark.parametrize(
    "name, hint",
    [
        ("TPROXY_INTERCEPT_PORT", " (did you mean TPROXY_INTERCEPT_PORTS?)"),
        ("TPROXY_LISTENER", " (did you mean TPROXY_LISTENER_PORT?)"),
        ("TPROXY_", ""),
        ("TPROXY_mode", ""),
        ("TPROXY_FOO", ""),
        ("TPROXY_SERVICE", ""),
        ("TPROXY_PORT_80", ""),
    ],
)
def test_an_unknown_variable_is_refused(name, hint):
    msg = env_error({"TPROXY_INTERCEPT_PORTS": "80", name: "x"})
    assert msg == f"environment: {name}: unknown variable{hint}; every key is TPROXY_<SECTION>_<KEY>"


def test_other_variables_are_not_ours():
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", "PATH": "/bin", "TPROXYX": "1", "tproxy_mode": "x"})
    assert dict(c.environ) == {"TPROXY_INTERCEPT_PORTS": "80"}


# -- Kubernetes' service links for a Service named "tproxy"

SERVICE_LINKS = {
    "TPROXY_SERVICE_HOST": "10.96.0.11",
    "TPROXY_SERVICE_PORT": "4143",
    "TPROXY_SERVICE_PORT_ADMIN": "4191",
    "TPROXY_PORT": "tcp://10.96.0.11:4143",
    "TPROXY_PORT_4143_TCP": "tcp://10.96.0.11:4143",
    "TPROXY_PORT_4143_TCP_PROTO": "tcp",
    "TPROXY_PORT_4143_TCP_PORT": "4143",
    "TPROXY_PORT_4143_TCP_ADDR": "10.96.0.11",
    "TPROXY_PORT_53_UDP": "udp://10.96.0.11:53",
    "TPROXY_PORT_9_SCTP_ADDR": "10.96.0.11",
}


def test_kubernetes_service_links_are_ignored():
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", **SERVICE_LINKS})
    assert c.ignored == tuple(sorted(SERVICE_LINKS))
    assert c == Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80"})
    assert c.from_environment() == {"intercept.ports": "TPROXY_INTERCEPT_PORTS"}


# -- precedence: flags > environment > file > defaults


def test_precedence(tmp_path):
    path = write(tmp_path, 'mode = "nat"\nbackend = "nftables"\n[intercept]\nports = [80]\n[proxy]\nidle_timeout = 9\n')
    env = {"TPROXY_BACKEND": "iptables", "TPROXY_MODE": "tproxy", "TPROXY_PROXY_IDLE_TIMEOUT": "8"}
    c = Config.load(path, env, mode="nat")
    assert (c.mode, c.source_of("mode")) == ("nat", "flag")  # flag over environment over file
    assert (c.backend, c.source_of("backend")) == ("iptables", "environment")  # environment over file
    assert (c.proxy.idle_timeout, c.source_of("proxy.idle_timeout")) == (8.0, "environment")
    assert ([str(p) for p in c.intercept.ports], c.source_of("intercept.ports")) == (["80"], "file")
    assert (c.proxy.connect_timeout, c.source_of("proxy.connect_timeout")) == (5.0, "default")
    assert c.file == str(path) and c.source == str(path)
    # a flag wins over the environment even where the file is silent
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_BACKEND": "iptables"}, backend="nftables")
    assert (c.backend, c.source_of("backend")) == ("nftables", "flag")


def test_the_environment_sets_a_section_the_file_does_not_have(tmp_path):
    path = write(tmp_path, "[intercept]\nports = [80]\n")
    c = Config.load(path, {"TPROXY_LOG_LEVEL": "debug"})
    assert c.log.level == "debug" and c.source_of("log.level") == "environment"


def test_errors_of_later_checks_name_the_variable():
    """Checks outside the loader (the user lookup) name the variable too (Config.where)."""
    from tproxy.privileges import resolve_identity

    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_PRIVILEGES_USER": "no-such-user-here"})
    with pytest.raises(ConfigError, match=r"^environment: TPROXY_PRIVILEGES_USER: no such user"):
        resolve_identity(c)
    assert c.where("log.level") == ("environment", "TPROXY_LOG_LEVEL")  # no file: every key is a variable
    assert Config.from_dict({"intercept": {"ports": [80]}}, source="f.toml").where("log.level") == (
        "f.toml",
        "log.level",
    )


# -- SIGHUP: the file is re-read, the environment is the one the process started with


def test_a_reload_rereads_the_file_with_the_environment_of_the_start(tmp_path, monkeypatch):
    path = write(tmp_path, "[intercept]\nports = [80]\n[proxy]\nconnect_timeout = 1\n")
    c = Config.load(path, {"TPROXY_PROXY_IDLE_TIMEOUT": "7"})
    path.write_text("[intercept]\nports = [80]\n[proxy]\nconnect_timeout = 2\nidle_timeout = 99\n")
    monkeypatch.setenv("TPROXY_PROXY_IDLE_TIMEOUT", "8")  # later changes of the process environment: not seen
    new = reload.load(c, {})
    assert new.proxy.connect_timeout == 2.0 and new.proxy.idle_timeout == 7.0
    assert new.source_of("proxy.idle_timeout") == "environment"


def test_a_reload_without_a_file_gives_the_same_config():
    c = Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_MODE": "nat"})
    assert reload.load(c, {}) == c and reload.plan(c, reload.load(c, {})).empty


# -- where the environment shows: /config, tproxy check, tproxy rules show, the CLI


def test_config_document_names_the_environment():
    doc = config_document(Config.load(None, {"TPROXY_INTERCEPT_PORTS": "80"}))
    assert doc["file"] is None
    assert doc["settings"]["intercept.ports"] == {"value": [80], "source": "environment"}
    assert doc["settings"]["mode"]["source"] == "default"


def test_check_reports_a_bad_variable_with_its_fix():
    out = io.StringIO()
    assert run_checks(None, environ={"TPROXY_INTERCEPT_PORTS": "80x"}, out=out) == 2
    line = out.getvalue().strip()
    assert line.startswith("FAIL config valid: environment: TPROXY_INTERCEPT_PORTS: ")
    assert "fix: correct the variable TPROXY_INTERCEPT_PORTS" in line


def tproxy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "tproxy", *args], capture_output=True, text=True, timeout=60, env={**base, **env}
    )


def test_cli_rules_show_from_the_environment_alone():
    r = tproxy("rules", "show", env={"TPROXY_INTERCEPT_PORTS": "8080", "TPROXY_MODE": "nat", **SERVICE_LINKS})
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    assert first == "# from the environment: intercept.ports (TPROXY_INTERCEPT_PORTS), mode (TPROXY_MODE)"
    assert "8080" in r.stdout and "redirect" in r.stdout


def test_cli_rules_show_without_environment_prints_no_provenance_line(tmp_path):
    path = write(tmp_path, "[intercept]\nports = [8080]\n")
    r = tproxy("rules", "show", "-c", str(path), env={})
    assert r.returncode == 0, r.stderr
    assert "environment" not in r.stdout


@pytest.mark.parametrize(
    "env, line",
    [
        ({"TPROXY_INTERCEPT_PORTS": "80x"}, "tproxy: environment: TPROXY_INTERCEPT_PORTS: '80x' is not a port"),
        ({"TPROXY_INTERCEPT_PORTS": "80", "TPROXY_NOPE": "1"}, "tproxy: environment: TPROXY_NOPE: unknown variable"),
        ({}, "tproxy: environment: TPROXY_INTERCEPT_PORTS: required key is missing"),
    ],
)
@pytest.mark.parametrize("command", [("run",), ("rules", "show"), ("rules", "apply"), ("rules", "remove")])
def test_cli_refuses_bad_environment_with_one_line_and_exit_2(env, line, command):
    r = tproxy(*command, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, r.stderr


def test_cli_check_refuses_bad_environment():
    r = tproxy("check", env={"TPROXY_INTERCEPT_PORTS": "80x"})
    assert r.returncode == 2 and r.stdout.startswith("FAIL config valid: environment: TPROXY_INTERCEPT_PORTS:")


def test_run_logs_the_ignored_service_links_at_debug():
    """Everything before the listener bind, as any user: the bind fails on a port this test holds, after the line."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        env = {
            "TPROXY_INTERCEPT_PORTS": "80",
            "TPROXY_LISTENER_ADDRESS": "127.0.0.1",
            "TPROXY_LISTENER_PORT": str(port),
            "TPROXY_INTERCEPT_IPV6": "false",
            "TPROXY_ADMIN_ADDRESS": "",
            "TPROXY_LOG_LEVEL": "debug",
            **SERVICE_LINKS,
        }
        r = tproxy("run", "--no-rules", env=env)
    assert r.returncode == 1, r.stderr
    ignored = [line for line in r.stderr.splitlines() if "environment_ignored" in line]
    assert len(ignored) == 1 and "TPROXY_SERVICE_HOST" in ignored[0] and "TPROXY_PORT_4143_TCP" in ignored[0]
    assert "cannot bind" in r.stderr.splitlines()[-1] or "in use" in r.stderr.splitlines()[-1], r.stderr
