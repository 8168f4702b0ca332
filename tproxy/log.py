"""Logging: one line per event, text or JSON (``log.format``), on stderr.

Every line is an *event* with fields. The stable keys of the per-connection line are ``event`` (``"connection"``),
``client``, ``original_dst``, ``upstream_src``, ``bytes_in``, ``bytes_out``, ``duration_ms`` and ``outcome``;
``start`` and ``stop`` lines say what was installed and removed. Text lines are ``TIME LEVEL EVENT key=value ...``
(values with spaces are quoted); JSON lines are one object with ``ts``, ``level``, ``event`` and the fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

LOGGER_NAME = "tproxy"
logger = logging.getLogger(LOGGER_NAME)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_ts_second = [-1, ""]  # the last whole second formatted, and its "YYYY-MM-DDTHH:MM:SS." prefix


def _timestamp(created: float) -> str:
    second = int(created)
    if second != _ts_second[0]:
        t = time.gmtime(second)
        _ts_second[1] = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        _ts_second[0] = second
    return f"{_ts_second[1]}{int((created - second) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    fields = getattr(record, "fields", None)
    if fields is None:  # a plain logger.warning("...") from anywhere
        return "message", {"message": record.getMessage()}
    return record.getMessage(), fields


_NEEDS_QUOTES = re.compile(r'[ "=\n\t]').search


def _text_value(value: Any) -> str:
    s = value if type(value) is str else str(value)
    if not s or _NEEDS_QUOTES(s) is not None:
        return json.dumps(s)
    return s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        parts = [_timestamp(record.created), record.levelname.lower(), event]
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        doc = {"ts": _timestamp(record.created), "level": record.levelname.lower(), "event": event}
        doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


# (handler, stream, json?) of the handler installed by setup(): the per-connection line is written to it directly,
# without a LogRecord (a measurable share of a short connection's CPU), as long as it is the logger's only handler.
_direct: tuple[logging.Handler, Any, bool] | None = None


def setup(level: str = "info", fmt: str = "text", stream: Any = None) -> logging.Logger:
    """Configure the ``tproxy`` logger (idempotent: replaces its handler). Returns it."""
    global _direct
    flush()  # (lines held back go to the handler they were written for)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(handler)
    logger.setLevel(_LEVELS[level])
    logger.propagate = False
    _direct = (handler, handler.stream, fmt == "json")
    return logger


def event(name: str, level: int = logging.INFO, exc_info: Any = None, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (in order) at ``level``."""
    if logger.isEnabledFor(level):
        if _held:
            flush()  # (connection lines held back come first: lines stay in order)
        logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


# Connection lines written but not flushed yet (see hold()): one write(2) for all the connections that end in one
# turn of the event loop, instead of one per connection (a syscall, and a wakeup of whoever reads the log, each).
_held: list[str] = []
_holding = 0  # how many hold(True) are in force (one per running server)
HOLD_LINES = 256  # flushed at once when this many are held


def hold(on: bool) -> None:
    """While on, :func:`connection` holds its lines back until :func:`flush`. The caller (the server) flushes
    whenever it is about to wait, so a line is never held for longer than one turn of the event loop. Calls nest
    (``hold(True)`` ... ``hold(False)``); the last ``hold(False)`` flushes."""
    global _holding
    _holding = max(0, _holding + (1 if on else -1))
    if not _holding:
        flush()


def flush() -> None:
    """Write the connection lines held back (one write)."""
    if not _held:
        return
    text = "\n".join(_held) + "\n"
    _held.clear()
    direct = _direct
    if direct is None:
        return
    try:
        direct[1].write(text)
        direct[1].flush()
    except (OSError, ValueError):
        pass  # like logging: a broken log stream never stops the proxy


def addr(a: tuple[str, int] | None) -> str:
    """``host:port``, IPv6 in brackets; ``-`` for none."""
    if a is None:
        return "-"
    host = a[0]
    return f"[{host}]:{a[1]}" if ":" in host else f"{host}:{a[1]}"


def connection(
    client: tuple[str, int] | None,
    original_dst: tuple[str, int] | None,
    upstream_src: tuple[str, int] | None,
    bytes_in: int,
    bytes_out: int,
    duration: float,
    outcome: str,
    **extra: Any,
) -> None:
    """The line logged when a connection ends (``duration`` in seconds). Formats nothing when info is off."""
    if not logger.isEnabledFor(logging.INFO):
        return
    direct = _direct
    handlers = logger.handlers
    if direct is not None and not direct[2] and len(handlers) == 1 and handlers[0] is direct[0]:
        # the text line of the common case, formatted at once: addresses, numbers and outcomes never need quotes
        line = (
            f"{_timestamp(time.time())} info connection client={addr(client)} original_dst={addr(original_dst)} "
            f"upstream_src={addr(upstream_src)} bytes_in={bytes_in} bytes_out={bytes_out} "
            f"duration_ms={round(duration * 1000, 1)} outcome={_text_value(outcome)}"
        )
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        _write(line)
        return
    fields = {
        "client": addr(client),
        "original_dst": addr(original_dst),
        "upstream_src": addr(upstream_src),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(duration * 1000, 1),
        "outcome": outcome,
    }
    if extra:
        fields.update(extra)
    direct = _direct
    handlers = logger.handlers
    if direct is None or len(handlers) != 1 or handlers[0] is not direct[0]:
        logger.info("connection", extra={"fields": fields})
        return
    ts = _timestamp(time.time())
    if direct[2]:
        doc = {"ts": ts, "level": "info", "event": "connection"}
        doc.update(fields)
        line = json.dumps(doc, default=str, separators=(",", ":"))
    else:
        line = f"{ts} info connection " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    _write(line)


def _write(line: str) -> None:
    """Write one connection line: now, or held back until :func:`flush` (:func:`hold`)."""
    if _holding:
        _held.append(line)
        if len(_held) >= HOLD_LINES:
            flush()
        return
    try:
        direct = _direct
        direct[1].write(line + "\n")
        direct[1].flush()
    except (OSError, ValueError):
        pass  # like logging: a broken log stream never stops the proxy
