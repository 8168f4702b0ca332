"""``tproxy demo``: the whole product in two network namespaces, in a few seconds.

Builds the lab (:mod:`tproxy.lab`: a client and a node joined by a veth pair, an application on the node that answers
each connection with the peer address it saw), runs the real ``tproxy run`` in tproxy mode, then nat mode, then nat
with ``preserve_source``, makes a few IPv4 and IPv6 connections through each, and prints what the application saw;
then tproxy mode with ``intercept.udp_ports``: connected UDP clients ask a UDP application whom it saw
(:mod:`tproxy.lab_udp`).

A row is right only if the application saw the expected address (the client's, or the node's own in plain nat mode)
*and* the connection really went through the proxy (its log names the client's address and port): in tproxy mode a
dead proxy fails open, so "the application answered" alone would prove nothing.

Resource handling: the namespaces, the application and every proxy are removed when the demo ends, by error or
Ctrl-C too; with ``keep`` they stay up (a tproxy-mode proxy running) and the demo prints how to enter and delete them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

from tproxy import lab_udp
from tproxy.errors import MissingBinaryError, PrivilegeError, TproxyError
from tproxy.lab import (
    CLIENT,
    ECHO_PORT,
    INTERCEPT_PORTS,
    NODE,
    Lab,
    expected_peer_ip,
    proxy_config,
    proxy_log_names,
    proxy_log_names_result,
)

RUNS = (("tproxy", None), ("nat", None), ("nat", True))
CONNECTIONS_PER_FAMILY = 2
UDP_PORT = 5353
UDP_LABEL = "tproxy/udp"
_BINARIES = {"ip": "iproute2", "nft": "nftables", "iptables-restore": "iptables", "ip6tables-restore": "iptables"}


def _label(mode: str, preserve: bool | None) -> str:
    return f"{mode} + preserve_source" if preserve else mode


def _addr(pair: list | None) -> str:
    if not pair:
        return "-"
    ip, port = pair
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _one_line(text: object) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " | ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def _preflight(backend: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError("tproxy demo needs root: it creates network namespaces and installs rules in them")
    needed = ["ip", "nft"] if backend == "nftables" else ["ip", "iptables-restore", "ip6tables-restore"]
    for b in needed:
        if shutil.which(b) is None:
            raise MissingBinaryError(f"{b} not found: install the Debian package {_BINARIES[b]}")


def demo(backend: str = "nftables", keep: bool = False) -> int:
    """Run the demo; 0 only if every row is right. ``keep`` leaves the lab up and prints how to enter it."""
    from tproxy.config import BACKENDS
    from tproxy.errors import ConfigError

    if backend not in BACKENDS:
        raise ConfigError("--backend", "", f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")
    _preflight(backend)
    out = sys.stdout
    rows: list[tuple[str, ...]] = []
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            lab = stack.enter_context(Lab.up(keep=keep))
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            raise TproxyError(f"cannot build the demo lab: {_one_line(detail)}") from None
        print(
            f"lab: client {lab.client.name} ({CLIENT[4]}, {CLIENT[6]}) <-veth-> node {lab.node.name} "
            f"({NODE[4]}, {NODE[6]}); the application on the node answers with the peer address it saw",
            file=out,
        )
        for mode, preserve in RUNS:
            label = _label(mode, preserve)
            print(f"  tproxy run: mode {label}, backend {backend} ...", file=out, flush=True)
            try:
                proxy = lab.start_proxy(proxy_config(mode, backend, preserve_source=preserve))
            except RuntimeError as e:
                rows.append((label, backend, "-", "-", "FAILED: the proxy did not start"))
                problems.append(f"{label}: {e}")
                continue
            try:
                jobs = [
                    {"dst": NODE[f], "port": ECHO_PORT, "count": CONNECTIONS_PER_FAMILY, "sizes": [1024]}
                    for f in (4, 6)
                ]
                results = lab.connect(jobs, timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # the client failed: a row, not a traceback
                results = []
                rows.append((label, backend, "-", "-", "FAILED: the client did not run"))
                problems.append(f"{label}: {e}")
            finally:
                status = proxy.stop()
            log = proxy.log()
            if status != 0:
                problems.append(f"{label}: tproxy run exited with status {status} after SIGTERM\n{log}")
            for r in results:
                rows.append((label, backend, _addr(r["src"]), _addr(r["peer"]), _verdict(r, mode, preserve, log)))
        rows += _udp_rows(lab, backend, problems, out)
        _print_table(rows, out)
        ok = not problems and all(row[-1].startswith("ok") for row in rows)
        for p in problems:
            print(f"\nproblem: {p}", file=out)
        if keep:
            try:
                lab.start_proxy(proxy_config("tproxy", backend))
                print(f"\nthe lab is still up, tproxy running in tproxy mode ({backend}):", file=out)
            except RuntimeError as e:
                print(f"\nthe lab is still up (the proxy did not start again: {e}):", file=out)
            print(lab.describe(), file=out)
    print(
        "\nresult: every row is right" if ok else "\nresult: FAILED (see the rows and problems above)",
        file=out,
    )
    return 0 if ok else 1


def _udp_rows(lab: Lab, backend: str, problems: list[str], out) -> list[tuple[str, ...]]:
    """tproxy mode with ``udp_ports``: per family, connected UDP clients ask the UDP application whom it saw."""
    print(f"  tproxy run: mode tproxy, udp_ports = [{UDP_PORT}], backend {backend} ...", file=out, flush=True)
    app = lab.node.popen(
        [sys.executable, "-m", "tproxy.lab_udp", "app", str(UDP_PORT)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        if app.stdout.readline().strip() != lab_udp.READY:
            problems.append(f"{UDP_LABEL}: the UDP application did not start")
            return [(UDP_LABEL, backend, "-", "-", "FAILED: the UDP application did not start")]
        config = proxy_config("tproxy", backend).replace(
            f'ports = ["{INTERCEPT_PORTS}"]', f'ports = ["{INTERCEPT_PORTS}"]\nudp_ports = [{UDP_PORT}]'
        )
        try:
            proxy = lab.start_proxy(config)
        except RuntimeError as e:
            problems.append(f"{UDP_LABEL}: {e}")
            return [(UDP_LABEL, backend, "-", "-", "FAILED: the proxy did not start")]
        try:
            jobs = [
                {"dst": NODE[f], "port": UDP_PORT, "sizes": [512]}
                for f in (4, 6)
                for _ in range(CONNECTIONS_PER_FAMILY)
            ]
            r = lab.client.run(
                [sys.executable, "-m", "tproxy.lab_udp", "client"], input=json.dumps(jobs), timeout=60, check=False
            )
            results = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
            if r.returncode != 0 or not results:
                problems.append(f"{UDP_LABEL}: the UDP client failed: {r.stderr.strip()[-500:]}")
                return [(UDP_LABEL, backend, "-", "-", "FAILED: the client did not run")]
        finally:
            status = proxy.stop()  # (ends every session: each is logged)
        log = proxy.log()
        if status != 0:
            problems.append(f"{UDP_LABEL}: tproxy run exited with status {status} after SIGTERM\n{log}")
        return [(UDP_LABEL, backend, _addr(r["src"]), _addr(r["peer"]), _udp_verdict(r, log)) for r in results]
    finally:
        app.kill()
        app.wait()


def _udp_verdict(r: dict, log: str) -> str:
    if not r["ok"]:
        return f"FAILED: {r['error']}"
    fam = 6 if ":" in r["src"][0] else 4
    if r["peer"][0] != CLIENT[fam]:
        return f"WRONG: expected {CLIENT[fam]}"
    if not [ln for ln in proxy_log_names(log, *r["src"]) if " udp_session " in ln]:
        return "WRONG: the proxy's log does not name this client (bypassed?)"
    return "ok: the client's address"


def _verdict(r: dict, mode: str, preserve: bool | None, log: str) -> str:
    if not r["ok"]:
        return f"FAILED: {r['error'] or 'wrong echo'}"
    fam = 6 if ":" in r["src"][0] else 4
    want = expected_peer_ip(mode, preserve, fam)
    if r["peer"][0] != want:
        return f"WRONG: expected {want}"
    if not proxy_log_names_result(log, mode, r):  # (in nat mode conntrack may have rewritten a reused client port)
        return "WRONG: the proxy's log does not name this client (bypassed?)"
    if want == CLIENT[fam]:
        return "ok: the client's address"
    return "ok: the node's address (nat default)"


def _print_table(rows: list[tuple[str, ...]], out) -> None:
    head = ("mode", "backend", "client address", "application saw", "verdict")
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    print("", file=out)
    for row in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    print(
        "\nok = the application saw the expected address and the proxy's log names the connection (in tproxy mode a\n"
        "dead proxy fails open, so an answer alone would prove nothing); the application sees another source port\n"
        "than the client's because the proxy picks one that cannot collide with the client's own connection.",
        file=out,
    )
