"""TOML configuration (+ ``TPROXY_`` environment variables, + flags) -> frozen attrs objects.

Nothing else in tproxy reads TOML or passes dicts of settings around: the loader below walks the document, names the
file and key path of anything wrong (:class:`~tproxy.errors.ConfigError`), and builds the frozen objects. attrs
validators guard the invariants of the objects themselves; the messages an operator sees come from the loader. The
environment is turned into the same document first (:meth:`Config.load`), so a variable gets the same checks and
messages as a key of the file, naming ``environment`` and the variable instead.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from tproxy.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = ("tproxy", "nat")
BACKENDS = ("nftables", "iptables")
UPSTREAMS = ("original", "loopback")
RELAYS = ("shared", "tasks")  # relay engines (tproxy.relay): one epoll task for all connections, or two tasks each
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
PROXY_PROTOCOL_IN = ("off", "v1", "v2", "any")
PROXY_PROTOCOL_OUT = ("off", "v1", "v2")
# Where a key's value came from, for /config; a key absent from Config.origins has its default.
SOURCES = ("default", "file", "environment", "flag")


@attrs.frozen(kw_only=True, order=True)
class PortRange:
    """An inclusive range of TCP ports; a single port has ``lo == hi``."""

    lo: int
    hi: int

    def __attrs_post_init__(self) -> None:
        if not (1 <= self.lo <= self.hi <= 65535):
            raise ValueError(f"bad port range {self.lo}-{self.hi}")

    def __contains__(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@functools.lru_cache(maxsize=4096)
def _trusted(ip: str, nets: tuple[IPNetwork, ...]) -> bool:
    """``ip`` in one of ``nets`` (an IPv4-mapped IPv6 address as its IPv4 address); cached: load balancers are few,
    and it is asked once per connection."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in nets)


@attrs.frozen(kw_only=True)
class Listener:
    address: IPAddress = attrs.field(default=ipaddress.IPv4Address("0.0.0.0"), converter=ipaddress.ip_address)
    port: int = 4143
    # PROXY protocol in: connections from proxy_protocol_from must start with a header; nobody else's are parsed
    proxy_protocol: str = attrs.field(default="off", validator=attrs.validators.in_(PROXY_PROTOCOL_IN))
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    proxy_protocol_timeout: float = 3.0

    @property
    def is_wildcard(self) -> bool:
        return self.address.is_unspecified

    def address_for(self, family: int) -> str:
        """The address to bind for ``family`` (4 or 6): the configured one, or that family's wildcard."""
        if self.address.version == family:
            return str(self.address)
        return "0.0.0.0" if family == 4 else "::"

    def trusts(self, ip: str | IPAddress) -> bool:
        """Whether a connection from ``ip`` must begin with a PROXY header (``ip`` in ``proxy_protocol_from``; an
        IPv4-mapped IPv6 address counts as its IPv4 address). False whenever ``proxy_protocol`` is "off"."""
        if self.proxy_protocol == "off":
            return False
        return _trusted(str(ip), self.proxy_protocol_from)


@attrs.frozen(kw_only=True)
class Intercept:
    ports: tuple[PortRange, ...]
    udp_ports: tuple[PortRange, ...] = ()  # UDP destination ports (tproxy mode only)
    interfaces: tuple[str, ...] = ()
    exclude_ports: tuple[PortRange, ...] = ()
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    ipv4: bool = True
    ipv6: bool = True

    @property
    def families(self) -> tuple[int, ...]:
        """The enabled IP versions, in order: (4,), (6,) or (4, 6)."""
        return tuple(f for f, on in ((4, self.ipv4), (6, self.ipv6)) if on)

    def excluded_cidrs(self, family: int) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self.exclude_cidrs if n.version == family)

    def intercepts(self, port: int) -> bool:
        """Whether a connection to destination ``port`` is diverted (exclusions win)."""
        return any(port in r for r in self.ports) and not any(port in r for r in self.exclude_ports)

    def intercepts_udp(self, port: int) -> bool:
        """Whether a datagram to destination ``port`` is diverted (exclusions win)."""
        return any(port in r for r in self.udp_ports) and not any(port in r for r in self.exclude_ports)


@attrs.frozen(kw_only=True)
class Routing:
    """Packet marks and the policy-routing table.

    Two bits of the packet mark are ours (README, "Marks"): ``mark``, which the fwmark rule routes to ``table`` (the
    replies that must reach the proxy), and ``upstream_mark``, which the proxy's upstream sockets carry and nothing
    routes (so an upstream SYN towards a container behind a DNAT or another host leaves the host normally). Every
    rule matches ``packet mark & mask == value`` and sets ``mark = (mark & ~mask) | value``, so bits outside ``mask``
    (other software's) are neither read nor changed. The defaults avoid the bits Istio (0x539), kube-proxy
    (0x4000, 0x8000), Calico (0xffff0000), Cilium (0x0f00), wg-quick (0xca6c) and the AWS VPC CNI (0x80) use.
    ``mask`` defaults to the two marks together, so a config that sets only ``mark = 1`` keeps working.
    """

    mark: int = 0x1000
    upstream_mark: int = 0x2000
    mask: int = attrs.field()
    table: int = 100
    check_interval: float = 5.0  # seconds between the rule watcher's checks (and on SIGHUP)
    reinstall: bool = True  # the watcher puts missing rules back (never after `tproxy rules remove`)

    @mask.default
    def _mask_default(self) -> int:
        return self.mark | self.upstream_mark

    def __attrs_post_init__(self) -> None:
        problem = routing_marks_problem(self.mark, self.upstream_mark, self.mask)
        if problem:
            raise ValueError(problem[1])


def routing_marks_problem(mark: int, upstream_mark: int, mask: int) -> tuple[str, str] | None:
    """(key, reason) of the first thing wrong with these marks, or None: both non-zero, distinct, inside ``mask``."""
    for key, value in (("routing.mark", mark), ("routing.upstream_mark", upstream_mark), ("routing.mask", mask)):
        if not 0 < value < 2**32:
            return key, f"{value} is not a valid fwmark (1-4294967295)"
    if mark & ~mask:
        return "routing.mark", f"{mark:#x} has bits outside routing.mask {mask:#x}"
    if upstream_mark & ~mask:
        return "routing.upstream_mark", f"{upstream_mark:#x} has bits outside routing.mask {mask:#x}"
    if mark == upstream_mark:
        return "routing.upstream_mark", (
            f"{upstream_mark:#x} is also routing.mark: the upstream sockets' mark must differ from the reply mark "
            "(it is the one no ip rule routes)"
        )
    return None


@attrs.frozen(kw_only=True)
class Proxy:
    preserve_source: bool | None = None  # None: the mode's default (see Config.preserve_source)
    upstream: str = attrs.field(default="original", validator=attrs.validators.in_(UPSTREAMS))
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    max_connections: int = 10000
    shutdown_grace: float = 30.0
    # upstream = "original": source ports for the upstream leg, outside the clients' own ephemeral ranges
    upstream_ports: PortRange = PortRange(lo=1024, hi=32767)
    # PROXY protocol out: a header with the client's address and the original destination, before any client byte
    send_proxy_protocol: str = attrs.field(default="off", validator=attrs.validators.in_(PROXY_PROTOCOL_OUT))
    relay: str = attrs.field(default="shared", validator=attrs.validators.in_(RELAYS))
    udp_idle_timeout: float = 60.0  # a UDP session with no datagram either way for this long ends
    udp_max_sessions: int = 10000  # beyond it new UDP flows are dropped (and counted); live ones are never evicted


@attrs.frozen(kw_only=True)
class Admin:
    host: str | None = "127.0.0.1"  # None: the admin endpoint is disabled
    port: int = 4191

    @property
    def enabled(self) -> bool:
        return self.host is not None


@attrs.frozen(kw_only=True)
class Log:
    level: str = attrs.field(default="info", validator=attrs.validators.in_(LOG_LEVELS))
    format: str = attrs.field(default="text", validator=attrs.validators.in_(LOG_FORMATS))


@attrs.frozen(kw_only=True)
class Privileges:
    user: str | None = None  # None: no privilege drop
    group: str | None = None


@attrs.frozen(kw_only=True)
class Config:
    """The whole configuration. Build it with :meth:`load` (file + environment + flags) or :meth:`from_toml`;
    override with :meth:`with_overrides`."""

    mode: str = attrs.field(default="tproxy", validator=attrs.validators.in_(MODES))
    backend: str = attrs.field(default="nftables", validator=attrs.validators.in_(BACKENDS))
    listener: Listener = Listener()
    intercept: Intercept
    routing: Routing = Routing()
    proxy: Proxy = Proxy()
    admin: Admin = Admin()
    log: Log = Log()
    privileges: Privileges = Privileges()
    source: str = "<config>"  # the file it came from ("environment" when there is none), for messages
    file: str | None = None  # the config file, re-read on SIGHUP; None: the environment alone
    # the TPROXY_ variables it was built from, fixed for the life of the process (a reload reuses them)
    environ: Mapping[str, str] = attrs.field(
        factory=dict, converter=lambda d: types.MappingProxyType(dict(d)), eq=False, repr=False
    )
    # TPROXY_ variables ignored as Kubernetes' service links for a Service named "tproxy" (logged at debug)
    ignored: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)
    # key path ("proxy.idle_timeout") -> "file" | "environment" | "flag" for every key not left at its default;
    # not part of equality: two configs that run the same are the same, wherever their values came from
    origins: Mapping[str, str] = attrs.field(
        factory=dict, converter=lambda d: types.MappingProxyType(dict(d)), eq=False, repr=False
    )
    # key path -> {"value", "source"} as the file now says, for each key a reload could not apply (it needs a
    # restart: tproxy/reload.py); the running value stays in the fields above. Empty unless built by a reload.
    restart_pending: Mapping[str, Mapping[str, Any]] = attrs.field(
        factory=dict, converter=lambda d: types.MappingProxyType(dict(d)), eq=False, repr=False
    )

    @property
    def preserve_source(self) -> bool:
        """Connect upstream from the client's IP: the explicit setting, else true in tproxy mode, false in nat."""
        if self.proxy.preserve_source is not None:
            return self.proxy.preserve_source
        return self.mode == "tproxy"

    @property
    def needs_routing(self) -> bool:
        """Whether replies to spoofed client addresses must be routed back to us (fwmark rule + local table)."""
        return self.mode == "tproxy" or self.preserve_source

    @property
    def families(self) -> tuple[int, ...]:
        return self.intercept.families

    def where(self, key: str) -> tuple[str, str]:
        """(source, key) to name in an error about ``key``: ``("environment", "TPROXY_...")`` when its value came
        from the environment, else the file and the key path."""
        if self.source_of(key) == "environment" or self.file is None:
            return "environment", env_name(key)
        return self.source, key

    def from_environment(self) -> dict[str, str]:
        """Key path -> the variable that set it, for every key whose value came from the environment."""
        return {k: env_name(k) for k, v in sorted(self.origins.items()) if v == "environment"}

    def source_of(self, key: str) -> str:
        """Where the value of ``key`` (a path as the file spells it, e.g. ``"proxy.idle_timeout"``) came from: one
        of :data:`SOURCES`."""
        return self.origins.get(key, "default")

    def settings(self) -> dict[str, Any]:
        """Every key as the file spells it -> its effective value as JSON/TOML types (for ``/config``)."""
        admin = f"[{self.admin.host}]" if self.admin.host and ":" in self.admin.host else self.admin.host
        return {
            "mode": self.mode,
            "backend": self.backend,
            "listener.address": str(self.listener.address),
            "listener.port": self.listener.port,
            "listener.proxy_protocol": self.listener.proxy_protocol,
            "listener.proxy_protocol_from": [str(n) for n in self.listener.proxy_protocol_from],
            "listener.proxy_protocol_timeout": self.listener.proxy_protocol_timeout,
            "intercept.ports": [_port_doc(r) for r in self.intercept.ports],
            "intercept.udp_ports": [_port_doc(r) for r in self.intercept.udp_ports],
            "intercept.interfaces": list(self.intercept.interfaces),
            "intercept.exclude_ports": [_port_doc(r) for r in self.intercept.exclude_ports],
            "intercept.exclude_cidrs": [str(n) for n in self.intercept.exclude_cidrs],
            "intercept.ipv4": self.intercept.ipv4,
            "intercept.ipv6": self.intercept.ipv6,
            "routing.mark": self.routing.mark,
            "routing.upstream_mark": self.routing.upstream_mark,
            "routing.mask": self.routing.mask,
            "routing.table": self.routing.table,
            "routing.check_interval": self.routing.check_interval,
            "routing.reinstall": self.routing.reinstall,
            "proxy.preserve_source": self.preserve_source,  # effective: the mode's default when not set
            "proxy.upstream": self.proxy.upstream,
            "proxy.connect_timeout": self.proxy.connect_timeout,
            "proxy.idle_timeout": self.proxy.idle_timeout,
            "proxy.max_connections": self.proxy.max_connections,
            "proxy.shutdown_grace": self.proxy.shutdown_grace,
            "proxy.upstream_ports": str(self.proxy.upstream_ports),
            "proxy.relay": self.proxy.relay,
            "proxy.send_proxy_protocol": self.proxy.send_proxy_protocol,
            "proxy.udp_idle_timeout": self.proxy.udp_idle_timeout,
            "proxy.udp_max_sessions": self.proxy.udp_max_sessions,
            "admin.address": f"{admin}:{self.admin.port}" if self.admin.enabled else "",
            "log.level": self.log.level,
            "log.format": self.log.format,
            "privileges.user": self.privileges.user or "",
            "privileges.group": self.privileges.group or "",
        }

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        environ: Mapping[str, str],
        *,
        mode: str | None = None,
        backend: str | None = None,
    ) -> Config:
        """The file at ``path`` (optional), overridden by the ``TPROXY_`` variables of ``environ``, overridden by
        ``mode``/``backend`` (command-line flags): flags > environment > file > defaults.

        Every key has a variable: ``TPROXY_<SECTION>_<KEY>`` (top-level keys ``TPROXY_<KEY>``), lists
        comma-separated, booleans ``true``/``false``, everything else as the file would spell it without quotes.
        Only the ``TPROXY_`` variables are kept (:attr:`Config.environ`), so a reload sees the same environment.

        Error handling: :class:`ConfigError`; a bad or unknown variable names ``environment`` and the variable, a key
        of the file names the file and the key. The variables Kubernetes sets for a Service named ``tproxy``
        (``TPROXY_PORT``, ``TPROXY_SERVICE_HOST``, ...) are not ours: they are skipped, listed in
        :attr:`Config.ignored`.
        """
        env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
        doc = _read_toml(str(path)) if path is not None else {}
        overlay, names, ignored = _environment_document(env)
        for section, values in overlay.items():
            if not section:
                doc.update(values)
            elif isinstance(doc.setdefault(section, {}), dict):  # (else the walk reports the file's non-table)
                doc[section].update(values)
        loader = _Loader(str(path) if path is not None else "environment", env_names=names, env_only=path is None)
        config = loader.load(doc, mode=mode, backend=backend)
        return attrs.evolve(config, file=None if path is None else str(path), environ=env, ignored=ignored)

    @classmethod
    def from_toml(cls, path: str | Path, *, mode: str | None = None, backend: str | None = None) -> Config:
        """Load ``path``; ``mode``/``backend`` (command-line flags) override the file.

        Error handling: any problem raises :class:`ConfigError` naming the file, the key path and the reason.
        """
        doc = _read_toml(str(path))
        return cls.from_dict(doc, source=str(path), mode=mode, backend=backend)

    @classmethod
    def from_dict(
        cls,
        doc: dict[str, Any],
        *,
        source: str = "<config>",
        mode: str | None = None,
        backend: str | None = None,
    ) -> Config:
        """Build from an already parsed TOML document of the file ``source`` (used by :meth:`from_toml` and by
        tests); no environment."""
        return attrs.evolve(_Loader(source).load(doc, mode=mode, backend=backend), file=source)

    def with_overrides(self, *, mode: str | None = None, backend: str | None = None) -> Config:
        """Command-line overrides (``--mode``, ``--backend``), checked like the file's values."""
        if mode is not None and mode not in MODES:
            raise ConfigError("--mode", "", f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
        if backend is not None and backend not in BACKENDS:
            raise ConfigError("--backend", "", f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")
        if mode == "nat" and self.intercept.udp_ports:
            raise ConfigError(
                *self.where("intercept.udp_ports"), 'UDP needs mode = "tproxy" (--mode nat cannot intercept datagrams)'
            )
        flags = {k: "flag" for k, v in (("mode", mode), ("backend", backend)) if v is not None}
        return attrs.evolve(
            self, mode=mode or self.mode, backend=backend or self.backend, origins={**self.origins, **flags}
        )


def _read_toml(source: str) -> dict[str, Any]:
    try:
        raw = Path(source).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"invalid TOML: {e}") from None
    except ValueError as e:  # an integer of more than 4,300 digits (Python's limit for converting text to int)
        raise ConfigError(source, "", f"invalid TOML: {str(e).split(';')[0]}") from None


def _port_doc(r: PortRange) -> int | str:
    return r.lo if r.lo == r.hi else str(r)


# ----------------------------------------------------------------------------------------------------------------
# The loader: walks the TOML document, every error naming file and key.

_SCHEMA: dict[str, tuple[str, ...]] = {
    "": ("mode", "backend", "listener", "intercept", "routing", "proxy", "admin", "log", "privileges"),
    "listener": ("address", "port", "proxy_protocol", "proxy_protocol_from", "proxy_protocol_timeout"),
    "intercept": ("ports", "udp_ports", "interfaces", "exclude_ports", "exclude_cidrs", "ipv4", "ipv6"),
    "routing": ("mark", "upstream_mark", "mask", "table", "check_interval", "reinstall"),
    "proxy": (
        "preserve_source",
        "upstream",
        "connect_timeout",
        "idle_timeout",
        "max_connections",
        "shutdown_grace",
        "upstream_ports",
        "send_proxy_protocol",
        "relay",
        "udp_idle_timeout",
        "udp_max_sessions",
    ),
    "admin": ("address",),
    "log": ("level", "format"),
    "privileges": ("user", "group"),
}

# How a variable's text becomes the value the TOML walk expects, per key; lists are comma-separated, their items
# stay text (ports are ints or "lo-hi" strings in the file alike). Every key of _SCHEMA has one (a test checks).
_KINDS: dict[str, type] = {
    "mode": str,
    "backend": str,
    "listener.address": str,
    "listener.port": int,
    "listener.proxy_protocol": str,
    "listener.proxy_protocol_from": list,
    "listener.proxy_protocol_timeout": float,
    "intercept.ports": list,
    "intercept.udp_ports": list,
    "intercept.interfaces": list,
    "intercept.exclude_ports": list,
    "intercept.exclude_cidrs": list,
    "intercept.ipv4": bool,
    "intercept.ipv6": bool,
    "routing.mark": int,
    "routing.upstream_mark": int,
    "routing.mask": int,
    "routing.table": int,
    "routing.check_interval": float,
    "routing.reinstall": bool,
    "proxy.preserve_source": bool,
    "proxy.upstream": str,
    "proxy.connect_timeout": float,
    "proxy.idle_timeout": float,
    "proxy.max_connections": int,
    "proxy.shutdown_grace": float,
    "proxy.upstream_ports": str,
    "proxy.send_proxy_protocol": str,
    "proxy.relay": str,
    "proxy.udp_idle_timeout": float,
    "proxy.udp_max_sessions": int,
    "admin.address": str,
    "log.level": str,
    "log.format": str,
    "privileges.user": str,
    "privileges.group": str,
}

ENV_PREFIX = "TPROXY_"
# What Kubernetes injects into every container of a namespace for a Service named "tproxy" (service links):
# TPROXY_SERVICE_HOST, TPROXY_SERVICE_PORT[_<NAME>], TPROXY_PORT, TPROXY_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR].
_SERVICE_LINK = re.compile(r"TPROXY_(SERVICE_HOST|SERVICE_PORT(_.+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)(_.+)?)")


def env_name(key: str) -> str:
    """The variable for key path ``key``: ``"proxy.idle_timeout"`` -> ``"TPROXY_PROXY_IDLE_TIMEOUT"``."""
    return ENV_PREFIX + key.split("[", 1)[0].replace(".", "_").upper()


def _env_keys() -> dict[str, str]:
    """Variable name -> key path, for every key of the schema."""
    out = {}
    for section, keys in _SCHEMA.items():
        for key in keys:
            if section == "" and key in _SCHEMA:
                continue  # a table, not a key
            path = f"{section}.{key}" if section else key
            out[env_name(path)] = path
    return out


def _environment_document(env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], tuple]:
    """The ``TPROXY_`` variables as the document the TOML walk validates: ``({section: {key: value}}, {key path:
    variable}, ignored service-link variables)``. Section "" holds the top-level keys.

    Only the text is converted here (an integer that is no integer, a boolean other than true/false); every check of
    the value itself is the walk's, so a variable and a file key get the same messages.
    """
    known = _env_keys()
    doc: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    ignored = []
    for name in sorted(env):
        text = env[name]
        path = known.get(name)
        if path is None:
            if _SERVICE_LINK.fullmatch(name):
                ignored.append(name)
                continue
            hint = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            reason = "unknown variable" + (f" (did you mean {hint[0]}?)" if hint else "")
            raise ConfigError("environment", name, f"{reason}; every key is TPROXY_<SECTION>_<KEY>")
        section, _, key = path.rpartition(".")
        doc.setdefault(section, {})[key] = _env_value(name, text, _KINDS[path])
        names[path] = name
    return doc, names, tuple(ignored)


# A number as the file spells it (TOML): ASCII digits, "_" only between digits, no leading zero, lower-case base
# prefixes without a sign; a float has a fraction or an exponent (or is inf/nan). Python's int() and float() take more
# ("٨٠٨٠", "0X10", "-0x10", ".5", "Infinity"), which a variable must not.
_TOML_INT = re.compile(
    r"[+-]?(?:0|[1-9](?:_?[0-9])*)|0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0o[0-7](?:_?[0-7])*|0b[01](?:_?[01])*"
)
_TOML_FLOAT = re.compile(
    r"[+-]?(?:(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?|inf|nan)"
)


def _env_value(name: str, text: str, kind: type) -> Any:
    if kind is list:
        return [item.strip() for item in text.split(",")] if text.strip() else []
    if kind is bool:
        if text.strip() not in ("true", "false"):
            raise ConfigError("environment", name, f"{text!r} is not a boolean (true or false)")
        return text.strip() == "true"
    if kind is int or kind is float:  # (a number key takes an integer too, as in the file)
        number = text.strip()
        try:
            if _TOML_INT.fullmatch(number):
                return int(number, 0)
            if kind is float and _TOML_FLOAT.fullmatch(number):
                return float(number.replace("_", ""))
        except ValueError:  # more than 4,300 digits
            pass
        raise ConfigError("environment", name, f"{text!r} is not {'an integer' if kind is int else 'a number'}")
    return text


_PORT_RANGE = re.compile(r"([0-9]{1,10})(?:\s*-\s*([0-9]{1,10}))?")  # ASCII digits (int() also takes "８０", "+8_0")

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _default_admin_address() -> str:
    """``admin.address`` as the file would spell the :class:`Admin` defaults."""
    admin = Admin()
    return f"{admin.host}:{admin.port}"


def _default(cls: type, name: str) -> Any:
    """The attrs default of ``cls.name``: the classes are the one place defaults are written."""
    return attrs.fields_dict(cls)[name].default


class _Loader:
    def __init__(self, source: str, *, env_names: Mapping[str, str] = types.MappingProxyType({}), env_only=False):
        self.source = source
        self.env_names = env_names  # key path -> the variable that set it
        self.env_only = env_only  # no file: every key is named by its variable
        self.origins: dict[str, str] = {}  # what Config.origins will hold

    def error(self, key: str, reason: str) -> ConfigError:
        path = key.split("[", 1)[0]
        if path in self.env_names or (self.env_only and path):
            return ConfigError("environment", self.env_names.get(path) or env_name(path), reason)
        return ConfigError(self.source, key, reason)

    # -- generic pieces

    def table(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        value = doc.get(name, {}) if name else doc
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table ([{name}]), got {_type_name(value)}")
        allowed = _SCHEMA[name]
        for key in value:
            if key not in allowed:
                path = f"{name}.{key}" if name else key
                hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                where = f"[{name}]" if name else "the top level"
                reason = f"unknown key in {where}"
                if hint:
                    hint_path = f"{name}.{hint[0]}" if name else hint[0]
                    reason += f" (did you mean {hint_path!r}?)"
                raise self.error(path, reason)
        for key, item in value.items():
            if not isinstance(item, dict):
                path = f"{name}.{key}" if name else key
                self.origins[path] = "environment" if path in self.env_names else "file"
        return value

    def typed(self, table: dict[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # (TOML integers have no size limit; a float's is about 1.8e308)
                raise self.error(path, "too large a number (more than 1.8e308)") from None
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise self.error(path, f"expected {_TYPE_NAMES[kind]}, got {_type_name(value)} {value!r}")
        return value

    def choice(self, table: dict[str, Any], key: str, path: str, choices: tuple[str, ...], default: str) -> str:
        value = self.typed(table, key, path, str, default)
        if value not in choices:
            raise self.error(path, f"unknown value {value!r} (expected one of: {', '.join(choices)})")
        return value

    def ranged_int(self, table: dict[str, Any], key: str, path: str, lo: int, hi: int, default: int, what: str) -> int:
        value = self.typed(table, key, path, int, default)
        if not lo <= value <= hi:
            raise self.error(path, f"{value} is not {what} ({lo}-{hi})")
        return value

    def positive(self, table: dict[str, Any], key: str, path: str, default: float) -> float:
        value = self.typed(table, key, path, float, default)
        if not value > 0 or value != value or value == float("inf"):
            raise self.error(path, f"{value} must be a positive number of seconds")
        return value

    def port_value(self, value: Any, path: str) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= 65535:
                raise self.error(path, f"{value} is not a port (1-65535)")
            return PortRange(lo=value, hi=value)
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise self.error(path, 'empty port range (expected a port or "lo-hi")')
            match = _PORT_RANGE.fullmatch(text)
            if match is None:
                raise self.error(path, f'{value!r} is not a port or a "lo-hi" range')
            lo = int(match[1])
            hi = int(match[2]) if match[2] is not None else lo
            for p in (lo, hi):
                if not 1 <= p <= 65535:
                    raise self.error(path, f"{p} is not a port (1-65535)")
            if lo > hi:
                raise self.error(path, f"inverted range {value!r} (low end above high end)")
            return PortRange(lo=lo, hi=hi)
        raise self.error(path, f'expected a port number or a "lo-hi" string, got {_type_name(value)} {value!r}')

    def list_of(self, table: dict[str, Any], key: str, path: str, item: Callable[[Any, str], Any]) -> tuple:
        if key not in table:
            return ()
        value = table[key]
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {_type_name(value)} {value!r}")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    def cidr(self, value: Any, path: str) -> IPNetwork:
        if not isinstance(value, str):
            raise self.error(path, f"expected a CIDR string, got {_type_name(value)} {value!r}")
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise self.error(path, f'{value!r} is not an IPv4 or IPv6 network (e.g. "198.18.0.0/15")') from None

    def interface(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected an interface name, got {_type_name(value)} {value!r}")
        bad = any(c.isspace() or not c.isprintable() or c in "/:\"'" for c in value)  # (the kernel's rule, and quotes)
        if not value or len(value.encode()) > 15 or bad or value in (".", ".."):
            raise self.error(
                path, f"{value!r} is not a valid interface name (1-15 bytes, no '/', ':', quotes, spaces or controls)"
            )
        if value == "lo":
            raise self.error(path, "lo can never be intercepted (the proxy's own upstream traffic arrives on it)")
        if "+" in value or "*" in value:
            # iptables reads "eth+" as a wildcard, nft as a literal name: the same config would mean two things
            raise self.error(path, f"{value!r}: wildcards are not supported; list each interface by name")
        return value

    # -- sections

    def load(self, doc: dict[str, Any], *, mode: str | None, backend: str | None) -> Config:
        top = self.table(doc, "")
        mode_v = self.choice(top, "mode", "mode", MODES, _default(Config, "mode"))
        backend_v = self.choice(top, "backend", "backend", BACKENDS, _default(Config, "backend"))
        if mode is not None:
            if mode not in MODES:
                raise ConfigError("--mode", "", f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
            mode_v = mode
            self.origins["mode"] = "flag"
        if backend is not None:
            if backend not in BACKENDS:
                raise ConfigError(
                    "--backend", "", f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})"
                )
            backend_v = backend
            self.origins["backend"] = "flag"

        t = self.table(top, "listener")
        address_s = self.typed(t, "address", "listener.address", str, str(_default(Listener, "address")))
        try:
            address = ipaddress.ip_address(address_s)
        except ValueError:
            raise self.error("listener.address", f"{address_s!r} is not an IP address") from None
        listener = Listener(
            address=address,
            port=self.ranged_int(t, "port", "listener.port", 1, 65535, _default(Listener, "port"), "a port"),
            **self.proxy_protocol_in(t),
        )

        t = self.table(top, "intercept")
        if "ports" not in t:
            raise self.error("intercept.ports", "required key is missing (the destination ports to intercept)")
        ports = self.list_of(t, "ports", "intercept.ports", self.port_value)
        if not ports:
            raise self.error("intercept.ports", "must name at least one port or range")
        intercept = Intercept(
            ports=ports,
            udp_ports=self.list_of(t, "udp_ports", "intercept.udp_ports", self.port_value),
            interfaces=self.list_of(t, "interfaces", "intercept.interfaces", self.interface),
            exclude_ports=self.list_of(t, "exclude_ports", "intercept.exclude_ports", self.port_value),
            exclude_cidrs=self.list_of(t, "exclude_cidrs", "intercept.exclude_cidrs", self.cidr),
            ipv4=self.typed(t, "ipv4", "intercept.ipv4", bool, True),
            ipv6=self.typed(t, "ipv6", "intercept.ipv6", bool, True),
        )
        if not intercept.families:
            raise self.error("intercept.ipv6", "ipv4 and ipv6 are both false: nothing would be intercepted")
        if intercept.intercepts(listener.port):
            raise self.error(
                "listener.port",
                f"{listener.port} is inside intercept.ports: the proxy would intercept its own listener",
            )
        if intercept.intercepts_udp(listener.port):
            raise self.error(
                "intercept.udp_ports",
                f"{listener.port} is listener.port: the proxy would intercept its own UDP listener",
            )
        if intercept.udp_ports and mode_v == "nat":
            raise self.error(
                "intercept.udp_ports",
                'UDP needs mode = "tproxy" (REDIRECT rewrites the destination, which a datagram cannot recover)',
            )
        if not listener.is_wildcard:
            other = 6 if listener.address.version == 4 else 4
            if other in intercept.families:
                raise self.error(
                    f"intercept.ipv{other}",
                    f"listener.address {listener.address} is IPv{listener.address.version} only; "
                    f"set ipv{other} = false or listen on a wildcard address",
                )

        t = self.table(top, "routing")
        defaults = attrs.fields(Routing)
        marks = {
            key: self.ranged_int(
                t, key, f"routing.{key}", 1, 2**32 - 1, getattr(defaults, key).default, "a valid fwmark"
            )
            for key in ("mark", "upstream_mark")
        }
        if "mask" in t:
            marks["mask"] = self.ranged_int(t, "mask", "routing.mask", 1, 2**32 - 1, 0, "a valid fwmark mask")
        problem = routing_marks_problem(marks["mark"], marks["upstream_mark"], marks.get("mask", ~0 & 0xFFFFFFFF))
        if problem:
            key, reason = problem
            if key == "routing.upstream_mark" and "upstream_mark" not in t:
                reason += " (it is the default; set routing.upstream_mark to a bit of your own)"
            raise self.error(key, reason)
        routing = Routing(
            **marks,
            table=self.ranged_int(
                t, "table", "routing.table", 1, 2**31 - 1, defaults.table.default, "a routing table id"
            ),
            check_interval=self.positive(
                t, "check_interval", "routing.check_interval", defaults.check_interval.default
            ),
            reinstall=self.typed(t, "reinstall", "routing.reinstall", bool, defaults.reinstall.default),
        )
        if routing.table in (253, 254, 255):
            raise self.error("routing.table", f"{routing.table} is a kernel table (default/main/local); pick another")

        t = self.table(top, "proxy")
        proxy = Proxy(
            preserve_source=self.typed(t, "preserve_source", "proxy.preserve_source", bool, None),
            upstream=self.choice(t, "upstream", "proxy.upstream", UPSTREAMS, _default(Proxy, "upstream")),
            connect_timeout=self.positive(
                t, "connect_timeout", "proxy.connect_timeout", _default(Proxy, "connect_timeout")
            ),
            idle_timeout=self.positive(t, "idle_timeout", "proxy.idle_timeout", _default(Proxy, "idle_timeout")),
            max_connections=self.ranged_int(
                t,
                "max_connections",
                "proxy.max_connections",
                1,
                10_000_000,
                _default(Proxy, "max_connections"),
                "a connection count",
            ),
            shutdown_grace=self.positive(
                t, "shutdown_grace", "proxy.shutdown_grace", _default(Proxy, "shutdown_grace")
            ),
            upstream_ports=self.upstream_ports(t),
            send_proxy_protocol=self.choice(
                t,
                "send_proxy_protocol",
                "proxy.send_proxy_protocol",
                PROXY_PROTOCOL_OUT,
                _default(Proxy, "send_proxy_protocol"),
            ),
            relay=self.choice(t, "relay", "proxy.relay", RELAYS, _default(Proxy, "relay")),
            udp_idle_timeout=self.positive(
                t, "udp_idle_timeout", "proxy.udp_idle_timeout", _default(Proxy, "udp_idle_timeout")
            ),
            udp_max_sessions=self.ranged_int(
                t,
                "udp_max_sessions",
                "proxy.udp_max_sessions",
                1,
                10_000_000,
                _default(Proxy, "udp_max_sessions"),
                "a session count",
            ),
        )

        t = self.table(top, "admin")
        admin = self.admin_address(self.typed(t, "address", "admin.address", str, _default_admin_address()))

        t = self.table(top, "log")
        log = Log(
            level=self.choice(t, "level", "log.level", LOG_LEVELS, _default(Log, "level")),
            format=self.choice(t, "format", "log.format", LOG_FORMATS, _default(Log, "format")),
        )

        t = self.table(top, "privileges")
        privileges = Privileges(
            user=self.typed(t, "user", "privileges.user", str, None) or None,
            group=self.typed(t, "group", "privileges.group", str, None) or None,
        )
        if privileges.group and not privileges.user:
            raise self.error("privileges.group", "set privileges.user too (a group alone drops nothing)")

        return Config(
            mode=mode_v,
            backend=backend_v,
            listener=listener,
            intercept=intercept,
            routing=routing,
            proxy=proxy,
            admin=admin,
            log=log,
            privileges=privileges,
            source=self.source,
            origins=self.origins,
        )

    def proxy_protocol_in(self, table: dict[str, Any]) -> dict[str, Any]:
        """The listener's PROXY protocol keys; a list of trusted sources is required once headers are read."""
        mode = self.choice(
            table, "proxy_protocol", "listener.proxy_protocol", PROXY_PROTOCOL_IN, _default(Listener, "proxy_protocol")
        )
        trusted = self.list_of(table, "proxy_protocol_from", "listener.proxy_protocol_from", self.cidr)
        if mode != "off" and not trusted:
            raise self.error(
                "listener.proxy_protocol_from",
                f'required with proxy_protocol = "{mode}": the load balancers\' addresses (e.g. ["198.18.0.0/24"]); '
                "headers from anyone else are never read",
            )
        timeout = self.positive(
            table,
            "proxy_protocol_timeout",
            "listener.proxy_protocol_timeout",
            _default(Listener, "proxy_protocol_timeout"),
        )
        return {"proxy_protocol": mode, "proxy_protocol_from": trusted, "proxy_protocol_timeout": timeout}

    def upstream_ports(self, table: dict[str, Any]) -> PortRange:
        path = "proxy.upstream_ports"
        if "upstream_ports" not in table:
            return _default(Proxy, "upstream_ports")
        value = table["upstream_ports"]
        if not isinstance(value, str):
            raise self.error(path, f'expected a "lo-hi" string, got {_type_name(value)} {value!r}')
        ports = self.port_value(value, path)
        if ports.hi - ports.lo < 255:
            raise self.error(path, f"{value!r} is too narrow: give the upstream leg at least 256 ports")
        return ports

    def admin_address(self, text: str) -> Admin:
        path = "admin.address"
        if text == "":
            return Admin(host=None)
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise self.error(path, f'{text!r} is not HOST:PORT (e.g. "127.0.0.1:4191", "[::1]:4191", or "")')
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise self.error(path, f"{host!r} is not an IP address") from None
        if not re.fullmatch(r"[0-9]{1,10}", port_s):  # (int() also takes " 80", "+80", "8_0", "٨٠")
            raise self.error(path, f"{port_s!r} is not a port (1-65535)")
        port = int(port_s)
        if not 1 <= port <= 65535:
            raise self.error(path, f"{port} is not a port (1-65535)")
        return Admin(host=host, port=port)
