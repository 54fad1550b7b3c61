"""The PROXY protocol parser (gannet.server.proxy_protocol), against HAProxy's proxy-protocol.txt.

Every case is checked whole and fed in pieces (split at every byte boundary,
and a byte at a time), as the session feeds it: the first result that is not
NEED_DATA must equal the whole input's, with the same header and the same
bytes left over for SMTP.

Fuzz invariant (hypothesis): any input gives NEED_DATA, Parsed or Invalid —
never an exception — and the answer does not depend on how the input was split.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gannet.server import proxy_protocol as pp
from gannet.server.proxy_protocol import NEED_DATA, Command, Endpoint, Family, Invalid, Parsed, Version

SMTP = b"EHLO client.test\r\n"
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v2(command: int = 1, family: int = 1, protocol: int = 1, block: bytes = b"", *,
       version: int = 2, length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/protocol, length, then `block`."""
    size = len(block) if length is None else length
    return pp.V2_SIGNATURE + bytes([(version << 4) | command, (family << 4) | protocol]) + \
        struct.pack("!H", size) + block


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def fed(data: bytes, cuts: list[int]) -> pp.Result:
    """What a session gets when `data` arrives in pieces ending at `cuts`: the first
    answer that is not NEED_DATA, with the unread remainder added to `rest`."""
    received = b""
    start = 0
    for end in [*cuts, len(data)]:
        received += data[start:end]
        start = end
        result = pp.parse(received)
        if result is not NEED_DATA:
            if isinstance(result, Parsed):
                return Parsed(result.header, result.rest + data[start:])
            return result
    return NEED_DATA


def assert_split_invariant(data: bytes) -> pp.Result:
    """parse(data) equals the result of every one-cut split and of byte-at-a-time feeding."""
    whole = pp.parse(data)
    for cut in range(len(data) + 1):
        assert fed(data, [cut]) == whole, f"split at {cut}"
    assert fed(data, list(range(1, len(data)))) == whole, "byte at a time"
    return whole


def parsed(data: bytes) -> Parsed:
    result = assert_split_invariant(data)
    assert isinstance(result, Parsed), result
    return result


def invalid(data: bytes) -> str:
    result = assert_split_invariant(data)
    assert isinstance(result, Invalid), result
    return result.reason


# -- version 1 -----------------------------------------------------------------------------------


def test_v1_tcp4_and_the_smtp_bytes_after_it() -> None:
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"
    r = parsed(line + SMTP)
    assert r.header == pp.ProxyHeader(Version.V1, Command.PROXY, Family.INET, Endpoint("192.0.2.10", 56324),
                                      Endpoint("198.51.100.1", 25), length=len(line))
    assert r.rest == SMTP


def test_v1_tcp6() -> None:
    r = parsed(b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 0 65535\r\n")
    assert r.header.family is Family.INET6
    assert r.header.source == Endpoint("2001:db8::1", 0)
    assert r.header.destination == Endpoint("2001:db8::2", 65535)
    assert r.rest == b""


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"65535 65535\r\n",  # §2.1's worst case: 107 bytes with the CRLF
    b"PROXY UNKNOWN whatever follows is ignored\r\n",
])
def test_v1_unknown_has_no_addresses(line: bytes) -> None:
    assert len(line) <= pp.V1_MAX_LINE
    r = parsed(line + SMTP)
    assert (r.header.family, r.header.source, r.header.destination) == (Family.UNSPEC, None, None)
    assert r.rest == SMTP


def test_v1_longest_line_is_107_bytes() -> None:
    worst = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
             b"65535 65535\r\n")
    assert len(worst) == 107
    assert isinstance(pp.parse(worst), Parsed)
    assert "no CRLF within 107" in invalid(worst[:-2] + b"0\r\n")
    assert "no CRLF within 107" in invalid(b"PROXY " + b"x" * 200)


@pytest.mark.parametrize(("line", "reason"), [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r \n", "bare CR"),
    (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "bare LF"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 expected"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "6 expected"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 expected"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 expected"),
    (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "destination address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "source address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address"),
    (b"PROXY TCP6 ::1::2 ::1 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa2\r\n", "US-ASCII"),
    (b"PROXY UNKNOWN caf\xc3\xa9\r\n", "US-ASCII"),
    (b"PROXY \r\n", "unknown protocol"),
])
def test_v1_malformed(line: bytes, reason: str) -> None:
    assert reason in invalid(line + SMTP)


# -- version 2 -----------------------------------------------------------------------------------


def test_v2_tcp4_with_tlvs_and_smtp_after() -> None:
    tlvs = tlv(0x05, b"unique-id-1") + tlv(0x04, b"") + tlv(0xE0, b"\x00\x01")
    header = v2(block=inet4("203.0.113.7", "127.0.0.2", 40000, 2525) + tlvs)
    r = parsed(header + SMTP)
    assert r.header == pp.ProxyHeader(
        Version.V2, Command.PROXY, Family.INET, Endpoint("203.0.113.7", 40000), Endpoint("127.0.0.2", 2525),
        ((0x05, b"unique-id-1"), (0x04, b""), (0xE0, b"\x00\x01")), len(header))
    assert r.rest == SMTP


def test_v2_tcp6() -> None:
    r = parsed(v2(family=2, block=inet6("2001:db8::7", "::1", 1, 25)) + SMTP)
    assert r.header.family is Family.INET6
    assert r.header.source == Endpoint("2001:db8::7", 1)
    assert r.header.destination == Endpoint("::1", 25)
    assert r.rest == SMTP


@pytest.mark.parametrize("header", [
    v2(command=0, family=0, protocol=0),
    v2(command=0, block=inet4("10.9.9.9", "10.8.8.8", 1, 2)),  # LOCAL with addresses: skipped, ignored
    v2(command=0, family=2, block=b"short"),  # LOCAL: the block is not read at all
])
def test_v2_local_uses_the_real_endpoints(header: bytes) -> None:
    r = parsed(header + SMTP)
    assert r.header.command is Command.LOCAL
    assert (r.header.source, r.header.destination) == (None, None)
    assert r.rest == SMTP


@pytest.mark.parametrize(("family", "protocol", "block", "expect"), [
    (0, 0, b"", Family.UNSPEC),
    (0, 1, b"ignored", Family.UNSPEC),
    (1, 0, b"", Family.UNSPEC),
    (3, 1, b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0"), Family.UNIX),
])
def test_v2_proxy_without_an_ip_address(family: int, protocol: int, block: bytes, expect: Family) -> None:
    r = parsed(v2(family=family, protocol=protocol, block=block) + SMTP)
    assert (r.header.command, r.header.family, r.header.source) == (Command.PROXY, expect, None)
    assert r.rest == SMTP


ADDR4 = inet4("1.2.3.4", "5.6.7.8", 1, 2)


@pytest.mark.parametrize(("header", "reason"), [
    (v2(version=1, block=ADDR4), "version 1"),
    (v2(version=3, block=ADDR4), "version 3"),
    (v2(command=2, block=ADDR4), "command 0x2"),
    (v2(command=0xF, block=ADDR4), "command 0xf"),
    (v2(family=4, block=ADDR4), "0x41"),
    (v2(protocol=3, block=ADDR4), "0x13"),
    (v2(protocol=2, block=ADDR4), "DGRAM"),
    (v2(family=2, block=ADDR4), "shorter than the 36-byte"),
    (v2(block=ADDR4[:11]), "shorter than the 12-byte"),
    (v2(family=3, block=b"x" * 215), "shorter than the 216-byte"),
    (v2(block=ADDR4 + b"\x05\x00"), "TLV header cut off"),
    (v2(block=ADDR4 + b"\x05\x00\x05abcd"), "overruns"),
    (v2(block=ADDR4 + tlv(1, b"h2") + b"\x02"), "TLV header cut off"),
])
def test_v2_malformed(header: bytes, reason: str) -> None:
    assert reason in invalid(header + SMTP)


def test_v2_length_is_honoured_even_when_large() -> None:
    block = ADDR4 + tlv(0x04, b"\0" * 65000)
    r = parsed(v2(block=block) + SMTP)
    assert r.header.source == Endpoint("1.2.3.4", 1)
    assert r.rest == SMTP
    assert pp.parse(v2(block=block)[:-1]) is NEED_DATA


# -- neither -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"EHLO client.test\r\n", b"GET / HTTP/1.0\r\n", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXYTCP4", b"\r\n\r\n\x00\r\nquit\n", b"\x16\x03\x01\x02\x00", b"\r\n\r\nX",
])
def test_anything_else_is_refused_as_soon_as_it_cannot_become_a_header(data: bytes) -> None:
    assert "no PROXY protocol header" in invalid(data)
    first_wrong = next(i for i in range(1, len(data) + 1) if isinstance(pp.parse(data[:i]), Invalid))
    assert first_wrong <= 13  # decided within the signatures, not after a timeout


@pytest.mark.parametrize("prefix", [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"\r\n\r\n\x00",
                                    pp.V2_SIGNATURE, v2(block=ADDR4)[:15], v2(block=ADDR4)[:-1]])
def test_a_valid_prefix_needs_more_data(prefix: bytes) -> None:
    assert pp.parse(prefix) is NEED_DATA


# -- fuzz ----------------------------------------------------------------------------------------

RESULT_TYPES = (Parsed, Invalid)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data: bytes) -> None:
    result = pp.parse(data)
    assert result is NEED_DATA or isinstance(result, RESULT_TYPES)
    cut = len(data) // 2
    assert fed(data, [cut]) == result
    if isinstance(result, Parsed):
        assert data.endswith(result.rest) and result.header.length + len(result.rest) == len(data)


@FUZZ
@given(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", pp.V2_SIGNATURE,
                        pp.V2_SIGNATURE + b"\x21\x11", pp.V2_SIGNATURE + b"\x20"]),
       st.binary(max_size=200), st.lists(st.integers(0, 220), max_size=4))
def test_fuzz_near_headers(prefix: bytes, tail: bytes, cuts: list[int]) -> None:
    """Inputs that start like a header reach the deep checks; splits never change the answer."""
    data = prefix + tail
    result = pp.parse(data)
    assert result is NEED_DATA or isinstance(result, RESULT_TYPES)
    assert fed(data, sorted(c for c in cuts if c <= len(data))) == result


@FUZZ
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535),
       st.booleans(), st.binary(max_size=40))
def test_fuzz_round_trip_v4(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int,
                            binary: bool, rest: bytes) -> None:
    if binary:
        data = v2(block=inet4(str(src), str(dst), sport, dport))
    else:
        data = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    r = pp.parse(data + rest)
    assert isinstance(r, Parsed)
    assert (r.header.source, r.header.destination, r.rest) == (
        Endpoint(str(src), sport), Endpoint(str(dst), dport), rest)


@FUZZ
@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535),
       st.booleans())
def test_fuzz_round_trip_v6(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, sport: int, dport: int,
                            binary: bool) -> None:
    if binary:
        data = v2(family=2, block=inet6(str(src), str(dst), sport, dport))
    else:
        data = f"PROXY TCP6 {src.exploded} {dst} {sport} {dport}\r\n".encode()
    r = pp.parse(data + SMTP)
    assert isinstance(r, Parsed)
    assert (r.header.source, r.header.destination, r.rest) == (
        Endpoint(str(src), sport), Endpoint(str(dst), dport), SMTP)
