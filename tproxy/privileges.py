"""Least privilege: the long-running proxy needs CAP_NET_RAW and nothing else.

Rules and routes need CAP_NET_ADMIN; the proxy itself only sets ``IP_TRANSPARENT`` (listener, and upstream sockets
bound to the client's address) and ``SO_MARK``, and the kernel accepts both with CAP_NET_RAW. Two ways to run:

- **privileged parent** (``[privileges] user`` set, started as root): the runner installs rules and routes and binds
  the listeners as root, then :func:`before_serve` forks. The child drops to that user keeping only the capabilities
  the config needs (:func:`required_capabilities`) and serves. The parent stays root: it forwards SIGTERM/SIGINT/SIGHUP
  to the child (on SIGHUP it first moves the rules to the re-read config: :class:`tproxy.reload.ParentReload`),
  watches the rules (tproxy/watch.py) and tells the child what it finds over a pipe, and when the child exits it
  removes the rules and routes and exits with the child's status. The child dies with the parent (PR_SET_PDEATHSIG).
- **split deployment**: ``tproxy rules apply`` as root, then ``tproxy run --no-rules`` started by the operator with only
  CAP_NET_RAW (``setpriv``, systemd ``AmbientCapabilities=``), then ``tproxy rules remove``.
  :func:`check_capabilities` makes a missing capability one clear line at start, never an error per connection.

Capabilities are read from ``/proc/self/status`` and set with a small ctypes binding to ``capset(2)`` and
``prctl(2)`` from libc (no library needing libcap headers to build).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
import select
import signal
import sys
import time
from collections.abc import Iterable
from typing import NoReturn

import attrs

from tproxy import log
from tproxy.config import Config
from tproxy.errors import ConfigError, PrivilegeError, TproxyError

# include/uapi/linux/capability.h, in order (index = capability number).
CAP_NAMES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

# Signals the privileged parent passes on to the proxy.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# In the serving child of a privileged parent: the read end of the parent's rule reports (tproxy/watch.py).
parent_status_fd: int | None = None


def cap_name(cap: int) -> str:
    return CAP_NAMES[cap] if 0 <= cap < len(CAP_NAMES) else f"CAP_{cap}"


def cap_mask(caps: Iterable[int]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def cap_set(mask: int) -> frozenset[int]:
    """The capability numbers in a bit mask (as in ``/proc/<pid>/status``)."""
    return frozenset(i for i in range(mask.bit_length()) if mask >> i & 1)


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set (rules and routes need it)."""
    try:
        return CAP_NET_ADMIN in cap_set(ProcessCredentials.of().effective)
    except (OSError, ValueError):
        return os.geteuid() == 0


def format_caps(caps: Iterable[int]) -> str:
    """``CAP_NET_ADMIN,CAP_NET_RAW``; ``none`` for the empty set."""
    names = [cap_name(c) for c in sorted(caps)]
    return ",".join(names) if names else "none"


@attrs.frozen(kw_only=True)
class ProcessCredentials:
    """What ``/proc/<pid>/status`` says about a process's identity and capability sets (bit masks)."""

    uids: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    inheritable: int
    permitted: int
    effective: int
    bounding: int
    ambient: int
    no_new_privs: bool

    @classmethod
    def parse(cls, status: str) -> ProcessCredentials:
        """Parse the text of ``/proc/<pid>/status``.

        Error handling: a missing or malformed field raises ValueError naming it (kernels without ambient
        capabilities or ``NoNewPrivs`` report 0 for those).
        """
        fields = {}
        for line in status.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()

        def get(key: str, default: str | None = None) -> str:
            if key not in fields:
                if default is None:
                    raise ValueError(f"no {key}: line in process status")
                return default
            return fields[key]

        def ids(key: str) -> tuple[int, int, int, int]:
            parts = get(key).split()
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                raise ValueError(f"bad {key}: line in process status: {get(key)!r}")
            return tuple(int(p) for p in parts)  # type: ignore[return-value]

        def mask(key: str, default: str | None = None) -> int:
            text = get(key, default)
            try:
                return int(text, 16)
            except ValueError:
                raise ValueError(f"bad {key}: line in process status: {text!r}") from None

        return cls(
            uids=ids("Uid"),
            gids=ids("Gid"),
            groups=tuple(int(g) for g in get("Groups", "").split()),
            inheritable=mask("CapInh"),
            permitted=mask("CapPrm"),
            effective=mask("CapEff"),
            bounding=mask("CapBnd"),
            ambient=mask("CapAmb", "0"),
            no_new_privs=get("NoNewPrivs", "0") == "1",
        )

    @classmethod
    def of(cls, pid: int | str = "self") -> ProcessCredentials:
        with open(f"/proc/{pid}/status") as f:
            return cls.parse(f.read())


# ----------------------------------------------------------------------------------------------------------------
# What the config needs


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def required_capabilities(config: Config, *, binds_listener: bool, port_start: int | None = None) -> dict[int, str]:
    """The capabilities the serving process needs, each with the reason (for the operator's error line).

    CAP_NET_RAW for ``IP_TRANSPARENT`` (the tproxy listener; upstream sockets bound to the client's address) and
    ``SO_MARK`` (reply routing of those upstream connections): in tproxy mode, or nat with ``preserve_source``.
    Nothing in nat mode without it. CAP_NET_BIND_SERVICE when a port we bind ourselves is privileged: the admin port
    (bound when serving starts), and the listener's when ``binds_listener`` (it was not bound before a drop).
    """
    need: dict[int, str] = {}
    if config.needs_routing:
        uses = []
        if config.mode == "tproxy" and binds_listener:
            uses.append("IP_TRANSPARENT on the tproxy listener")
        if config.preserve_source:
            uses.append("IP_TRANSPARENT and SO_MARK to connect to the application from the client's address")
        setting = "tproxy mode" if config.mode == "tproxy" else "proxy.preserve_source = true"
        need[CAP_NET_RAW] = f"{setting} sets {' and '.join(uses) or 'IP_TRANSPARENT'}"
    start = _unprivileged_port_start() if port_start is None else port_start
    low = []
    if binds_listener and config.listener.port < start:
        low.append(f"listener.port {config.listener.port}")
    if config.admin.enabled and config.admin.port < start:
        low.append(f"admin.address port {config.admin.port}")
    if low:
        need[CAP_NET_BIND_SERVICE] = f"binding {' and '.join(low)} (below net.ipv4.ip_unprivileged_port_start={start})"
    return need


def check_capabilities(config: Config, *, manage_rules: bool, effective: int | None = None) -> None:
    """Fail at start, with one line, when this process lacks a capability it will need.

    Call it first thing in ``tproxy run`` (before installing rules or binding), so a missing capability is one
    clear error and exit status 1, never a failure per connection. ``effective`` (a bit mask) defaults to this
    process's effective set.

    Error handling: raises :class:`PrivilegeError` naming the first missing capability, why it is needed and how to
    grant it; :class:`ConfigError` for an unknown ``privileges.user`` or ``group`` (before any rule goes in).
    """
    if config.privileges.user is not None:
        resolve_identity(config)
    if effective is None:
        needed = set(required_capabilities(config, binds_listener=True)) | ({CAP_NET_ADMIN} if manage_rules else set())
        raise_permitted(needed)
    have = cap_set(ProcessCredentials.of().effective if effective is None else effective)
    if manage_rules and CAP_NET_ADMIN not in have:
        raise PrivilegeError(
            "missing CAP_NET_ADMIN: installing the interception rules and routes needs it; run as root, or apply them "
            "with `tproxy rules apply` as root and start the proxy with `tproxy run --no-rules`"
        )
    for cap, why in required_capabilities(config, binds_listener=True).items():
        if cap not in have:
            raise PrivilegeError(
                f"missing {cap_name(cap)}: {why}; grant it, e.g. "
                f"`setpriv --inh-caps=+{cap_name(cap)[4:].lower()} --ambient-caps=+{cap_name(cap)[4:].lower()} ...` "
                f"or systemd AmbientCapabilities={cap_name(cap)}"
            )


def raise_permitted(caps: Iterable[int]) -> frozenset[int]:
    """Make those of ``caps`` that are permitted but not effective effective; returns the ones raised.

    Why: an interpreter with file capabilities in its permitted set only (``setcap cap_net_raw+p``, the container
    image) starts with them permitted and not effective. Without the effective bit on the file, the kernel still runs
    the interpreter where the capability is not in the bounding set (it refuses an effective-bit file there), so the
    same image serves a pod with NET_RAW and one with none. Nothing outside the permitted set can be gained.

    Error handling: :class:`PrivilegeError` if capset(2) refuses (it does not for a subset of the permitted set).
    """
    now = ProcessCredentials.of()
    want = cap_mask(caps) & now.permitted & ~now.effective
    if want:
        _capset(effective=now.effective | want, permitted=now.permitted, inheritable=now.inheritable)
    return cap_set(want)


# ----------------------------------------------------------------------------------------------------------------
# Users


@attrs.frozen(kw_only=True)
class Identity:
    user: str
    uid: int
    gid: int


def resolve_identity(config: Config) -> Identity:
    """Look up ``privileges.user`` (name or number) and ``privileges.group`` (default: the user's primary group).

    Error handling: an unknown user or group raises :class:`ConfigError` naming the key; so does uid 0 (dropping to
    root drops nothing).
    """
    user, group = config.privileges.user, config.privileges.group
    if user is None:
        raise ValueError("privileges.user is not set")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise ConfigError(*config.where("privileges.user"), f"no such user {user!r}") from None
        uid, gid = int(user), None
    else:
        uid, gid = pw.pw_uid, pw.pw_gid
    if uid == 0:
        raise ConfigError(*config.where("privileges.user"), f"{user!r} is root: that drops nothing")
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise ConfigError(*config.where("privileges.group"), f"no such group {group!r}") from None
            gid = int(group)
    if gid is None:
        raise ConfigError(
            *config.where("privileges.group"), f"uid {uid} has no passwd entry: set privileges.group as well"
        )
    return Identity(user=user, uid=uid, gid=gid)


# ----------------------------------------------------------------------------------------------------------------
# The kernel interface: capset(2) and prctl(2) through libc


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what} failed: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, what: str = "prctl") -> None:
    ulong = ctypes.c_ulong
    _check(_libc.prctl(ctypes.c_int(option), ulong(arg2), ulong(0), ulong(0), ulong(0)), what)


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def drop_privileges(identity: Identity, keep: Iterable[int]) -> ProcessCredentials:
    """Become ``identity`` keeping exactly ``keep`` as permitted and effective capabilities; irreversible.

    Runs as root. The bounding set is reduced to ``keep`` too, inheritable and ambient sets are cleared, supplementary
    groups become just the group, and ``no_new_privs`` is set, so nothing this process executes can regain anything.

    Error handling: any failed step, or a result that differs from the request when read back from
    ``/proc/self/status``, raises :class:`PrivilegeError`; the caller must then not serve.
    """
    keep_mask = cap_mask(keep)
    for cap in range(_last_cap() + 1):
        if not keep_mask >> cap & 1:
            _prctl(PR_CAPBSET_DROP, cap, f"dropping {cap_name(cap)} from the bounding set")
    _prctl(PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    try:
        os.setgroups([identity.gid])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot become uid {identity.uid} gid {identity.gid}: {e.strerror}") from None
    _capset(effective=keep_mask, permitted=keep_mask, inheritable=0)
    _prctl(PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")

    now = ProcessCredentials.of()
    want_ids = (identity.uid,) * 4, (identity.gid,) * 4, (identity.gid,)
    got_ids = now.uids, now.gids, now.groups
    caps = (now.effective, now.permitted, now.inheritable, now.ambient, now.bounding)
    if got_ids != want_ids or caps != (keep_mask, keep_mask, 0, 0, keep_mask) or not now.no_new_privs:
        raise PrivilegeError(f"privilege drop did not take: now uid/gid/groups {got_ids}, capabilities {caps}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("privilege drop did not take: setuid(0) still succeeds")
    return now


# ----------------------------------------------------------------------------------------------------------------
# The hook the runner calls


def before_serve(config: Config, sockets: Iterable[object], *, manage_rules: bool) -> bool:
    """Drop privileges if ``privileges.user`` is set and we are root; called after rules and listeners are set up.

    Returns whether this process still owns the rules and routes (the runner removes them at the end only then).

    - No ``privileges.user``, or not root (already unprivileged, e.g. a split deployment): nothing to do.
    - ``manage_rules`` false (rules belong to a separate step): drop in place, no fork.
    - Otherwise fork. The child drops privileges, sets PR_SET_PDEATHSIG and returns False: serving is all it does
      (the parent's rule reports arrive on :data:`parent_status_fd`). The parent never returns: it closes its copies
      of ``sockets`` (a listener nobody accepts on would swallow connections), forwards SIGTERM/SIGINT/SIGHUP to the
      child, watches the rules until the child exits, removes the rules and routes and exits with its status.

    Error handling: an unknown user or group is a :class:`ConfigError` raised before anything forks; a failed drop is a
    :class:`PrivilegeError` in the child (its exit status 1 then becomes the parent's, after the rules are removed).
    """
    if config.privileges.user is None or os.geteuid() != 0:
        return manage_rules
    identity = resolve_identity(config)
    keep = required_capabilities(config, binds_listener=False)
    if not manage_rules:
        _drop(identity, keep)
        return False

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        global parent_status_fd
        os.close(status_w)
        parent_status_fd = status_r
        _child(identity, keep, old_mask, parent)
        return False
    os.close(status_r)
    _supervise(config, pid, sockets, status_w)


def _drop(identity: Identity, keep: dict[int, str]) -> None:
    drop_privileges(identity, keep)
    log.event("privileges_dropped", user=identity.user, uid=identity.uid, gid=identity.gid, caps=format_caps(keep))


def _child(identity: Identity, keep: dict[int, str], old_mask: Iterable[int], parent: int) -> None:
    """The proxy side of the fork: its own process group (a terminal's Ctrl-C reaches it once, through the parent),
    then the drop. It never returns with privileges: any failure ends it here, leaving the rules to the parent.

    Then PR_SET_PDEATHSIG (SIGTERM: the proxy drains and stops) — after the drop, since the kernel clears it when the
    uid changes — so a parent killed outright never leaves a proxy serving with no one to remove the rules; and a
    parent that died before that is caught by its pid."""
    try:
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        _drop(identity, keep)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, "PR_SET_PDEATHSIG")
        if os.getppid() != parent:
            raise PrivilegeError("the privileged parent exited before the proxy started; not serving")
    except BaseException as e:
        print(
            f"tproxy: {e}" if isinstance(e, TproxyError) else f"tproxy: privilege drop failed: {e!r}", file=sys.stderr
        )
        sys.stderr.flush()
        os._exit(1)


def _supervise(config: Config, child: int, sockets: Iterable[object], status_w: int) -> NoReturn:
    """The privileged parent: forward signals, watch the rules (tproxy/watch.py: every ``routing.check_interval``
    seconds and on SIGHUP, reporting to the child over ``status_w``) until the child exits, then remove the rules and
    routes and exit with the child's status.

    Signal handlers only forward or take note; the SIGHUP reload and the checks run in the loop, one at a time."""
    for sock in sockets:
        sock.close()  # type: ignore[attr-defined]
    from tproxy import watch
    from tproxy.reload import ParentReload

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    on_hup = ParentReload(config, lambda: forward(signal.SIGHUP, None), child=child)  # moves the rules, forwards
    hups: list[int] = []
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, (lambda signum, _frame: hups.append(signum)) if sig == signal.SIGHUP else forward)
    pidfd = os.pidfd_open(child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    log.event("supervising", pid=os.getpid(), proxy_pid=child)

    reporter = watch.PipeReporter(status_w)
    next_check = time.monotonic() + on_hup.config.routing.check_interval
    while True:
        ready, _, _ = select.select([pidfd, wake_r], [], [], max(0.0, next_check - time.monotonic()))
        if pidfd in ready:
            break
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 4096)
        due = time.monotonic() >= next_check
        if hups:
            hups.clear()
            on_hup(signal.SIGHUP, None)
            due = True
        if due:
            try:
                reporter.send(watch.check(on_hup.config, reporter.send))
            except Exception as e:  # noqa: BLE001 - the parent must go on supervising; say why, try again
                log.event("rules_check_failed", logging.ERROR, error=str(e) if isinstance(e, TproxyError) else repr(e))
            next_check = time.monotonic() + on_hup.config.routing.check_interval

    _, status = os.waitpid(child, 0)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # nothing left to forward to; removing the rules is not interruptible
    signal.set_wakeup_fd(-1)
    os.close(status_w)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        log.event("proxy_killed", logging.WARNING, proxy_pid=child, signal=signal.Signals(-code).name)
        code = 128 - code
    try:
        from tproxy import rules

        log.event("stop", removed=rules.uninstall(on_hup.config), proxy_status=code)
    except Exception as e:
        print(
            f"tproxy: {e}" if isinstance(e, TproxyError) else f"tproxy: removing the rules failed: {e!r}",
            file=sys.stderr,
        )
        code = code or 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
