"""State files root acts on (tproxy/state.py): every refusal, the atomic write, and (root) `rules remove` refusing a
state directory the proxy's user could write.

Tests that create state files need root (marked ``root``): the trusted owner is uid 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tproxy import state
from tproxy.config import Config
from tproxy.errors import StateError
from tproxy.netns import netns
from tproxy.sockets import netns_cookie

REPO = Path(__file__).resolve().parents[1]
root = pytest.mark.root  # the trusted owner is root: these tests create root-owned files (and chown them)
NOBODY = 65534


@pytest.fixture
def sdir(tmp_path, monkeypatch):
    d = tmp_path / "run-tproxy"
    monkeypatch.setattr(state, "STATE_DIR", d)
    return d


@root
def test_the_directory_is_created_0700_root_and_files_0600(sdir):
    path = state.state_path("routing", "mark1")
    state.save_state(path, {"sysctls": {}})
    st = os.stat(sdir)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert state.load_state(path) == {"sysctls": {}, "netns_cookie": netns_cookie()}
    assert [p.name for p in sdir.iterdir()] == [path.name]  # no temporary file left


@root
def test_a_missing_file_or_directory_is_no_state(sdir):
    assert state.load_state(sdir / "x.json") is None
    sdir.mkdir(mode=0o700)
    assert state.load_state(sdir / "x.json") is None


@root
def test_a_directory_owned_by_another_user_is_refused(sdir):
    sdir.mkdir(mode=0o700)
    (sdir / "x.json").write_text("{}")
    os.chown(sdir, NOBODY, NOBODY)
    with pytest.raises(StateError, match=rf"^{sdir}: owned by uid {NOBODY}, not root"):
        state.load_state(sdir / "x.json")
    with pytest.raises(StateError, match="owned by uid"):
        state.save_state(sdir / "x.json", {})
    with pytest.raises(StateError, match="owned by uid"):
        state.ensure_dir()


@root
def test_a_directory_writable_by_others_is_refused(sdir):
    sdir.mkdir()
    os.chmod(sdir, 0o1777)
    with pytest.raises(StateError, match=rf"^{sdir}: writable by group or others \(mode 1777\)"):
        state.load_state(sdir / "x.json")


@root
def test_a_directory_that_is_a_symlink_is_refused(sdir, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    sdir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match=rf"^{sdir}: is a symbolic link"):
        state.save_state(sdir / "x.json", {})


@root
def test_a_file_owned_by_another_user_is_refused(sdir):
    path = sdir / "x.json"
    state.save_state(path, {"sysctls": {}})
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(StateError, match=rf"^{path}: owned by uid {NOBODY}, not root"):
        state.load_state(path)


@root
def test_a_file_writable_by_group_is_refused(sdir):
    path = sdir / "x.json"
    state.save_state(path, {})
    os.chmod(path, 0o620)
    with pytest.raises(StateError, match=rf"^{path}: writable by group or others \(mode 0620\)"):
        state.load_state(path)


@root
def test_a_file_that_is_a_symlink_is_refused_and_never_followed(sdir, tmp_path):
    state.ensure_dir()
    target = tmp_path / "target"
    target.write_text('{"sysctls": {}}')
    (sdir / "x.json").symlink_to(target)
    with pytest.raises(StateError, match=r"x\.json: is a symbolic link"):
        state.load_state(sdir / "x.json")


@root
def test_the_write_never_follows_a_planted_link(sdir, tmp_path):
    """A temporary name planted as a link (by whoever could write there once) is replaced, its target untouched."""
    state.ensure_dir()
    path = sdir / "x.json"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (sdir / f".x.json.{os.getpid()}.tmp").symlink_to(victim)
    state.save_state(path, {"a": 1})
    assert victim.read_text() == "precious\n"
    assert state.load_state(path) == {"a": 1, "netns_cookie": netns_cookie()} and not path.is_symlink()


@root
def test_malformed_json_names_the_file(sdir):
    state.ensure_dir()
    path = sdir / "x.json"
    path.write_text("{not json")
    with pytest.raises(StateError, match=rf"^{path}: not valid JSON \(.*\); check what it says, then remove it$"):
        state.load_state(path)
    path.write_text("[1, 2]")
    with pytest.raises(StateError, match=rf"^{path}: not a JSON object"):
        state.load_state(path)


@pytest.mark.parametrize(
    "key",
    [
        "/etc/shadow",
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/net/ipv4/conf/all/rp_filter",
        "/proc/sys/net/ipv4/conf/../../../../etc/route_localnet",
        "/proc/sys/net/ipv4/conf/a/b/route_localnet",
        "/proc/sys/net/ipv4/conf/averyveryverylongname/route_localnet",
    ],
)
def test_only_route_localnet_paths_are_accepted(key):
    with pytest.raises(StateError, match=r"^f\.json: sysctls: .* is not a /proc/sys/net/ipv4/conf/<interface>/route"):
        state.sysctls({"sysctls": {key: "0"}}, Path("f.json"))


def test_sysctl_values_must_be_integers():
    ok = {"/proc/sys/net/ipv4/conf/all/route_localnet": "0", "/proc/sys/net/ipv4/conf/eth0.10/route_localnet": "1"}
    assert state.sysctls({"sysctls": ok}, Path("f.json")) == ok
    with pytest.raises(StateError, match=r"is not an integer value"):
        state.sysctls({"sysctls": {"/proc/sys/net/ipv4/conf/all/route_localnet": "1\n* * * * * root sh"}}, Path("f"))
    with pytest.raises(StateError, match=r"sysctls: not a JSON object"):
        state.sysctls({"sysctls": ["x"]}, Path("f"))


# ----------------------------------------------------------------------------------------------------------------
# root, for real: `tproxy rules remove` in a namespace refuses what it cannot trust, one line, exit 1


def _remove(ns, conf: Path) -> subprocess.CompletedProcess:
    return ns.run([sys.executable, "-m", "tproxy", "rules", "remove", "-c", str(conf)], check=False, cwd=str(REPO))


@root
def test_rules_remove_refuses_a_state_file_naming_another_path(tmp_path):
    conf = tmp_path / "t.toml"
    conf.write_text('[intercept]\nports = [8080]\n[proxy]\nupstream = "loopback"\n')
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    with netns("stat") as ns:
        inode = ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
        routing = Config.from_toml(conf).routing
        path = state.STATE_DIR / f"routing-netns{inode}-mark{routing.mark}-table{routing.table}.json"
        state.ensure_dir()
        path.write_text(json.dumps({"sysctls": {str(victim): "0"}}))
        try:
            r = _remove(ns, conf)
            assert r.returncode == 1, r
            assert r.stderr == (
                f"tproxy: {path}: sysctls: {str(victim)!r} is not a /proc/sys/net/ipv4/conf/<interface>/route_localnet "
                "path; refusing to write it\n"
            )
            assert victim.read_text() == "precious\n"
            path.write_text("{oops")
            r = _remove(ns, conf)
            assert r.returncode == 1 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
        finally:
            path.unlink(missing_ok=True)


@root
def test_forget_netns_drops_the_files_of_that_inode_only(sdir):
    state.ensure_dir()
    mine = [sdir / "removed-netns123.json", sdir / "routing-netns123-mark4096-table100.json"]
    others = [sdir / "removed-netns1234.json", sdir / "routing-netns12-mark4096-table100.json", sdir / "netns123"]
    for path in mine + others:
        path.write_text("{}")
    assert sorted(state.forget_netns(123)) == sorted(mine)
    assert sorted(sdir.iterdir()) == sorted(others)


@root
def test_a_namespace_deleted_takes_its_state_files_with_it(tmp_path):
    """`tproxy rules remove` leaves a marker named by the namespace's inode (so no watcher undoes it); a namespace of
    ours (the tests', the lab's, `tproxy check`'s throwaway one) takes it along when deleted, before its inode can be
    another namespace's."""
    conf = tmp_path / "t.toml"
    conf.write_text("[intercept]\nports = [8080]\n")
    with netns("fgt") as ns:
        inode = ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
        for verb in ("apply", "remove"):
            ns.run([sys.executable, "-m", "tproxy", "rules", verb, "-c", str(conf)], cwd=str(REPO))
        marker = state.STATE_DIR / f"removed-netns{inode}.json"
        written = marker.read_text()
    # (gone; unless another run's namespace got the freed inode at once and wrote its own)
    assert not marker.exists() or marker.read_text() != written


@root
def test_a_file_holds_the_namespace_cookie_and_another_namespaces_file_is_no_state(sdir):
    """Files are named by the namespace's inode, which the kernel reuses: the cookie (never reused) tells whose a
    file is. A file without one (an older tproxy) is still taken as this namespace's."""
    cookie = netns_cookie()
    assert cookie is not None  # (SO_NETNS_COOKIE: Linux 5.14; our machines have it)
    path = sdir / "routing-netns1-mark4096-table100.json"
    state.save_state(path, {"sysctls": {}})
    assert json.loads(path.read_text()) == {"sysctls": {}, "netns_cookie": cookie}
    assert state.load_state(path) == {"sysctls": {}, "netns_cookie": cookie}
    path.write_text(json.dumps({"sysctls": {}, "netns_cookie": cookie + 1}))
    assert state.load_state(path) is None
    path.write_text(json.dumps({"sysctls": {}}))
    assert state.load_state(path) == {"sysctls": {}}


@root
def test_rules_remove_never_restores_what_an_earlier_namespace_under_this_inode_saved(tmp_path):
    """An install saved route_localnet's old value in a state file named by the namespace's inode; the namespace
    went without a removal, and a new one got its inode. Here someone else set route_localnet to 1 (kube-proxy does,
    for node ports on localhost); `tproxy rules remove` (nothing of ours installed) must leave it so."""
    conf = tmp_path / "t.toml"
    conf.write_text('[intercept]\nports = [8080]\n[proxy]\nupstream = "loopback"\n')
    routing = Config.from_toml(conf).routing
    with netns("ckie") as ns:
        inode = ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
        ns.run(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        path = state.STATE_DIR / f"routing-netns{inode}-mark{routing.mark}-table{routing.table}.json"
        state.ensure_dir()
        earlier = {"sysctls": {"/proc/sys/net/ipv4/conf/all/route_localnet": "0"}, "netns_cookie": netns_cookie()}
        path.write_text(json.dumps(earlier))  # (the test's own namespace's cookie: another namespace's)
        try:
            r = _remove(ns, conf)
            assert r.returncode == 0, r
            assert ns.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"
            assert not path.exists()  # dropped by the removal: it describes nothing here
        finally:
            path.unlink(missing_ok=True)
