"""Logging: one line per event, text or JSON (``log.format``), on stderr.

Every line is an *event* with fields. The stable keys of the per-connection line are ``event`` (``"connection"``),
``client``, ``original_dst``, ``upstream_src``, ``bytes_in``, ``bytes_out``, ``duration_ms`` and ``outcome``;
``start`` and ``stop`` lines say what was installed and removed. Text lines are ``TIME LEVEL EVENT key=value ...``
(values with spaces are quoted); JSON lines are one object with ``ts``, ``level``, ``event`` and the fields.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import trio

LOGGER_NAME = "tproxy"
logger = logging.getLogger(LOGGER_NAME)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_ts_second = [-1, ""]  # the last whole second formatted, and its "YYYY-MM-DDTHH:MM:SS." prefix
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # (a lookup instead of a format per line)


def _timestamp(created: float) -> str:
    second = int(created)
    if second != _ts_second[0]:
        t = time.gmtime(second)
        _ts_second[1] = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        _ts_second[0] = second
    return _ts_second[1] + _MILLIS[int((created - second) * 1000)]


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    fields = getattr(record, "fields", None)
    if fields is None:  # a plain logger.warning("...") from anywhere
        return "message", {"message": record.getMessage()}
    return record.getMessage(), fields


_NEEDS_QUOTES = re.compile(r'[ "=\n\t]').search
_OUTCOMES = frozenset(("ok", "reset", "refused", "timeout", "idle", "cancelled"))  # (words: never quoted)


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
    """Configure the ``tproxy`` logger (idempotent: replaces its handler). Returns it. Inside :func:`threaded`,
    stderr stays behind the log writer thread."""
    global _direct
    flush()  # (lines held back go to the handler they were written for)
    if stream is None:
        stream = _writer if _writer is not None else sys.stderr
    if isinstance(stream, _QueueWriter):
        stream.json = fmt == "json"
    handler = logging.StreamHandler(stream)
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


class _FlushBeforeWait(trio.abc.Instrument):
    """Flushes the held lines each time the trio run loop is about to wait for I/O: once per turn of the loop."""

    def before_io_wait(self, timeout: float) -> None:
        if _held:
            flush()


def hold_until_idle() -> trio.abc.Instrument:
    """Inside a trio run: hold connection lines back (:func:`hold`) and flush them once per turn of the event loop,
    just before it waits (a trio instrument). Undo with :func:`release`."""
    hold(True)
    instrument = _FlushBeforeWait()
    trio.lowlevel.add_instrument(instrument)
    return instrument


def release(instrument: trio.abc.Instrument) -> None:
    """Undo :func:`hold_until_idle` (the last release flushes)."""
    with contextlib.suppress(KeyError, RuntimeError):
        trio.lowlevel.remove_instrument(instrument)
    hold(False)


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
        if outcome not in _OUTCOMES:
            outcome = _text_value(outcome)
        ms = duration * 1000
        ms_text = f"{ms:.1f}" if 0 <= ms < 1e15 else round(ms, 1)  # (what str(round(ms, 1)) writes, in half the time)
        line = (
            f"{_timestamp(time.time())} info connection client={addr(client)} original_dst={addr(original_dst)} "
            f"upstream_src={addr(upstream_src)} bytes_in={bytes_in} bytes_out={bytes_out} "
            f"duration_ms={ms_text} outcome={outcome}"
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


# -- the log writer thread: a slow reader of stderr (journald back-pressure, a full pipe) never stalls the proxy

MAX_QUEUED_LINES = 10_000  # lines waiting for the writer thread; more are dropped (and counted)
WRITER_STOP_WAIT = 2.0  # seconds :func:`threaded` waits for the writer to finish the queue at the end
WRITER_BATCH_DELAY = 0.01  # seconds the writer lets lines gather after a wakeup (the most a line waits for it)

_writer: _QueueWriter | None = None


class _QueueWriter:
    """A file-like stream whose writes go to a bounded queue that one thread drains into the real stream, in order.

    ``write`` never blocks and takes no lock: it appends to a deque and, when the deque was empty, wakes the
    thread, which then waits :data:`WRITER_BATCH_DELAY` for more and writes everything queued in one write (at most
    about one wakeup and one write(2) per batch delay, however many lines). Beyond ``max_lines`` waiting, the text
    is dropped and counted (``dropped``, and ``stats.log_dropped`` when given); once there is room again a line says
    how many were dropped. ``queued`` is only written by the writing side and ``written`` only by the thread, so
    their difference is the backlog without a lock.
    """

    def __init__(self, stream: Any, max_lines: int, stats: Any, json_format: bool) -> None:
        self.stream = stream
        self.max_lines = max_lines
        self.stats = stats
        self.json = json_format
        self.texts: collections.deque[str] = collections.deque()
        self.wake = threading.Event()
        self.stopping = False
        self.queued = 0  # lines queued, ever
        self.written = 0  # lines written (or lost to a broken stream), ever
        self.dropped = 0
        self.unreported = 0  # dropped since the last "log_lines_dropped" line
        self.thread = threading.Thread(target=self._run, name="tproxy-log-writer", daemon=True)
        self.thread.start()

    def write(self, text: str) -> int:
        n = text.count("\n") or 1
        if self.queued - self.written + n > self.max_lines:
            self.dropped += n
            self.unreported += n
            if self.stats is not None:
                self.stats.log_dropped += n
            return len(text)
        if self.unreported:
            text = self._dropped_line(self.unreported) + text
            self.unreported = 0
            n += 1
        texts = self.texts
        was_empty = not texts
        texts.append(text)
        self.queued += n
        if was_empty:
            self.wake.set()
        return len(text)

    def flush(self) -> None:
        pass  # the thread flushes after every write

    def _dropped_line(self, count: int) -> str:
        ts = _timestamp(time.time())
        if self.json:
            doc = {"ts": ts, "level": "warning", "event": "log_lines_dropped", "count": count}
            return json.dumps(doc, separators=(",", ":")) + "\n"
        return f'{ts} warning log_lines_dropped count={count} reason="log output too slow"\n'

    def _run(self) -> None:
        texts = self.texts
        while True:
            self.wake.wait()
            self.wake.clear()
            if not self.stopping:
                time.sleep(WRITER_BATCH_DELAY)  # (let a batch gather: one write for many turns of the loop)
            batch = []
            while texts:
                batch.append(texts.popleft())
            if batch:
                text = "".join(batch)
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # like logging: a broken log stream never stops the proxy
                self.written += text.count("\n")
            elif self.stopping:
                return

    def close(self, wait: float) -> bool:
        """Stop after the lines queued so far; True when they were all written within ``wait`` seconds."""
        self.stopping = True
        self.wake.set()
        self.thread.join(wait)
        return not self.thread.is_alive()


@contextlib.contextmanager
def threaded(stats: Any = None, *, max_lines: int = MAX_QUEUED_LINES) -> Iterator[Any]:
    """While in the block, every line of the ``tproxy`` logger is written by a thread of its own from a bounded
    queue (see :class:`_QueueWriter`), so a slow or stuck reader of the log never stalls the event loop; lines
    beyond ``max_lines`` waiting are dropped and counted in ``stats.log_dropped``. Order is kept.

    Resource handling: a thread does not survive ``fork()``: enter this in the process that serves, after any fork,
    and leave it last (after the final lines): leaving waits up to :data:`WRITER_STOP_WAIT` seconds for the queue
    to be written, then writes directly again."""
    global _writer, _direct
    direct = _direct
    if direct is None or _writer is not None:
        yield _writer
        return
    handler, stream, json_format = direct
    flush()
    writer = _QueueWriter(stream, max_lines, stats, json_format)
    handler.setStream(writer)
    _writer, _direct = writer, (handler, writer, json_format)
    try:
        yield writer
    finally:
        flush()
        _writer = None
        current = _direct
        if current is not None and current[1] is writer:  # (a reload's setup() made a handler on the writer)
            current[0].setStream(stream)
            _direct = (current[0], stream, current[2])
        writer.close(WRITER_STOP_WAIT)
