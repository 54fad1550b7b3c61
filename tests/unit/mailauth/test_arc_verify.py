"""ARC verification (RFC 8617 §5.2): chains sealed by dkimpy's own `arc_sign`, checked by
`gannet.mailauth.arc_verify` through the same prefetch path the session uses.

The keys are published in a dict ("DNS"); `prefetched()` asks it for exactly the
names `arc_key_names()` lists for the message, as `InboundChecks` does through the
resolver, so a name the module forgot to list would be missing and fail the chain.
A running Gannet verifying a chain from dnsmasq is in tests/interop/test_arc.py.
"""

from __future__ import annotations

import base64
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gannet.mailauth.arc_verify import ArcOutcome, arc_key_names, has_arc, verify
from gannet.mailauth.dns_bridge import TxtAnswer
from gannet.message.rewrite import split_head

MESSAGE = (
    b"From: Alice <alice@origin.test>\r\n"
    b"To: list@lists.test\r\n"
    b"Subject: an ARC chain\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <arc-unit@origin.test>\r\n"
    b"\r\n"
    b"Hello through two forwarders.\r\n"
)
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


class Hop:
    """A forwarder with its own RSA key, published at `selector._domainkey.domain`."""

    def __init__(self, domain: str, selector: str = "arc") -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )  # fmt: skip
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        self.domain, self.selector = domain, selector
        self.authserv_id = f"mx.{domain}"

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def seal(self, message: bytes, results: str) -> bytes:
        """The message as this hop forwards it: its A-R field, then dkimpy's ARC set on top."""
        with_ar = f"Authentication-Results: {self.authserv_id}; {results}\r\n".encode() + message
        block = dkim.arc_sign(
            with_ar, self.selector.encode(), self.domain.encode(), self.pem, self.authserv_id.encode(),
            include_headers=SIGNED, timestamp=1_700_000_000,
        )  # fmt: skip
        return b"".join(block) + with_ar


@pytest.fixture(scope="module")
def hops() -> tuple[Hop, Hop, Hop]:
    return Hop("lists.test"), Hop("forwarder.test"), Hop("third.test")


def published(*hops: Hop) -> dict[str, str]:
    return {h.name: h.record for h in hops}


def prefetched(message: bytes, dns: dict[str, str], *, failing: str = "") -> dict[str, TxtAnswer]:
    """The key records as InboundChecks fetches them: the names arc_key_names() lists, each one
    answered from `dns` (NXDOMAIN: no records), `failing` as a temporary failure."""
    head, _ = split_head(message)
    out = {}
    for name in arc_key_names(head):
        if name == failing:
            out[name] = TxtAnswer(temporary_error="SERVFAIL")
        else:
            out[name] = TxtAnswer((dns[name],) if name in dns else ())
    return out


def check(message: bytes, dns: dict[str, str]) -> ArcOutcome:
    return verify(message, prefetched(message, dns))


def two_hops(first: Hop, second: Hop, cv: str = "pass") -> bytes:
    hop1 = first.seal(MESSAGE, "spf=pass smtp.mailfrom=alice@origin.test; arc=none")
    return second.seal(hop1, f"dkim=none; arc={cv}")


# ---------------------------------------------------------------------------- pass


def test_one_arc_set_passes(hops: tuple[Hop, Hop, Hop]) -> None:
    first = hops[0]
    sealed = first.seal(MESSAGE, "spf=pass smtp.mailfrom=alice@origin.test; arc=none")
    assert has_arc(split_head(sealed)[0])
    assert check(sealed, published(first)) == ArcOutcome("pass", "", 1)


def test_a_chain_of_three_sets_passes_and_every_key_is_fetched(hops: tuple[Hop, Hop, Hop]) -> None:
    first, second, third = hops
    message = third.seal(two_hops(first, second), "arc=pass")
    head, _ = split_head(message)
    assert sorted(arc_key_names(head)) == sorted(h.name for h in hops)
    assert check(message, published(*hops)) == ArcOutcome("pass", "", 3)


# ---------------------------------------------------------------------------- none


def test_no_arc_headers_is_none() -> None:
    assert not has_arc(split_head(MESSAGE)[0])
    assert arc_key_names(split_head(MESSAGE)[0]) == []
    assert verify(MESSAGE, {}) == ArcOutcome("none", "", 0)


# ---------------------------------------------------------------------------- fail


def test_a_body_changed_after_sealing_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    message = two_hops(hops[0], hops[1]).replace(b"Hello through", b"Goodbye through")
    outcome = check(message, published(*hops))
    assert outcome.result == "fail"
    assert outcome.reason == "Most recent ARC-Message-Signature did not validate"


def test_a_signed_header_changed_after_sealing_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    message = two_hops(hops[0], hops[1]).replace(b"Subject: an ARC chain", b"Subject: a changed chain")
    assert check(message, published(*hops)).result == "fail"


def test_a_tampered_arc_seal_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """The newest seal's cv= changed (pass → none) after sealing: its signature no longer holds."""
    message = two_hops(hops[0], hops[1])
    tampered = re.sub(rb"(ARC-Seal: i=2; )cv=pass", rb"\1cv=none", message, count=1)
    assert tampered != message
    outcome = check(tampered, published(*hops))
    assert outcome.result == "fail"
    assert outcome.reason == "ARC-Seal[2] did not validate"


def test_an_older_seal_tampered_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """The first hop's AAR rewritten (spf=pass → spf=fail): ARC-Seal[1] and every later seal break."""
    message = two_hops(hops[0], hops[1])
    tampered = message.replace(b"i=1; mx.lists.test;\r\n spf=pass", b"i=1; mx.lists.test;\r\n spf=fail")
    assert tampered != message
    assert check(tampered, published(*hops)) == ArcOutcome("fail", "ARC-Seal[2] did not validate", 2)


def test_a_missing_instance_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """i=1 removed from a chain of two: instance 2 with no 1 (RFC 8617 §5.2 step 3, i= gap)."""
    message = two_hops(hops[0], hops[1])
    head, rest = split_head(message)
    fields = [f for f in re.split(rb"\r\n(?=[^ \t])", head) if f]
    kept = [f for f in fields if not (f.lower().startswith(b"arc-") and re.search(rb"\bi=1;", f))]
    assert len(kept) == len(fields) - 3
    outcome = check(b"\r\n".join(kept) + b"\r\n" + rest, published(*hops))
    assert outcome.result == "fail"
    assert "Incomplete ARC set for instance 1" in outcome.reason


def test_an_instance_numbered_past_a_gap_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """The only set renumbered i=1 → i=2 (no set 1): a gap, whatever the signatures say."""
    sealed = hops[0].seal(MESSAGE, "arc=none")
    renumbered = re.sub(rb"\bi=1;", b"i=2;", sealed)
    outcome = check(renumbered, published(hops[0]))
    assert outcome.result == "fail" and "instance 1" in outcome.reason


def test_a_chain_that_reported_cv_fail_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """The second hop found the chain broken and sealed with cv=fail: the chain is over (§5.1.2)."""
    message = two_hops(hops[0], hops[1], cv="fail")
    assert b"cv=fail" in message
    outcome = check(message, published(*hops))
    assert outcome.result == "fail"
    assert "reported failure" in outcome.reason


def test_a_first_set_with_cv_pass_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    """A first seal altered to claim cv=pass (i=1 must say none, RFC 8617 §4.1.3) fails."""
    sealed = hops[0].seal(MESSAGE, "arc=none")
    forged = sealed.replace(b"ARC-Seal: i=1; cv=none", b"ARC-Seal: i=1; cv=pass", 1)
    assert forged != sealed
    assert check(forged, published(hops[0])) == ArcOutcome("fail", "ARC-Seal[1] did not validate", 1)


def test_a_key_not_published_fails(hops: tuple[Hop, Hop, Hop]) -> None:
    message = two_hops(hops[0], hops[1])
    outcome = check(message, published(hops[1]))  # the first hop's key is gone
    assert outcome == ArcOutcome("fail", "ARC-Seal[1] did not validate", 2)


def test_a_key_lookup_that_failed_temporarily_is_fail_with_the_reason(hops: tuple[Hop, Hop, Hop]) -> None:
    message = two_hops(hops[0], hops[1])
    outcome = verify(message, prefetched(message, published(*hops), failing=hops[0].name))
    assert outcome == ArcOutcome("fail", f"key lookup failed temporarily: {hops[0].name}")


def test_garbage_arc_fields_fail_without_raising() -> None:
    message = b"ARC-Seal: i=1; cv=none; a=rsa-sha256; b=@@@\r\nARC-Message-Signature: nonsense\r\n" + MESSAGE
    outcome = verify(message, {})
    assert outcome.result == "fail" and outcome.reason
