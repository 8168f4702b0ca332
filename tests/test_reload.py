"""Reload: the "what changed" plan (pure), and the runner's Reloader on a real server over loopback, without rules
(the original destination is injected, as in tests/test_server.py). The namespace tests are in test_reload_netns.py.
"""

from __future__ import annotations

import functools
import io
import json
import socket
from pathlib import Path

import attrs
import pytest
import trio

from tproxy import log, reload
from tproxy.config import Config
from tproxy.runner import Reloader, bind_listeners
from tproxy.server import Server
from tproxy.stats import State, Stats

BASE = {
    "mode": "nat",
    "listener": {"address": "127.0.0.1", "port": 4143},
    "intercept": {"ports": [8080], "ipv6": False},
    "proxy": {"preserve_source": False},
    "admin": {"address": ""},
}


def cfg(**changes) -> Config:
    doc = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        section, _, key = path.rpartition("__")
        (doc.setdefault(section, {}) if section else doc)[key] = value
    return Config.from_dict(doc, source="/etc/tproxy.toml")


# -- the plan (pure)


def test_no_change_is_an_empty_plan():
    p = reload.plan(cfg(), cfg())
    assert p.empty and not p.restart and not p.rules and not p.listeners and not p.settings


def test_an_added_port_changes_the_rules_only():
    p = reload.plan(cfg(), cfg(intercept__ports=[8080, 9090]))
    assert [c.line() for c in p.applied] == ["intercept.ports [8080] -> [8080, 9090]"]
    assert p.rules and not p.listeners and not p.backend and not p.settings
    assert p.config.intercept.intercepts(9090)


def test_a_listener_port_changes_rules_and_listeners():
    p = reload.plan(cfg(), cfg(listener__port=4144))
    assert [c.line() for c in p.applied] == ["listener.port 4143 -> 4144"]
    assert p.rules and p.listeners


def test_settings_change_neither_rules_nor_listeners():
    p = reload.plan(cfg(), cfg(proxy__idle_timeout=60, proxy__max_connections=5, log__level="debug"))
    assert [c.key for c in p.applied] == ["proxy.idle_timeout", "proxy.max_connections", "log.level"]
    assert p.settings and not p.rules and not p.listeners
    assert p.config.proxy.idle_timeout == 60 and p.config.proxy.max_connections == 5


def test_proxy_protocol_keys_apply_to_new_connections():
    new = cfg(
        listener__proxy_protocol="v2",
        listener__proxy_protocol_from=["198.18.1.0/24"],
        listener__proxy_protocol_timeout=1,
        proxy__send_proxy_protocol="v1",
    )
    p = reload.plan(cfg(), new)
    assert [c.line() for c in p.applied] == [
        "listener.proxy_protocol off -> v2",
        "listener.proxy_protocol_from [] -> [198.18.1.0/24]",
        "listener.proxy_protocol_timeout 3 -> 1",
        "proxy.send_proxy_protocol off -> v1",
    ]
    assert p.settings and not p.restart and not p.rules and not p.listeners
    assert p.config.listener.trusts("198.18.1.1") and p.config.proxy.send_proxy_protocol == "v1"


def test_a_backend_change_is_applied():
    p = reload.plan(cfg(), cfg(backend="iptables"))
    assert p.backend and p.rules and p.config.backend == "iptables"


def test_keys_that_need_a_restart_keep_their_running_value():
    new = cfg(mode="tproxy", routing__mark=2, proxy__upstream="loopback", intercept__ports=[8080, 9090])
    p = reload.plan(cfg(), new)
    # preserve_source is set; routing.mask follows the marks when not set
    assert {c.key for c in p.restart} == {"mode", "routing.mark", "routing.mask", "proxy.upstream"}
    assert [c.key for c in p.applied] == ["intercept.ports"]
    assert p.config.mode == "nat" and p.config.routing.mark == 0x1000 and p.config.proxy.upstream == "original"
    assert p.config.preserve_source is False
    assert p.config.intercept.intercepts(9090)
    assert "routing.mark 0x1000 -> 0x2" in [c.line() for c in p.restart]
    assert "routing.mask 0x3000 -> 0x2002" in [c.line() for c in p.restart]


def test_a_family_can_be_added_but_not_dropped():
    added = reload.plan(cfg(), cfg(intercept__ipv6=True, listener__address="0.0.0.0"))
    assert added.config.families == (4, 6) and added.listeners and added.rules and not added.restart
    dropped = reload.plan(added.config, cfg())
    assert {c.key for c in dropped.restart} == {"intercept.ipv6", "listener.address"}
    assert dropped.config.families == (4, 6) and str(dropped.config.listener.address) == "0.0.0.0"
    assert not dropped.listeners and not dropped.rules and dropped.empty


def test_the_failure_line_names_file_and_key(tmp_path: Path):
    path = tmp_path / "t.toml"
    path.write_text('[intercept]\nports = ["9090-80"]\n')
    with pytest.raises(Exception) as info:
        reload.load(cfg(), {})  # /etc/tproxy.toml does not exist here: that is a failure too
    assert reload.failed_line(info.value).startswith("tproxy: reload failed: /etc/tproxy.toml: ")
    with pytest.raises(Exception) as info:
        Config.from_toml(path)
    assert reload.failed_line(info.value) == (
        f"tproxy: reload failed: {path}: intercept.ports[0]: inverted range '9090-80' (low end above high end); "
        "keeping the running config"
    )


# -- the Reloader on a real server over loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path: Path, port: int, *, ports: str = "[8080]", extra: str = "") -> None:
    path.write_text(
        f'mode = "nat"\n[listener]\naddress = "127.0.0.1"\nport = {port}\n'
        f"[intercept]\nports = {ports}\nipv6 = false\n[proxy]\npreserve_source = false\n{extra}"
        '[admin]\naddress = ""\n'
    )


@pytest.fixture
def log_lines():
    buf = io.StringIO()
    log.setup("info", "json", stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    log.setup("info", "text")


async def echo_app(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def roundtrip(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(65536)
        assert chunk, "the connection ended"
        got += chunk
    return got


async def start(nursery: trio.Nursery, path: Path) -> tuple[Reloader, Server]:
    app = (await nursery.start(functools.partial(trio.serve_tcp, echo_app, 0, host="127.0.0.1")))[0]
    app_port = app.socket.getsockname()[1]
    config = Config.from_toml(path)
    listeners = bind_listeners(config)
    state = State(mode=config.mode, backend=config.backend, rules_installed=True)
    server = Server(config, listeners, Stats(), state, original_dst=lambda s: ("127.0.0.1", app_port))
    reloader = Reloader(config, listeners, state, owns_rules=False)
    reloader.server = server
    await nursery.start(server.serve)
    reloader.serving.set()
    return reloader, server


async def test_an_invalid_config_changes_nothing_and_says_so_in_one_line(tmp_path, capsys, log_lines):
    path = tmp_path / "tproxy.toml"
    port = free_port()
    write(path, port)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reloader, server = await start(nursery, path)
            before = reloader.config
            path.write_text(path.read_text().replace("ports = [8080]", 'ports = ["8080", "x"]'))
            assert await reloader.reload() is False
            err = capsys.readouterr().err.splitlines()
            assert err == [
                f"tproxy: reload failed: {path}: intercept.ports[1]: 'x' is not a port or a \"lo-hi\" range; "
                "keeping the running config"
            ]
            assert reloader.config is before
            assert server.state.ready
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            assert await roundtrip(conn, b"still here") == b"still here"
            await conn.aclose()
            server.shutdown()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()  # the application
    assert not [e for e in log_lines() if e["event"].startswith("reload")]


async def test_a_new_listener_port_keeps_the_open_connection(tmp_path, log_lines):
    path = tmp_path / "tproxy.toml"
    old_port, new_port = free_port(), free_port()
    write(path, old_port)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reloader, server = await start(nursery, path)
            held = await trio.open_tcp_stream("127.0.0.1", old_port)
            assert await roundtrip(held, b"before") == b"before"
            write(path, new_port, extra="max_connections = 7\nidle_timeout = 600\n")
            assert await reloader.reload() is True
            # no rules of its own: the old listener accepts until the next reload (the rules move meanwhile)
            assert server.addresses == [("127.0.0.1", old_port), ("127.0.0.1", new_port)]
            assert await reloader.reload() is True
            assert server.addresses == [("127.0.0.1", new_port)]
            assert server.max_connections == 7 and server.idle_timeout == 600
            assert server.state.ready
            assert await roundtrip(held, b"after") == b"after"
            fresh = await trio.open_tcp_stream("127.0.0.1", new_port)
            assert await roundtrip(fresh, b"new") == b"new"
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", old_port)
            await held.aclose()
            await fresh.aclose()
            server.shutdown()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()  # the application
    events = log_lines()
    changes = [(e["key"], e["old"], e["new"]) for e in events if e["event"] == "reload"]
    assert changes == [
        ("listener.port", str(old_port), str(new_port)),
        ("proxy.idle_timeout", "3600", "600"),
        ("proxy.max_connections", "10000", "7"),
    ]
    summary = [e for e in events if e["event"] == "reloaded"]
    assert summary and summary[0]["changes"] == 3 and summary[0]["rules"] == "not ours"


async def test_a_key_that_needs_a_restart_is_logged_and_ignored(tmp_path, log_lines):
    path = tmp_path / "tproxy.toml"
    port = free_port()
    write(path, port)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reloader, server = await start(nursery, path)
            path.write_text(path.read_text().replace("[admin]", "[routing]\ntable = 16\n[admin]"))
            assert await reloader.reload() is True
            assert reloader.config.routing.table == 100
            server.shutdown()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()  # the application
    events = log_lines()
    assert [(e["level"], e["key"], e["applied"]) for e in events if e["event"] == "reload"] == [
        ("warning", "routing.table", "no: needs a restart")
    ]
    assert [(e["changes"], e["restart_needed"]) for e in events if e["event"] == "reloaded"] == [(0, 1)]


async def test_config_shows_the_running_value_of_a_key_that_needs_a_restart(tmp_path):
    """``/config`` after a reload: a key that needs a restart shows the value in force and where *that* came from,
    with the file's new value and source under ``restart_pending``; also when nothing else changed, and no longer
    once the file agrees with what runs again."""
    from tproxy.admin import config_document

    path = tmp_path / "tproxy.toml"
    port = free_port()
    write(path, port, extra='relay = "tasks"\n')

    def settings() -> dict:
        return config_document(reloader.config)["settings"]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reloader, server = await start(nursery, path)
            write(path, port, extra="idle_timeout = 600\n")
            path.write_text(path.read_text().replace("[admin]", "[routing]\ntable = 16\n[admin]"))
            assert await reloader.reload() is True
            doc = settings()
            assert doc["proxy.idle_timeout"] == {"value": 600.0, "source": "file"}
            assert doc["routing.table"] == {
                "value": 100,
                "source": "default",
                "restart_pending": {"value": 16, "source": "file"},
            }
            assert doc["proxy.relay"] == {
                "value": "tasks",
                "source": "file",
                "restart_pending": {"value": "shared", "source": "default"},
            }
            assert reloader.config.proxy.relay == "tasks" and reloader.config.routing.table == 100

            write(path, port, extra="idle_timeout = 600\n")  # only keys that need a restart differ now
            assert await reloader.reload() is True
            assert settings()["routing.table"] == {"value": 100, "source": "default"}
            assert settings()["proxy.relay"]["restart_pending"] == {"value": "shared", "source": "default"}

            write(path, port, extra='idle_timeout = 600\nrelay = "tasks"\n')  # the file agrees with what runs
            assert await reloader.reload() is True
            assert not [k for k, v in settings().items() if "restart_pending" in v]
            assert settings()["proxy.relay"] == {"value": "tasks", "source": "file"}
            server.shutdown()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()  # the application


# -- signals and the privileged parent's pieces


def test_a_sighup_while_the_rules_go_in_is_kept_for_later_not_fatal():
    import os
    import signal

    from tproxy import runner

    with runner._deferred_signals() as early:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
    assert early.pending == [signal.SIGHUP, signal.SIGHUP]


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:102F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:1030 00000000:0000 06 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F90 0200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
"""


def test_listening_ports_reads_only_listen_sockets():
    assert reload.listening_ports(PROC_NET_TCP) == {4143}
    assert reload.listening_ports("  sl  local_address\n") == set()


PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  120: 00000000:102F 00000000:0000 07 00000000:00000000 00:00000000 00000000 65534        0 48213 2 0 0
  121: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 48214 2 0 0
"""


def test_socket_entries_read_port_and_inode_of_every_udp_socket():
    assert reload.socket_entries(PROC_NET_UDP) == {(4143, 48213), (53, 48214)}
    assert reload.socket_entries(PROC_NET_TCP, listen_only=True) == {(4143, 1)}


def test_the_parent_forwards_an_invalid_config_to_the_proxy_and_keeps_its_rules(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text("[intercept]\nports = []\n")
    running = attrs.evolve(cfg(), source=str(path))
    forwarded = []
    on_hup = reload.ParentReload(running, lambda: forwarded.append(True))
    on_hup(1, None)
    assert forwarded == [True] and on_hup.config is running


def test_the_parent_forwards_at_once_when_no_rule_changes(tmp_path):
    path = tmp_path / "tproxy.toml"
    write(path, 4143, extra="idle_timeout = 5\n")
    running = Config.from_toml(path)
    write(path, 4143, extra="idle_timeout = 50\n")
    forwarded = []
    on_hup = reload.ParentReload(running, lambda: forwarded.append(True))
    on_hup(1, None)
    assert forwarded == [True] and on_hup.config is running  # the proxy applies settings; the rules stay


def test_command_line_overrides_are_kept_on_reload(tmp_path):
    from tproxy import runner

    path = tmp_path / "tproxy.toml"
    write(path, 4143)
    given = Config.from_toml(path, backend="iptables")
    assert runner._overrides(given, None, None) == {"backend": "iptables"}  # told apart from the file
    assert runner._overrides(given, "nat", "iptables") == {"mode": "nat", "backend": "iptables"}
    assert runner._overrides(Config.from_toml(path), None, None) == {}
    assert reload.load(given, {"backend": "iptables"}).backend == "iptables"


async def test_proxy_protocol_keys_apply_to_the_next_connection(tmp_path):
    path = tmp_path / "tproxy.toml"
    port = free_port()
    write(path, port)
    header = b"PROXY TCP4 198.18.7.7 198.18.0.2 4567 8080\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reloader, server = await start(nursery, path)
            held = await trio.open_tcp_stream("127.0.0.1", port)
            assert await roundtrip(held, header) == header  # off: the header is the client's data
            text = path.read_text().replace(
                f"port = {port}\n",
                f'port = {port}\nproxy_protocol = "v1"\nproxy_protocol_from = ["127.0.0.0/8"]\n',
            )
            path.write_text(text)
            assert await reloader.reload() is True
            fresh = await trio.open_tcp_stream("127.0.0.1", port)
            await fresh.send_all(header + b"x")
            assert await fresh.receive_some(100) == b"x"  # read and consumed
            assert await roundtrip(held, header) == header  # an open connection keeps what it began with
            for s in (held, fresh):
                await s.aclose()
            server.shutdown()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()  # the application
    assert not server.stats.proxy_protocol_errors


def test_udp_ports_change_the_rules_and_udp_settings_apply_live():
    base = {"mode": "tproxy", "proxy__preserve_source": True}
    p = reload.plan(cfg(**base), cfg(**base, intercept__udp_ports=[53]))
    assert [c.line() for c in p.applied] == ["intercept.udp_ports [] -> [53]"]
    assert p.rules and not p.listeners and p.config.intercept.udp_ports
    p = reload.plan(cfg(**base), cfg(**base, proxy__udp_idle_timeout=5, proxy__udp_max_sessions=7))
    assert [c.key for c in p.applied] == ["proxy.udp_idle_timeout", "proxy.udp_max_sessions"]
    assert p.settings and not p.rules and p.config.proxy.udp_max_sessions == 7
