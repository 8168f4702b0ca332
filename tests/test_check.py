"""``tproxy check``: the line format and the pure pieces here; the whole command as root inside fresh namespaces,
where every check passes, and each failing case (port taken, leftovers, sysctl, missing program, no privilege) gives
its FAIL line, its fix and exit status 1."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tproxy import check
from tproxy.config import Config
from tproxy.netns import netns

TPROXY = [sys.executable, "-m", "tproxy"]


def write_config(text: str) -> Path:
    """A config file every user can read (the unprivileged case reads it too); the caller removes it."""
    d = Path(tempfile.mkdtemp(prefix="tpx-check-"))
    d.chmod(0o755)
    p = d / "tproxy.toml"
    p.write_text(text)
    p.chmod(0o644)
    return p


@pytest.fixture
def cfg_file():
    made: list[Path] = []

    def make(text: str = "[intercept]\nports = [8080]\n") -> Path:
        made.append(write_config(text))
        return made[-1]

    yield make
    for p in made:
        p.unlink()
        p.parent.rmdir()


def lines_of(out: str) -> list[str]:
    lines = out.splitlines()
    for ln in lines:
        assert ln.startswith(("PASS ", "FAIL ", "WARN ")), f"not a check line: {ln!r}"
        if ln.startswith(("FAIL ", "WARN ")):
            assert " \u2014 fix: " in ln, f"a failure without its fix: {ln!r}"
    return lines


def failures(out: str) -> list[str]:
    return [ln for ln in lines_of(out) if ln.startswith("FAIL ")]


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_result_lines():
    assert check.passed("listener free").line() == "PASS listener free"
    assert check.passed("program nft", "nftables v1").line() == "PASS program nft: nftables v1"
    assert check.failed("x", "broken", "mend it").line() == "FAIL x: broken \u2014 fix: mend it"


@pytest.mark.parametrize(
    "text, line",
    [
        (
            "mode = 'x'\n",
            "FAIL config valid: {p}: mode: unknown value 'x' (expected one of: tproxy, nat) \u2014 fix: "
            "correct mode in {p}; the other checks need a valid config",
        ),
        ("[intercept\n", None),
    ],
)
def test_config_error_is_one_fail_line_exit_2(cfg_file, text, line):
    p = cfg_file(text)
    r = subprocess.run([*TPROXY, "check", "-c", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == ""
    (only,) = lines_of(r.stdout)
    assert only.startswith(f"FAIL config valid: {p}: ")
    if line:
        assert only == line.format(p=p)


def test_missing_config_file(tmp_path):
    out = io.StringIO()
    assert check.run_checks(tmp_path / "none.toml", out=out) == 2
    assert out.getvalue() == (
        f"FAIL config valid: {tmp_path / 'none.toml'}: no such file \u2014 fix: give -c a readable TOML file "
        "(example: conf/tproxy.toml); the other checks need a valid config\n"
    )


def test_bad_override_names_the_flag(cfg_file):
    out = io.StringIO()
    assert check.run_checks(cfg_file(), backend="pf", out=out) == 2
    assert "fix: correct the --backend flag" in out.getvalue()


def test_a_crashing_check_is_a_fail_line(cfg_file, monkeypatch):
    def check_boom(config, path):
        raise RuntimeError("boom")
        yield

    monkeypatch.setattr(check, "CHECKS", (check_boom,))
    out = io.StringIO()
    assert check.run_checks(cfg_file(), out=out) == 1
    assert failures(out.getvalue()) == [
        "FAIL boom: the check itself failed: RuntimeError('boom') \u2014 fix: report this bug"
    ]


@pytest.mark.parametrize(
    "mode, backend, preserve, names",
    [
        ("tproxy", "nftables", None, ["nft tproxy", "nft socket transparent", "nft ct mark", "policy routing"]),
        ("nat", "nftables", None, ["nft redirect"]),
        ("nat", "nftables", True, ["nft ct mark", "nft redirect", "policy routing"]),
        (
            "tproxy",
            "iptables",
            None,
            ["iptables TPROXY target", "iptables socket match", "iptables connmark", "policy routing"],
        ),
        ("nat", "iptables", None, ["iptables REDIRECT target"]),
    ],
)
def test_features_follow_the_config(mode, backend, preserve, names):
    proxy = {} if preserve is None else {"preserve_source": preserve}
    config = Config.from_dict({"mode": mode, "backend": backend, "intercept": {"ports": [80]}, "proxy": proxy})
    feats = check.features(config)
    assert sorted({f.name.split(" (")[0] for _, f in feats}) == sorted(names)
    assert {fam for fam, _ in feats} == {4, 6}


def test_features_use_the_configured_mark_table_and_port():
    config = Config.from_dict(
        {
            "intercept": {"ports": [80], "ipv6": False},
            "routing": {"mark": 0x40, "table": 77},
            "listener": {"port": 4999},
        }
    )
    text = "".join(f.text for _, f in check.features(config))
    assert "tproxy to :4999 meta mark set 0x40" in text
    assert "-4 rule add fwmark 0x40/0x40 lookup 77" in text
    assert "ip6" not in text


def test_src_valid_mark_on(tmp_path):
    for name, value in (("all", "0"), ("eth0", "1"), ("lo", "0"), ("wg0", "1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "src_valid_mark").write_text(value + "\n")
    assert check.src_valid_mark_on(tmp_path) == ["eth0", "wg0"]


def test_port_free_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        reason = check.port_free(4, "127.0.0.1", port)
        assert reason is not None and reason.startswith("in use")
    assert check.port_free(4, "127.0.0.1", port) is None


def test_port_free_sees_a_bound_udp_socket():
    # the port a TCP socket got (then closed: never connected, so nothing lingers): a UDP socket's own ephemeral port
    # may be the local port of some TCP connection of the host at that moment, and then the TCP check rightly fails
    with socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        reason = check.port_free(4, "127.0.0.1", port, udp=True)
        assert reason is not None and reason.startswith("in use")
        assert check.port_free(4, "127.0.0.1", port) is None  # the TCP port of that number is free
    assert check.port_free(4, "127.0.0.1", port, udp=True) is None


def test_port_free_names_a_foreign_address():
    assert check.port_free(4, "198.18.255.254", 0) == "198.18.255.254 is not an address of this host"


@pytest.mark.root
def test_port_free_transparent_allows_a_foreign_address():
    assert check.port_free(4, "198.18.255.254", 0, transparent=True) is None


# ----------------------------------------------------------------------------------------------------------------
# The whole command, as root, inside fresh namespaces


def run_check(ns, path: Path, *args: str, env: dict[str, str] | None = None, user: bool = False):
    cmd = [*TPROXY, "check", "-c", str(path), *args]
    if user:
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd]
    if env:
        cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    r = ns.run(cmd, check=False, timeout=120, cwd=os.getcwd())
    assert r.stderr == "" or "Traceback" not in r.stderr, r.stderr
    return r


@pytest.mark.root
@pytest.mark.parametrize("mode", ["tproxy", "nat"])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_all_pass_in_a_fresh_namespace(cfg_file, mode, backend):
    path = cfg_file()
    with netns("chkt") as ns:
        r = run_check(ns, path, "--mode", mode, "--backend", backend)
        assert failures(r.stdout) == [] and r.returncode == 0, r.stdout
        out = r.stdout
        assert f"(mode {mode}, backend {backend}, IPv4+IPv6, relay shared)" in out
        assert "PASS rules install and remove: in a throwaway namespace: " in out
        assert "PASS listener 0.0.0.0:4143 free\nPASS listener [::]:4143 free\nPASS admin 127.0.0.1:4191 free\n" in out
        assert "PASS no leftover tproxy rules or routes\n" in out
        kernel = [ln for ln in out.splitlines() if ln.startswith("PASS kernel ")]
        assert kernel and all(ln.endswith(": IPv4, IPv6") for ln in kernel)
        # the check left nothing behind in the namespace it ran in
        assert ns.run(["nft", "list", "ruleset"]).stdout == ""
        assert "fwmark" not in ns.run(["ip", "rule", "show"]).stdout


@pytest.mark.root
def test_named_interfaces_with_the_loopback_upstream(cfg_file):
    """The loopback upstream sets route_localnet on each of intercept.interfaces: the rules round trip in the
    throwaway namespace (which has none of the host's interfaces) must not fail for that."""
    path = cfg_file('[intercept]\nports = [8080]\ninterfaces = ["veth7"]\n[proxy]\nupstream = "loopback"\n')
    with netns("chkt") as ns:
        ns.run(["ip", "link", "add", "veth7", "type", "veth", "peer", "name", "veth8"])
        r = run_check(ns, path)
        assert failures(r.stdout) == [] and r.returncode == 0, r.stdout
        assert "PASS rules install and remove: in a throwaway namespace: " in r.stdout


@pytest.mark.root
def test_listener_port_taken(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        holder = ns.popen(
            [
                sys.executable,
                "-c",
                "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',4143))\n"
                "s.listen(1)\nprint('ready',flush=True)\ntime.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline() == "ready\n"
            r = run_check(ns, path)
        finally:
            holder.kill()
            holder.wait()
        assert r.returncode == 1
        (fail,) = failures(r.stdout)
        assert fail.startswith('FAIL listener 0.0.0.0:4143 free: in use (held by users:(("python')
        assert "change listener.port" in fail


@pytest.mark.root
def test_udp_listener_port_taken(cfg_file):
    """With ``intercept.udp_ports`` the proxy also binds the listener port over UDP: a socket holding it fails the
    check (the TCP port stays free), and without ``udp_ports`` nothing asks for it."""
    udp = cfg_file("[intercept]\nports = [8080]\nudp_ports = [53]\n")
    tcp_only = cfg_file()
    with netns("chkt") as ns:
        holder = ns.popen(
            [
                sys.executable,
                "-c",
                "import socket,time\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
                "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1)\ns.bind(('::',4143))\n"
                "print('ready',flush=True)\ntime.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline() == "ready\n"
            r = run_check(ns, udp)
            plain = run_check(ns, tcp_only)
        finally:
            holder.kill()
            holder.wait()
    assert r.returncode == 1, r.stdout
    (fail,) = failures(r.stdout)
    assert fail.startswith('FAIL udp listener [::]:4143 free: in use (held by users:(("python'), fail
    assert "change listener.port" in fail
    assert "PASS udp listener 0.0.0.0:4143 free\n" in r.stdout and "PASS listener [::]:4143 free\n" in r.stdout
    assert plain.returncode == 0 and "udp listener" not in plain.stdout, plain.stdout


@pytest.mark.root
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_leftover_rules_of_an_earlier_run(cfg_file, backend):
    path = cfg_file(f'backend = "{backend}"\n[intercept]\nports = [8080]\n')
    with netns("chkt") as ns:
        ns.run([*TPROXY, "rules", "apply", "-c", str(path)], cwd=os.getcwd())
        try:
            r = run_check(ns, path)
        finally:
            ns.run([*TPROXY, "rules", "remove", "-c", str(path)], cwd=os.getcwd())  # its state lives in /run/tproxy
        assert r.returncode == 1
        (fail,) = failures(r.stdout)
        what = "nftables" if backend == "nftables" else "iptables (nf_tables variant)"
        assert fail.startswith(
            f"FAIL no leftover tproxy rules or routes: {what} rules of tproxy; "
            "IPv4 rule `fwmark 0x1000/0x3000 lookup 100`; "
            "IPv4 routes in table 100 (1); IPv6 rule `fwmark 0x1000/0x3000 lookup 100`; "
            f"IPv6 routes in table 100 (1) \u2014 fix: a tproxy is running or an earlier one was killed: stop it, "
            f"or `tproxy rules remove -c {path}`"
        ), fail
        r = run_check(ns, path)
        assert r.returncode == 0 and failures(r.stdout) == []


@pytest.mark.root
def test_a_foreign_fwmark_rule_clashes(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        ns.run(["ip", "rule", "add", "fwmark", "0x2001", "lookup", "200"])
        r = run_check(ns, path)
        assert r.returncode == 1
        (fail,) = failures(r.stdout)
        assert fail.startswith("FAIL no leftover tproxy rules or routes: IPv4 rule `fwmark 0x2001 lookup 200` ")
        assert "choose another routing.mark / routing.table" in fail
        assert "WARN packet mark bits 0x3000 not used by other rules: " in r.stdout


@pytest.mark.root
def test_src_valid_mark_set(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        ns.run(["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])
        r = run_check(ns, path)
        assert r.returncode == 1
        (fail,) = failures(r.stdout)
        assert fail.startswith("FAIL net.ipv4.conf.*.src_valid_mark off: net.ipv4.conf.all.src_valid_mark=1: ")
        assert "sysctl -w net.ipv4.conf.all.src_valid_mark=0" in fail
        # nat mode without preserve_source routes nothing by mark: the sysctl does not matter there
        assert run_check(ns, path, "--mode", "nat").returncode == 0


@pytest.mark.root
def test_missing_program(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        r = run_check(ns, path, env={"PATH": "/usr/bin:/bin"})  # nft lives in /usr/sbin
        assert r.returncode == 1
        assert failures(r.stdout) == [
            "FAIL program nft: not found in PATH \u2014 fix: apt-get install nftables",
            "FAIL kernel support: cannot ask the kernel without nft \u2014 fix: install it (see above)",
        ]


@pytest.mark.root
def test_unprivileged(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        r = run_check(ns, path, user=True)
        assert r.returncode == 1
        fails = failures(r.stdout)
        assert [f.split(":")[0] for f in fails] == [
            "FAIL privilege CAP_NET_ADMIN",
            "FAIL privilege CAP_NET_RAW",
            "FAIL kernel support",
            "FAIL no leftover tproxy rules or routes",
        ]
        assert "AmbientCapabilities=CAP_NET_RAW" in fails[1]
        assert fails[2].endswith("fix: run `tproxy check` as root")


# ----------------------------------------------------------------------------------------------------------------
# Sharing the host: other software's marks, an input policy that accepts only tracked packets

_KUBE_PROXY_SAVE = """*nat
:KUBE-MARK-MASQ - [0:0]
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
COMMIT
"""


def test_foreign_mark_uses_sees_overlaps_only():
    from tproxy.check import foreign_mark_uses

    assert foreign_mark_uses(0x3000, save_texts=[_KUBE_PROXY_SAVE]) == []  # kube-proxy's 0x4000 is not ours
    assert foreign_mark_uses(0x4000, save_texts=[_KUBE_PROXY_SAVE]) == [
        "`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000` (bits 0x4000)",
        "`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN` (bits 0x4000)",
    ]
    nft = (
        "table inet tproxy_rules {\n\tchain output {\n\t\tmeta mark & 0x00003000 == 0x00001000 accept\n\t}\n}\n"
        "table inet cni {\n\tchain pre {\n"
        "\t\tmeta mark set meta mark & 0xffffefff | 0x00000f00\n"  # keeps all but 0x1000: writes bit 12
        '\t\tmeta mark & 0x00003000 == 0x00001000 accept comment "tproxy/x"\n'
        "\t\tip daddr 10.0.0.1 accept\n\t}\n}\n"
    )
    (use,) = foreign_mark_uses(0x3000, nft_text=nft)
    assert use.startswith("`meta mark set meta mark & 0xffffefff | 0x00000f00`") and use.endswith("(bits 0x1000)")
    rules = [
        {"fwmark": "0x1000", "fwmask": "0x3000", "table": "100"},  # ours
        {"fwmark": "0x2000", "table": "7"},
        {"fwmark": "0x4000", "fwmask": "0x4000", "table": "8"},
    ]
    assert foreign_mark_uses(0x3000, ip_rules=rules, table=100) == ["ip rule `fwmark 0x2000 lookup 7` (bits 0x2000)"]


_DROP_INPUT = """table inet filter {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		iif "lo" accept
	}
}
"""


def test_established_only_inputs():
    from tproxy.check import established_only_inputs

    assert established_only_inputs(_DROP_INPUT) == ["table inet filter chain input"]
    assert established_only_inputs(_DROP_INPUT.replace("policy drop", "policy accept")) == []
    with_untracked = _DROP_INPUT.replace("iif", "tcp dport 8080 ct state untracked accept\n\t\tiif")
    assert established_only_inputs(with_untracked) == []
    save = "*filter\n:INPUT DROP [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n"
    assert established_only_inputs("", [save, ""]) == ["iptables filter INPUT"]
    assert established_only_inputs("", [save.replace("DROP", "ACCEPT"), ""]) == []


@pytest.mark.root
@pytest.mark.parametrize("tool", ["nft", "iptables"])
def test_an_input_policy_for_tracked_packets_only_is_reported_with_what_to_add(cfg_file, tool):
    """tproxy mode keeps the intercepted client packets out of conntrack: a host firewall that drops by default and
    accepts ``ct state established,related`` (plus listed ports with a state) drops them. The check says so, with
    the rule to add, and the rule it names makes the warning go away."""
    path = cfg_file('[intercept]\nports = [8080, "9000-9100"]\n')
    with netns("chkt") as ns:
        if tool == "nft":
            ns.run(["nft", "-f", "-"], input=_DROP_INPUT)
        else:
            ns.run(["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"])
            ns.run(["iptables", "-P", "INPUT", "DROP"])
        r = run_check(ns, path)
        (warn,) = [ln for ln in lines_of(r.stdout) if ln.startswith("WARN ")]
        assert warn.startswith("WARN input policy accepts the intercepted (untracked) packets: "), warn
        fix = warn.split(" \u2014 fix: ")[1]
        if tool == "nft":
            assert fix == "nft insert rule inet filter input tcp dport { 8080, 9000-9100 } ct state untracked accept"
        else:
            assert fix == (
                "iptables -I INPUT -p tcp -m multiport --dports 8080,9000:9100 "
                "-m conntrack --ctstate UNTRACKED -j ACCEPT"
            )
        ns.run(fix.split())
        r = run_check(ns, path)
        assert "WARN " not in r.stdout and "PASS input policy accepts the intercepted (untracked) packets" in r.stdout


@pytest.mark.root
def test_rules_using_our_mark_bits_are_reported(cfg_file):
    path = cfg_file()
    with netns("chkt") as ns:
        ns.run(
            ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "MARK", "--set-xmark", "0x1000/0x1000"]
        )
        r = run_check(ns, path)
        (warn,) = [ln for ln in lines_of(r.stdout) if ln.startswith("WARN ")]
        assert warn.startswith("WARN packet mark bits 0x3000 not used by other rules: rules already on this host use ")
        assert "(bits 0x1000)" in warn and "routing.mask" in warn
        assert r.returncode == 0  # a warning: the rule may never meet tproxy's traffic
        ns.run(["iptables", "-t", "mangle", "-F", "PREROUTING"])
        assert "PASS packet mark bits 0x3000 not used by other rules: reply mark 0x1000" in run_check(ns, path).stdout
