"""Every error the operator may see, under one base class.

Messages are written for the operator: one line, naming what is wrong and, where it helps, how to fix it.
The CLI turns a :class:`ConfigError` into exit status 2 and any other :class:`TproxyError` into 1.
"""

from __future__ import annotations


class TproxyError(Exception):
    """Base of all errors tproxy reports to the operator (one line, no traceback)."""

    exit_code = 1


class ConfigError(TproxyError):
    """Bad configuration or command-line input: names the file, the key path and what is wrong."""

    exit_code = 2
    MAX_PART = 200  # characters of the key and of the reason kept (a 5,000-item list quoted in full is no message)

    # (key and reason are clipped and their unprintable characters escaped: a quoted TOML key may hold a newline)

    def __init__(self, source: str, key: str, reason: str) -> None:
        key, reason = _clip(key, self.MAX_PART), _clip(reason, self.MAX_PART)
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


def _clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters (and a count): unprintable characters escaped as Python does."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RulesError(TproxyError):
    """Installing, checking or removing interception rules or routes failed."""


class PrivilegeError(TproxyError):
    """The process lacks a capability it needs (names which one, and why)."""


class MissingBinaryError(RulesError):
    """A program we need is not installed (names the Debian package that provides it)."""


class ProxyProtocolError(TproxyError):
    """A PROXY protocol header that is not, and can never become, valid (or did not arrive in time).

    ``reason`` is a short machine word from :data:`tproxy.proxy_protocol.REASONS` (the ``reason`` label of
    ``tproxy_proxy_protocol_errors_total``); ``detail`` says what exactly, for the connection's log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"bad PROXY protocol header: {reason}" + (f" ({detail})" if detail else ""))


class StateError(TproxyError):
    """A state file under /run/tproxy (or the directory) cannot be trusted or read: names the path and why."""
