"""Bad input, fuzzed (issue 18), the environment: generated ``TPROXY_`` variables, alone and over a TOML file.

:meth:`Config.load` either returns a :class:`~tproxy.config.Config` or raises our one-line
:class:`~tproxy.errors.ConfigError` naming the variable (or the file); never another exception. Variables are written
in their own text syntax (comma lists, ``true``/``false``, integers in decimal or hex, padded with spaces), or are
junk (odd Unicode, empty strings, 5,000-item lists, numbers out of range), or are names that are not ours (unknown
``TPROXY_`` names: refused; Kubernetes' service links for a Service named ``tproxy``: ignored, changing nothing).

The README promises that a variable is a key of the file spelled as text, with the same checks and messages: variables
made from a document load to the same config as the document, or fail with the same reason naming the variable; over a
file, they replace the file's keys one by one (a list whole); a number is a number exactly when TOML would read its
text as one. Accepted configs' rules pass the real tools (root). Fixed example budgets, a few seconds each; a failure
prints the example.
"""

from __future__ import annotations

import copy
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_fuzz_config import FUZZ, _odd_text, assert_tools_accept, documents, to_toml
from tproxy.config import _KINDS, _SERVICE_LINK, Config, _env_value, env_name
from tproxy.errors import ConfigError
from tproxy.netns import netns

VARIABLES = {env_name(path): path for path in _KINDS}

# -- the variables' own text syntax


def _flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """Key path -> value for every key of a valid-shaped document (``{"proxy": {"relay": "x"}}`` -> ``proxy.relay``)."""
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _unflatten(paths: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for path, value in paths.items():
        section, _, key = path.rpartition(".")
        if section:
            doc.setdefault(section, {})[key] = value
        else:
            doc[key] = value
    return doc


def _text(value: Any, kind: type) -> st.SearchStrategy[str]:
    """``value`` (of the file) as a variable may spell it: every spelling means the same value."""
    if kind is bool:
        word = "true" if value else "false"
        return st.sampled_from([word, f" {word}", f"{word}\n"])
    if kind is int:
        return st.sampled_from([str(value), hex(value), f" {value} ", f"{value:_}"])
    if kind is float:
        return st.sampled_from([repr(value), f" {value!r}\t"])
    if kind is list:
        return st.sampled_from([",", ", ", " , "]).map(lambda sep: sep.join(str(v) for v in value))
    return st.just(value)


def expressible(paths: dict[str, Any]) -> bool:
    """Whether every value can be written as a variable: a list item holds no comma and no space at its ends (the
    variable's list syntax trims them), and no list is ``[""]`` (an empty variable is an empty list)."""
    for path, value in paths.items():
        if _KINDS[path] is list:
            for item in value:
                text = str(item)
                if "," in text or text != text.strip() or not text:
                    return False
    return True


@st.composite
def variables_of(draw, paths: dict[str, Any]) -> dict[str, str]:
    """The variables that set ``paths`` (key path -> value as the file holds it), each in one of its spellings."""
    return {env_name(path): draw(_text(value, _KINDS[path])) for path, value in paths.items()}


_junk_text = st.one_of(
    _odd_text(),
    st.sampled_from(
        [
            *("", " ", ",", ",,", " , ", "true,false", "TRUE", "True", "yes", "1", "on", "0", "-1", "-0", "+5"),
            *("0x", "0x1g", "0X1000", "0b101", "0o17", "010", "1_000", "_1", "1__0", "1e400", "-1e400", "1e-400"),
            *("nan", "NaN", "inf", "-inf", "infinity", "65536", "4294967296", "2147483648", "1.5", "٨٠٨٠", "８０８０"),
            *("\x00", "80\x0081", "tcp://10.96.0.11:4143", "[::1]:4191", "::", "0.0.0.0:", "[::1]", "a,b,,c", "lo"),
            *("eth0,eth0", "eth+", "80-", "-80", "90-80", "0-0", "1-65535", "198.18.0.0/33", "fd00::/129", "\u202e80"),
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.builds(lambda n: ",".join(map(str, range(n))), st.integers(0, 5000)),  # huge lists
    st.builds(lambda n, item: ",".join([item] * n), st.integers(0, 2000), st.sampled_from(["eth0", "x" * 100, ""])),
    st.lists(_odd_text(), max_size=5).map(",".join),
)

_service_links = st.one_of(
    st.sampled_from(["TPROXY_SERVICE_HOST", "TPROXY_SERVICE_PORT", "TPROXY_PORT"]),
    st.from_regex(r"TPROXY_SERVICE_PORT_[A-Z0-9_]{1,20}", fullmatch=True),
    st.builds(
        lambda n, proto, suffix: f"TPROXY_PORT_{n}_{proto}{suffix}",
        st.integers(1, 65535),
        st.sampled_from(["TCP", "UDP", "SCTP"]),
        st.sampled_from(["", "_PROTO", "_PORT", "_ADDR"]),
    ),
)
_link_values = st.one_of(
    st.sampled_from(["10.96.0.11", "4143", "tcp://10.96.0.11:4143", "udp://[fd00::1]:53", "tcp", ""]), _junk_text
)

_unknown = st.one_of(
    st.from_regex(r"TPROXY_[A-Z0-9_]{0,30}", fullmatch=True),
    st.text(max_size=20).map(lambda s: "TPROXY_" + s),
    st.sampled_from(sorted(VARIABLES)).flatmap(
        lambda n: st.sampled_from([n + "S", n[:-1], n.replace("TPROXY_", "TPROXY__"), "TPROXY_" + n[7:].lower()])
    ),
).filter(lambda n: n not in VARIABLES and not _SERVICE_LINK.fullmatch(n))


@st.composite
def broken_environments(draw) -> dict[str, str]:
    """Mostly valid variables (so the junk meets a sane context), some junk values, now and then unknown names; the
    variables of other programs never matter."""
    paths = _flatten(draw(documents(broken=False)))
    env = draw(variables_of({p: v for p, v in paths.items() if expressible({p: v})}))
    for name in draw(st.lists(st.sampled_from(sorted(VARIABLES)), max_size=4)):
        env[name] = draw(_junk_text)
    if draw(st.sampled_from(range(6))) == 3:  # (one in six; hypothesis favours the ends of a range)
        env[draw(_unknown)] = draw(_junk_text)
    env.update(draw(st.dictionaries(st.sampled_from(["PATH", "HOME", "TPROXYX", "tproxy_mode"]), _junk_text)))
    return env


# -- the properties


def load(path: Path | None, env: dict[str, str]) -> Config | ConfigError:
    """Config, or the ConfigError after checking that it is one line naming the file or a variable that is ours;
    any other exception fails the test."""
    try:
        return Config.load(path, env)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 2000, msg
        if e.source == "environment":
            assert e.key.startswith("TPROXY_") and not _SERVICE_LINK.fullmatch(e.key), msg
            # with a file, only a variable that is set is named; without, every key is named by its variable
            assert e.key in {as_named(n) for n in env} or (path is None and e.key in VARIABLES), msg
        else:
            assert path is not None and e.source == str(path), msg
        return e


def as_named(name: str) -> str:
    """``name`` as a message names it (unprintable characters escaped, a long name clipped)."""
    return ConfigError("", name, "").key


def load_document(doc: dict[str, Any], source: str) -> Config | ConfigError:
    try:
        return Config.from_dict(doc, source=source)
    except ConfigError as e:
        return e


def same_config(a: Config, b: Config) -> bool:
    return attrs.evolve(a, source="", file="") == attrs.evolve(b, source="", file="")


def unknown_names(env: dict[str, str]) -> list[str]:
    return [n for n in env if n.startswith("TPROXY_") and n not in VARIABLES and not _SERVICE_LINK.fullmatch(n)]


_number_spellings = st.one_of(
    st.from_regex(r"[+-]?(0|[1-9](_?[0-9]){0,12})(\.[0-9](_?[0-9]){0,5})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"0[xob][0-9a-fA-F_]{1,10}", fullmatch=True),
    st.from_regex(r"[+-]?0[xXoObB][0-9a-f]{1,4}|[+-]?(inf|nan|Infinity|NaN)|[+-]?[0-9]*\.[0-9]*", fullmatch=True),
    st.sampled_from(["٨٠٨٠", "８０８０", "1__0", "_1", "1_", "00", "07", "1e", "0x", "0b2", "1.5.5", "9" * 400]),
    _junk_text,
).map(lambda t: t if t.isprintable() and "#" not in t and "=" not in t else "0")


def _as_toml(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None


@settings(FUZZ, max_examples=300)
@given(_number_spellings, st.sampled_from([int, float]), st.sampled_from(["", " ", "\t\n"]))
def test_numbers_are_spelled_as_the_file_spells_them(text, kind, pad):
    """The README: integers "as TOML writes them"; a number key takes an integer too, as in the file. So a variable
    holds a number exactly when TOML reads its text as one (ASCII digits, ``_`` between digits, ``0x``/``0o``/``0b``
    without a sign, ``inf``/``nan``), and the same number."""
    toml = _as_toml(text) if text.strip() == text and text else None
    if kind is int:
        expected = toml if isinstance(toml, int) and not isinstance(toml, bool) else None
    else:
        expected = toml if isinstance(toml, (int, float)) and not isinstance(toml, bool) else None
    try:
        got = _env_value("TPROXY_X", pad + text + pad, kind)
    except ConfigError as e:
        assert expected is None, f"{text!r} is {expected!r} in TOML, refused: {e}"
        return
    assert expected is not None, f"{text!r} is no {kind.__name__} in TOML, accepted as {got!r}"
    assert got == expected or (got != got and expected != expected), (text, got, expected)


@settings(FUZZ, max_examples=300)
@given(broken_environments())
def test_broken_environments_load_or_raise_our_one_line_error_naming_the_variable(env):
    result = load(None, env)
    if unknown_names(env):
        assert isinstance(result, ConfigError), f"unknown variables were ignored: {unknown_names(env)}"


@settings(FUZZ, max_examples=200)
@given(st.one_of(documents(broken=True), documents(broken=False)), broken_environments())
def test_broken_environments_over_any_file_load_or_raise_our_one_line_error(doc, env):
    with tempfile.TemporaryDirectory(prefix="tpx-fuzz-") as d:
        path = Path(d) / "fuzz.toml"
        path.write_text(to_toml(doc), encoding="utf-8")
        load(path, env)


@settings(FUZZ, max_examples=150)
@given(broken_environments(), st.dictionaries(_service_links, _link_values, min_size=1, max_size=6))
def test_kubernetes_service_links_change_nothing(env, links):
    """A Service named "tproxy" puts these in every container of its namespace: they are never read as ours."""
    without = load(None, env)
    with_links = load(None, {**env, **links})
    if isinstance(without, Config):
        assert isinstance(with_links, Config), with_links
        assert with_links == without and set(links) <= set(with_links.ignored), (with_links.ignored, links)
    else:
        assert str(with_links) == str(without)


@settings(FUZZ, max_examples=200)
@given(documents(broken=False).filter(lambda doc: expressible(_flatten(doc))), st.data())
def test_variables_give_the_same_config_as_the_document(doc, data):
    """Same values, same config; or the same reason, naming the variable where the file's message names the key."""
    env = data.draw(variables_of(_flatten(doc)))
    from_file = load_document(doc, "fuzz.toml")
    from_env = load(None, env)
    if isinstance(from_file, Config):
        assert isinstance(from_env, Config), (env, str(from_env))
        assert same_config(from_env, from_file), (env, doc)
    else:
        assert isinstance(from_env, ConfigError), (env, str(from_file))
        assert (from_env.key, from_env.reason) == (env_name(from_file.key), from_file.reason), (env, doc)


@settings(FUZZ, max_examples=200)
@given(documents(broken=False), documents(broken=False), st.data())
def test_variables_replace_the_files_keys_one_by_one(file_doc, env_doc, data):
    """Over a file, each variable replaces its key (a list whole); keys no variable sets stay the file's; an error
    names the variable when the key it is about came from the environment, else the file and the key."""
    paths = {p: v for p, v in _flatten(env_doc).items() if expressible({p: v})}
    chosen = data.draw(st.lists(st.sampled_from(sorted(paths)), unique=True)) if paths else []
    overrides = {p: paths[p] for p in chosen}
    env = data.draw(variables_of(overrides))
    with tempfile.TemporaryDirectory(prefix="tpx-fuzz-") as d:
        path = Path(d) / "fuzz.toml"
        path.write_text(to_toml(file_doc), encoding="utf-8")
        merged = tomllib.loads(path.read_text(encoding="utf-8"))
        for section, values in _unflatten(overrides).items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(copy.deepcopy(values))
            else:
                merged[section] = values
        expected = load_document(merged, str(path))
        got = load(path, env)
    if isinstance(expected, Config):
        assert isinstance(got, Config), (env, str(got))
        assert same_config(got, expected)
        assert got.from_environment() == {p: env_name(p) for p in sorted(overrides)}
    else:
        assert isinstance(got, ConfigError), (env, str(expected))
        key_path = expected.key.split("[", 1)[0]
        if key_path in overrides:
            assert (got.source, got.key) == ("environment", env_name(key_path)), str(got)
        else:
            assert (got.source, got.key) == (str(path), expected.key), str(got)
        assert got.reason == expected.reason


@pytest.mark.root
def test_rules_of_configs_from_the_environment_pass_the_real_tools():
    """A bounded sample: 100 environments made from valid-shaped documents, every other one over a file of its own;
    every config the loader accepts is rendered with both backends and checked by the tools in a fresh namespace."""
    accepted = []
    with netns("fuzzenv") as ns, tempfile.TemporaryDirectory(prefix="tpx-fuzz-") as d:
        path = Path(d) / "fuzz.toml"

        @settings(FUZZ, max_examples=100)
        @given(documents(broken=False).filter(lambda doc: expressible(_flatten(doc))), st.data())
        def check(doc, data):
            env = data.draw(variables_of(_flatten(doc)))
            file_doc = data.draw(st.one_of(st.none(), documents(broken=False)))
            if file_doc is not None:
                path.write_text(to_toml(file_doc), encoding="utf-8")
            config = load(None if file_doc is None else path, env)
            if isinstance(config, Config):
                accepted.append(config)
                assert_tools_accept(ns, config, {"environment": env, "file": file_doc})

        check()
        assert ns.run(["nft", "list", "ruleset"]).stdout == ""
    assert len(accepted) >= 25, f"only {len(accepted)} of 100 environments were accepted: the sample checks too little"
