"""tproxy/log.py beyond the line shapes (tests/test_log_json.py): quoting, exceptions, other modules' loggers,
re-configuration, and that nothing is formatted when the level is off."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time

import pytest
import trio

from tproxy import log
from tproxy.stats import Stats


@pytest.fixture
def buf():
    b = io.StringIO()
    yield b
    log.setup("info", "text")


def test_text_values_with_spaces_quotes_or_newlines_are_quoted(buf):
    log.setup("info", "text", stream=buf)
    log.event("x", plain="a:b", spaced="a b", quoted='say "hi"', empty="", multi="1\n2")
    line = buf.getvalue()
    assert line.count("\n") == 1
    assert line.rstrip("\n").split(" ", 3)[3] == ('plain=a:b spaced="a b" quoted="say \\"hi\\"" empty="" multi="1\\n2"')


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_exceptions_are_kept_with_their_event(buf, fmt):
    log.setup("info", fmt, stream=buf)
    try:
        raise ValueError("boom")
    except ValueError as e:
        log.event("connection_error", logging.ERROR, exc_info=e, client="198.18.0.1:1")
    text = buf.getvalue()
    assert "ValueError: boom" in text
    if fmt == "json":
        doc = json.loads(text)
        assert doc["event"] == "connection_error" and "ValueError: boom" in doc["exception"]


def test_child_loggers_of_other_modules_use_the_same_format(buf):
    log.setup("info", "json", stream=buf)
    logging.getLogger("tproxy.privileges").info("dropped privileges: now user %s", "nobody")
    doc = json.loads(buf.getvalue())
    assert doc["event"] == "message" and doc["message"] == "dropped privileges: now user nobody"


def test_setup_twice_replaces_the_handler(buf):
    log.setup("info", "text", stream=io.StringIO())
    log.setup("debug", "json", stream=buf)
    log.event("once", logging.DEBUG)
    assert [json.loads(line)["event"] for line in buf.getvalue().splitlines()] == ["once"]
    assert len(logging.getLogger(log.LOGGER_NAME).handlers) == 1


def test_nothing_is_formatted_below_the_level(buf):
    class Loud:
        def __str__(self):
            raise AssertionError("formatted although the level is off")

    log.setup("warning", "text", stream=buf)
    log.connection(("198.18.0.1", 1), ("198.18.0.2", 2), None, 0, 0, 0, "ok", extra=Loud())
    log.event("debugging", logging.DEBUG, value=Loud())
    assert buf.getvalue() == ""


def test_addresses():
    assert log.addr(("198.18.0.1", 80)) == "198.18.0.1:80"
    assert log.addr(("fd00::1", 80)) == "[fd00::1]:80"
    assert log.addr(None) == "-"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_connection_line_is_what_the_formatter_writes(buf, fmt):
    # the per-connection line skips the logging machinery when our handler is the only one: same bytes either way
    args = (("fd00::1", 40000), ("198.18.0.2", 8080), None, 10, 32, 0.25, "reset")
    log.setup("info", fmt, stream=buf)
    log.connection(*args, error="ECONNRESET by peer")
    direct = buf.getvalue()
    logging.getLogger(log.LOGGER_NAME).addHandler(logging.NullHandler())  # two handlers: the ordinary path
    try:
        log.connection(*args, error="ECONNRESET by peer")
    finally:
        logging.getLogger(log.LOGGER_NAME).handlers.pop()
    via_logging = buf.getvalue()[len(direct) :]

    def strip_ts(line: str) -> str:
        return line.split(" ", 1)[1] if fmt == "text" else json.dumps({**json.loads(line), "ts": None})

    assert strip_ts(direct) == strip_ts(via_logging)
    assert via_logging.count("\n") == 1


@pytest.mark.parametrize("duration", [0.0, 0.00005, 0.00015, 0.0012345, 0.25, 3.999951, 86400.123456, 1e13])
@pytest.mark.parametrize("outcome", ["ok", "idle", "cancelled", "not a word"])
def test_direct_line_writes_duration_and_outcome_as_the_formatter_does(buf, duration, outcome):
    # the direct text line formats the duration with ":.1f" (and leaves known outcomes unquoted): the same text
    args = (("198.18.0.1", 40000), ("198.18.0.2", 8080), ("198.18.0.1", 2000), 1, 2, duration, outcome)
    log.setup("info", "text", stream=buf)
    log.connection(*args)
    direct = buf.getvalue()
    logging.getLogger(log.LOGGER_NAME).addHandler(logging.NullHandler())  # two handlers: the ordinary path
    try:
        log.connection(*args)
    finally:
        logging.getLogger(log.LOGGER_NAME).handlers.pop()
    via_logging = buf.getvalue()[len(direct) :]
    assert direct.split(" ", 1)[1] == via_logging.split(" ", 1)[1]
    assert f"duration_ms={round(duration * 1000, 1)} " in direct


def test_timestamps_are_utc_with_milliseconds_truncated():
    now = time.time()
    for t in [now, now + 0.0004, now + 0.9996, float(int(now)), float(int(now)) + 1 - 2**-22, 0.0, 1e9 + 0.001]:
        second = int(t)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)) + f"{int((t - second) * 1000):03d}Z"
        assert log._timestamp(t) == expected


class CountingStream(io.StringIO):
    """A stream that counts its writes (one write(2) each on a real file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_held_connection_lines_are_written_together_and_in_order():
    stream = CountingStream()
    log.setup("info", "text", stream=stream)
    try:
        log.hold(True)
        log.hold(True)  # a second server in the same process
        for port in (1, 2, 3):
            log.connection(("198.18.0.1", port), ("198.18.0.2", 80), None, 0, 0, 0, "ok")
        assert stream.getvalue() == "" and stream.writes == 0  # held until the server's turn ends
        log.event("reload", ok=True)  # another event: the held lines go first
        lines = stream.getvalue().splitlines()
        assert [ln.split()[2] for ln in lines] == ["connection"] * 3 + ["reload"]
        assert [ln.split()[3] for ln in lines[:3]] == [f"client=198.18.0.1:{p}" for p in (1, 2, 3)]
        assert stream.writes == 2  # the three held lines in one write, then the event
        log.connection(("198.18.0.1", 4), ("198.18.0.2", 80), None, 0, 0, 0, "ok")
        log.hold(False)
        assert "198.18.0.1:4" not in stream.getvalue()  # the other server still holds
        log.flush()
        assert stream.getvalue().splitlines()[-1].split()[3] == "client=198.18.0.1:4"
        log.connection(("198.18.0.1", 5), ("198.18.0.2", 80), None, 0, 0, 0, "ok")
        log.hold(False)  # the last one: flushes, and lines are written at once again
        assert stream.getvalue().splitlines()[-1].split()[3] == "client=198.18.0.1:5"
        log.connection(("198.18.0.1", 6), ("198.18.0.2", 80), None, 0, 0, 0, "ok")
        assert stream.getvalue().splitlines()[-1].split()[3] == "client=198.18.0.1:6"
    finally:
        while log._holding:
            log.hold(False)
        log.setup("info", "text")


def test_many_held_lines_are_flushed_without_waiting_for_the_turn():
    stream = CountingStream()
    log.setup("info", "text", stream=stream)
    try:
        log.hold(True)
        for port in range(log.HOLD_LINES):
            log.connection(("198.18.0.1", port + 1), ("198.18.0.2", 80), None, 0, 0, 0, "ok")
        assert len(stream.getvalue().splitlines()) == log.HOLD_LINES and stream.writes == 1
    finally:
        log.hold(False)
        log.setup("info", "text")


# -- the log writer thread (log.threaded): a reader that does not read never stalls the proxy


def _unread_pipe():
    r, w = os.pipe()  # blocking, like stderr; nobody reads it until the test does
    return r, os.fdopen(w, "w", buffering=1)


def test_writes_never_block_on_a_stuck_reader_and_drops_are_counted_in_order():
    r, stream = _unread_pipe()
    stats = Stats()
    log.setup("info", "text", stream=stream)
    done = threading.Event()

    def burst():
        for i in range(50_000):
            log.event("line", i=i)
        done.set()

    try:
        with log.threaded(stats, max_lines=100):
            t = threading.Thread(target=burst, daemon=True)
            t.start()
            assert done.wait(20), "logging blocked on a full pipe"
            assert stats.log_dropped > 0
            log.event("end_marker")  # queued once there is room again, after the drop report
            data = b""
            os.set_blocking(r, False)
            deadline = time.monotonic() + 20
            while b"end_marker" not in data and time.monotonic() < deadline:
                try:
                    data += os.read(r, 1 << 20)
                except BlockingIOError:
                    time.sleep(0.01)
                    if b"end_marker" not in data and stats.log_dropped and log._writer.queued == log._writer.written:
                        log.event("end_marker")
    finally:
        log.setup("info", "text")
        os.close(r)
        stream.close()
    numbers = [int(x) for x in re.findall(rb" i=(\d+)", data)]
    assert numbers == sorted(numbers)  # what was written is in order
    assert b"log_lines_dropped count=" in data  # and the gap is said where it happened


def test_lines_written_before_the_writer_stops_are_all_written():
    buf = io.StringIO()
    log.setup("info", "json", stream=buf)
    try:
        with log.threaded(Stats()) as writer:
            assert writer is not None
            for i in range(1000):
                log.event("line", i=i)
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert [d["i"] for d in lines] == list(range(1000))
        log.event("after", n=1)  # direct again
        assert json.loads(buf.getvalue().splitlines()[-1])["event"] == "after"
    finally:
        log.setup("info", "text")


async def test_connection_lines_are_flushed_before_the_loop_waits():
    buf = io.StringIO()
    log.setup("info", "text", stream=buf)
    try:
        instrument = log.hold_until_idle()
        log.connection(("198.18.0.1", 1), ("198.18.0.2", 2), None, 1, 2, 0.1, "ok")
        assert buf.getvalue() == ""  # held within this turn
        await trio.sleep(0.01)  # the loop waits: flushed first
        assert "outcome=ok" in buf.getvalue()
        log.release(instrument)
    finally:
        log.setup("info", "text")
