"""Fixtures shared by the mailauth tests: one DKIM-signed message and its key record."""

from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@pytest.fixture(scope="module")
def signed() -> tuple[bytes, str]:
    """A message from sender.test signed by s1._domainkey.sender.test, and that key's TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )  # fmt: skip
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    message = (
        b"From: Bob <bob@sender.test>\r\nTo: alice@example.test\r\nSubject: checked\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <checks@sender.test>\r\n\r\nHello.\r\n"
    )
    signature = dkim.sign(message, b"s1", b"sender.test", pem, include_headers=[b"from", b"to", b"subject"])
    return signature + message, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
