"""Rule backends: golden files for the whole matrix, properties every rendering must have, and (root) each golden
file checked by the real tool (``nft -c -f``, ``iptables-restore --test``) inside a fresh network namespace."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests import golden_gen
from tproxy import rules
from tproxy.backends import get_backend, nftables
from tproxy.backends.base import run
from tproxy.backends.iptables import (
    OUR_CHAINS,
    OUTPUT,
    PREROUTING,
    IptablesBackend,
    has_rules,
    parse_save,
    render_family,
    split,
)
from tproxy.errors import MissingBinaryError, RulesError
from tproxy.netns import netns

CASES = sorted(golden_gen.cases())
MATRIX = [(c, b) for c in CASES for b in golden_gen.BACKENDS]


def ids(p):
    return f"{p[1]}:{p[0]}"


# ----------------------------------------------------------------------------------------------------------------
# Golden files


@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_golden(case):
    name, backend = case
    path = golden_gen.golden_path(name, backend)
    assert path.exists(), f"missing golden file {path}: regenerate with {golden_gen.REGENERATE}"
    got = golden_gen.render(name, backend)
    assert got == path.read_text(), (
        f"{backend} rendering of case {name!r} differs from {path}; if the change is intended, regenerate with "
        f"{golden_gen.REGENERATE} and review the diff"
    )


def test_matrix_is_whole():
    for mode in ("tproxy", "nat", "nat_preserve"):
        for fam in ("v4", "v6", "both"):
            assert f"{mode}-{fam}" in CASES
        for extra in ("exclusions", "interfaces", "loopback", "listener-v4", "listener-v6"):
            assert f"{mode}-{extra}" in CASES


# ----------------------------------------------------------------------------------------------------------------
# Properties of every rendering


def _rule_lines(text: str, backend: str) -> list[str]:
    if backend == "iptables":
        return [line for line in text.splitlines() if line.startswith(("-A ", "-I "))]
    inside = text.split("table inet tproxy_rules {", 2)[-1]
    return [
        line.strip() for line in inside.splitlines() if line.startswith("\t\t") and not line.strip().startswith("type ")
    ]


@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_render_is_pure_and_every_rule_is_ours(case):
    name, backend = case
    cfg = golden_gen.config(name, backend)
    b = get_backend(backend)
    text = b.render(cfg)
    assert text == b.render(cfg)
    lines = _rule_lines(text, backend)
    assert lines
    for line in lines:
        assert '"tproxy/' in line, f"rule without a tproxy/ comment: {line}"


@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_interception_never_matches_lo_or_the_listener(case):
    name, backend = case
    cfg = golden_gen.config(name, backend)
    lines = _rule_lines(get_backend(backend).render(cfg), backend)
    actions = [ln for ln in lines if '"tproxy/intercept' in ln]  # (and intercept-udp)
    assert actions
    for line in actions:
        if cfg.intercept.interfaces:
            named = set(re.findall(r"-i (\S+)", line)) | set(re.findall(r'"(\w+)"', line.split("comment")[0]))
            assert named and named <= set(cfg.intercept.interfaces), line
        else:
            assert "! -i lo" in line or 'iifname != "lo"' in line
        assert str(cfg.listener.port) not in re.findall(r"dports? (?:\{ )?([\d,: -]+)", line)[0]
        # only packets addressed to this host: never traffic the host forwards to another machine
        assert "fib daddr type local" in line or "-m addrtype --dst-type LOCAL" in line, line
    # the listener port is explicitly returned before any interception, in every family
    for fam in cfg.families:
        idx_return = next(i for i, ln in enumerate(lines) if '"tproxy/listener-port"' in ln and _fam(ln, fam, backend))
        idx_action = next(i for i, ln in enumerate(lines) if '"tproxy/intercept"' in ln and _fam(ln, fam, backend))
        assert idx_return < idx_action


def _fam(line: str, fam: int, backend: str) -> bool:
    return backend == "iptables" or f"ipv{fam}" in line


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_divert_rule_excludes_syns_and_needs_a_transparent_socket(backend):
    cfg = golden_gen.config("tproxy-both", backend)
    divert = [ln for ln in _rule_lines(get_backend(backend).render(cfg), backend) if "socket" in ln]
    assert len(divert) == 2  # one per family (iptables: one per restore file)
    for line in divert:
        if backend == "iptables":
            assert "! --syn" in line and "-m socket --transparent" in line
        else:
            assert "tcp flags & (syn | ack) != syn socket transparent 1" in line


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_tproxy_targets_the_listener_address_when_not_a_wildcard(backend):
    v4 = get_backend(backend).render(golden_gen.config("tproxy-listener-v4", backend))
    v6 = get_backend(backend).render(golden_gen.config("tproxy-listener-v6", backend))
    if backend == "iptables":
        assert "--on-port 5000 --on-ip 198.18.0.1 " in v4 and "--on-port 5000 --on-ip fd00::1 " in v6
    else:
        assert "tproxy ip to 198.18.0.1:5000" in v4 and "tproxy ip6 to [fd00::1]:5000" in v6


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_loopback_guard_only_with_the_ipv4_loopback_upstream(backend):
    def guarded(name):
        return '"tproxy/loopback-guard"' in get_backend(backend).render(golden_gen.config(name, backend))

    assert guarded("tproxy-loopback") and guarded("nat_preserve-loopback")
    assert not guarded("tproxy-both") and not guarded("nat-loopback")  # nat without preserve_source: no spoofing
    # 127.0.0.0/8 as destination and as source, never on lo, always before anything else in prerouting
    lines = _rule_lines(get_backend(backend).render(golden_gen.config("tproxy-loopback", backend)), backend)
    guards = [ln for ln in lines if '"tproxy/loopback-guard"' in ln]
    if backend == "iptables":
        assert [g.split()[2:5] for g in guards] == [["-d", "127.0.0.0/8", "!"], ["-s", "127.0.0.0/8", "!"]], guards
        assert all("! -i lo" in g and g.endswith("-j DROP") for g in guards)
        assert [ln for ln in lines if ln.startswith("-A TPROXY_PREROUTING ")][:2] == guards  # first of the chain
    else:
        assert ["ip daddr 127.0.0.0/8" in g for g in guards] == [True, False] and "ip saddr 127.0.0.0/8" in guards[1]
        assert all(g.startswith('iifname != "lo"') and " drop " in g for g in guards)
        text = get_backend(backend).render(golden_gen.config("tproxy-loopback", backend))
        chain = text.split("chain prerouting {")[1].splitlines()
        assert [ln.strip() for ln in chain[2:4]] == guards  # first of the chain, after its hook line


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_plain_nat_has_no_mark_rules_and_no_routing(backend):
    cfg = golden_gen.config("nat-both", backend)
    text = rules.show(cfg)
    assert "mark" not in get_backend(backend).render(cfg).split("\n", 1)[1]
    assert "# routing: none needed" in text and "ip -4 rule" not in text


def test_iptables_split_and_headers():
    cfg = golden_gen.config("tproxy-both", "iptables")
    text = IptablesBackend().render(cfg)
    files = split(text)
    assert set(files) == {4, 6}
    assert files[4] == render_family(cfg, 4) and files[6] == render_family(cfg, 6)
    assert files[4].startswith("# iptables-restore --noflush\n*raw\n")
    with pytest.raises(RulesError, match="header"):
        split("*mangle\nCOMMIT\n")


def test_iptables_reapply_skips_existing_jumps():
    cfg = golden_gen.config("tproxy-v4", "iptables")
    body = render_family(cfg, 4)
    saved = (
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:TPROXY_PREROUTING - [0:0]\n"
        '-A PREROUTING -m comment --comment "tproxy/jump" -j TPROXY_PREROUTING\nCOMMIT\n'
    )
    out = IptablesBackend._without_existing_jumps(body, saved)
    assert "-j TPROXY_PREROUTING" not in out and "-I OUTPUT 1" in out and "-j TPROXY_RAW" in out
    assert out == "\n".join(ln for ln in body.splitlines() if "-j TPROXY_PREROUTING" not in ln) + "\n"


def test_parse_save_and_has_rules():
    empty = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [3:180]\nCOMMIT\n"
    assert not has_rules(empty)
    assert has_rules(empty.replace(":OUTPUT ACCEPT", ":OUTPUT DROP"))
    assert has_rules(empty.replace("COMMIT", "-A OUTPUT -j ACCEPT\nCOMMIT"))
    assert has_rules(empty.replace("COMMIT", ":MINE - [0:0]\nCOMMIT"))
    assert parse_save(empty)["nat"].chains == {"PREROUTING": "ACCEPT", "OUTPUT": "ACCEPT"}


# ----------------------------------------------------------------------------------------------------------------
# Reading what is installed: real outputs of both iptables variants and of `nft -j`, captured in namespaces by
# tests/fixtures/rules/capture.sh (our golden tproxy-both and nat-both rules beside an operator's own rules)

FIXTURES = Path(__file__).parent / "fixtures" / "rules"
SAVES = [f"{tool}-{variant}-save.txt" for tool in ("iptables", "ip6tables") for variant in ("nft", "legacy")]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize("name", SAVES)
def test_parse_save_reads_real_outputs(name):
    tables = parse_save(fixture(name))
    assert set(tables) == {"nat", "mangle", "filter", "raw"}
    for table, chains in OUR_CHAINS.items():
        assert set(chains) <= set(tables[table].chains)
        assert all(tables[table].chains[c] == "-" for c in chains)
    assert tables["filter"].chains["INPUT"] == "DROP" and tables["filter"].chains["OPERATOR_WEB"] == "-"
    jumps = [r for r in tables["mangle"].rules if r.chain in ("PREROUTING", "OUTPUT") and r.comment == "tproxy/jump"]
    assert [(r.chain, r.target) for r in jumps] == [("PREROUTING", PREROUTING), ("OUTPUT", OUTPUT)]
    (web,) = [r for r in tables["filter"].rules if r.target == "OPERATOR_WEB"]
    assert web.comment == 'operator\'s "web" rule'  # iptables-save writes "operator\'s \"web\" rule"
    (intercept,) = [r for r in tables["mangle"].rules if r.comment == "tproxy/intercept"]
    assert intercept.chain == PREROUTING and intercept.target == "TPROXY"
    assert intercept.args[intercept.args.index("--on-port") + 1] == "4143"
    assert has_rules(fixture(name))


@pytest.mark.parametrize("tool", ["iptables", "ip6tables"])
def test_both_variants_read_the_same(tool):
    """One parser, two variants: the same rules installed with iptables-nft and iptables-legacy read as equal."""

    def shape(text: str) -> dict:
        return {name: (t.chains, sorted((r.chain, r.args) for r in t.rules)) for name, t in parse_save(text).items()}

    assert shape(fixture(f"{tool}-nft-save.txt")) == shape(fixture(f"{tool}-legacy-save.txt"))


def test_parse_save_reads_restore_files_too():
    tables = parse_save(split(golden_gen.render("tproxy-both", "iptables"))[4])
    inserts = [r for r in tables["mangle"].rules if r.insert]
    assert [(r.chain, r.spec) for r in inserts] == [
        ("PREROUTING", '-m comment --comment "tproxy/jump" -j TPROXY_PREROUTING'),
        ("OUTPUT", '-m comment --comment "tproxy/jump" -j TPROXY_OUTPUT'),
    ]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("-A INPUT -j ACCEPT\n", "outside a table"),
        ('*filter\n-A INPUT -m comment --comment "open\n', "unterminated"),
        ("*filter\n-X INPUT\n", "not understood"),
        ("*filter\nCOMMIT\n-A INPUT -j ACCEPT\n", "outside a table"),
    ],
)
def test_parse_save_refuses_what_it_does_not_understand(text, reason):
    with pytest.raises(RulesError, match=reason):
        parse_save(text)


@pytest.mark.parametrize("name", SAVES)
def test_iptables_installed_reads_the_save_output(monkeypatch, name):
    backend = IptablesBackend()
    monkeypatch.setattr(backend, "_save", lambda family: fixture(name))
    assert backend.installed()
    operator_only = "".join(ln + "\n" for ln in fixture(name).splitlines() if "TPROXY" not in ln)
    monkeypatch.setattr(backend, "_save", lambda family: operator_only)
    assert not backend.installed()


def test_jumps_already_in_place_are_left_out():
    body = split(golden_gen.render("tproxy-both", "iptables"))[4]
    out = IptablesBackend._without_existing_jumps(body, fixture("iptables-nft-save.txt"))
    assert out == "\n".join(ln for ln in body.splitlines() if not ln.startswith("-I ")) + "\n"
    fresh = "*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    assert IptablesBackend._without_existing_jumps(body, fresh) == body


def test_nft_json_tables():
    ours = nftables.json_objects(fixture("nft-j-list-tables-inet.json"), "table")
    assert [(t["family"], t["name"]) for t in ours] == [("inet", "operator"), ("inet", nftables.TABLE)]
    without = nftables.json_objects(fixture("nft-j-list-tables-inet-without-ours.json"), "table")
    assert [t["name"] for t in without] == ["operator"]
    assert nftables.json_objects("", "table") == []
    with pytest.raises(RulesError, match="not its JSON"):
        nftables.json_objects("table inet tproxy_rules\n", "table")


def test_nft_json_our_table_has_every_rule_with_its_comment():
    rules = nftables.json_objects(fixture("nft-j-list-table-inet-tproxy_rules.json"), "rule")
    assert rules and all(r["table"] == nftables.TABLE and r["comment"].startswith("tproxy/") for r in rules)
    chains = {c["name"]: c for c in nftables.json_objects(fixture("nft-j-list-table-inet-tproxy_rules.json"), "chain")}
    assert set(chains) == {"prerouting", "output", "raw_prerouting"} and chains["prerouting"]["hook"] == "prerouting"


def test_iptables_nft_objects_and_empty_base_chains():
    from tproxy.backends.iptables import _empty_base_chain

    chains = nftables.json_objects(fixture("nft-j-list-chains-ip-iptables-nft.json"), "chain")
    assert ("mangle", "OUTPUT") in {(c["table"], c["name"]) for c in chains}
    assert _empty_base_chain(nftables.json_objects(fixture("nft-j-list-chain-ip-mangle-OUTPUT-empty.json"), None))
    assert not _empty_base_chain(nftables.json_objects(fixture("nft-j-list-chain-ip-mangle-OUTPUT.json"), None))


def test_missing_binary_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingBinaryError, match=r"nft not found: install the Debian package nftables"):
        get_backend("nftables").check("")
    with pytest.raises(MissingBinaryError, match=r"iptables-restore not found: .*package iptables"):
        run(["iptables-restore", "--test"])


def test_get_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown rule backend"):
        get_backend("pf")


# ----------------------------------------------------------------------------------------------------------------
# The real tools accept every golden file (root: a fresh namespace, so nothing on the host is read or changed)


@pytest.fixture(scope="module")
def ns():
    with netns("gold") as n:
        yield n


def _tool_check(ns, argv, text):
    r = ns.run(argv, input=text, check=False)
    assert r.returncode == 0, f"{' '.join(argv)} rejected:\n{r.stderr}\n--- file ---\n{text}"


@pytest.mark.root
@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_golden_file_accepted_by_the_tool(ns, case):
    name, backend = case
    text = get_backend(backend).render(golden_gen.config(name, backend))
    assert golden_gen.golden_path(name, backend).read_text().startswith(text)
    if backend == "nftables":
        _tool_check(ns, ["nft", "-c", "-f", "-"], text)
    else:
        for fam, body in split(text).items():
            _tool_check(ns, [f"{'ip' if fam == 4 else 'ip6'}tables-restore", "--test", "--noflush"], body)
    # checking installs nothing
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""


@pytest.mark.root
def test_the_tool_does_reject_a_broken_file(ns):
    """The check above can fail: a typo in a rule is refused by each tool."""
    text = get_backend("nftables").render(golden_gen.config("tproxy-both", "nftables"))
    r = ns.run(["nft", "-c", "-f", "-"], input=text.replace("socket transparent 1", "socket transparnt 1"), check=False)
    assert r.returncode != 0 and "transparnt" in r.stderr
    body = split(get_backend("iptables").render(golden_gen.config("tproxy-v4", "iptables")))[4]
    r = ns.run(["iptables-restore", "--test", "--noflush"], input=body.replace("--on-port", "--on-prt"), check=False)
    assert r.returncode != 0


def test_subprocess_is_real():
    # the tests above run the real binaries; make sure they exist here rather than silently skipping
    assert subprocess.run(["nft", "--version"], capture_output=True).returncode == 0


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_udp_rules_only_with_udp_ports_and_to_the_same_listener(backend):
    assert "udp" not in get_backend(backend).render(golden_gen.config("tproxy-both", backend))
    lines = _rule_lines(get_backend(backend).render(golden_gen.config("tproxy-udp-exclusions", backend)), backend)
    udp = [ln for ln in lines if '"tproxy/intercept-udp"' in ln]
    assert len(udp) == 2  # one per family
    for line in udp:
        assert ("udp dport { 53, 5000-5010 } tproxy" in line) or ("-p udp -m multiport --dports 53,5000:5010" in line)
        assert ":4143" in line or "--on-port 4143 " in line
        assert "0x1000" in line
        # excluded sources and ports return before it
        i = lines.index(line)
        assert any('"tproxy/exclude-ports-udp"' in ln for ln in lines[:i])
        assert any('"tproxy/exclude-cidrs"' in ln for ln in lines[:i])
    # the client leg is kept out of conntrack, as TCP's (no NAT of the host applies to it)
    notrack = [ln for ln in lines if '"tproxy/notrack-udp"' in ln]
    assert len(notrack) == 2 and all(
        "notrack" in ln.split("comment")[0].split()[-1] or "CT --notrack" in ln for ln in notrack
    )


@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_reply_routing_marks_only_replies_and_never_routes_the_upstream_mark(case):
    """DESIGN.md, "Reply routing, revised": the upstream sockets' mark is saved into the connection mark; only packets
    in the reply direction get the routed mark (output and prerouting); the fwmark rule routes the reply mark only."""
    name, backend = case
    cfg = golden_gen.config(name, backend)
    r = cfg.routing
    mark, up, mask = f"{r.mark:#x}", f"{r.upstream_mark:#x}", f"{r.mask:#x}"
    lines = _rule_lines(get_backend(backend).render(cfg), backend)
    replies = [ln for ln in lines if '"tproxy/reply-mark"' in ln]
    saves = [ln for ln in lines if '"tproxy/upstream-mark"' in ln]
    if not cfg.needs_routing:
        assert replies == saves == []
        return
    per_family = len(cfg.families)  # (iptables: one restore file per family)
    assert len(saves) == per_family and len(replies) == 2 * per_family
    for line in replies:
        if backend == "iptables":
            assert f"--ctdir REPLY -m connmark --mark {up}/{mask}" in line and f"--set-xmark {mark}/{mask}" in line
        else:
            assert f"ct direction reply ct mark & {mask} == {up} meta mark set meta mark & " in line
            assert line.split("comment")[0].rstrip().endswith(f"| {mark}")
    for line in saves:
        if backend == "iptables":
            assert f"-m mark --mark {up}/{mask}" in line and f"CONNMARK --set-xmark {up}/{mask}" in line
        else:
            assert f"meta mark & {mask} == {up} ct mark set ct mark & " in line
    routing = [ln for ln in rules.show(cfg).splitlines() if " rule add fwmark " in ln]
    assert routing and all(f"fwmark {mark}/{mask} " in ln for ln in routing)
    assert r.mark != r.upstream_mark and (r.mark | r.upstream_mark) & ~r.mask == 0


@pytest.mark.parametrize("case", MATRIX, ids=ids)
def test_the_intercepted_client_leg_is_untracked_in_tproxy_mode_only(case):
    name, backend = case
    cfg = golden_gen.config(name, backend)
    text = get_backend(backend).render(cfg)
    notrack = [ln for ln in _rule_lines(text, backend) if '"tproxy/notrack"' in ln]
    if cfg.mode != "tproxy":
        assert notrack == [] and "notrack" not in text
        return
    intercept = [ln for ln in _rule_lines(text, backend) if '"tproxy/intercept"' in ln]
    assert len(notrack) == len(intercept)
    for line in notrack:
        assert "fib daddr type local" in line or "-m addrtype --dst-type LOCAL" in line
        assert ("! -i lo" in line or 'iifname != "lo"' in line) or cfg.intercept.interfaces
        assert line.startswith("-A TPROXY_RAW ") if backend == "iptables" else " notrack " in line
    if backend == "nftables":
        assert "chain raw_prerouting {\n\t\ttype filter hook prerouting priority raw; policy accept;" in text
    else:
        assert "*raw\n:TPROXY_RAW - [0:0]\n" in text and "-j CT --notrack" in text


@pytest.mark.parametrize("backend", golden_gen.BACKENDS)
def test_nat_redirect_runs_before_the_hosts_own_dnat(backend):
    text = get_backend(backend).render(golden_gen.config("nat-both", backend))
    if backend == "nftables":
        assert "type nat hook prerouting priority dstnat - 10; policy accept;" in text
    else:
        assert '*nat\n:TPROXY_NAT - [0:0]\n-I PREROUTING 1 -m comment --comment "tproxy/jump" -j TPROXY_NAT\n' in text
