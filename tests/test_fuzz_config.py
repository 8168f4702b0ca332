"""Bad input, fuzzed (issue 18): generated TOML documents, valid and broken, through the config loader.

The loader either returns a :class:`~tproxy.config.Config` or raises our one-line :class:`~tproxy.errors.ConfigError`
naming the file; never another exception (a traceback is a bug). Every accepted config renders, with both backends,
to rules the real tools accept (``nft -c``, ``iptables-restore --test``, in a network namespace of the test's own).

Documents are built from the schema: each key gets a valid value or junk (wrong types, out-of-range numbers, odd
Unicode, huge lists, nested tables), unknown keys appear, whole sections are replaced. Fixed example budgets keep
the file well under a minute; a failure prints the example and the seed to reproduce it.

The ``TPROXY_`` variables are fuzzed in tests/test_fuzz_env.py, with these generators.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.backends import get_backend
from tproxy.backends.iptables import split
from tproxy.config import (
    _SCHEMA,
    BACKENDS,
    LOG_FORMATS,
    LOG_LEVELS,
    MODES,
    PROXY_PROTOCOL_IN,
    PROXY_PROTOCOL_OUT,
    RELAYS,
    UPSTREAMS,
    Config,
)
from tproxy.errors import ConfigError
from tproxy.netns import Netns, netns

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)

# -- values


def _odd_text() -> st.SearchStrategy[str]:
    """Unicode of every kind TOML can carry: letters of other scripts, combining marks, RTL, emoji, controls."""
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ["", " ", "é", "ℵ", "\u202e8080", "٨٠٨٠", "８０８０", "8_080", "0x1f90", "1e3", "\t8080\n", "😀"]
        ),
    )


def _junk(depth: int = 2) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([0, -1, 65536, 2**32, 2**31, 2**63 - 1, 10**400, -(10**400)]),  # (10**400: no float holds it)
        st.floats(allow_nan=True, allow_infinity=True),
        _odd_text(),
        st.builds(lambda n: list(range(n)), st.integers(0, 5000)),  # huge lists
        st.builds(lambda n: ["x" * 100] * n, st.integers(0, 1000)),
    )
    if depth == 0:
        return scalars
    return st.one_of(
        scalars,
        st.lists(_junk(depth - 1), max_size=5),
        st.dictionaries(_odd_text(), _junk(depth - 1), max_size=3),
    )


_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_port = st.integers(1, 65535)
_port_value = st.one_of(
    _port,
    st.tuples(_port, _port).map(lambda t: f"{min(t)}-{max(t)}"),
    st.sampled_from([80, 443, 8080, "9000-9100", "1-65535", " 8080 "]),
)


def _cidr(ip: str, data: int) -> str:
    bits = 128 if ":" in ip else 32
    return f"{ip}/{data % (bits + 1)}"


_ifname = st.one_of(
    st.from_regex(r"[a-z][a-z0-9._-]{0,14}", fullmatch=True),
    st.text(min_size=1, max_size=15),  # the loader's own limits decide; odd Unicode included
).filter(lambda s: s != "lo")
_mark = st.one_of(st.integers(1, 2**32 - 1), st.integers(0, 31).map(lambda b: 1 << b))
_seconds = st.one_of(st.floats(0.001, 1e7), st.integers(1, 10**6))
_cidrs = st.builds(_cidr, _ip, st.integers(0, 200))

VALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "": {"mode": st.sampled_from(MODES), "backend": st.sampled_from(BACKENDS)},
    "listener": {
        "address": st.one_of(st.sampled_from(["0.0.0.0", "::"]), st.sampled_from(["127.0.0.1", "::1"]), _ip),
        "port": _port,
        "proxy_protocol": st.sampled_from(PROXY_PROTOCOL_IN),
        "proxy_protocol_from": st.lists(_cidrs, max_size=5),
        "proxy_protocol_timeout": _seconds,
    },
    "intercept": {
        "ports": st.lists(_port_value, min_size=1, max_size=30),
        "udp_ports": st.lists(_port_value, max_size=10),
        "interfaces": st.lists(_ifname, max_size=4),
        "exclude_ports": st.lists(_port_value, max_size=10),
        "exclude_cidrs": st.lists(_cidrs, max_size=10),
        "ipv4": st.booleans(),
        "ipv6": st.booleans(),
    },
    "routing": {
        "mark": _mark,
        "upstream_mark": _mark,
        "mask": _mark,
        "table": st.integers(1, 2**31 - 1),
        "check_interval": _seconds,
        "reinstall": st.booleans(),
    },
    "proxy": {
        "preserve_source": st.booleans(),
        "upstream": st.sampled_from(UPSTREAMS),
        "connect_timeout": _seconds,
        "idle_timeout": _seconds,
        "max_connections": st.integers(1, 10_000_000),
        "shutdown_grace": _seconds,
        "upstream_ports": st.tuples(_port, _port).map(lambda t: f"{min(t)}-{max(t)}"),
        "send_proxy_protocol": st.sampled_from(PROXY_PROTOCOL_OUT),
        "relay": st.sampled_from(RELAYS),
        "udp_idle_timeout": _seconds,
        "udp_max_sessions": st.integers(1, 10_000_000),
    },
    "admin": {
        "address": st.one_of(
            st.just(""), st.builds(lambda ip, p: f"[{ip}]:{p}" if ":" in ip else f"{ip}:{p}", _ip, _port)
        )
    },
    "log": {"level": st.sampled_from(LOG_LEVELS), "format": st.sampled_from(LOG_FORMATS)},
    "privileges": {"user": st.sampled_from(["root", "nobody", ""]), "group": st.sampled_from(["root", "nogroup", ""])},
}


def _section(keys: dict[str, st.SearchStrategy[Any]], broken: bool) -> st.SearchStrategy[dict[str, Any]]:
    if not broken:
        return st.fixed_dictionaries({}, optional=keys)
    values = {k: st.one_of(v, v, _junk()) for k, v in keys.items()}  # mostly valid: the junk meets a sane context
    base = st.fixed_dictionaries({}, optional=values)
    unknown = st.dictionaries(
        st.one_of(_odd_text(), st.sampled_from([k + "s" for k in keys] or ["x"])), _junk(1), max_size=2
    )
    return st.builds(lambda b, u, add: {**b, **u} if add else b, base, unknown, st.booleans())


def documents(broken: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A TOML document from the schema; ``broken``: junk values, unknown keys and sections, junk sections."""
    sections = {name: _section(keys, broken) for name, keys in VALID.items() if name}
    if broken:
        sections = {name: st.one_of(s, s, s, _junk(1)) for name, s in sections.items()}
    top = _section(VALID[""], broken)
    # intercept.ports is required: present in most valid documents, so most of them load
    sections["intercept"] = st.builds(
        lambda s, p: {**s, "ports": p} if isinstance(s, dict) and "ports" not in s else s,
        sections["intercept"],
        VALID["intercept"]["ports"],
    )
    extra = st.dictionaries(st.sampled_from(["proxi", "listeners", "udp", "[x]", "é"]), _junk(1), max_size=1)
    return st.builds(
        lambda t, s, e: {**t, **s, **(e if broken else {})},
        top,
        # ([intercept] is required: always there in a valid-shaped document, most of the time in a broken one)
        st.fixed_dictionaries(
            {} if broken else {"intercept": sections.pop("intercept")},
            optional=sections,
        ),
        extra,
    )


# -- TOML text


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON's escapes are TOML's; DEL is not


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    lines = [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_toml_str(k)}]"] + [f"{_toml_str(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


# -- the properties


def load_dict(doc: dict[str, Any]) -> Config | None:
    """Config, or None after a one-line ConfigError naming the source; any other exception fails the test."""
    try:
        return Config.from_dict(doc, source="fuzz.toml")
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("fuzz.toml") and "\n" not in msg and len(msg) < 2000, msg
        return None


def test_the_generators_cover_every_key_of_the_loader():
    """VALID is the fuzzer's schema: a key the loader gained since would never be fuzzed."""
    assert set(VALID) == set(_SCHEMA)
    for name, keys in _SCHEMA.items():
        own = {k for k in keys if not (name == "" and k in _SCHEMA)}
        assert set(VALID[name]) == own, f"give VALID[{name!r}] a generator for every key of _SCHEMA[{name!r}]"


def test_a_huge_value_gives_a_short_message():
    """Found by the fuzzer: the loader quotes a wrong value, and a 5,000-item list made a 30,000-character line."""
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"mode": list(range(5000))}, source="fuzz.toml")
    assert str(e.value).startswith("fuzz.toml: mode: expected a string, got a list [0, 1, 2")
    assert len(str(e.value)) < 300 and str(e.value).endswith("characters)")


def test_a_key_with_a_newline_gives_one_line():
    """Found by the fuzzer: a quoted TOML key may hold a newline, and the message named it raw."""
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"mode\nx": 1}, source="fuzz.toml")
    assert str(e.value) == "fuzz.toml: mode\\nx: unknown key in the top level (did you mean 'mode'?)"


def test_a_huge_integer_where_seconds_go_is_one_line():
    """Found by the fuzzer: TOML integers have no size limit, and 10**400 seconds raised OverflowError (no float
    holds it)."""
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"intercept": {"ports": [80]}, "proxy": {"idle_timeout": 10**400}}, source="fuzz.toml")
    assert str(e.value) == "fuzz.toml: proxy.idle_timeout: too large a number (more than 1.8e308)"


def test_an_integer_of_5000_digits_in_a_file_is_one_line(tmp_path):
    """Found by the fuzzer (files with huge numbers): tomllib raises a plain ValueError, not TOMLDecodeError, for an
    integer of more than 4,300 digits (Python's limit for converting text to int)."""
    path = tmp_path / "t.toml"
    path.write_text("[intercept]\nports = [80]\n[listener]\nport = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError) as e:
        Config.from_toml(path)
    assert str(e.value) == (
        f"{path}: invalid TOML: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"
    )


@pytest.mark.parametrize("text", ["８０８０", "٨٠٨٠", "80-٩٠", "+8080", "8_080", "80-"])
def test_a_port_string_is_ascii_digits(text):
    """Found while fuzzing the environment (whose numbers must be spelled as TOML spells them): Python's int() also
    reads other scripts' digits, a sign and underscores, so the string "８０８０" was port 8080."""
    with pytest.raises(ConfigError, match='is not a port or a "lo-hi" range'):
        Config.from_dict({"intercept": {"ports": [text]}}, source="fuzz.toml")
    with pytest.raises(ConfigError, match=r"^fuzz.toml: admin.address: '.*' is not a port \(1-65535\)$"):
        Config.from_dict({"intercept": {"ports": [80]}, "admin": {"address": f"127.0.0.1:{text}"}}, source="fuzz.toml")


@pytest.mark.parametrize("name", ["\r", "eth0\x0b", "a:b", "\u00e9" * 8, "eth\u20280"])
def test_interface_names_the_kernel_or_the_tools_refuse_are_refused(name):
    """Found by the fuzzer: "\\r" passed the loader and broke iptables-restore ("-i" without an argument); the
    kernel's rule is 1-15 bytes (not characters), no '/', ':' or whitespace."""
    with pytest.raises(ConfigError, match="not a valid interface name"):
        Config.from_dict({"intercept": {"ports": [80], "interfaces": [name]}}, source="fuzz.toml")


@settings(FUZZ, max_examples=1000)
@given(documents(broken=True))
def test_broken_documents_load_or_raise_our_one_line_error(doc):
    load_dict(doc)


_KEY_PATHS = sorted((section, key) for section, keys in VALID.items() for key in keys)


_EDGES = st.sampled_from([10**400, -(10**400), 2**64, -(2**63), -0.0, 1e308, 5e-324, math.nan, math.inf, "", [], {}])


@settings(FUZZ, max_examples=500)
@given(
    st.one_of(st.builds(lambda: {"intercept": {"ports": [8080]}}), documents(broken=False)),
    st.sampled_from(_KEY_PATHS),
    st.one_of(_junk(), _EDGES),
)
def test_one_junk_value_in_a_sane_document_loads_or_raises_our_one_line_error(doc, where, junk):
    """In a broken document the walk stops at the first bad key; here every key's junk meets the loader's check (in
    the smallest valid document, or in a valid-shaped one)."""
    section, key = where
    (doc.setdefault(section, {}) if section else doc)[key] = junk
    load_dict(doc)


@FUZZ
@given(documents(broken=False))
def test_valid_shaped_documents_load_or_raise_our_one_line_error_and_render(doc):
    config = load_dict(doc)
    if config is not None:
        for backend in BACKENDS:
            assert get_backend(backend).render(config)


@settings(FUZZ, max_examples=300)
@given(st.one_of(documents(broken=True), documents(broken=False)))
def test_toml_files_load_the_same_as_their_documents(doc):
    with tempfile.TemporaryDirectory(prefix="tpx-fuzz-") as d:
        path = Path(d) / "fuzz.toml"
        path.write_text(to_toml(doc), encoding="utf-8")
        try:
            config = Config.from_toml(path)
        except ConfigError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
            config = None
    direct = load_dict(doc)
    assert (config is None) == (direct is None), (to_toml(doc), config, direct)


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.integers(4000, 5000).map(lambda n: f"[listener]\nport = {'9' * n}\n".encode()),  # huge numbers
    )
)
def test_any_bytes_as_a_file_load_or_raise_our_one_line_error(raw):
    with tempfile.TemporaryDirectory(prefix="tpx-fuzz-") as d:
        path = Path(d) / "fuzz.toml"
        path.write_bytes(raw)
        try:
            Config.from_toml(path)
        except ConfigError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)


def assert_tools_accept(ns: Netns, config: Config, what: Any) -> None:
    """Render ``config`` with both backends and have the real tools check the text inside ``ns`` (``nft -c``,
    ``iptables-restore --test``: nothing is installed); ``what`` (the document, the variables) goes in the message."""
    for backend in BACKENDS:
        text = get_backend(backend).render(config.with_overrides(backend=backend))
        if backend == "nftables":
            argvs = [(["nft", "-c", "-f", "-"], text)]
        else:
            argvs = [
                ([f"{'ip' if fam == 4 else 'ip6'}tables-restore", "--test", "--noflush"], body)
                for fam, body in split(text).items()
            ]
        for argv, body in argvs:
            r = ns.run(argv, input=body, check=False)
            assert r.returncode == 0, f"{' '.join(argv)} rejected:\n{r.stderr}\n--- config ---\n{what}"


@pytest.mark.root
def test_rules_of_accepted_configs_pass_the_real_tools():
    """A bounded sample: 150 generated valid-shaped documents; every one the loader accepts is rendered with both
    backends and checked by the tools in a fresh namespace (nothing is installed: ``-c`` and ``--test``)."""
    accepted = []
    with netns("fuzz") as ns:

        @settings(FUZZ, max_examples=150)
        @given(documents(broken=False))
        def check(doc):
            config = load_dict(doc)
            if config is None:
                return
            accepted.append(config)
            assert_tools_accept(ns, config, doc)

        check()
        assert ns.run(["nft", "list", "ruleset"]).stdout == ""
    assert len(accepted) >= 40, f"only {len(accepted)} of 150 documents were accepted: the sample checks too little"
