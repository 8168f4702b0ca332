"""PROXY protocol: the parser and builder against the spec's own examples and hypothesis fuzzing, and the socket
reader over real loopback TCP connections (peek, then consume exactly the header; never a byte of the payload).

The fuzzing is bounded (:data:`FUZZ`): a fixed number of examples per property, no deadline, so CI time is fixed.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_relay import tcp_pair
from tests.trio_helpers import bounded
from tproxy import proxy_protocol as pp
from tproxy.proxy_protocol import Header, ProxyProtocolError, build, crc32c, parse, read_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIG = pp.V2_SIGNATURE


def reason(data: bytes, allow: str = "any") -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data, allow=allow)
    assert info.value.reason in pp.REASONS
    return info.value.reason


def v2(command: int, family: int, block: bytes, *, version: int = 2) -> bytes:
    return SIG + bytes(((version << 4) | command, family)) + struct.pack("!H", len(block)) + block


def with_tlvs(header: bytes, tlvs: list[tuple[int, bytes]], *, crc: bool = False) -> bytes:
    """``header`` (a v2 header) with ``tlvs`` appended and its length fixed; with ``crc``, a CRC32C TLV last."""
    body = b"".join(bytes((t,)) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    if crc:
        body += b"\x03\x00\x04\x00\x00\x00\x00"
    out = bytearray(header[:14] + struct.pack("!H", len(header) - 16 + len(body)) + header[16:] + body)
    if crc:
        out[-4:] = struct.pack("!I", crc32c(bytes(out)))
    return bytes(out)


# ----------------------------------------------------------------------------------------------------------------
# The spec's examples (HAProxy's doc/proxy-protocol.txt)

V1_WORST_TCP6 = b"PROXY TCP6 " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"
V1_WORST_UNKNOWN = b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"


def test_v1_examples():
    h = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n", allow="v1")
    assert h == Header(
        version=1, command="PROXY", source=("192.168.0.1", 56324), destination=("192.168.0.11", 443), length=47
    )
    assert parse(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", allow="any").length == 56
    h = parse(V1_WORST_TCP6, allow="v1")
    assert h.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535) and h.length == len(V1_WORST_TCP6) == 104
    assert parse(b"PROXY UNKNOWN\r\n", allow="v1") == Header(version=1, command="UNKNOWN", length=15)
    assert len(V1_WORST_UNKNOWN) == 107  # the spec's longest line, and our limit
    assert parse(V1_WORST_UNKNOWN, allow="v1") == Header(version=1, command="UNKNOWN", length=107)
    h = parse(b"PROXY TCP6 fd00::1 fd00:0:0::2 0 80\r\n", allow="v1")
    assert h.source == ("fd00::1", 0) and h.destination == ("fd00::2", 80)  # canonical text


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "bad_line"),  # LF without CR
        (b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n", "bad_line"),  # two spaces
        (b"PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "bad_line"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n", "bad_line"),  # trailing space
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "bad_line"),  # a field short
        (b"PROXY TCP4 192.168.0.1\r192.168.0.11 56324 443\r\n", "bad_line"),
        (b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n", "bad_family"),
        (b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n", "bad_family"),
        (b"PROXY UNKNOWNX\r\n", "bad_family"),
        (b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n", "bad_address"),  # leading zero
        (b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n", "bad_address"),
        (b"PROXY TCP4 fd00::1 192.168.0.11 56324 443\r\n", "bad_address"),  # not the stated family
        (b"PROXY TCP6 192.168.0.1 fd00::2 56324 443\r\n", "bad_address"),
        (b"PROXY TCP6 fe80::1%eth0 fd00::2 56324 443\r\n", "bad_address"),  # zone
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "bad_port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "bad_port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n", "bad_port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 00\r\n", "bad_port"),
        (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "too_long"),  # the CRLF is past byte 107
        (b"PROXY UNKNOWN " + b"x" * 100, "too_long"),  # decided without waiting for more
        (b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "bad_signature"),
        (b"GET / HTTP/1.1\r\n", "bad_signature"),
        (b"PROXY\r\n", "bad_signature"),
    ],
)
def test_v1_malformed(line, why):
    assert reason(line, "v1") == why
    assert reason(line, "any") == why


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        (b"G", "bad_signature"),
        (b"PROXx", "bad_signature"),
        (b"PROXY X", "bad_family"),
        (b"PROXY TCP4 1.2.3.4x", "bad_address"),
        (b"PROXY TCP4 1.2.3.04 ", "bad_address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "bad_line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r", "bad_line"),  # the CR comes a field early
    ],
)
def test_v1_errors_are_found_before_the_line_ends(prefix, why):
    """A sender of junk is reset at once, not after the timeout."""
    assert reason(prefix, "v1") == why


def test_v2_examples():
    block = bytes([198, 18, 0, 1, 198, 18, 0, 2]) + struct.pack("!HH", 40000, 8080)
    h = parse(v2(1, 0x11, block) + b"payload", allow="v2")
    assert h == Header(
        version=2, command="PROXY", source=("198.18.0.1", 40000), destination=("198.18.0.2", 8080), length=28
    )
    block6 = bytes.fromhex("fd00" + "00" * 13 + "01") + bytes.fromhex("fd00" + "00" * 13 + "02") + b"\x00\x01\xff\xff"
    h = parse(v2(1, 0x21, block6), allow="any")
    assert h.source == ("fd00::1", 1) and h.destination == ("fd00::2", 65535) and h.length == 52
    # LOCAL (a health check): the block is skipped, whatever the family says
    assert parse(v2(0, 0x00, b""), allow="v2") == Header(version=2, command="LOCAL", length=16)
    assert parse(v2(0, 0x11, block), allow="v2") == Header(version=2, command="LOCAL", length=28)
    assert parse(v2(0, 0x77, b"whatever"), allow="v2").length == 24
    # UNSPEC and UNIX: no address we can use; the TCP connection's apply
    assert parse(v2(1, 0x00, b""), allow="v2") == Header(version=2, command="PROXY", length=16)
    h = parse(v2(1, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")), allow="v2")
    assert h.source is None and h.destination is None and h.length == 232


def test_v2_tlvs_are_walked_and_crc32c_verified():
    base = v2(1, 0x11, bytes(8) + struct.pack("!HH", 1, 2))
    tlvs = [(0x01, b"h2"), (0x02, b"example.org"), (0x04, b"\0" * 5), (0x05, b"id"), (0x20, b"\x01" + bytes(4))]
    for crc in (False, True):
        data = with_tlvs(base, tlvs, crc=crc)
        assert parse(data + b"more", allow="v2").length == len(data)
    good = with_tlvs(base, tlvs, crc=True)
    bad = bytearray(good)
    bad[17] ^= 1  # a bit of the source address
    assert reason(bytes(bad)) == "bad_crc"
    bad = bytearray(good)
    bad[-1] ^= 0x80  # the checksum itself
    assert reason(bytes(bad)) == "bad_crc"
    assert reason(with_tlvs(base, [(0x03, b"\0\0\0")])) == "bad_crc"  # wrong size
    # a TLV running past the end; a TLV head cut short
    assert reason(base[:14] + struct.pack("!H", 12 + 5) + base[16:] + b"\x01\x00\x09ab") == "truncated_tlv"
    assert reason(base[:14] + struct.pack("!H", 12 + 2) + base[16:] + b"\x01\x00") == "truncated_tlv"


# Captured from HAProxy 2.6 (Debian 12), `server ... send-proxy-v2 proxy-v2-options crc32c,unique-id`, then "hello"
HAPROXY_V4 = "0d0a0d0a000d0a515549540a211100167f0000017f0000018de6426803000407a15faf05000068656c6c6f"
HAPROXY_V6 = (
    "0d0a0d0a000d0a515549540a2121002e00000000000000000000000000000001000000000000000000000000000000019c3e4268"
    "0300044c1b7ce505000068656c6c6f"
)


def test_haproxys_own_headers_with_crc32c():
    data = bytes.fromhex(HAPROXY_V4)
    assert parse(data, allow="v2") == Header(
        version=2, command="PROXY", source=("127.0.0.1", 36326), destination=("127.0.0.1", 17000), length=38
    )
    assert data[38:] == b"hello"
    h = parse(bytes.fromhex(HAPROXY_V6), allow="any")
    assert h.source == ("::1", 39998) and h.destination == ("::1", 17000) and h.length == 62
    bad = bytearray(data)
    bad[23] ^= 1  # the last byte of the destination address
    assert reason(bytes(bad)) == "bad_crc"


def test_crc32c_reference_values():
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (SIG[:5] + b"x", "bad_signature"),
        (v2(1, 0x11, bytes(12), version=1), "bad_version"),
        (v2(1, 0x11, bytes(12), version=3), "bad_version"),
        (v2(2, 0x11, bytes(12)), "bad_command"),
        (v2(0xF, 0x11, bytes(12)), "bad_command"),
        (v2(1, 0x12, bytes(12)), "bad_family"),  # UDP over a TCP connection
        (v2(1, 0x10, bytes(12)), "bad_family"),
        (v2(1, 0x41, bytes(12)), "bad_family"),
        (v2(1, 0x11, bytes(11)), "bad_length"),
        (v2(1, 0x21, bytes(35)), "bad_length"),
        (SIG + b"\x21\x11" + struct.pack("!H", 4081), "too_long"),  # decided from the length field alone
        (SIG + b"\x20\x00\xff\xff", "too_long"),
    ],
)
def test_v2_malformed(data, why):
    assert reason(data, "v2") == why
    assert reason(data, "any") == why


def test_v2_at_the_size_cap_is_accepted():
    data = with_tlvs(v2(1, 0x11, bytes(12)), [(0x04, bytes(pp.MAX_HEADER - 28 - 3))])
    assert len(data) == pp.MAX_HEADER and parse(data, allow="v2").length == pp.MAX_HEADER


def test_allow_selects_the_version():
    one, two = build("v1", ("1.2.3.4", 1), ("5.6.7.8", 2)), build("v2", ("1.2.3.4", 1), ("5.6.7.8", 2))
    assert reason(two, "v1") == "bad_signature" and reason(one, "v2") == "bad_signature"
    assert reason(two[:1], "v1") == "bad_signature" and reason(one[:1], "v2") == "bad_signature"
    assert parse(b"", allow="v1") is None
    with pytest.raises(ValueError):
        parse(one, allow="v3")


def test_build():
    assert (
        build("v1", ("198.18.0.1", 40000), ("198.18.0.2", 8080)) == b"PROXY TCP4 198.18.0.1 198.18.0.2 40000 8080\r\n"
    )
    assert build("v1", ("fd00:0::1", 1), ("fd00::2", 2)) == b"PROXY TCP6 fd00::1 fd00::2 1 2\r\n"
    assert build("v2", ("198.18.0.1", 1), ("198.18.0.2", 2)) == v2(1, 0x11, bytes.fromhex("c6120001c6120002 0001 0002"))
    for bad in (
        lambda: build("v2", ("198.18.0.1", 1), ("fd00::2", 2)),  # mixed families
        lambda: build("v1", ("198.18.0.1", 65536), ("198.18.0.2", 2)),
        lambda: build("v3", ("198.18.0.1", 1), ("198.18.0.2", 2)),
    ):
        with pytest.raises(ValueError):
            bad()


def test_same_family_maps_the_ipv4_side_into_ipv6():
    v4, v6 = ("198.18.0.1", 1), ("fd00::2", 2)
    assert pp.same_family(v4, ("198.18.0.2", 2)) == (v4, ("198.18.0.2", 2))
    assert pp.same_family(v4, v6) == (("::ffff:198.18.0.1", 1), v6)
    assert pp.same_family(v6, v4) == (v6, ("::ffff:198.18.0.1", 1))
    h = parse(build("v2", *pp.same_family(v4, v6)), allow="v2")
    assert h.source == ("::ffff:c612:1", 1)  # (Python's canonical text of ::ffff:198.18.0.1)


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing

ports = st.integers(0, 65535)
endpoints = st.one_of(
    st.tuples(st.ip_addresses(v=4), ports, st.ip_addresses(v=4), ports),
    st.tuples(st.ip_addresses(v=6), ports, st.ip_addresses(v=6), ports),
)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=64)),
    max_size=6,
)


@st.composite
def headers(draw) -> tuple[bytes, Header]:
    """A valid header of either version (v2 with random TLVs, with or without a CRC32C) and what it says."""
    sip, sport, dip, dport = draw(endpoints)
    src, dst = (str(sip), sport), (str(dip), dport)
    version = draw(st.sampled_from(["v1", "v2"]))
    data = build(version, src, dst)
    if version == "v2":
        data = with_tlvs(data, draw(tlv_lists), crc=draw(st.booleans()))
    expected = Header(version=int(version[1]), command="PROXY", source=src, destination=dst, length=len(data))
    return data, expected


@FUZZ
@given(headers(), st.binary(max_size=32))
def test_round_trip(case, payload):
    data, expected = case
    allow = f"v{expected.version}"
    assert parse(data + payload, allow=allow) == expected
    assert parse(data + payload, allow="any") == expected


@FUZZ
@given(headers())
def test_every_truncation_is_incomplete(case):
    data, expected = case
    for cut in range(len(data)):
        assert parse(data[:cut], allow="any") is None, cut
        assert parse(data[:cut], allow=f"v{expected.version}") is None, cut


def _judge(data: bytes, allow: str) -> None:
    """Only ever None, a Header within ``data`` that does not depend on the bytes after it, or our error."""
    try:
        h = parse(data, allow=allow)
    except ProxyProtocolError as e:
        assert e.reason in pp.REASONS
        return
    if h is not None:
        assert 0 < h.length <= len(data)
        assert parse(data[: h.length], allow=allow) == h
        assert parse(data[: h.length] + b"\xff" * 8, allow=allow) == h


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(pp.ALLOW))
def test_random_bytes(data, allow):
    _judge(data, allow)
    _judge(b"PROXY " + data, allow)
    _judge(SIG + data, allow)


@FUZZ
@given(headers(), st.data())
def test_mutated_headers(case, draw):
    data, _ = case
    out = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw.draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[i] ^= 1 << draw.draw(st.integers(0, 7))
        elif op == "insert":
            out[i:i] = draw.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and out:
            del out[i]
        elif op == "truncate":
            del out[i:]
    for allow in pp.ALLOW:
        _judge(bytes(out), allow)


@FUZZ
@given(endpoints, tlv_lists, st.data())
def test_crc32c_catches_any_flipped_address_bit(ends, tlvs, draw):
    sip, sport, dip, dport = ends
    data = bytearray(with_tlvs(build("v2", (str(sip), sport), (str(dip), dport)), tlvs, crc=True))
    block = 12 if sip.version == 4 else 36
    i = draw.draw(st.integers(16, 16 + block - 1))
    data[i] ^= 1 << draw.draw(st.integers(0, 7))
    assert reason(bytes(data), "v2") == "bad_crc"


# ----------------------------------------------------------------------------------------------------------------
# read_header over real TCP connections


class Counting:
    """``sock`` with its system calls counted: ``recv`` / ``setsockopt`` / ``getsockopt``, and ``fileno`` (which
    is what a wait on the socket asks for)."""

    def __init__(self, sock: socket.socket, limit: int = 50) -> None:
        self.sock = sock
        self.calls: list[str] = []
        self.limit = limit

    def _count(self, name: str) -> None:
        self.calls.append(name)
        assert len(self.calls) < self.limit, f"spinning: {self.calls[-10:]}"

    def recv(self, *args):
        self._count("recv_peek" if len(args) > 1 and args[1] & socket.MSG_PEEK else "recv")
        return self.sock.recv(*args)

    def setsockopt(self, *args):
        self._count("setsockopt")
        return self.sock.setsockopt(*args)

    def getsockopt(self, *args):
        self._count("getsockopt")
        return self.sock.getsockopt(*args)

    def fileno(self) -> int:
        self._count("wait")
        return self.sock.fileno()


@pytest.fixture
def pair():
    client, server = tcp_pair()
    yield client, server
    client.close()
    server.close()


def rcvlowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


@bounded
async def test_whole_header_in_one_segment_costs_two_syscalls_and_leaves_the_payload(pair):
    client, server = pair
    header = build("v2", ("198.18.0.1", 40000), ("198.18.0.2", 8080))
    client.send(header + b"GET / HTTP/1.1\r\n\r\n")
    counted = Counting(server)
    h = await read_header(counted, allow="any", timeout=3)
    assert h.source == ("198.18.0.1", 40000) and h.length == len(header)
    assert counted.calls == ["recv_peek", "recv"]
    assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"


@bounded
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_header_split_across_sends(pair, autojump_clock, version):
    client, server = pair
    header = build(version, ("fd00::1", 1), ("fd00::2", 2))
    pieces = [header[:1], header[1:7], header[7:20], header[20:] + b"payload"]
    counted = Counting(server)

    async def send() -> None:
        for piece in pieces:
            await trio.sleep(0.5)
            client.send(piece)

    async with trio.open_nursery() as n:
        n.start_soon(send)
        h = await read_header(counted, allow=version, timeout=3)
    assert h.source == ("fd00::1", 1) and h.length == len(header)
    assert counted.calls.count("recv_peek") == len(pieces) + 1  # one per arrival (and the first, empty, try)
    assert server.recv(100) == b"payload"
    assert rcvlowat(server) == 1  # put back for the relay


@bounded
async def test_a_partial_header_does_not_spin(pair, autojump_clock):
    client, server = pair
    client.send(b"PROXY TCP4 1.2.3.4 ")
    counted = Counting(server)
    with pytest.raises(ProxyProtocolError) as info:
        await read_header(counted, allow="v1", timeout=3)
    assert info.value.reason == "timeout"
    assert trio.current_time() == pytest.approx(3)
    assert counted.calls.count("recv_peek") == 1  # the bytes already peeked never woke it again
    assert rcvlowat(server) == 1
    assert server.recv(100) == b"PROXY TCP4 1.2.3.4 "  # nothing consumed


@bounded
async def test_nothing_at_all_times_out(pair, autojump_clock):
    _, server = pair
    with pytest.raises(ProxyProtocolError) as info:
        await read_header(server, allow="any", timeout=2.5)
    assert info.value.reason == "timeout" and trio.current_time() == pytest.approx(2.5)


@bounded
@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 1.2.3.4", pp.V2_SIGNATURE[:9]])
async def test_eof_before_a_complete_header(pair, autojump_clock, sent):
    client, server = pair

    async def send() -> None:
        await trio.sleep(0.5)
        client.send(sent)
        await trio.sleep(0.5)
        client.shutdown(socket.SHUT_WR)

    async with trio.open_nursery() as n:
        n.start_soon(send)
        with pytest.raises(ProxyProtocolError) as info:
            await read_header(Counting(server), allow="any", timeout=3)
    assert info.value.reason == "eof" and trio.current_time() == pytest.approx(1)


@bounded
async def test_a_reset_before_a_complete_header(pair, autojump_clock):
    client, server = pair
    client.send(b"PROXY ")

    async def reset() -> None:
        await trio.sleep(0.5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    async with trio.open_nursery() as n:
        n.start_soon(reset)
        with pytest.raises(ProxyProtocolError) as info:
            await read_header(server, allow="any", timeout=3)
    assert info.value.reason == "eof" and trio.current_time() == pytest.approx(0.5)


@bounded
async def test_a_malformed_header_is_refused_at_once_and_left_unread(pair, autojump_clock):
    client, server = pair
    client.send(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\n"[:20] + b"x")
    with pytest.raises(ProxyProtocolError) as info:
        await read_header(server, allow="v1", timeout=3)
    assert info.value.reason == "bad_address" and trio.current_time() == 0
    assert server.recv(100).endswith(b"x")


_ADDRESS_TEXT = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){0,4}", fullmatch=True),  # leading zeros, octets > 255, 3 or 5 parts
    st.text(alphabet="0123456789.: \x00x", max_size=20),
    st.ip_addresses(v=6).map(str),
)


@FUZZ
@given(_ADDRESS_TEXT, st.sampled_from(["v1", "v2"]))
def test_build_takes_the_addresses_ipaddress_takes_and_writes_what_it_would(text, version):
    """build() checks IPv4 text with inet_pton (it runs per connection; ipaddress costs ten times more): it must
    accept exactly what ipaddress accepts and write the same header."""
    import ipaddress

    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            build(version, (text, 1), ("198.18.0.2" if ":" not in text else "fd00::2", 2))
        return
    other = ipaddress.ip_address("198.18.0.2" if address.version == 4 else "fd00::2")
    if version == "v1":
        expected = f"PROXY TCP{address.version} {address} {other} 1 2\r\n".encode()
    else:
        block = address.packed + other.packed + b"\x00\x01\x00\x02"
        family = 0x11 if address.version == 4 else 0x21
        expected = pp.V2_SIGNATURE + bytes((0x21, family)) + len(block).to_bytes(2, "big") + block
    assert build(version, (text, 1), (str(other), 2)) == expected
    assert parse(expected, allow=version).source == (str(address), 1)
