"""State that must survive across processes, in ``/run/tproxy``: what an install changed, for the removal to undo.

Root reads these files and acts on them (``tproxy rules remove`` writes the sysctl values they hold, to the paths
they name), so nothing read here is trusted:

- the directory is created ``0700`` and owned by root; a directory or file that is a symbolic link, is not owned by
  root or is writable by group or others is refused (a proxy user able to write here could make root write anything
  anywhere);
- files are opened with ``O_NOFOLLOW`` and written to a fresh temporary file (``O_CREAT | O_EXCL | O_NOFOLLOW``,
  mode 0600) that is then renamed over the old one;
- a sysctl a file names must be ``/proc/sys/net/ipv4/conf/<iface>/route_localnet`` with a small integer value
  (:func:`sysctls`): the only sysctl tproxy ever changes;
- malformed JSON, or JSON of the wrong shape, is an operator error naming the file, never a traceback;
- files are named by the namespace's inode, which the kernel gives to a new namespace once the old one is freed: each
  file also holds the namespace's cookie (``SO_NETNS_COOKIE``, never reused), and a file with another namespace's
  cookie is no state of this one (one without a cookie, from an older tproxy or kernel, is taken as this one's).

Error handling: every refusal raises :class:`~tproxy.errors.StateError` (exit status 1): one line naming the path
and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from tproxy.errors import StateError

STATE_DIR = Path("/run/tproxy")
SYSCTL_ROOT = "/proc/sys"
_IFACE = r"(?!\.\.?/)[^/\x00]{1,15}"  # a Linux interface name: 1-15 bytes, no slash, not "." or ".."
_SYSCTL_RE = re.compile(rf"^{re.escape(SYSCTL_ROOT)}/net/ipv4/conf/{_IFACE}/route_localnet$")
_VALUE_RE = re.compile(r"^-?[0-9]{1,10}$")


def netns_id() -> int:
    """The identity of the current network namespace (inode of /proc/self/ns/net)."""
    return os.stat("/proc/self/ns/net").st_ino


def state_path(kind: str, *key: object) -> Path:
    """``/run/tproxy/<kind>-netns<inode>[-<key>...].json``: one file per namespace (and config key)."""
    return STATE_DIR / ("-".join([kind, f"netns{netns_id()}", *(str(k) for k in key)]) + ".json")


def _refuse_stat(path: Path, st: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path}: is a symbolic link; refusing to use it as tproxy's state {what}")
    if st.st_uid != 0:
        raise StateError(f"{path}: owned by uid {st.st_uid}, not root; refusing to trust tproxy's state {what}")
    if st.st_mode & 0o022:
        raise StateError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust "
            f"tproxy's state {what} (chmod go-w, or remove it)"
        )


def check_dir(path: Path | None = None) -> bool:
    """Whether the state directory exists; raise :class:`StateError` when it exists but cannot be trusted."""
    path = STATE_DIR if path is None else path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    _refuse_stat(path, st, "directory")
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{path}: not a directory; refusing to use it as tproxy's state directory")
    return True


def ensure_dir() -> Path:
    """Create the state directory (0700, root) if needed and return it, once it is known to be trustworthy."""
    if not check_dir():
        STATE_DIR.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(STATE_DIR, 0o700)  # the umask can only remove bits
        check_dir()
    return STATE_DIR


def load_state(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file (or no state directory), or when another
    namespace wrote it (its ``netns_cookie`` is not this namespace's).

    Error handling: :class:`StateError` for a symbolic link, a file (or directory) not owned by root or writable by
    group or others, something that is not a regular file, malformed JSON or JSON that is not an object.
    """
    if not check_dir(path.parent):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if os.path.islink(path):
            raise StateError(f"{path}: is a symbolic link; refusing to use it as tproxy's state file") from None
        raise StateError(f"{path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _refuse_stat(path, st, "file")
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"{path}: not a regular file; refusing to use it as tproxy's state file")
        raw = f.read(1 << 20)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StateError(f"{path}: not valid JSON ({e}); check what it says, then remove it") from None
    if not isinstance(data, dict):
        raise StateError(f"{path}: not a JSON object; check what it says, then remove it")
    cookie = data.get("netns_cookie")
    if isinstance(cookie, int) and not isinstance(cookie, bool):
        current = _netns_cookie()
        if current is not None and cookie != current:
            return None  # left by a namespace that had this one's inode before (inodes are reused, cookies never)
    return data


def _netns_cookie() -> int | None:
    from tproxy.sockets import netns_cookie  # (sockets imports the config; state is imported early)

    return netns_cookie()


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a fresh temporary file (never following a link), then a rename. The
    file holds the namespace's cookie (``netns_cookie``): :func:`load_state` ignores a file another namespace wrote
    under the same inode."""
    ensure_dir()
    check_dir(path.parent)
    cookie = _netns_cookie()
    if cookie is not None:
        state = {**state, "netns_cookie": cookie}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a process of ours with the same pid that died half-way
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"{tmp}: cannot create: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def drop_state(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def forget_netns(inode: int) -> list[Path]:
    """Remove every state file of the network namespace with this inode (:func:`state_path`); returns them. For
    whoever deletes a namespace it created: the files describe nothing once it is gone, and the kernel gives its
    inode to the next namespace."""
    if not check_dir():
        return []
    paths = [*STATE_DIR.glob(f"*-netns{inode}.json"), *STATE_DIR.glob(f"*-netns{inode}-*.json")]
    for path in paths:
        drop_state(path)
    return paths


def sysctls(state: dict[str, Any], path: Path) -> dict[str, str]:
    """The ``sysctls`` entry of a state file (sysctl path -> value to restore), each checked.

    Error handling: :class:`StateError` naming the file for a path other than
    ``/proc/sys/net/ipv4/conf/<iface>/route_localnet`` or a value that is not a small integer.
    """
    entries = state.get("sysctls", {})
    if not isinstance(entries, dict):
        raise StateError(f"{path}: sysctls: not a JSON object; check what it says, then remove it")
    for key, value in entries.items():
        if not _SYSCTL_RE.match(key) or ".." in key.split("/"):
            raise StateError(
                f"{path}: sysctls: {key!r} is not a {SYSCTL_ROOT}/net/ipv4/conf/<interface>/route_localnet path; "
                "refusing to write it"
            )
        if not isinstance(value, str) or not _VALUE_RE.match(value):
            raise StateError(f"{path}: sysctls: {key}: {value!r} is not an integer value; refusing to write it")
    return dict(entries)
