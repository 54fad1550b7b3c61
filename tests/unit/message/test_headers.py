"""Received/Message-ID/Date builders and the header scanner."""

from __future__ import annotations

import email

from gannet.message import headers

NOW = 1_800_000_000.0


def info(**kw: object) -> headers.ReceivedInfo:
    base: dict[str, object] = dict(
        helo="client.test",
        client_host="",
        client_ip="192.0.2.7",
        by="mx.example.test",
        protocol="ESMTPS",
        queue_id="ABC123",
        recipient="bob@example.test",
        tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    )
    base.update(kw)
    return headers.ReceivedInfo(**base)  # type: ignore[arg-type]


def test_received_header_has_rfc5321_clauses_and_parses() -> None:
    raw = headers.received_header(info(), NOW)
    assert raw.endswith(b"\r\n")
    msg = email.message_from_bytes(raw + b"\r\nbody")
    value = " ".join(msg["Received"].split())
    assert value.startswith(
        "from client.test ([192.0.2.7]) by mx.example.test (Gannet) with ESMTPS id ABC123"
    )
    assert "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))" in value
    assert "for <bob@example.test>;" in value
    assert value.endswith("GMT")


def test_received_ipv6_literal_and_hostile_helo() -> None:
    raw = headers.received_header(
        info(client_ip="2001:db8::1", helo="evil\r\nX-Injected: yes", recipient=None), NOW
    )
    assert b"[IPv6:2001:db8::1]" in raw
    assert b"X-Injected: yes" not in raw.split(b"\r\n")[0] or b"\r\nX-Injected" not in raw
    assert b"for <" not in raw


def test_with_protocol_names() -> None:
    p = headers.with_protocol
    assert p(esmtp=False, tls=False, auth=False, smtputf8=False, lmtp=False) == "SMTP"
    assert p(esmtp=True, tls=True, auth=True, smtputf8=False, lmtp=False) == "ESMTPSA"
    assert p(esmtp=True, tls=True, auth=False, smtputf8=True, lmtp=False) == "UTF8SMTPS"
    assert p(esmtp=True, tls=False, auth=False, smtputf8=False, lmtp=True) == "LMTP"


def test_scan_headers_finds_message_id_date_and_counts_received() -> None:
    head = (
        b"Received: from a\r\n\tby b; date\r\nReceived: from c\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID:\r\n <x@y.test>\r\nSubject: hi\r\n\r\nbody\r\nMessage-ID: <not-a-header>\r\n"
    )
    facts = headers.scan_headers(head)
    assert facts.complete and facts.has_date and facts.has_message_id
    assert facts.message_id == "<x@y.test>"
    assert facts.received_count == 2


def test_scan_headers_incomplete_and_empty_header_section() -> None:
    facts = headers.scan_headers(b"Subject: a\r\nMessage-")
    assert not facts.complete and not facts.has_message_id
    assert headers.scan_headers(b"\r\nbody only").complete
    assert not headers.scan_headers(b"\r\nMessage-ID: <a@b>\r\n").has_message_id
