"""The end-of-data pipeline's signing and sealing decisions, sizes included.

Messages are spooled to real files (a SpooledBody, as the session makes them);
signatures are checked with dkimpy's own verifier, keys handed over in memory.
The session's call of `process` with real peers is in tests/interop/test_sign_seal.py.
"""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from gannet.config import DmarcMode
from gannet.mailauth import pipeline
from gannet.mailauth.checks import Verdict
from gannet.mailauth.keys import KeyAlgorithm, SigningKey, generate_key
from gannet.mailauth.signing import Signer
from gannet.queue.model import Body, InlineBody, SpooledBody

HOST = "mx.example.test"


def key(algorithm: KeyAlgorithm) -> SigningKey:
    return SigningKey("example.test", algorithm.value, algorithm, generate_key(algorithm), Path("unused"))


@pytest.fixture(scope="module")
def signer() -> Signer:
    rsa_key = key(KeyAlgorithm.RSA)
    return Signer([rsa_key, key(KeyAlgorithm.ED25519)], seal_key=rsa_key)


def records(signer: Signer) -> dict[str, bytes]:
    return {f"{k.record_name}.": k.txt_record().encode() for k in signer.keys}


def verifies(message: bytes, signer: Signer, index: int) -> bool:
    published = records(signer)
    try:
        return bool(dkim.DKIM(message).verify(index, dnsfunc=lambda n, timeout=5: published.get(n.decode())))
    except dkim.ValidationError:  # dkimpy raises for a body hash mismatch
        return False


def facts(*, sign: bool = True, forwarded: bool = False, max_size: int = 10_000) -> pipeline.MessageFacts:
    return pipeline.MessageFacts(
        queue_id="Q1", hostname=HOST, sender="alice@example.test", helo="client.test", check=False,
        dmarc=DmarcMode.ENFORCE, strip_forged=True, sign=sign, forwarded=forwarded, max_size=max_size,
    )  # fmt: skip


def message(body_lines: int, *, extra: bytes = b"") -> bytes:
    line = b"A line of a long message,  with  runs of spaces \t and a tab.   \r\n"
    return (
        b"Received: from client.test by mx.example.test\r\n"
        b"From: Alice <alice@example.test>\r\nTo: bob@elsewhere.test\r\nSubject: big\r\n"
        b"Date: Sat, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <big@example.test>\r\n" + extra + b"\r\n"
        + line * body_lines + b"\r\n\r\n"
    )  # fmt: skip


def spooled(tmp_path: Path, data: bytes) -> SpooledBody:
    path = tmp_path / "spool"
    path.write_bytes(data)
    return SpooledBody(path, len(data))


def content(body: Body) -> bytes:
    return body.data if isinstance(body, InlineBody) else body.path.read_bytes()


@pytest.mark.parametrize("lines", [10, 30_000], ids=["small", "over-max-size"])
async def test_our_mail_is_signed_whatever_its_size(tmp_path: Path, signer: Signer, lines: int) -> None:
    forged = f"Authentication-Results: {HOST}; dkim=pass\r\n".encode()
    original = message(lines, extra=forged)
    done = await pipeline.process(facts(max_size=10_000), spooled(tmp_path, original), None, signer, None)
    signed = content(done.body)
    assert signed.count(b"DKIM-Signature:") == 2 and forged not in signed
    assert verifies(signed, signer, 0) and verifies(signed, signer, 1)
    assert signed.endswith(original[original.index(b"\r\n\r\n") :])  # the body as it came
    assert not verifies(signed.replace(b"runs of spaces", b"runs of spades", 1), signer, 0)


async def test_a_large_inline_body_is_signed_too(signer: Signer) -> None:
    done = await pipeline.process(facts(max_size=100), InlineBody(message(5)), None, signer, None)
    assert verifies(content(done.body), signer, 0)


async def test_a_header_section_without_an_end_is_not_signed(tmp_path: Path, signer: Signer) -> None:
    endless = b"From: alice@example.test\r\nX-Long: " + b"x" * 70 + b"\r\n" + b"X-More: y\r\n" * 110_000
    done = await pipeline.process(facts(max_size=1000), spooled(tmp_path, endless), None, signer, None)
    assert b"DKIM-Signature:" not in content(done.body)


async def test_mail_from_another_domain_is_not_signed_and_its_body_not_read(
    tmp_path: Path, signer: Signer
) -> None:
    other = message(30_000).replace(b"alice@example.test", b"carol@elsewhere.test")
    body = spooled(tmp_path, other)
    done = await pipeline.process(facts(max_size=1000), body, None, signer, None)
    assert content(done.body) == other


async def test_a_large_forwarded_message_is_not_sealed(tmp_path: Path, signer: Signer) -> None:
    """Sealing above max_verify_size is the limit that remains (dkimpy's ARC needs the whole message)."""
    verdict_facts = facts(sign=False, forwarded=True, max_size=1000)
    small = facts(sign=False, forwarded=True)
    verdict = Verdict(b"", f"{HOST}; spf=pass; arc=none", HOST)
    assert await pipeline._signatures(small, InlineBody(message(5)), b"", None, signer, verdict)
    assert await pipeline._signatures(verdict_facts, spooled(tmp_path, message(100)), b"", None, signer,
                                      verdict) == b""  # fmt: skip
