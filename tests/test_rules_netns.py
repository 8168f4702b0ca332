"""Installing and removing for real (root): through the CLI, inside a fresh network namespace.

apply -> the rules and routes are there; apply again -> nothing doubles; remove -> ``nft list ruleset``,
``iptables-save``, ``ip6tables-save``, ``ip rule``, ``ip route show table all`` and the sysctls we touch read
byte-for-byte as before apply. The same after a failure half-way, and after a rule file the kernel rejects.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests import golden_gen
from tproxy.backends.iptables import has_rules
from tproxy.netns import Netns, netns

pytestmark = pytest.mark.root

VENV_BIN = Path(sys.executable).parent
TPROXY = str(VENV_BIN / "tproxy")
PYTHON = sys.executable
SYSCTLS = ("net.ipv4.conf.all.route_localnet", "net.ipv4.conf.veth0.route_localnet", "net.ipv4.conf.all.rp_filter")


def snapshot(ns: Netns) -> dict[str, str]:
    """Everything apply may touch, as text.

    Only what changes by itself is normalised: the timestamp comments of iptables-save, and packet/byte counters
    (the veth pair sends IPv6 neighbour discovery through the hooks on its own).
    """
    out = {}
    for name, argv in {
        "nft": ["nft", "list", "ruleset"],
        "iptables": ["iptables-save"],
        "ip6tables": ["ip6tables-save"],
        "rule4": ["ip", "-4", "rule"],
        "rule6": ["ip", "-6", "rule"],
        "route4": ["ip", "-4", "route", "show", "table", "all"],
        "route6": ["ip", "-6", "route", "show", "table", "all"],
        "sysctl": ["sysctl", *SYSCTLS],
    }.items():
        text = ns.run(argv).stdout
        if name.endswith("tables"):
            text = "".join(ln + "\n" for ln in text.splitlines() if not ln.startswith(("# Generated", "# Completed")))
        out[name] = re.sub(r"counter packets \d+ bytes \d+", "counter", re.sub(r"\[\d+:\d+\]", "[:]", text))
    return out


def write_config(tmp_path: Path, case: str, backend: str, **changes) -> Path:
    doc = golden_gen.cases()[case]
    lines = [f'mode = "{doc["mode"]}"', f'backend = "{backend}"']
    for section in ("listener", "intercept", "proxy", "routing"):
        table = {**doc.get(section, {}), **changes.get(section, {})}
        if table:
            lines.append(f"[{section}]")
            for k, v in table.items():
                lines.append(f"{k} = {_toml(v)}")
    path = tmp_path / f"{case}-{backend}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


def cli(ns: Netns, *args: str) -> subprocess.CompletedProcess:
    return ns.run([TPROXY, "rules", *args], check=False)


@pytest.fixture
def ns():
    with netns("rules") as n:
        n.run(["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"])
        for dev in ("veth0", "veth1"):  # no link-local address: nothing changes the routes behind our back
            n.run(["ip", "link", "set", dev, "addrgenmode", "none"])
            n.run(["ip", "link", "set", dev, "up"])
        yield n


# A representative slice of the matrix (the whole matrix is checked by the tools in test_backends.py).
CASES = ["tproxy-both", "nat-both", "nat_preserve-both", "tproxy-loopback-interfaces", "tproxy-exclusions"]


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_apply_apply_remove_is_byte_for_byte(ns, tmp_path, case, backend):
    conf = str(write_config(tmp_path, case, backend))
    before = snapshot(ns)

    r = cli(ns, "apply", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tproxy rules installed:")
    once = snapshot(ns)
    cfg = golden_gen.config(case, backend)
    if backend == "nftables":
        assert "table inet tproxy_rules" in once["nft"] and '"tproxy/intercept"' in once["nft"]
    else:
        assert '"tproxy/intercept"' in once["iptables"] and '"tproxy/intercept"' in once["ip6tables"]
        assert "iptables (nf_tables variant)" in r.stdout
    if cfg.needs_routing:
        assert "fwmark 0x1000/0x3000 lookup 100" in once["rule4"] and "fwmark 0x1000/0x3000 lookup 100" in once["rule6"]
        assert "local default dev lo table 100" in once["route4"]
        assert "local default dev lo table 100" in once["route6"]
    else:
        assert once["rule4"] == before["rule4"] and once["route4"] == before["route4"]
    if case == "tproxy-loopback-interfaces":
        assert "net.ipv4.conf.veth0.route_localnet = 1" in once["sysctl"]
        assert "net.ipv4.conf.all.route_localnet = 0" in once["sysctl"]

    r = cli(ns, "apply", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert snapshot(ns) == once, "applying twice changed something (a duplicate?)"
    assert _installed(ns, conf) == "True"

    r = cli(ns, "remove", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tproxy rules removed:")
    assert snapshot(ns) == before

    r = cli(ns, "remove", "-c", conf)
    assert r.returncode == 0 and "nothing to remove" in r.stdout
    assert snapshot(ns) == before
    assert _installed(ns, conf) == "False"


def _installed(ns: Netns, conf: str) -> str:
    script = (
        "from tproxy import rules\nfrom tproxy.config import Config\n"
        f"print(rules.installed(Config.from_toml({conf!r})))"
    )
    return ns.run([PYTHON, "-c", script]).stdout.strip()


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_remove_leaves_other_rules_alone(ns, tmp_path, backend):
    """Someone else's rules in the same hooks and tables survive our apply/remove untouched, in order."""
    ns.sh(
        "nft add table inet other; nft add chain inet other pre '{ type filter hook prerouting priority -150; }';"
        "nft add rule inet other pre tcp dport 22 counter accept;"
        "iptables -t mangle -A PREROUTING -p tcp --dport 2222 -j ACCEPT;"
        "iptables -t nat -N THEIRS; iptables -t nat -A PREROUTING -j THEIRS;"
        "ip6tables -t mangle -A OUTPUT -p tcp --dport 2222 -j ACCEPT;"
        "ip rule add fwmark 0x2 lookup 200; ip route add local default dev lo table 200"
    )
    before = snapshot(ns)
    for case in ("tproxy-both", "nat-both"):
        conf = str(write_config(tmp_path, case, backend))
        assert cli(ns, "apply", "-c", conf).returncode == 0
        if backend == "iptables":
            save = ns.run(["iptables-save", "-t", "mangle" if case == "tproxy-both" else "nat"]).stdout
            rules = [ln for ln in save.splitlines() if ln.startswith("-A PREROUTING")]
            assert "tproxy/jump" in rules[0], "our jump is first in the built-in chain"
        r = cli(ns, "remove", "-c", conf)
        assert r.returncode == 0, r.stderr
        assert snapshot(ns) == before


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_failure_half_way_leaves_the_host_as_it_was(ns, tmp_path, backend):
    """A sysctl for a missing interface: refused before anything goes in (one line, no traceback)."""
    conf = str(write_config(tmp_path, "tproxy-loopback-interfaces", backend, intercept={"interfaces": ["nosuch0"]}))
    before = snapshot(ns)
    r = cli(ns, "apply", "-c", conf)
    assert r.returncode == 1
    assert "interface 'nosuch0' does not exist" in r.stderr and "route_localnet" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(ns) == before


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_reapply_with_a_missing_interface_keeps_the_running_rules(ns, tmp_path, backend):
    """Installed, then applied again with an interface that does not exist (a typo before `systemctl reload`): the
    installed rules stay exactly as they were, not replaced by rules of a config whose routing cannot go in."""
    good = str(write_config(tmp_path, "tproxy-loopback-interfaces", backend))
    assert cli(ns, "apply", "-c", good).returncode == 0
    once = snapshot(ns)
    bad = write_config(tmp_path, "tproxy-loopback-interfaces", backend, intercept={"interfaces": ["veth0", "nosuch0"]})
    r = cli(ns, "apply", "-c", str(bad))
    assert r.returncode == 1 and "interface 'nosuch0' does not exist" in r.stderr, r.stderr
    assert snapshot(ns) == once
    assert cli(ns, "remove", "-c", good).returncode == 0


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_routing_failure_after_the_rules_takes_them_out_again(ns, tmp_path, backend):
    """Routing fails once the rules are in (netlink refusing, simulated by making routing.install raise): the rules
    come out again and the namespace reads as before."""
    conf = str(write_config(tmp_path, "tproxy-both", backend))
    script = f"""
import sys
from tproxy import routing, rules
from tproxy.config import Config
from tproxy.errors import RulesError
def refuse(config):
    raise RulesError("adding the IPv4 fwmark rule/local route (table 100): refused by the test")
routing.install = refuse
try:
    rules.install(Config.from_toml({conf!r}))
except RulesError as e:
    print(e)
    sys.exit(3)
"""
    before = snapshot(ns)
    r = ns.run([PYTHON, "-c", script], check=False, cwd=str(Path(__file__).parent.parent))
    assert r.returncode == 3 and "refused by the test" in r.stdout, r.stdout + r.stderr
    assert snapshot(ns) == before


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_a_replacement_whose_routing_fails_leaves_the_previous_rules(ns, tmp_path, backend):
    """Installed for IPv4, then applied again with IPv6 too while routing.table already holds someone else's IPv6
    default route (a real conflict: the kernel refuses our local route, "File exists"). The new rules went in first
    (both families; iptables-nft also creates its ip6 tables): afterwards the IPv4 install reads exactly as before,
    rules, routes and all, and one line says why."""
    v4 = str(write_config(tmp_path, "tproxy-v4", backend))
    both = str(write_config(tmp_path, "tproxy-both", backend))
    pristine = snapshot(ns)
    assert cli(ns, "apply", "-c", v4).returncode == 0
    ns.run(["ip", "-6", "route", "add", "blackhole", "default", "table", "100"])
    before = snapshot(ns)
    r = cli(ns, "apply", "-c", both)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1 and "IPv6" in r.stderr and "File exists" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(ns) == before
    ns.run(["ip", "-6", "route", "del", "blackhole", "default", "table", "100"])
    assert cli(ns, "remove", "-c", v4).returncode == 0
    assert snapshot(ns) == pristine


_ROUNDTRIP = """
import re, subprocess, sys
from tests import golden_gen
from tproxy.backends import get_backend
backend = sys.argv[1]
b = get_backend(backend)
def ruleset():
    out = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    if backend == "iptables":  # nft lists iptables-nft's chains in creation order: a chain put back comes last
        out = "".join(sorted(out.splitlines(True)))
    for save in ("iptables-save", "ip6tables-save"):
        out += subprocess.run([save], capture_output=True, text=True, check=True).stdout
    out = "".join(ln + "\\n" for ln in out.splitlines() if not ln.startswith(("# Generated", "# Completed")))
    return re.sub(r"\\[\\d+:\\d+\\]", "[:]", out)
bad = []
other = b.render(golden_gen.config("nat_preserve-exclusions", backend))
for case in golden_gen.cases():
    b.apply(b.render(golden_gen.config(case, backend)))
    installed, snap = ruleset(), b.snapshot()
    b.apply(other)
    b.restore(snap)
    if ruleset() != installed:
        bad.append(case)
    b.restore(None)
print(" ".join(bad) or "ok", ruleset() == "")
"""


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_snapshot_and_restore_put_back_every_golden_rule_set(ns, backend):
    """What undoes a failed replacement: for every golden case, installed, replaced by another rule set, restored:
    the ruleset reads as it did (nft reads back its own listing; iptables gets its chains, rules and jumps back, and
    the tables iptables-nft created for the other set are deleted again); restoring "nothing" leaves nothing. (With
    iptables-nft, a chain the other set deleted is listed last by nft once it is back: ``iptables-save`` reads as it
    did, ``nft list ruleset`` holds the same lines.)"""
    r = ns.run([PYTHON, "-c", _ROUNDTRIP, backend], check=False, cwd=str(Path(__file__).parent.parent), timeout=300)
    assert r.stdout.split() == ["ok", "True"], r.stdout + r.stderr


def _apply_with_read_only_proc_sys(ns: Netns, conf: Path) -> subprocess.CompletedProcess:
    """`tproxy rules apply` in a private mount namespace where /proc/sys is read-only (as in a container)."""
    script = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
    script += f"exec {TPROXY} rules apply -c {conf}"
    return ns.run(["unshare", "-m", "sh", "-c", script], check=False)


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_a_replacement_whose_sysctl_cannot_be_set_leaves_the_previous_rules(ns, tmp_path, backend):
    """Installed with the loopback upstream on veth0, then applied again with veth1 added where route_localnet cannot
    be written (/proc/sys read-only): the new rules went in before the sysctl step; afterwards the running install
    reads exactly as before, and removing it still restores veth0's route_localnet (its state file is intact)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    good = write_config(tmp_path / "a", "tproxy-loopback-interfaces", backend)
    more = write_config(
        tmp_path / "b", "tproxy-loopback-interfaces", backend, intercept={"interfaces": ["veth0", "veth1"]}
    )
    pristine = snapshot(ns)
    assert cli(ns, "apply", "-c", str(good)).returncode == 0
    before = snapshot(ns)
    assert "net.ipv4.conf.veth0.route_localnet = 1" in before["sysctl"]
    r = _apply_with_read_only_proc_sys(ns, more)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("tproxy: cannot write /proc/sys/net/ipv4/conf/veth1/route_localnet: Read-only"), r
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert snapshot(ns) == before
    assert ns.run(["sysctl", "-n", "net.ipv4.conf.veth1.route_localnet"]).stdout.strip() == "0"
    assert cli(ns, "remove", "-c", str(good)).returncode == 0
    assert snapshot(ns) == pristine


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_rejected_rule_file_reports_the_tools_message_and_changes_nothing(ns, backend):
    """A file the kernel/tool refuses (here: the IPv6 half, after the IPv4 half went in for iptables)."""
    cfg_case = "tproxy-both"
    script = f"""
import sys
from tproxy.backends import get_backend
from tests import golden_gen
from tproxy.errors import RulesError
b = get_backend({backend!r})
text = b.render(golden_gen.config({cfg_case!r}, {backend!r}))
head, sep, tail = text.rpartition("tproxy/intercept")
text = head + sep + tail.replace("--on-port", "--on-port 99999 --bogus") if {backend!r} == "iptables" else (
    text.replace("tproxy ip6 to", "tproxy ip6 too"))
try:
    b.apply(text)
except RulesError as e:
    print(e)
    sys.exit(3)
"""
    before = snapshot(ns)
    r = ns.run([PYTHON, "-c", script], check=False, cwd=str(Path(__file__).parent.parent))
    assert r.returncode == 3, r.stdout + r.stderr
    if backend == "nftables":
        assert "nft -f - failed" in r.stdout and "too" in r.stdout
    else:
        assert "ip6tables-restore -w 10 --noflush failed" in r.stdout or "ip6tables-restore -w 10 --test" in r.stdout
    assert snapshot(ns) == before


def test_iptables_reapply_after_a_mode_change_leaves_no_stale_chain(ns, tmp_path):
    before = snapshot(ns)
    tp = str(write_config(tmp_path, "tproxy-both", "iptables"))
    nat = str(write_config(tmp_path, "nat-both", "iptables"))
    assert cli(ns, "apply", "-c", tp).returncode == 0
    assert cli(ns, "apply", "-c", nat).returncode == 0
    save = ns.run(["iptables-save"]).stdout
    assert "TPROXY_NAT" in save and "TPROXY_DIVERT" not in save and "TPROXY_PREROUTING" not in save
    assert cli(ns, "remove", "-c", tp).returncode == 0
    assert snapshot(ns) == before


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_remove_with_the_other_backend_configured_removes_everything(ns, tmp_path, backend):
    """Applied with one backend, then the config names the other (edited, or ``--backend`` given once): remove still
    takes out every rule of ours and says which."""
    other = next(b for b in golden_gen.BACKENDS if b != backend)
    before = snapshot(ns)
    assert cli(ns, "apply", "-c", str(write_config(tmp_path, "tproxy-both", backend))).returncode == 0
    r = cli(ns, "remove", "-c", str(write_config(tmp_path, "tproxy-both", other)))
    assert r.returncode == 0, r.stderr
    assert backend in r.stdout and "routing:" in r.stdout, r.stdout
    assert snapshot(ns) == before


def test_iptables_refuses_a_host_with_legacy_rules(ns, tmp_path):
    if not shutil.which("iptables-legacy"):
        pytest.skip("iptables-legacy is not installed")
    r = ns.run(
        ["iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "2", "-j", "ACCEPT"], check=False
    )
    if r.returncode != 0:
        pytest.skip(f"the legacy iptables kernel modules are unavailable here: {r.stderr.strip()}")
    before = snapshot(ns)
    conf = str(write_config(tmp_path, "tproxy-both", "iptables"))
    r = cli(ns, "apply", "-c", conf)
    assert r.returncode == 1
    assert "nf_tables variant" in r.stderr and "iptables-legacy holds rules" in r.stderr
    assert snapshot(ns) == before


def test_unprivileged_apply_says_it_needs_cap_net_admin(ns):
    fd, name = tempfile.mkstemp(suffix=".toml")  # pytest's tmp_path is not readable by uid 65534
    conf = Path(name)
    os.write(fd, b"intercept.ports = [8080]\n")
    os.close(fd)
    os.chmod(conf, 0o644)
    try:
        _unprivileged(ns, conf)
    finally:
        conf.unlink()


def _unprivileged(ns, conf):
    for cmd in ("apply", "remove"):
        r = ns.run(
            [
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                TPROXY,
                "rules",
                cmd,
                "-c",
                str(conf),
            ],
            check=False,
        )
        assert r.returncode == 1, r.stderr
        assert "needs CAP_NET_ADMIN (run as root)" in r.stderr and "Traceback" not in r.stderr


def test_show_touches_nothing(ns, tmp_path):
    before = snapshot(ns)
    for backend in golden_gen.BACKENDS:
        conf = str(write_config(tmp_path, "tproxy-loopback-interfaces", backend))
        r = cli(ns, "show", "-c", conf)
        assert r.returncode == 0, r.stderr
        assert r.stdout == golden_gen.golden_path("tproxy-loopback-interfaces", backend).read_text()
    assert snapshot(ns) == before


# ----------------------------------------------------------------------------------------------------------------
# The rules really divert, and replies to the spoofed client address really come back (tests/rules_probe.py is a
# minimal transparent proxy). Strict rp_filter everywhere: the finding is that nothing needs changing for it.

CLIENT4, SERVER4 = "198.18.7.2", "198.18.7.1"
CLIENT6, SERVER6 = "fd00:7::2", "fd00:7::1"


@pytest.fixture
def pair():
    with netns("srv") as srv, netns("cli") as cli_ns:
        srv.run(["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", cli_ns.name])
        for ns_, dev, a4, a6 in ((srv, "veth0", SERVER4, SERVER6), (cli_ns, "veth1", CLIENT4, CLIENT6)):
            ns_.run(["ip", "link", "set", dev, "addrgenmode", "none"])
            ns_.run(["ip", "addr", "add", f"{a4}/24", "dev", dev])
            ns_.run(["ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad"])
            ns_.run(["ip", "link", "set", dev, "up"])
            ns_.sh("for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 1 > $f; done")
        yield srv, cli_ns


def _ask(cli_ns: Netns, host: str, port: int, sport: int = 0) -> str:
    """Connect from the client (from ``sport`` if given), read the answer to EOF, then close."""
    script = (
        "import socket\n"
        f"s = socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET)\n"
        "s.settimeout(10)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('', {sport}))\n"
        f"s.connect(({host!r}, {port}))\n"
        "data = b''\n"
        "while chunk := s.recv(200):\n"
        "    data += chunk\n"
        "print(data.decode().strip())\n"
    )
    r = cli_ns.run([PYTHON, "-c", script], check=False, timeout=30)
    return r.stdout.strip() or r.stderr.strip().splitlines()[-1]


PROBES = [
    # case, expected peer the application sees (None: the server itself)
    ("tproxy-both", "client"),
    ("tproxy-loopback-interfaces", "client"),
    ("tproxy-loopback", "client"),
    ("nat_preserve-both", "client"),
    ("nat-both", "server"),
]


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
@pytest.mark.parametrize(("case", "sees"), PROBES)
def test_rules_divert_and_route_replies(pair, tmp_path, case, sees, backend):
    srv, cli_ns = pair
    cfg = golden_gen.config(case, backend)
    conf = str(write_config(tmp_path, case, backend))
    before = snapshot(srv)
    r = cli(srv, "apply", "-c", conf)
    assert r.returncode == 0, r.stderr
    probe = srv.popen(
        [PYTHON, "-m", "tests.rules_probe", cfg.mode, cfg.proxy.upstream, str(cfg.routing.upstream_mark),
         str(cfg.listener.port), "8080", "1" if cfg.preserve_source else "0"],
        cwd=str(Path(__file__).parent.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert probe.stdout.readline().strip() == "ready"
        for fam, server, client in ((4, SERVER4, CLIENT4), (6, SERVER6, CLIENT6)):
            if fam not in cfg.families:
                continue
            answer = _ask(cli_ns, server, 8080)
            assert answer.startswith("via-proxy "), f"IPv{fam}: {answer}"
            peer = answer.split()[1]
            if sees == "client":
                assert peer == client, f"IPv{fam}: the application saw {peer}, not the client"
            else:
                assert peer in (server, "127.0.0.1", "::1"), f"IPv{fam}: {answer}"
            # the proxy closed first, so its intercepted socket is in TIME_WAIT; a client reusing its port at once
            # must still reach the proxy (the divert rule must not see SYNs: DESIGN.md, pitfalls)
            for _ in range(3):
                again = _ask(cli_ns, server, 8080, sport=41000 + fam)
                assert again.startswith("via-proxy "), f"IPv{fam}, reused client port: {again}"
    finally:
        probe.stdin.close()
        probe.kill()
        probe.wait()
    assert cli(srv, "remove", "-c", conf).returncode == 0
    assert snapshot(srv) == before


@pytest.fixture
def legacy_path(tmp_path):
    """A PATH on which ``iptables`` & co. are the legacy variant (the host's alternatives are left alone)."""
    shim = tmp_path / "legacy-bin"
    shim.mkdir()
    for fam in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            target = shutil.which(f"{fam}-legacy{suffix}")
            if target is None:
                pytest.skip("iptables-legacy is not installed")
            (shim / f"{fam}{suffix}").symlink_to(target)
    return f"{shim}:{os.environ['PATH']}"


@pytest.mark.parametrize("case", ["tproxy-both", "nat_preserve-both"])
def test_iptables_legacy_variant(ns, tmp_path, legacy_path, case):
    """The legacy variant: same rules, said so in the summary. A legacy table, once loaded, cannot be unloaded: after
    remove it stays, empty (built-in chains, policy ACCEPT, no rule); everything else reads as before."""
    env = {**os.environ, "PATH": legacy_path}
    conf = str(write_config(tmp_path, case, "iptables"))
    probe = ns.run(["iptables", "-t", "mangle", "-S"], env=env, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the legacy iptables kernel modules are unavailable here: {probe.stderr.strip()}")
    before = snapshot(ns)
    r = ns.run([TPROXY, "rules", "apply", "-c", conf], env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert "iptables (legacy variant)" in r.stdout
    legacy = ns.run(["iptables-save"], env=env).stdout
    assert '"tproxy/intercept"' in legacy or "tproxy/restore-mark" in legacy
    assert snapshot(ns)["nft"] == before["nft"]  # nothing went into nf_tables
    once = ns.run(["iptables-save"], env=env).stdout
    assert ns.run([TPROXY, "rules", "apply", "-c", conf], env=env, check=False).returncode == 0
    assert _strip_save(ns.run(["iptables-save"], env=env).stdout) == _strip_save(once)
    r = ns.run([TPROXY, "rules", "remove", "-c", conf], env=env, check=False)
    assert r.returncode == 0, r.stderr
    for fam in ("iptables-save", "ip6tables-save"):
        save = ns.run([fam], env=env).stdout
        assert "tproxy" not in save and "TPROXY" not in save
        assert not has_rules(save), save
    assert snapshot(ns) == before


def test_iptables_legacy_variant_without_nft_installed(ns, tmp_path, legacy_path):
    """A legacy-only host need not have the ``nft`` program: apply and remove work without it (PATH: the legacy
    shim and ``ip``, nothing else)."""
    shim = Path(legacy_path.split(":")[0])
    (shim / "ip").symlink_to(shutil.which("ip"))
    for prog in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        if shutil.which(prog):
            (shim / prog).symlink_to(shutil.which(prog))
    env = {**os.environ, "PATH": str(shim)}
    probe = ns.run(["iptables", "-t", "mangle", "-S"], env=env, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the legacy iptables kernel modules are unavailable here: {probe.stderr.strip()}")
    conf = str(write_config(tmp_path, "tproxy-both", "iptables"))
    before = snapshot(ns)
    for cmd in ("apply", "remove"):
        r = ns.run([TPROXY, "rules", cmd, "-c", conf], env=env, check=False)
        assert r.returncode == 0, r.stderr
    assert "nft" not in r.stderr
    after = snapshot(ns)
    assert after["nft"] == before["nft"] and after["rule4"] == before["rule4"] and after["route6"] == before["route6"]


def _strip_save(text: str) -> str:
    text = "".join(ln + "\n" for ln in text.splitlines() if not ln.startswith(("# Generated", "# Completed")))
    return re.sub(r"\[\d+:\d+\]", "[:]", text)


# ----------------------------------------------------------------------------------------------------------------
# route_localnet never outlives its guard: a sysctl that cannot be restored is an error, and nothing comes out


def _remove_with_read_only_proc_sys(ns: Netns, conf: Path) -> subprocess.CompletedProcess:
    """`tproxy rules remove` in a private mount namespace where /proc/sys is read-only (as in a container)."""
    script = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
    script += f"exec {TPROXY} rules remove -c {conf}"
    return ns.run(["unshare", "-m", "sh", "-c", script], check=False)


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_a_sysctl_that_cannot_be_restored_keeps_the_guard_and_the_state(ns, tmp_path, backend):
    conf = write_config(tmp_path, "tproxy-loopback", backend)
    before = snapshot(ns)
    assert "net.ipv4.conf.all.route_localnet = 0" in before["sysctl"]
    r = cli(ns, "apply", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    installed = snapshot(ns)
    assert "net.ipv4.conf.all.route_localnet = 1" in installed["sysctl"]
    assert "tproxy/loopback-guard" in installed["nft" if backend == "nftables" else "iptables"]

    r = _remove_with_read_only_proc_sys(ns, conf)
    assert r.returncode == 1, r
    assert r.stderr.startswith("tproxy: cannot restore net.ipv4.conf.all.route_localnet = 0 (it is 1): ")
    assert "Read-only file system" in r.stderr and len(r.stderr.splitlines()) == 1
    assert snapshot(ns) == installed  # the guard (and everything else) stays while route_localnet is 1

    r = cli(ns, "remove", "-c", str(conf))  # once it can be written, a later removal finishes
    assert r.returncode == 0, r.stderr
    assert "net.ipv4.conf.all.route_localnet" in r.stdout
    assert snapshot(ns) == before


_APPLY_WITH_WAIT = """
import sys
from tproxy.backends import iptables
from tproxy.config import Config
from tproxy.errors import RulesError
iptables.LOCK_WAIT_SECONDS = int(sys.argv[2])
b = iptables.IptablesBackend()
try:
    b.apply(b.render(Config.from_toml(sys.argv[1])))
except RulesError as e:
    print(e)
    sys.exit(1)
"""


def test_iptables_restore_waits_for_the_xtables_lock_and_gives_up_in_bounded_time(ns, tmp_path, legacy_path):
    """Docker, kube-proxy or firewalld may hold the xtables lock: each restore waits for it (``-w``), bounded.
    Measured without ``-w``: iptables-legacy-restore waits for the lock with no bound at all. The lock file is the
    test's own (``XTABLES_LOCKFILE``), never the host's."""
    lock = tmp_path / "xtables.lock"
    lock.touch()
    env = {**os.environ, "PATH": legacy_path, "XTABLES_LOCKFILE": str(lock)}
    probe = ns.run(["iptables", "-t", "mangle", "-S"], env=env, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the legacy iptables kernel modules are unavailable here: {probe.stderr.strip()}")
    conf = str(write_config(tmp_path, "tproxy-both", "iptables"))
    before = snapshot(ns)
    repo = str(Path(__file__).parent.parent)
    for hold, wait, ok in ((None, 1, False), (1.5, 10, True)):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if hold is not None:
                threading.Timer(hold, os.close, (fd,)).start()  # closing the file releases the lock
            t0 = time.monotonic()
            r = ns.run([PYTHON, "-c", _APPLY_WITH_WAIT, conf, str(wait)], env=env, cwd=repo, check=False, timeout=60)
            took = time.monotonic() - t0
        finally:
            if hold is None:
                os.close(fd)
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
            assert took > 1.0, f"the lock was held 1.5 s, yet apply took only {took:.1f} s"
        else:
            assert r.returncode == 1 and "lock" in r.stdout, r.stdout + r.stderr
            assert took < 10, f"apply gave up only after {took:.1f} s (bound: 1 s per restore)"
            assert snapshot(ns) == before
    assert ns.run([TPROXY, "rules", "remove", "-c", conf], env=env, check=False).returncode == 0
