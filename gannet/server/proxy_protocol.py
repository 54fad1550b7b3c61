"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans I/O.

A load balancer in front of Gannet (HAProxy's `send-proxy` / `send-proxy-v2`)
writes one header at the start of each TCP connection saying who the real
client is; everything after the header is the client's SMTP. `parse(data)`
takes the bytes received so far and returns one of:

- `NEED_DATA`: a valid prefix of a header; read more and call again with
  everything received so far;
- `Parsed(header, rest)`: the header, and the bytes after it (they belong
  to SMTP and must be kept);
- `Invalid(reason)`: not a header; the connection must be dropped (§2: "any
  sequence which does not exactly match the protocol must be discarded").

Rules it keeps (section numbers of proxy-protocol.txt):
- the version is decided by the first bytes, never guessed (§2); input that
  can no longer become a header is refused at once, not after a timeout;
- v1 (§2.1): one US-ASCII line of at most 107 bytes including CRLF; a lone
  CR or LF is refused; `TCP4`/`TCP6` with canonical addresses (no leading
  zeros) of the announced family and ports 0..65535 without leading zeros;
  `UNKNOWN` with anything (or nothing) after it, addresses ignored;
- v2 (§2.2): the 12-byte signature, version 2, command LOCAL or PROXY,
  family UNSPEC/INET/INET6/UNIX, protocol UNSPEC/STREAM/DGRAM, a length
  field that is always honoured; the address block must fit in it; TLVs
  after the addresses are walked (each must fit) and returned, not
  interpreted (the CRC32C TLV is not checked: §2.2.3 makes that optional);
- LOCAL (v2) and UNKNOWN/UNSPEC/UNIX (no IP address to report) give a
  header without addresses: the caller then uses the real connection's
  (health checks, §2.2). A DGRAM header is refused: SMTP runs over TCP.
It does no I/O, reads no clock and raises nothing on any input (fuzzed).

Why not the `proxy-protocol` package on PyPI: it comes with its own asyncio
server and reader, where Gannet needs a pure function over its own buffer
(the session's Wire) that can be fed a byte at a time and fuzzed; the
format is small enough that the strict checks above are most of the code.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # §2.1: the worst case, "PROXY UNKNOWN" + two IPv6 + two ports + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length

_V2_ADDRESS_LENGTH = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX: 2 addresses (+ 2 ports)
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class Version(enum.Enum):
    V1 = 1
    V2 = 2


class Command(enum.Enum):
    PROXY = "proxy"  # relayed on behalf of a client: use the addresses given
    LOCAL = "local"  # the proxy's own connection (health check): use the real endpoints


class Family(enum.Enum):
    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"
    UNSPEC = "unspec"  # v1 UNKNOWN, v2 AF_UNSPEC


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str  # compressed text form, as ipaddress prints it
    port: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: Version
    command: Command
    family: Family
    source: Endpoint | None  # None: use the connection's own peer address
    destination: Endpoint | None
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 (type, value), in order; not interpreted
    length: int = 0  # bytes the header took on the wire


@dataclass(frozen=True, slots=True)
class Parsed:
    header: ProxyHeader
    rest: bytes  # what followed the header: the client's first SMTP bytes


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str  # for the log line; never sent to the peer


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA

Result = NeedData | Parsed | Invalid


def parse(data: bytes) -> Result:
    """Decide what `data` (everything received so far on the connection) starts with."""
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return NEED_DATA if n < len(V2_SIGNATURE) else _parse_v2(data)
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return NEED_DATA if n < len(V1_PREFIX) else _parse_v1(data)
    return Invalid("no PROXY protocol header (neither the v1 'PROXY ' nor the v2 signature)")


# -- version 1: one text line ----------------------------------------------------------------


def _parse_v1(data: bytes) -> Result:
    window = data[:V1_MAX_LINE]
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        return Invalid("v1: a bare LF before CRLF")
    if cr == -1 or cr + 2 > V1_MAX_LINE:  # the LF too must be within the 107 bytes
        too_long = len(data) >= V1_MAX_LINE
        return Invalid(f"v1: no CRLF within {V1_MAX_LINE} bytes") if too_long else NEED_DATA
    if cr + 1 == len(data):
        return NEED_DATA
    if data[cr + 1] != 0x0A:
        return Invalid("v1: a bare CR before CRLF")
    line, end = data[:cr], cr + 2
    if not line.isascii():
        return Invalid("v1: the line is not US-ASCII")
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":  # §2.1: "the receiver must ignore anything presented before the CRLF"
        header = ProxyHeader(Version.V1, Command.PROXY, Family.UNSPEC, None, None, length=end)
        return Parsed(header, data[end:])
    if fields[1] not in (b"TCP4", b"TCP6"):
        return Invalid(f"v1: unknown protocol {_show(fields[1])} (TCP4, TCP6 or UNKNOWN)")
    if len(fields) != 6:
        return Invalid(f"v1: {len(fields)} fields separated by single spaces, 6 expected")
    family = Family.INET if fields[1] == b"TCP4" else Family.INET6
    addresses = []
    for what, raw in (("source", fields[2]), ("destination", fields[3])):
        ip = _v1_address(raw, family)
        if ip is None:
            return Invalid(f"v1: {what} address {_show(raw)} is not a canonical {fields[1].decode()} address")
        addresses.append(ip)
    ports = []
    for what, raw in (("source", fields[4]), ("destination", fields[5])):
        if not _V1_PORT.fullmatch(raw) or int(raw) > 65535:
            return Invalid(f"v1: {what} port {_show(raw)} is not 0..65535 without leading zeros")
        ports.append(int(raw))
    header = ProxyHeader(Version.V1, Command.PROXY, family, Endpoint(addresses[0], ports[0]),
                         Endpoint(addresses[1], ports[1]), length=end)
    return Parsed(header, data[end:])


def _v1_address(raw: bytes, family: Family) -> str | None:
    try:
        if family is Family.INET:
            return str(ipaddress.IPv4Address(raw.decode())) if _V1_IPV4.fullmatch(raw) else None
        return str(ipaddress.IPv6Address(raw.decode())) if _V1_IPV6.fullmatch(raw) else None
    except ValueError:
        return None


# -- version 2: binary -------------------------------------------------------------------------


def _parse_v2(data: bytes) -> Result:
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            return Invalid(f"v2: version {version}, only 2 exists")
        if command > 1:
            return Invalid(f"v2: command {command:#x} (0 LOCAL or 1 PROXY)")
    if len(data) > 13:
        family, protocol = data[13] >> 4, data[13] & 0x0F
        if family > 3 or protocol > 2:
            return Invalid(f"v2: address family/protocol byte {data[13]:#04x} is not defined")
    if len(data) < V2_FIXED:
        return NEED_DATA
    (length,) = struct.unpack_from("!H", data, 14)
    end = V2_FIXED + length
    if len(data) < end:
        return NEED_DATA
    block = data[V2_FIXED:end]
    rest = data[end:]
    if data[12] & 0x0F == 0:  # LOCAL: "discard the protocol block including the family"
        return Parsed(ProxyHeader(Version.V2, Command.LOCAL, Family.UNSPEC, None, None, length=end), rest)
    family, protocol = data[13] >> 4, data[13] & 0x0F
    if family == 0 or protocol == 0:
        return Parsed(ProxyHeader(Version.V2, Command.PROXY, Family.UNSPEC, None, None, length=end), rest)
    if protocol == 2:
        return Invalid("v2: a DGRAM (UDP) connection; SMTP runs over TCP")
    need = _V2_ADDRESS_LENGTH[family]
    if length < need:
        return Invalid(f"v2: length {length} is shorter than the {need}-byte address block")
    tlvs = _tlvs(block[need:])
    if isinstance(tlvs, Invalid):
        return tlvs
    if family == 3:  # AF_UNIX: a path, no IP to report; the proxy's own address stands in
        return Parsed(ProxyHeader(Version.V2, Command.PROXY, Family.UNIX, None, None, tlvs, end), rest)
    size = 4 if family == 1 else 16
    src = ipaddress.ip_address(block[:size])
    dst = ipaddress.ip_address(block[size:2 * size])
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    header = ProxyHeader(Version.V2, Command.PROXY, Family.INET if family == 1 else Family.INET6,
                         Endpoint(str(src), sport), Endpoint(str(dst), dport), tlvs, end)
    return Parsed(header, rest)


def _tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...] | Invalid:
    """§2.2: type (1 byte), length (2 bytes, network order), value; each must fit in the header."""
    out = []
    pos = 0
    while pos < len(raw):
        if pos + 3 > len(raw):
            return Invalid(f"v2: a TLV header cut off after {len(raw) - pos} byte(s)")
        kind = raw[pos]
        (size,) = struct.unpack_from("!H", raw, pos + 1)
        if pos + 3 + size > len(raw):
            return Invalid(f"v2: TLV type {kind:#04x} of {size} bytes overruns the header")
        out.append((kind, bytes(raw[pos + 3:pos + 3 + size])))
        pos += 3 + size
    return tuple(out)


def _show(raw: bytes) -> str:
    """A field from the network, shortened and printable, for the log."""
    return repr(raw[:48].decode("ascii", "replace"))
