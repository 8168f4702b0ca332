"""PROXY protocol v1 and v2 (HAProxy's doc/proxy-protocol.txt): a strict parser, a builder, and the socket reader.

:func:`parse` and :func:`build` are pure. :func:`parse` decides as early as the bytes allow: a valid prefix that needs
more bytes gives ``None``, a complete header gives a :class:`Header` whose ``length`` is exactly the bytes it occupies
(never more: what follows is the client's payload), and bytes that can never become a valid header raise
:class:`~tproxy.errors.ProxyProtocolError` with a short ``reason`` from :data:`REASONS`.

:func:`read_header` reads a header off a connection without taking a byte of the payload: it peeks, parses, and
consumes exactly ``length`` bytes. When the whole header came with the first segment that is two system calls.
"""

from __future__ import annotations

import ipaddress
import socket

import attrs
import trio

from tproxy.errors import ProxyProtocolError

__all__ = ["Header", "ProxyProtocolError", "REASONS", "build", "crc32c", "parse", "read_header", "same_family"]

ALLOW = ("v1", "v2", "any")
MAX_HEADER = 4096  # the cap on a v2 header (signature included), as nginx's; a v1 line is at most V1_MAX
V1_MAX = 107
V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# The ``reason`` of every error :func:`parse` and :func:`read_header` raise (a bounded set: it is a metric label).
REASONS = (
    "bad_signature",  # neither "PROXY " nor the v2 signature (or not the version allowed)
    "bad_line",  # v1: not one line of single-space separated fields ending in CRLF
    "bad_family",  # v1 protocol other than TCP4/TCP6/UNKNOWN; v2 family/transport byte not INET/INET6/UNIX stream
    "bad_address",  # v1 address not of the stated family (or with leading zeros, a zone, ...)
    "bad_port",  # v1 port not 0-65535 without leading zeros
    "too_long",  # v1 without CRLF in 107 bytes; v2 header over MAX_HEADER bytes
    "bad_version",  # v2 version nibble not 2
    "bad_command",  # v2 command not LOCAL or PROXY
    "bad_length",  # v2 length shorter than the address block of its family
    "truncated_tlv",  # v2 TLV running past the header's end
    "bad_crc",  # v2 CRC32C TLV of the wrong size or not matching
    "eof",  # the connection ended (or was reset) before a complete header
    "timeout",  # no complete header within the timeout
)


@attrs.frozen(kw_only=True)
class Header:
    """A complete, valid header.

    ``command`` is "PROXY" (addresses given), "LOCAL" (v2: the sender's own connection, e.g. a health check) or
    "UNKNOWN" (v1). ``source`` / ``destination`` are ``(ip, port)`` with the ip in canonical text form, or ``None``
    when the header names no usable address (LOCAL, UNKNOWN, v2 UNSPEC or UNIX): then the TCP connection's own
    endpoints apply. ``length`` is the exact number of bytes the header occupies.
    """

    version: int  # 1 or 2
    command: str
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    length: int


def parse(data: bytes, *, allow: str) -> Header | None:
    """The header at the start of ``data``: a :class:`Header`, or ``None`` when ``data`` is a valid beginning that
    needs more bytes. ``allow`` is "v1", "v2" or "any" (detected by the signature, as the spec says).

    Error handling: raises :class:`ProxyProtocolError` as soon as ``data`` cannot be the beginning of a valid header
    (``reason`` in :data:`REASONS`); nothing else, whatever the bytes. ValueError for an unknown ``allow``.
    """
    if allow not in ALLOW:
        raise ValueError(f"allow must be one of {ALLOW}, not {allow!r}")
    if not data:
        return None
    data = bytes(data)
    if data[0] == V2_SIGNATURE[0] and allow != "v1":
        return _parse_v2(data)
    if data[0] == V1_SIGNATURE[0] and allow != "v2":
        return _parse_v1(data)
    raise ProxyProtocolError("bad_signature", f"{allow} header expected, got {data[:12]!r}")


# ----------------------------------------------------------------------------------------------------------------
# v1: "PROXY TCP4|TCP6|UNKNOWN src dst sport dport\r\n"

_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_ADDR_CHARS = {4: frozenset(b"0123456789."), 6: frozenset(b"0123456789abcdefABCDEF:.")}
_V1_ADDR_MAX = {4: 15, 6: 45}  # longest text forms: 255.255.255.255, ffff:...:ffff:255.255.255.255


def _parse_v1(data: bytes) -> Header | None:
    head = data[:V1_MAX]
    end = head.find(b"\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("too_long", f"no CRLF in the first {V1_MAX} bytes")
        _check_v1_prefix(head)
        return None
    if end == 0 or head[end - 1] != 0x0D:
        raise ProxyProtocolError("bad_line", "LF without CR")
    if not head.startswith(V1_SIGNATURE):
        raise ProxyProtocolError("bad_signature", f"v1 line does not start with 'PROXY ': {head[:6]!r}")
    return _v1_line(head[: end - 1], end + 1)


def _v1_line(line: bytes, length: int) -> Header:
    """``line``: a whole line without its CRLF, starting with "PROXY "."""
    rest = line[len(V1_SIGNATURE) :]
    protocol, _, tail = rest.partition(b" ")
    if protocol == b"UNKNOWN":  # the spec: whatever follows up to the CRLF is ignored
        return Header(version=1, command="UNKNOWN", length=length)
    if b"\r" in line:
        raise ProxyProtocolError("bad_line", "CR inside the line")
    if not protocol:
        raise ProxyProtocolError("bad_line", "two spaces after PROXY")
    if protocol not in _V1_PROTOCOLS:
        raise ProxyProtocolError("bad_family", f"protocol {protocol[:8]!r}")
    fields = tail.split(b" ")
    if len(fields) != 4 or not all(fields):
        raise ProxyProtocolError("bad_line", "expected 'src dst sport dport' separated by single spaces")
    family = 4 if protocol == b"TCP4" else 6
    src, dst = _v1_address(fields[0], family), _v1_address(fields[1], family)
    return Header(
        version=1,
        command="PROXY",
        source=(src, _v1_port(fields[2])),
        destination=(dst, _v1_port(fields[3])),
        length=length,
    )


def _v1_address(token: bytes, family: int) -> str:
    if not set(token) <= _V1_ADDR_CHARS[family] or len(token) > _V1_ADDR_MAX[family]:
        raise ProxyProtocolError("bad_address", f"{token[:46]!r} is not an IPv{family} address")
    try:
        # Python's parser rejects leading zeros in IPv4 octets and, without '%' in the charset, zones
        address = ipaddress.IPv4Address(token.decode()) if family == 4 else ipaddress.IPv6Address(token.decode())
    except ValueError:
        raise ProxyProtocolError("bad_address", f"{token!r} is not an IPv{family} address") from None
    return str(address)


def _v1_port(token: bytes) -> int:
    if not _v1_port_prefix_ok(token) or not token:
        raise ProxyProtocolError("bad_port", f"{token[:8]!r} is not a port (0-65535, no leading zeros)")
    return int(token)


def _v1_port_prefix_ok(token: bytes) -> bool:
    return (
        (token.isdigit() or not token)
        and len(token) <= 5
        and not (len(token) > 1 and token[0] == 0x30)
        and (not token or int(token) <= 65535)
    )


def _check_v1_prefix(head: bytes) -> None:
    """Raise when ``head`` (no LF in it, shorter than V1_MAX) can never begin a valid v1 line."""
    if not V1_SIGNATURE.startswith(head[: len(V1_SIGNATURE)]):
        raise ProxyProtocolError("bad_signature", f"{head[:6]!r} is not 'PROXY '")
    rest = head[len(V1_SIGNATURE) :]
    if not rest:
        return
    if rest.endswith(b"\r"):  # the whole line is here but its LF: judge it now
        _v1_line(head[:-1], len(head) + 1)
        return
    tokens = rest.split(b" ")
    protocol = tokens[0]
    if len(tokens) == 1:
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError("bad_family", f"protocol {protocol[:8]!r}")
        return
    if protocol == b"UNKNOWN":
        return
    if b"\r" in rest:
        raise ProxyProtocolError("bad_line", "CR inside the line")
    if not protocol:
        raise ProxyProtocolError("bad_line", "two spaces after PROXY")
    if protocol not in _V1_PROTOCOLS:
        raise ProxyProtocolError("bad_family", f"protocol {protocol[:8]!r}")
    family = 4 if protocol == b"TCP4" else 6
    fields = tokens[1:]
    if len(fields) > 4 or not all(fields[:-1]):
        raise ProxyProtocolError("bad_line", "expected 'src dst sport dport' separated by single spaces")
    for i, token in enumerate(fields[:-1]):
        if i < 2:
            _v1_address(token, family)
        else:
            _v1_port(token)
    last = fields[-1]
    if len(fields) <= 2:
        if not set(last) <= _V1_ADDR_CHARS[family] or len(last) > _V1_ADDR_MAX[family]:
            raise ProxyProtocolError("bad_address", f"{last[:46]!r} is not an IPv{family} address")
    elif not _v1_port_prefix_ok(last):
        raise ProxyProtocolError("bad_port", f"{last[:8]!r} is not a port (0-65535, no leading zeros)")


# ----------------------------------------------------------------------------------------------------------------
# v2: signature, version/command, family/transport, length, addresses, TLVs

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
# family/transport byte -> size of its address block; STREAM only (this is a TCP proxy), UNSPEC and UNIX give no
# address we can use (the TCP connection's own endpoints apply)
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}
_TLV_CRC32C = 0x03


def _parse_v2(data: bytes) -> Header | None:
    n = len(data)
    k = min(n, len(V2_SIGNATURE))
    if data[:k] != V2_SIGNATURE[:k]:
        raise ProxyProtocolError("bad_signature", "not the v2 signature")
    if n < 13:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError("bad_version", f"version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError("bad_command", f"command {command:#x}")
    if n < 14:
        return None
    family = data[13]
    if command == _V2_PROXY and family not in _V2_ADDRESS_SIZE:
        raise ProxyProtocolError("bad_family", f"family/transport {family:#04x}")
    if n < 16:
        return None
    size = int.from_bytes(data[14:16], "big")
    total = 16 + size
    if total > MAX_HEADER:
        raise ProxyProtocolError("too_long", f"{total} bytes (at most {MAX_HEADER})")
    if command == _V2_LOCAL:  # the spec: skip the block, the family is ignored
        return None if n < total else Header(version=2, command="LOCAL", length=total)
    address_size = _V2_ADDRESS_SIZE[family]
    if size < address_size:
        raise ProxyProtocolError("bad_length", f"{size} bytes cannot hold the {address_size}-byte addresses")
    if n < total:
        return None
    _check_tlvs(data[:total], 16 + address_size)
    source = destination = None
    if family == 0x11:  # (inet_ntop: a tenth of ipaddress's cost, and the same text for IPv4)
        source = (_ntop(_AF_INET, data[16:20]), int.from_bytes(data[24:26], "big"))
        destination = (_ntop(_AF_INET, data[20:24]), int.from_bytes(data[26:28], "big"))
    elif family == 0x21:
        source = (str(ipaddress.IPv6Address(data[16:32])), int.from_bytes(data[48:50], "big"))
        destination = (str(ipaddress.IPv6Address(data[32:48])), int.from_bytes(data[50:52], "big"))
    return Header(version=2, command="PROXY", source=source, destination=destination, length=total)


def _check_tlvs(header: bytes, pos: int) -> None:
    """Walk the TLVs from ``pos`` to the end of ``header``; verify every CRC32C TLV."""
    end = len(header)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError("truncated_tlv", f"{end - pos} bytes left for a 3-byte TLV head")
        kind, size = header[pos], int.from_bytes(header[pos + 1 : pos + 3], "big")
        if pos + 3 + size > end:
            raise ProxyProtocolError("truncated_tlv", f"TLV {kind:#04x} of {size} bytes runs past the header")
        if kind == _TLV_CRC32C:
            if size != 4:
                raise ProxyProtocolError("bad_crc", f"CRC32C TLV of {size} bytes")
            zeroed = header[: pos + 3] + b"\x00\x00\x00\x00" + header[pos + 7 :]
            if crc32c(zeroed) != int.from_bytes(header[pos + 3 : pos + 7], "big"):
                raise ProxyProtocolError("bad_crc", "CRC32C does not match")
        pos += 3 + size


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 CRC32C TLV carries it (big-endian on the wire). Table-driven: a header is at
    most :data:`MAX_HEADER` bytes, and the TLV is rare."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Building


def build(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY-command header ("v1" or "v2") for a TCP connection from ``source`` to ``destination``.

    Error handling: ValueError for an unknown version, a bad address or port, or addresses of two families (a
    header names one family; the caller maps or falls back).
    """
    (sversion, stext, spacked), (dversion, dtext, dpacked) = _address(source[0]), _address(destination[0])
    if sversion != dversion:
        raise ValueError(f"source {stext} and destination {dtext} are of different families")
    sport, dport = source[1], destination[1]
    for port in (sport, dport):
        if not 0 <= port <= 65535:
            raise ValueError(f"{port} is not a port")
    if version == "v1":
        return f"PROXY TCP{sversion} {stext} {dtext} {sport} {dport}\r\n".encode()
    if version == "v2":
        block = spacked + dpacked + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        family = 0x11 if sversion == 4 else 0x21
        return V2_SIGNATURE + bytes((0x20 | _V2_PROXY, family)) + len(block).to_bytes(2, "big") + block
    raise ValueError(f"version must be 'v1' or 'v2', not {version!r}")


_AF_INET = socket.AF_INET
_ntop, _pton = socket.inet_ntop, socket.inet_pton


def _address(text: str) -> tuple[int, str, bytes]:
    """(version, canonical text, packed) of an IP address; ValueError when it is none. IPv4 through ``inet_pton``
    (strict like ``ipaddress``: four decimal octets, no leading zeros; a tenth of its cost, this runs per connection),
    IPv6 through ``ipaddress`` (its canonical text is the one the rest of tproxy prints)."""
    if ":" not in text:
        try:
            return 4, text, _pton(_AF_INET, text)
        except (OSError, ValueError):  # (ValueError: a NUL in the text)
            pass  # (ipaddress's message names what is wrong)
    address = ipaddress.ip_address(text)
    return address.version, str(address), address.packed


def same_family(source: tuple[str, int], destination: tuple[str, int]) -> tuple[tuple[str, int], tuple[str, int]]:
    """``source`` and ``destination`` in one family, for a header: unchanged when they share one, else the IPv4 one
    as its IPv4-mapped IPv6 address (``::ffff:198.18.0.1``), so that a client learnt from an IPv4 header still
    reaches an application over IPv6, and the reverse."""
    sv4, dv4 = ":" not in source[0], ":" not in destination[0]  # (an IPv6 address has a colon, IPv4 none)
    if sv4 == dv4:
        return source, destination
    if sv4:
        return (f"::ffff:{source[0]}", source[1]), destination
    return source, (f"::ffff:{destination[0]}", destination[1])


# ----------------------------------------------------------------------------------------------------------------
# Reading off a connection

_TCP_ESTABLISHED = 1


async def read_header(sock: socket.socket, *, allow: str, timeout: float) -> Header:
    """Read the PROXY header at the start of the connected, non-blocking TCP socket ``sock``; the bytes after it
    stay in the socket.

    Peeks at what has arrived, parses it, and consumes exactly the header. When the whole header came with the first
    segment that is one ``recv(MSG_PEEK)`` and one ``recv``, and no wait. While only part of it is there, the socket's
    ``SO_RCVLOWAT`` is raised above what was seen, so that the wait ends on new bytes (or EOF), not on the bytes
    already peeked; it is put back to 1 before returning.

    Error handling: :class:`ProxyProtocolError` for a malformed header (its ``reason``), for EOF or a reset before a
    complete header ("eof"), and when none is complete within ``timeout`` seconds ("timeout"). The bytes of a
    malformed header are left unread; the caller resets the connection.
    """
    try:  # the usual case: the whole header came with the first segment (no cancel scope, no wait)
        first: bytes | None = sock.recv(MAX_HEADER, socket.MSG_PEEK)
    except BlockingIOError:
        first = None
    except OSError as e:
        raise ProxyProtocolError("eof", e.strerror or str(e)) from None
    if first:
        header = parse(first, allow=allow)
        if header is not None:
            _consume(sock, header.length)
            return header
    peeked = True  # (the loop's first look is the peek above)
    lowat = 1
    seen = -1
    try:
        with trio.move_on_after(timeout):
            while True:
                if peeked:
                    data, peeked = first, False
                else:
                    try:
                        data = sock.recv(MAX_HEADER, socket.MSG_PEEK)
                    except BlockingIOError:
                        data = None
                    except OSError as e:
                        raise ProxyProtocolError("eof", e.strerror or str(e)) from None
                if data is not None:
                    if not data:
                        raise ProxyProtocolError("eof", f"after {max(seen, 0)} bytes")
                    if len(data) == seen and not _established(sock):
                        raise ProxyProtocolError("eof", f"after {seen} bytes")
                    if len(data) > seen:
                        header = parse(data, allow=allow)
                        if header is not None:
                            _consume(sock, header.length)
                            return header
                        seen = len(data)
                        lowat = seen + 1
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                await trio.lowlevel.wait_readable(sock)
        raise ProxyProtocolError("timeout", f"no complete header in {timeout:g} s ({max(seen, 0)} bytes)")
    finally:
        if lowat != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


def _established(sock: socket.socket) -> bool:
    """Whether no FIN has come yet (a wake with nothing new is then not EOF)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED
    except OSError:
        return False


def _consume(sock: socket.socket, length: int) -> None:
    try:
        got = sock.recv(length)
    except OSError as e:
        raise ProxyProtocolError("eof", e.strerror or str(e)) from None
    if len(got) != length:  # cannot happen: the bytes were peeked; never hand on a half-read connection
        raise ProxyProtocolError("eof", f"read {len(got)} of the {length} header bytes")
