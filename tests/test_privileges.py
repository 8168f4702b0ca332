"""tproxy/privileges.py: capability parsing, what each config needs, user/group lookup, and (root) the real drop."""

from __future__ import annotations

import os
import socket

import pytest

from tproxy import privileges
from tproxy.config import Config
from tproxy.errors import ConfigError, PrivilegeError
from tproxy.privileges import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_NET_RAW, ProcessCredentials

STATUS = """\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Uid:\t65534\t65534\t65534\t65534
Gid:\t65534\t65534\t65534\t65534
Groups:\t65534 100
NoNewPrivs:\t1
CapInh:\t0000000000000000
CapPrm:\t0000000000002000
CapEff:\t0000000000002000
CapBnd:\t000001ffffffffff
CapAmb:\t0000000000000000
Seccomp:\t0
"""


def config(**doc) -> Config:
    doc.setdefault("intercept", {"ports": [8080]})
    return Config.from_dict(doc, source="t.toml")


def test_parse_status():
    c = ProcessCredentials.parse(STATUS)
    assert c.uids == (65534,) * 4 and c.gids == (65534,) * 4 and c.groups == (65534, 100)
    assert c.effective == c.permitted == 0x2000 == 1 << CAP_NET_RAW
    assert c.inheritable == c.ambient == 0
    assert c.bounding == (1 << 41) - 1
    assert c.no_new_privs


def test_parse_status_old_kernel_defaults_and_errors():
    old = "\n".join(line for line in STATUS.splitlines() if not line.startswith(("CapAmb", "NoNewPrivs", "Groups")))
    c = ProcessCredentials.parse(old)
    assert c.ambient == 0 and not c.no_new_privs and c.groups == ()
    with pytest.raises(ValueError, match="CapEff"):
        ProcessCredentials.parse(STATUS.replace("CapEff:\t0000000000002000", "CapEff:\tzz"))
    with pytest.raises(ValueError, match="Uid"):
        ProcessCredentials.parse(STATUS.replace("Uid:", "Xid:"))


def test_parse_own_status():
    c = ProcessCredentials.of()
    assert c.uids[1] == os.geteuid() and c.gids[1] == os.getegid()


def test_cap_masks_and_names():
    assert privileges.cap_mask([CAP_NET_RAW]) == 0x2000
    assert privileges.cap_set(0x3000) == {CAP_NET_ADMIN, CAP_NET_RAW}
    assert privileges.format_caps({CAP_NET_RAW, CAP_NET_ADMIN}) == "CAP_NET_ADMIN,CAP_NET_RAW"
    assert privileges.format_caps(()) == "none"
    assert privileges.cap_name(40) == "CAP_CHECKPOINT_RESTORE" and privileges.cap_name(99) == "CAP_99"


@pytest.mark.parametrize(
    ("doc", "binds", "want"),
    [
        ({"mode": "tproxy"}, True, {CAP_NET_RAW}),
        ({"mode": "tproxy"}, False, {CAP_NET_RAW}),
        ({"mode": "tproxy", "proxy": {"preserve_source": False}}, True, {CAP_NET_RAW}),
        ({"mode": "nat"}, True, set()),
        ({"mode": "nat", "proxy": {"preserve_source": True}}, False, {CAP_NET_RAW}),
        ({"mode": "nat", "listener": {"port": 443}}, True, {CAP_NET_BIND_SERVICE}),
        ({"mode": "nat", "listener": {"port": 443}}, False, set()),  # bound before the drop
        ({"mode": "nat", "admin": {"address": "127.0.0.1:99"}}, False, {CAP_NET_BIND_SERVICE}),
        ({"mode": "nat", "admin": {"address": ""}, "listener": {"port": 4143}}, True, set()),
    ],
)
def test_required_capabilities(doc, binds, want):
    need = privileges.required_capabilities(config(**doc), binds_listener=binds, port_start=1024)
    assert set(need) == want
    assert all(why for why in need.values())


def test_check_capabilities_names_the_missing_one_and_why():
    cfg = config(mode="tproxy")
    with pytest.raises(PrivilegeError) as e:
        privileges.check_capabilities(cfg, manage_rules=False, effective=0)
    msg = str(e.value)
    assert msg.startswith("missing CAP_NET_RAW: tproxy mode sets IP_TRANSPARENT")
    assert "SO_MARK" in msg and "AmbientCapabilities=CAP_NET_RAW" in msg and "\n" not in msg
    assert e.value.exit_code == 1
    privileges.check_capabilities(cfg, manage_rules=False, effective=0x2000)  # enough
    privileges.check_capabilities(config(mode="nat"), manage_rules=False, effective=0)  # nat needs nothing

    nat_ps = config(mode="nat", proxy={"preserve_source": True})
    with pytest.raises(PrivilegeError, match=r"missing CAP_NET_RAW: proxy.preserve_source = true sets"):
        privileges.check_capabilities(nat_ps, manage_rules=False, effective=0)


def test_check_capabilities_rules_need_net_admin():
    with pytest.raises(PrivilegeError, match=r"missing CAP_NET_ADMIN: .*--no-rules"):
        privileges.check_capabilities(config(mode="nat"), manage_rules=True, effective=0x2000)
    privileges.check_capabilities(config(mode="tproxy"), manage_rules=True, effective=0x3000)


def test_resolve_identity():
    me = privileges.resolve_identity(config(privileges={"user": "nobody"}))
    assert (me.uid, me.user) == (65534, "nobody")
    assert me.gid == __import__("pwd").getpwnam("nobody").pw_gid
    by_number = privileges.resolve_identity(config(privileges={"user": "65534", "group": "0"}))
    assert (by_number.uid, by_number.gid) == (65534, 0)
    unknown_uid = privileges.resolve_identity(config(privileges={"user": "4000123", "group": "4000124"}))
    assert (unknown_uid.uid, unknown_uid.gid) == (4000123, 4000124)


@pytest.mark.parametrize(
    ("priv", "key", "reason"),
    [
        ({"user": "no-such-user-tpx"}, "privileges.user", "no such user 'no-such-user-tpx'"),
        ({"user": "nobody", "group": "no-such-group-tpx"}, "privileges.group", "no such group 'no-such-group-tpx'"),
        ({"user": "root"}, "privileges.user", "'root' is root: that drops nothing"),
        ({"user": "0"}, "privileges.user", "'0' is root: that drops nothing"),
        ({"user": "4000123"}, "privileges.group", "uid 4000123 has no passwd entry: set privileges.group as well"),
    ],
)
def test_resolve_identity_errors(priv, key, reason):
    with pytest.raises(ConfigError) as e:
        privileges.resolve_identity(config(privileges=priv))
    assert (e.value.source, e.value.key, e.value.reason) == ("t.toml", key, reason)
    assert e.value.exit_code == 2


def test_check_capabilities_looks_up_the_user_first():
    with pytest.raises(ConfigError, match="privileges.user: no such user"):
        privileges.check_capabilities(config(privileges={"user": "no-such-user-tpx"}), manage_rules=True, effective=0)
    privileges.check_capabilities(config(privileges={"user": "nobody"}), manage_rules=True, effective=(1 << 41) - 1)


def test_before_serve_without_user_changes_nothing():
    cfg = config()
    assert privileges.before_serve(cfg, [], manage_rules=True) is True
    assert privileges.before_serve(cfg, [], manage_rules=False) is False
    assert ProcessCredentials.of().uids[1] == os.geteuid()


def _in_child(fn) -> tuple[int, str]:
    """Run ``fn`` in a forked child (a drop is irreversible); return its exit code and what it wrote."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            out, code = f"{type(e).__name__}: {e}", 1
        os.write(w, str(out).encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def _sockopts() -> str:
    results = []
    for family, level, opt in ((socket.AF_INET, socket.SOL_IP, 19), (socket.AF_INET6, socket.IPPROTO_IPV6, 75)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            for lvl, o in ((level, opt), (socket.SOL_SOCKET, socket.SO_MARK)):
                try:
                    s.setsockopt(lvl, o, 1)
                    results.append("ok")
                except PermissionError:
                    results.append("EPERM")
    return " ".join(results)


@pytest.mark.root
def test_drop_keeps_exactly_net_raw():
    def child() -> str:
        c = privileges.drop_privileges(privileges.Identity(user="nobody", uid=65534, gid=65534), [CAP_NET_RAW])
        now = ProcessCredentials.of()
        assert now == c
        return (
            f"{now.uids} {now.gids} {now.groups} {now.effective:#x} {now.bounding:#x} {now.no_new_privs} {_sockopts()}"
        )

    code, out = _in_child(child)
    assert code == 0, out
    assert out == f"{(65534,) * 4} {(65534,) * 4} (65534,) 0x2000 0x2000 True ok ok ok ok"


@pytest.mark.root
def test_drop_to_nothing_refuses_transparent_sockets():
    def child() -> str:
        privileges.drop_privileges(privileges.Identity(user="nobody", uid=65534, gid=65534), [])
        now = ProcessCredentials.of()
        return f"{now.effective:#x} {now.permitted:#x} {_sockopts()}"

    code, out = _in_child(child)
    assert (code, out) == (0, "0x0 0x0 EPERM EPERM EPERM EPERM")


@pytest.mark.root
def test_drop_cannot_be_undone():
    def child() -> str:
        privileges.drop_privileges(privileges.Identity(user="nobody", uid=65534, gid=65534), [CAP_NET_RAW])
        os.setresuid(0, 0, 0)
        return "regained root"

    code, out = _in_child(child)
    assert (code, out) == (1, "PermissionError: [Errno 1] Operation not permitted")
