"""The log line shapes operators parse (tproxy/log.py): JSON is one object per line with stable keys; text is one
human line per event. (Named apart from tests/test_log.py, which is the core engineer's to write.)"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re

import pytest

from tproxy import log

CONNECTION_KEYS = ["client", "original_dst", "upstream_src", "bytes_in", "bytes_out", "duration_ms", "outcome"]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def capture():
    """Set the tproxy logger up on a buffer; restore the handlers and level afterwards."""
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buf = io.StringIO()

    def setup(fmt: str, level: str = "info") -> io.StringIO:
        log.setup(level, fmt, stream=buf)
        return buf

    yield setup
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved[0]:
        logger.addHandler(h)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def one_json_line(buf: io.StringIO) -> dict:
    text = buf.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return json.loads(text)


def test_connection_line_has_the_stable_keys_in_order(capture):
    buf = capture("json")
    log.connection(("198.18.0.1", 40000), ("198.18.0.2", 8080), ("198.18.0.1", 25000), 10, 32, 0.0123456, "ok")
    doc = one_json_line(buf)
    assert list(doc) == ["ts", "level", "event", *CONNECTION_KEYS]
    assert TS.match(doc["ts"])
    assert doc["level"] == "info" and doc["event"] == "connection"
    assert doc["client"] == "198.18.0.1:40000"
    assert doc["original_dst"] == "198.18.0.2:8080"
    assert doc["upstream_src"] == "198.18.0.1:25000"
    assert doc["bytes_in"] == 10 and doc["bytes_out"] == 32
    assert doc["duration_ms"] == 12.3
    assert doc["outcome"] == "ok"


def test_connection_line_ipv6_and_missing_addresses(capture):
    buf = capture("json")
    log.connection(("fd00:18::1", 40000), ("fd00:18::2", 8080), None, 0, 0, 0, "refused", error="ECONNREFUSED")
    doc = one_json_line(buf)
    assert list(doc)[: 3 + len(CONNECTION_KEYS)] == ["ts", "level", "event", *CONNECTION_KEYS]
    assert doc["client"] == "[fd00:18::1]:40000" and doc["original_dst"] == "[fd00:18::2]:8080"
    assert doc["upstream_src"] == "-"
    assert doc["outcome"] == "refused" and doc["error"] == "ECONNREFUSED"
    assert isinstance(doc["bytes_in"], int) and isinstance(doc["duration_ms"], int | float)


def test_every_event_is_one_json_object_per_line(capture):
    buf = capture("json")
    log.event("start", mode="tproxy", installed="rules\nand routes", addr=ipaddress.ip_address("198.18.0.2"))
    log.event("stop", removed="everything")
    logging.getLogger(log.LOGGER_NAME).warning("plain %s", "message")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    docs = [json.loads(line) for line in lines]
    assert [d["event"] for d in docs] == ["start", "stop", "message"]
    assert docs[0]["installed"] == "rules\nand routes"  # a newline inside a value stays inside the object
    assert docs[0]["addr"] == "198.18.0.2"  # values JSON cannot hold are written as strings
    assert docs[2] == {"ts": docs[2]["ts"], "level": "warning", "event": "message", "message": "plain message"}


def test_level_filters_connection_lines(capture):
    buf = capture("json", level="warning")
    log.connection(("198.18.0.1", 1), ("198.18.0.2", 2), None, 0, 0, 0, "ok")
    log.event("x", logging.ERROR, why="boom")
    assert [json.loads(line)["event"] for line in buf.getvalue().splitlines()] == ["x"]


def test_text_is_one_human_line(capture):
    buf = capture("text")
    log.connection(("198.18.0.1", 40000), ("198.18.0.2", 8080), ("198.18.0.1", 25000), 10, 32, 0.5, "ok")
    log.event("start", installed="tproxy rules installed: tproxy mode")
    first, second = buf.getvalue().splitlines()
    ts, level, event, rest = first.split(" ", 3)
    assert TS.match(ts) and level == "info" and event == "connection"
    assert rest == (
        "client=198.18.0.1:40000 original_dst=198.18.0.2:8080 upstream_src=198.18.0.1:25000 "
        "bytes_in=10 bytes_out=32 duration_ms=500.0 outcome=ok"
    )
    assert second.endswith(' start installed="tproxy rules installed: tproxy mode"')
