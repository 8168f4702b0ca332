"""The rule backend interface, and what every backend shares (running a tool, privilege, per-namespace state).

A backend turns a :class:`~tproxy.config.Config` into rule text and installs it:

- :meth:`Backend.render` is pure: no system calls, the same text for the same config, every line traceable to a key.
- :meth:`Backend.apply` installs rendered text in one atomic step; applying the same text again changes nothing.
- :meth:`Backend.remove` takes out everything tproxy installed (whatever config installed it) and nothing else.
- :meth:`Backend.installed` says whether any of our rules are present.
- :meth:`Backend.snapshot` / :meth:`Backend.restore` take what of ours is installed and put it back later, so that a
  replacement that fails after its rules went in leaves the previous rules, not the new ones.

Error handling: a missing program raises :class:`MissingBinaryError` naming the Debian package; lack of privilege
raises :class:`RulesError` ``needs CAP_NET_ADMIN (run as root)``; text the tool rejects raises :class:`RulesError`
carrying the tool's own message, and the host is left as it was.
"""

from __future__ import annotations

import abc
import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence

from tproxy.config import Config, PortRange
from tproxy.errors import MissingBinaryError, RulesError
from tproxy.privileges import has_net_admin

NEEDS_ROOT = "needs CAP_NET_ADMIN (run as root)"
COMMENT = "tproxy/"

# The Debian package that provides each program we run.
PACKAGES = {
    "nft": "nftables",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "iptables-restore": "iptables",
    "ip6tables-restore": "iptables",
    "iptables-save": "iptables",
    "ip6tables-save": "iptables",
    "iptables-legacy-save": "iptables",
    "ip6tables-legacy-save": "iptables",
    "iptables-nft-save": "iptables",
    "ip6tables-nft-save": "iptables",
}

_TAG = re.compile(r'comment "?(tproxy/[^"\s]+)')
_PERMISSION_HINTS = ("Operation not permitted", "Permission denied", "you must be root")


class Backend(abc.ABC):
    """One way of installing the interception rules (see the module docstring for the contract)."""

    name: str

    @abc.abstractmethod
    def render(self, config: Config) -> str:
        """The complete rule text for ``config``. Pure and deterministic."""

    @abc.abstractmethod
    def apply(self, text: str) -> None:
        """Install ``text`` (from :meth:`render`) atomically, replacing what we installed before."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove every rule, chain and table of ours; a no-op when nothing is installed."""

    @abc.abstractmethod
    def installed(self) -> bool:
        """Whether any of our rules are present in this network namespace."""

    @abc.abstractmethod
    def check(self, text: str) -> None:
        """Have the tool validate ``text`` without installing it (raises :class:`RulesError`)."""

    @abc.abstractmethod
    def snapshot(self) -> object:
        """What of ours is installed now, for :meth:`restore` (an opaque value; ``None``: nothing)."""

    @abc.abstractmethod
    def restore(self, snapshot: object) -> None:
        """Put back exactly what :meth:`snapshot` saw, replacing what is installed now (with ``None``: remove
        everything of ours): how a replacement that fails after :meth:`apply` (routing, say) is undone."""

    def describe(self) -> str:
        """A short name for messages, e.g. ``nftables`` or ``iptables (nf_tables variant)``."""
        return self.name

    def rule_tags(self, text: str) -> Counter[tuple[str, str]]:
        """(where, tag) of every rule in ``text`` (pure): where is a table (and family), tag the rule's comment."""
        raise NotImplementedError

    def installed_tags(self) -> Counter[tuple[str, str]]:
        """(where, tag) of every rule of ours installed now, counted as :meth:`rule_tags` counts them."""
        raise NotImplementedError

    def missing(self, text: str) -> list[str]:
        """The rules of ``text`` that are not installed, one line each (empty: all there).

        Every rule carries a ``tproxy/...`` comment, so rules are compared by table and tag, each as many times as
        ``text`` has it: what an ``nft flush ruleset``, ``iptables -t mangle -F`` or a firewall reload took out shows.
        """
        want, have = self.rule_tags(text), self.installed_tags()
        out = []
        for (where, tag), n in sorted(want.items()):
            short = n - have[where, tag]
            if short > 0:
                out.append(f"{where}: rule {tag} missing" + (f" ({short} of {n})" if n > 1 else ""))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the selection shared by both dialects.


def loopback_guard(config: Config) -> bool:
    """Whether the IPv4 loopback upstream needs ``route_localnet`` and so the 127.0.0.0/8 guard rule.

    Only when the proxy connects to 127.0.0.1 *from the client's address* (preserve_source): a reply from 127.0.0.1
    to a non-local address is routed towards the client's interface, which the kernel refuses without route_localnet.
    """
    return config.proxy.upstream == "loopback" and config.preserve_source and 4 in config.families


def tags(line: str) -> list[str]:
    """The ``tproxy/...`` comments in one rule line (either dialect, quoted or not)."""
    return _TAG.findall(line)


def mark_hex(value: int) -> str:
    return f"{value:#x}"


def keep_mask(config: Config) -> str:
    """``~routing.mask`` (32 bits), for ``mark = (mark & ~mask) | ours``: the bits of other software are kept."""
    return mark_hex(~config.routing.mask & 0xFFFFFFFF)


def port_ranges(ranges: Sequence[PortRange], sep: str) -> list[str]:
    return [str(r.lo) if r.lo == r.hi else f"{r.lo}{sep}{r.hi}" for r in ranges]


# ----------------------------------------------------------------------------------------------------------------
# Running tools.


def require_net_admin() -> None:
    if not has_net_admin():
        raise RulesError(NEEDS_ROOT)


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a tool; text in and out. ``check``: a failure raises RulesError with the tool's own message."""
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        prog = os.path.basename(argv[0])
        pkg = PACKAGES.get(prog, prog)
        raise MissingBinaryError(
            f"{prog} not found: install the Debian package {pkg} (apt-get install {pkg})"
        ) from None
    if check and r.returncode != 0:
        raise tool_error(argv, r)
    return r


def put_back(restore: Callable[[], None], err: BaseException) -> None:
    """Undo a failed change with ``restore`` while ``err`` is being raised; if the undo fails too, raise one
    RulesError (one line) naming both, so the operator learns that the host is not as it was."""
    try:
        restore()
    except Exception as undo:
        if not isinstance(err, Exception):
            return  # an interrupt stays an interrupt
        raise RulesError(f"{err}; putting the previous rules back failed too: {undo}") from err


def tool_error(argv: Sequence[str], r: subprocess.CompletedProcess) -> RulesError:
    msg = (r.stderr or r.stdout or "").strip()
    if any(h in msg for h in _PERMISSION_HINTS):
        return RulesError(f"{NEEDS_ROOT}: {os.path.basename(argv[0])}: {_one_line(msg)}")
    return RulesError(
        f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))} failed: "
        f"{_one_line(msg) or f'exit status {r.returncode}'}"
    )


def _one_line(msg: str) -> str:
    return " | ".join(line.rstrip() for line in msg.splitlines() if line.strip())
