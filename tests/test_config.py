"""Config loading: every bad input is one ConfigError naming the file, the key path and the reason."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import attrs
import pytest

from tproxy.config import SOURCES, Config, PortRange
from tproxy.errors import ConfigError

MINIMAL = "intercept.ports = [8080]\n"


def load(tmp_path: Path, text: str, **kw) -> Config:
    p = tmp_path / "x.toml"
    p.write_text(text)
    return Config.from_toml(p, **kw)


def error(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, text, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path / "x.toml") + ": ") or msg.startswith("--")
    return msg


def test_defaults(tmp_path):
    c = load(tmp_path, MINIMAL)
    assert c.mode == "tproxy" and c.backend == "nftables"
    assert c.listener.port == 4143 and c.listener.address == ipaddress.ip_address("0.0.0.0")
    assert c.intercept.ports == (PortRange(lo=8080, hi=8080),)
    assert c.intercept.families == (4, 6)
    assert c.routing.mark == 0x1000 and c.routing.upstream_mark == 0x2000 and c.routing.mask == 0x3000
    assert c.routing.table == 100
    assert c.preserve_source is True and c.needs_routing
    assert c.proxy.upstream == "original" and c.proxy.connect_timeout == 5.0
    assert c.proxy.max_connections == 10000 and c.proxy.shutdown_grace == 30.0
    assert c.admin.host == "127.0.0.1" and c.admin.port == 4191
    assert c.log.level == "info" and c.log.format == "text"
    assert c.privileges.user is None


def test_examples_load():
    root = Path(__file__).resolve().parent.parent
    for name in ("tproxy.toml", "nat.toml"):
        c = Config.from_toml(root / "conf" / name)
        assert c.mode == name.split(".")[0]


def test_preserve_source_default_follows_mode(tmp_path):
    assert load(tmp_path, 'mode = "nat"\n' + MINIMAL).preserve_source is False
    nat = load(tmp_path, MINIMAL, mode="nat")
    assert nat.mode == "nat" and nat.preserve_source is False and not nat.needs_routing
    explicit = load(tmp_path, MINIMAL + "[proxy]\npreserve_source = true\n", mode="nat")
    assert explicit.preserve_source is True and explicit.needs_routing
    assert load(tmp_path, MINIMAL, backend="iptables").backend == "iptables"


def test_full_file(tmp_path):
    c = load(
        tmp_path,
        """
mode = "nat"
backend = "iptables"
[listener]
address = "::"
port = 5000
[intercept]
ports = [80, "9000-9100", "443"]
interfaces = ["eth0", "veth1"]
exclude_ports = ["9050-9060"]
exclude_cidrs = ["198.18.0.0/24", "fd00:1::/64"]
ipv4 = true
ipv6 = true
[routing]
mark = 0x10
table = 200
[proxy]
preserve_source = true
upstream = "loopback"
connect_timeout = 1
idle_timeout = 60.5
max_connections = 5
shutdown_grace = 2
[admin]
address = "[::1]:9999"
[log]
level = "debug"
format = "json"
[privileges]
user = "nobody"
group = "nogroup"
""",
    )
    assert c.intercept.ports == (
        PortRange(lo=80, hi=80),
        PortRange(lo=9000, hi=9100),
        PortRange(lo=443, hi=443),
    )
    assert c.intercept.intercepts(9000) and not c.intercept.intercepts(9055) and not c.intercept.intercepts(81)
    assert c.intercept.excluded_cidrs(4) == (ipaddress.ip_network("198.18.0.0/24"),)
    assert c.intercept.excluded_cidrs(6) == (ipaddress.ip_network("fd00:1::/64"),)
    assert c.routing.mark == 16 and c.proxy.connect_timeout == 1.0
    assert c.admin.host == "::1" and c.admin.port == 9999
    assert c.listener.address_for(4) == "0.0.0.0" and c.listener.address_for(6) == "::"
    assert c.privileges.user == "nobody" and c.privileges.group == "nogroup"


def test_upstream_ports(tmp_path):
    assert load(tmp_path, MINIMAL).proxy.upstream_ports == PortRange(lo=1024, hi=32767)
    c = load(tmp_path, MINIMAL + '[proxy]\nupstream_ports = "61000-65535"\n')
    assert c.proxy.upstream_ports == PortRange(lo=61000, hi=65535)


def test_admin_disabled(tmp_path):
    assert not load(tmp_path, MINIMAL + '[admin]\naddress = ""\n').admin.enabled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # malformed TOML, with line and column
        ('intercept.ports = [8080\nmode = "x"\n', "invalid TOML: "),
        ("mode = \n", "line 1, column"),
        # missing and empty required key
        ('mode = "nat"\n', "intercept.ports: required key is missing"),
        ("intercept.ports = []\n", "intercept.ports: must name at least one port"),
        # unknown keys, with suggestions where close
        (MINIMAL + 'mdoe = "nat"\n', "mdoe: unknown key in the top level (did you mean 'mode'?)"),
        (
            MINIMAL + "[proxy]\nconect_timeout = 1\n",
            "proxy.conect_timeout: unknown key in [proxy] (did you mean 'proxy.connect_timeout'?)",
        ),
        (MINIMAL + "[proxy]\nzzz = 1\n", "proxy.zzz: unknown key in [proxy]"),
        (MINIMAL + "[bogus]\nx = 1\n", "bogus: unknown key in the top level"),
        # wrong types
        ("intercept.ports = 8080\n", "intercept.ports: expected a list, got an integer 8080"),
        ("intercept.ports = [true]\n", "intercept.ports[0]: expected a port number"),
        (MINIMAL + '[listener]\nport = "4143"\n', "listener.port: expected an integer, got a string '4143'"),
        (MINIMAL + "[intercept]\n", "invalid TOML"),  # redefining a table is a TOML error
        (MINIMAL + "listener = 5\n", "listener: expected a table"),
        (MINIMAL + '[proxy]\npreserve_source = "yes"\n', "proxy.preserve_source: expected a boolean"),
        (
            MINIMAL + "[proxy]\nmax_connections = true\n",
            "proxy.max_connections: expected an integer, got a boolean",
        ),
        (MINIMAL + '[proxy]\nconnect_timeout = "5"\n', "proxy.connect_timeout: expected a number"),
        (MINIMAL + "[proxy]\nidle_timeout = -1\n", "proxy.idle_timeout: -1.0 must be a positive number"),
        (MINIMAL + "[proxy]\nshutdown_grace = nan\n", "proxy.shutdown_grace: nan must be a positive number"),
        # out-of-range ports and marks
        ("intercept.ports = [8080, 9000, 70000]\n", "intercept.ports[2]: 70000 is not a port (1-65535)"),
        ("intercept.ports = [0]\n", "intercept.ports[0]: 0 is not a port (1-65535)"),
        ('intercept.ports = ["1-70000"]\n', "intercept.ports[0]: 70000 is not a port (1-65535)"),
        (MINIMAL + "[listener]\nport = 0\n", "listener.port: 0 is not a port (1-65535)"),
        (MINIMAL + "[routing]\nmark = 0\n", "routing.mark: 0 is not a valid fwmark (1-4294967295)"),
        (MINIMAL + "[routing]\nmark = 4294967296\n", "routing.mark: 4294967296 is not a valid fwmark"),
        (MINIMAL + "[routing]\ntable = 254\n", "routing.table: 254 is a kernel table"),
        (MINIMAL + "[routing]\nupstream_mark = 0\n", "routing.upstream_mark: 0 is not a valid fwmark"),
        (MINIMAL + "[routing]\nmask = 0\n", "routing.mask: 0 is not a valid fwmark mask"),
        (MINIMAL + "[routing]\nmark = 3\nmask = 1\n", "routing.mark: 0x3 has bits outside routing.mask 0x1"),
        (
            MINIMAL + "[routing]\nupstream_mark = 8\nmask = 0x3000\n",
            "routing.upstream_mark: 0x8 has bits outside routing.mask 0x3000",
        ),
        (MINIMAL + "[routing]\nmark = 8192\n", "(it is the default; set routing.upstream_mark to a bit of your own)"),
        (MINIMAL + "[routing]\nmark = 4\nupstream_mark = 4\n", "routing.upstream_mark: 0x4 is also routing.mark"),
        (MINIMAL + "[routing]\ntable = 0\n", "routing.table: 0 is not a routing table id"),
        # empty or inverted ranges, junk
        ('intercept.ports = [""]\n', "intercept.ports[0]: empty port range"),
        ('intercept.ports = ["9100-9000"]\n', "intercept.ports[0]: inverted range '9100-9000'"),
        ('intercept.ports = ["http"]\n', "intercept.ports[0]: 'http' is not a port"),
        (MINIMAL + "[intercept]\n", "invalid TOML"),
        ('[intercept]\nports = [1]\nexclude_ports = ["5-3"]\n', "intercept.exclude_ports[0]: inverted range"),
        # bad CIDRs
        (
            '[intercept]\nports = [1]\nexclude_cidrs = ["10.0.0.0/33"]\n',
            "intercept.exclude_cidrs[0]: '10.0.0.0/33' is not an IPv4 or IPv6 network",
        ),
        ('[intercept]\nports = [1]\nexclude_cidrs = ["nope"]\n', "intercept.exclude_cidrs[0]: 'nope' is not"),
        (
            "[intercept]\nports = [1]\nexclude_cidrs = [12]\n",
            "intercept.exclude_cidrs[0]: expected a CIDR string",
        ),
        # interfaces
        (
            '[intercept]\nports = [1]\ninterfaces = ["lo"]\n',
            "intercept.interfaces[0]: lo can never be intercepted",
        ),
        ('[intercept]\nports = [1]\ninterfaces = ["a/b"]\n', "intercept.interfaces[0]: 'a/b' is not a valid"),
        ('[intercept]\nports = [1]\ninterfaces = ["eth+"]\n', "intercept.interfaces[0]: 'eth+': wildcards are not"),
        (
            "[intercept]\nports = [1]\nipv4 = false\nipv6 = false\n",
            "intercept.ipv6: ipv4 and ipv6 are both false",
        ),
        # unknown mode, backend, upstream, log settings
        ('mode = "magic"\n' + MINIMAL, "mode: unknown value 'magic' (expected one of: tproxy, nat)"),
        (
            'backend = "ipfw"\n' + MINIMAL,
            "backend: unknown value 'ipfw' (expected one of: nftables, iptables)",
        ),
        (MINIMAL + '[proxy]\nupstream = "x"\n', "proxy.upstream: unknown value 'x'"),
        (MINIMAL + '[log]\nformat = "xml"\n', "log.format: unknown value 'xml'"),
        (MINIMAL + '[log]\nlevel = "loud"\n', "log.level: unknown value 'loud'"),
        # listener inside intercepted ports
        ('intercept.ports = ["4000-5000"]\n', "listener.port: 4143 is inside intercept.ports"),
        # listener address
        (
            MINIMAL + '[listener]\naddress = "localhost"\n',
            "listener.address: 'localhost' is not an IP address",
        ),
        (
            MINIMAL + '[listener]\naddress = "198.18.0.1"\n',
            "intercept.ipv6: listener.address 198.18.0.1 is IPv4",
        ),
        # admin address
        (MINIMAL + '[admin]\naddress = "4191"\n', "admin.address: '4191' is not HOST:PORT"),
        (MINIMAL + '[admin]\naddress = "127.0.0.1:99999"\n', "admin.address: 99999 is not a port"),
        (MINIMAL + '[admin]\naddress = "example:80"\n', "admin.address: 'example' is not an IP address"),
        (MINIMAL + '[privileges]\ngroup = "x"\n', "privileges.group: set privileges.user too"),
        # upstream source ports
        (MINIMAL + "[proxy]\nupstream_ports = 1024\n", 'proxy.upstream_ports: expected a "lo-hi" string'),
        (MINIMAL + '[proxy]\nupstream_ports = "2000-1000"\n', "proxy.upstream_ports: inverted range"),
        (MINIMAL + '[proxy]\nupstream_ports = "2000-2100"\n', "proxy.upstream_ports: '2000-2100' is too narrow"),
        # PROXY protocol
        (
            MINIMAL + '[listener]\nproxy_protocol = "v3"\n',
            "listener.proxy_protocol: unknown value 'v3' (expected one of: off, v1, v2, any)",
        ),
        (MINIMAL + "[listener]\nproxy_protocol = true\n", "listener.proxy_protocol: expected a string"),
        (
            MINIMAL + '[listener]\nproxy_protocol = "v2"\n',
            'listener.proxy_protocol_from: required with proxy_protocol = "v2"',
        ),
        (
            MINIMAL + '[listener]\nproxy_protocol = "any"\nproxy_protocol_from = []\n',
            'listener.proxy_protocol_from: required with proxy_protocol = "any"',
        ),
        (
            MINIMAL + '[listener]\nproxy_protocol = "v1"\nproxy_protocol_from = ["lb"]\n',
            "listener.proxy_protocol_from[0]: 'lb' is not an IPv4 or IPv6 network",
        ),
        (
            MINIMAL + "[listener]\nproxy_protocol_timeout = 0\n",
            "listener.proxy_protocol_timeout: 0.0 must be a positive number of seconds",
        ),
        (
            MINIMAL + '[proxy]\nsend_proxy_protocol = "any"\n',
            "proxy.send_proxy_protocol: unknown value 'any' (expected one of: off, v1, v2)",
        ),
        (
            MINIMAL + '[listener]\nproxy_protocl = "v1"\n',
            "listener.proxy_protocl: unknown key in [listener] (did you mean 'listener.proxy_protocol'?)",
        ),
    ],
)
def test_bad_input(tmp_path, text, expected):
    assert expected in error(tmp_path, text)


def test_proxy_protocol_defaults_come_from_the_classes(tmp_path):
    c = load(tmp_path, MINIMAL)
    assert c.listener.proxy_protocol == "off" and c.listener.proxy_protocol_from == ()
    assert c.listener.proxy_protocol_timeout == 3.0 and c.proxy.send_proxy_protocol == "off"
    assert not c.listener.trusts("198.18.0.1")


def test_proxy_protocol_keys(tmp_path):
    c = load(
        tmp_path,
        MINIMAL
        + '[listener]\nproxy_protocol = "any"\nproxy_protocol_from = ["198.18.1.0/24", "fd00:1::/64"]\n'
        + 'proxy_protocol_timeout = 1\n[proxy]\nsend_proxy_protocol = "v2"\n',
    )
    assert c.listener.proxy_protocol == "any" and c.listener.proxy_protocol_timeout == 1.0
    assert c.listener.proxy_protocol_from == (
        ipaddress.ip_network("198.18.1.0/24"),
        ipaddress.ip_network("fd00:1::/64"),
    )
    assert c.proxy.send_proxy_protocol == "v2"
    assert c.listener.trusts("198.18.1.7") and c.listener.trusts(ipaddress.ip_address("fd00:1::9"))
    assert c.listener.trusts("::ffff:198.18.1.7")  # a dual-stack socket's view of an IPv4 peer
    assert not c.listener.trusts("198.18.2.7") and not c.listener.trusts("fd00:2::1")
    off = attrs.evolve(c.listener, proxy_protocol="off")
    assert not off.trusts("198.18.1.7")  # "off" reads no header from anyone


def test_excluded_listener_port_is_allowed(tmp_path):
    c = load(tmp_path, '[intercept]\nports = ["4000-5000"]\nexclude_ports = [4143]\n')
    assert not c.intercept.intercepts(4143)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        Config.from_toml(tmp_path / "nope.toml")
    assert str(ei.value) == f"{tmp_path / 'nope.toml'}: no such file"


def test_bad_overrides(tmp_path):
    assert error(tmp_path, MINIMAL, mode="bogus").startswith("--mode: unknown mode 'bogus'")
    assert error(tmp_path, MINIMAL, backend="pf").startswith("--backend: unknown backend 'pf'")


def test_with_overrides(tmp_path):
    c = load(tmp_path, MINIMAL).with_overrides(mode="nat", backend="iptables")
    assert (c.mode, c.backend, c.preserve_source) == ("nat", "iptables", False)
    with pytest.raises(ConfigError):
        c.with_overrides(mode="x")


def test_frozen(tmp_path):
    import attrs

    c = load(tmp_path, MINIMAL)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.mode = "nat"  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------
# Provenance: where each key's value came from (for /config)


def test_sources_default_file_and_flag(tmp_path):
    c = load(tmp_path, MINIMAL + 'backend = "iptables"\n[proxy]\nidle_timeout = 60\n[log]\n', mode="nat")
    assert c.source_of("intercept.ports") == "file"
    assert c.source_of("backend") == "file"
    assert c.source_of("proxy.idle_timeout") == "file"
    assert c.source_of("mode") == "flag"
    assert c.source_of("proxy.connect_timeout") == "default"
    assert c.source_of("log") == "default" and c.source_of("log.level") == "default"  # an empty table sets nothing
    assert set(c.origins.values()) <= set(SOURCES)


def test_with_overrides_marks_flags_and_keeps_the_rest(tmp_path):
    c = load(tmp_path, MINIMAL + 'mode = "nat"\n').with_overrides(backend="iptables")
    assert (c.source_of("backend"), c.source_of("mode"), c.source_of("intercept.ports")) == ("flag", "file", "file")


def test_sources_do_not_change_equality(tmp_path):
    """A reload compares configs: the same values from another source are the same config."""
    assert load(tmp_path, MINIMAL + 'mode = "tproxy"\n') == load(tmp_path, MINIMAL)


def test_settings_name_every_key_of_the_file(tmp_path):
    from tproxy.config import _SCHEMA

    keys = {f"{t}.{k}" if t else k for t, ks in _SCHEMA.items() for k in ks if not (t == "" and k in _SCHEMA)}
    c = load(tmp_path, MINIMAL + '[admin]\naddress = "[::1]:4191"\n')
    assert set(c.settings()) == keys
    assert c.settings()["admin.address"] == "[::1]:4191"
    assert c.settings()["intercept.ports"] == [8080]


def test_marks_default_to_bits_no_common_component_uses():
    """Istio 0x539, kube-proxy 0x4000/0x8000, Calico 0xffff0000, Cilium 0x0f00, wg-quick 0xca6c, AWS VPC CNI 0x80."""
    r = Config.from_dict({"intercept": {"ports": [80]}}).routing
    assert (r.mark, r.upstream_mark, r.mask) == (0x1000, 0x2000, 0x3000)
    for theirs in (0x539, 0x4000, 0x8000, 0xFFFF0000, 0x0F00, 0xCA6C, 0x80):
        assert r.mask & theirs == 0, hex(theirs)
    assert r.mark & r.upstream_mark == 0 and r.mark | r.upstream_mark == r.mask


def test_an_old_config_with_mark_1_keeps_working():
    """Before routing.mask existed, configs said ``mark = 1``: the mask follows the marks, so it still loads, and the
    reply mark 1 is matched under a mask that leaves every other bit alone."""
    r = Config.from_dict({"intercept": {"ports": [80]}, "routing": {"mark": 1}}).routing
    assert (r.mark, r.upstream_mark, r.mask) == (1, 0x2000, 0x2001)
    r = Config.from_dict({"intercept": {"ports": [80]}, "routing": {"mark": 1, "upstream_mark": 2, "mask": 3}}).routing
    assert (r.mark, r.upstream_mark, r.mask) == (1, 2, 3)


def test_routing_objects_check_their_own_marks():
    from tproxy.config import Routing

    with pytest.raises(ValueError, match="outside routing.mask"):
        Routing(mark=1, mask=2, upstream_mark=2)


# ----------------------------------------------------------------------------------------------------------------
# UDP

INTERCEPT = "[intercept]\nports = [8080]\n"


def test_udp_defaults(tmp_path):
    c = load(tmp_path, MINIMAL)
    assert c.intercept.udp_ports == ()
    assert c.proxy.udp_idle_timeout == 60.0 and c.proxy.udp_max_sessions == 10000
    assert c.settings()["intercept.udp_ports"] == [] and c.settings()["proxy.udp_max_sessions"] == 10000


def test_udp_keys_load(tmp_path):
    c = load(
        tmp_path, INTERCEPT + 'udp_ports = [53, "5000-5010"]\n[proxy]\nudp_idle_timeout = 5\nudp_max_sessions = 3\n'
    )
    assert c.intercept.udp_ports == (PortRange(lo=53, hi=53), PortRange(lo=5000, hi=5010))
    assert c.proxy.udp_idle_timeout == 5.0 and c.proxy.udp_max_sessions == 3
    assert c.intercept.intercepts_udp(5005) and not c.intercept.intercepts_udp(8080)
    assert c.settings()["intercept.udp_ports"] == [53, "5000-5010"]


def test_udp_bad_values(tmp_path):
    assert "intercept.udp_ports[0]: 0 is not a port" in error(tmp_path, INTERCEPT + "udp_ports = [0]\n")
    assert "proxy.udp_idle_timeout" in error(tmp_path, MINIMAL + "[proxy]\nudp_idle_timeout = 0\n")
    assert "proxy.udp_max_sessions" in error(tmp_path, MINIMAL + "[proxy]\nudp_max_sessions = 0\n")
    assert "intercept.udp_ports: 4143 is listener.port" in error(tmp_path, INTERCEPT + "udp_ports = [4143]\n")


def test_udp_needs_tproxy_mode(tmp_path):
    msg = error(tmp_path, 'mode = "nat"\n' + INTERCEPT + "udp_ports = [53]\n")
    assert 'intercept.udp_ports: UDP needs mode = "tproxy"' in msg
    assert "intercept.udp_ports" in error(tmp_path, INTERCEPT + "udp_ports = [53]\n", mode="nat")
    c = load(tmp_path, INTERCEPT + "udp_ports = [53]\n")
    with pytest.raises(ConfigError, match="intercept.udp_ports"):
        c.with_overrides(mode="nat")
