"""DKIM verification: the RFC 8463 example as a fixed vector, RFC 6376's canonicalization examples,
and every result a signature can get (signatures made here with dkimpy's signer and fresh keys).

The key records are given as the prefetched `TxtAnswer`s the session would have
fetched; DNS itself is tested against dnsmasq in tests/interop/test_mailauth.py.
"""

from __future__ import annotations

import base64
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.mailauth.dkim_verify import (
    B_TAG,
    _canonical_body,
    _relaxed_headers,
    _select,
    key_names,
    parse_head,
    verify,
    without_b,
)
from gannet.mailauth.dns_bridge import TxtAnswer
from gannet.message.rewrite import split_head

# RFC 8463 Appendix A.2 (keys) and A.3 (the signed message), transcribed.
RFC8463_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com": TxtAnswer(
        ("v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",)
    ),
    "test._domainkey.football.example.com": TxtAnswer((
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6w"
        "y5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9P"
        "zoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
    )),
}  # fmt: skip
RFC8463_MESSAGE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)

# RFC 6376 Appendix A.1: the example message (unsigned).
RFC6376_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game. Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)


def test_rfc8463_example_both_signatures_pass() -> None:
    results = verify(RFC8463_MESSAGE, RFC8463_KEYS)
    assert [(r.result, r.algorithm, r.selector, r.domain) for r in results] == [
        ("pass", "ed25519-sha256", "brisbane", "football.example.com"),
        ("pass", "rsa-sha256", "test", "football.example.com"),
    ]
    assert results[0].b_prefix == "/gCrinpc"
    assert results[1].b_prefix == "F45dVWDf"


@pytest.mark.parametrize("head_given", [False, True])
def test_crlf_vouched_gives_the_same_outcomes(head_given: bool) -> None:
    """`crlf=True` (a session's CRLF-only mail) skips counting line ends, nothing else: the same
    outcomes as the counted path, for the message as sent and with its body altered."""
    for message in (RFC8463_MESSAGE, RFC8463_MESSAGE.replace(b"hungry yet?", b"hungry now?")):
        head = parse_head(split_head(message)[0]) if head_given else None
        counted = verify(message, RFC8463_KEYS, now=time.time(), head=head)
        vouched = verify(message, RFC8463_KEYS, now=time.time(), head=head, crlf=True)
        assert vouched == counted


def test_rfc8463_example_keys_are_the_published_pair() -> None:
    """The seed of A.2 gives the public key the vector is checked with (the vector is what the RFC says)."""
    seed = base64.b64decode(RFC8463_ED25519_SEED)
    public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (
        "p=" + base64.b64encode(raw).decode()
        in RFC8463_KEYS["brisbane._domainkey.football.example.com"].records[0]
    )


def test_rfc8463_example_altered_body_fails_both() -> None:
    altered = RFC8463_MESSAGE.replace(b"hungry yet?", b"hungry now?")
    assert [(r.result, r.reason) for r in verify(altered, RFC8463_KEYS)] == [
        ("fail", "body hash mismatch")
    ] * 2


def test_rfc8463_example_altered_subject_fails_both() -> None:
    altered = RFC8463_MESSAGE.replace(b"Is dinner ready?", b"Is lunch ready?")
    assert [r.result for r in verify(altered, RFC8463_KEYS)] == ["fail", "fail"]


def test_relaxed_canonicalization_survives_whitespace_changes() -> None:
    """relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4): refolded headers and trailing spaces still pass."""
    changed = RFC8463_MESSAGE.replace(b"Subject: Is dinner ready?", b"Subject:   Is dinner\r\n  ready?  ")
    changed = changed.replace(b"Joe.\r\n", b"Joe.   \r\n\r\n\r\n")
    assert [r.result for r in verify(changed, RFC8463_KEYS)] == ["pass", "pass"]


def test_key_names_in_order_without_repeats() -> None:
    head, _ = split_head(RFC8463_MESSAGE)
    assert key_names(head) == [
        "brisbane._domainkey.football.example.com",
        "test._domainkey.football.example.com",
    ]


def test_rfc6376_canonicalization_example() -> None:
    """RFC 6376 §3.4.5: the example header and body in both canonicalizations."""
    headers = [(b"A", b" X\r\n"), (b"B ", b" Y\t\r\n\tZ  \r\n")]
    body = b" C \r\nD \t E\r\n\r\n\r\n"
    assert Relaxed.canonicalize_headers(headers) == [(b"a", b"X\r\n"), (b"b", b"Y Z\r\n")]
    assert Relaxed.canonicalize_body(body) == b" C\r\nD E\r\n"
    assert Simple.canonicalize_headers(headers) == headers
    assert Simple.canonicalize_body(body) == b" C \r\nD \t E\r\n"


# ---------------------------------------------------------------- signatures made here


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def signed(pem: bytes, message: bytes = RFC6376_MESSAGE, **kw: object) -> bytes:
    args: dict[str, object] = {"include_headers": [b"from", b"to", b"subject", b"date"]}
    args.update(kw)
    return dkim.sign(message, b"s1", b"sender.test", pem, **args) + message  # type: ignore[no-any-return]


KEY = "s1._domainkey.sender.test"


@pytest.mark.parametrize("canon", [(b"simple", b"simple"), (b"relaxed", b"simple"), (b"relaxed", b"relaxed")])
def test_rsa_sha256_each_canonicalization_passes(
    rsa_key: tuple[bytes, str], canon: tuple[bytes, bytes]
) -> None:
    pem, record = rsa_key
    [result] = verify(signed(pem, canonicalize=canon), {KEY: TxtAnswer((record,))})
    assert (result.result, result.domain, result.selector) == ("pass", "sender.test", "s1")


def test_simple_body_fails_on_trailing_space(rsa_key: tuple[bytes, str]) -> None:
    pem, record = rsa_key
    message = signed(pem, canonicalize=(b"simple", b"simple")).replace(b"Joe.\r\n", b"Joe. \r\n")
    assert verify(message, {KEY: TxtAnswer((record,))})[0].result == "fail"


def test_body_length_limit(rsa_key: tuple[bytes, str]) -> None:
    """l= (RFC 6376 §3.5): text added after the signed length keeps the signature; a change inside fails."""
    pem, record = rsa_key
    message = signed(pem, length=True)
    keys = {KEY: TxtAnswer((record,))}
    assert verify(message + b"-- \r\nList footer\r\n", keys)[0].result == "pass"
    assert verify(message.replace(b"We lost", b"We won"), keys)[0].result == "fail"


class _ExpiringDkim(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer writes no x=: add t= and x= two hours in the past before it signs."""

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: object, **kw: object) -> bytes:
        past = int(time.time()) - 7200
        fields = [(k, str(past - 60).encode()) if k == b"t" else (k, v) for k, v in fields]
        at = [k for k, _ in fields].index(b"h")
        fields.insert(at, (b"x", str(past).encode()))
        return super().gen_header(fields, *args, **kw)  # type: ignore[no-any-return]


def test_expired_signature_is_neutral(rsa_key: tuple[bytes, str]) -> None:
    """x= in the past (RFC 6376 §3.5): not verified, reported as neutral with the reason."""
    pem, record = rsa_key
    header = _ExpiringDkim(RFC6376_MESSAGE).sign(b"s1", b"sender.test", pem, include_headers=[b"from"])
    [result] = verify(header + RFC6376_MESSAGE, {KEY: TxtAnswer((record,))})
    assert result.result == "neutral" and "expired" in result.reason


def test_ed25519_signature_made_here_passes() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    message = signed(base64.b64encode(seed), signature_algorithm=b"ed25519-sha256")
    record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    assert verify(message, {KEY: TxtAnswer((record,))})[0].result == "pass"


@pytest.mark.parametrize(
    ("answer", "result", "reason"),
    [
        (TxtAnswer(), "permerror", "no key published"),
        (TxtAnswer(temporary_error="SERVFAIL"), "temperror", "key lookup failed"),
        (TxtAnswer(("v=DKIM1; k=rsa; p=",)), "permerror", "unusable key record"),
        (TxtAnswer(("v=DKIM1; k=rsa; p=!!notbase64",)), "permerror", "unusable key record"),
    ],
)
def test_key_problems(rsa_key: tuple[bytes, str], answer: TxtAnswer, result: str, reason: str) -> None:
    [outcome] = verify(signed(rsa_key[0]), {KEY: answer})
    assert outcome.result == result and reason in outcome.reason


def test_wrong_key_fails(rsa_key: tuple[bytes, str]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    assert verify(signed(rsa_key[0]), {KEY: TxtAnswer((record,))})[0].result == "fail"


def test_small_rsa_key_is_refused(rsa_key: tuple[bytes, str]) -> None:
    """RFC 8301 §3.2: keys under 1024 bits are not accepted."""
    small = rsa.RSAPublicNumbers(65537, (1 << 767) | 0xFFFF1).public_key()  # no signer makes these now
    der = small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    [outcome] = verify(signed(rsa_key[0]), {KEY: TxtAnswer((record,))})
    assert outcome.result == "permerror" and "too small" in outcome.reason


def test_rsa_sha1_is_not_accepted(rsa_key: tuple[bytes, str]) -> None:
    """RFC 8301 §3.1: verifiers MUST NOT consider rsa-sha1 signatures valid."""
    [outcome] = verify(signed(rsa_key[0], signature_algorithm=b"rsa-sha1"), {KEY: TxtAnswer((rsa_key[1],))})
    assert outcome.result == "policy"


def test_no_signature_no_results() -> None:
    assert verify(RFC6376_MESSAGE, {}) == []


def test_garbage_signature_is_neutral() -> None:
    message = b"DKIM-Signature: this is not a tag list\r\n" + RFC6376_MESSAGE
    [outcome] = verify(message, {})
    assert outcome.result == "neutral"


@pytest.mark.parametrize(
    "body",
    [b"", b"\r\n", b"\r\n\r\n", b"a\r\n", b"a \r\n\r\n", b"a  b\r\n", b"a\tb \t\r\n", b"no newline",
     b" lead\r\n trail \r\n\r\n", b"x y z\r\n \r\n", RFC6376_MESSAGE.split(b"\r\n\r\n", 1)[1]],
)  # fmt: skip
def test_fast_relaxed_body_is_dkimpys(body: bytes) -> None:
    """The shortcut for bodies without tabs or double spaces gives exactly dkimpy's canonical body."""
    for c in (b"relaxed/relaxed", b"relaxed/simple", b"simple/simple"):
        policy = CanonicalizationPolicy.from_c_value(c)
        assert _canonical_body(policy, body) == policy.canonicalize_body(body)


# ---------------------------------------------------------------- the fast paths are dkimpy's bytes

_WSP_AND_TEXT = st.lists(
    st.sampled_from([b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\n", b"\r", b"a", b"B", b"=", b";", b":"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"Subject", b"FROM", b"to ", b"X-A"]), _WSP_AND_TEXT), max_size=5))
def test_fast_relaxed_headers_are_dkimpys(headers: list[tuple[bytes, bytes]]) -> None:
    assert _relaxed_headers(headers) == Relaxed.canonicalize_headers(headers)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"from", b"to", b"subject"]), max_size=6),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"date"]), max_size=8),
)
def test_field_selection_is_dkimpys(names: list[bytes], wanted: list[bytes]) -> None:
    """RFC 6376 §5.4.2: repeated names take instances bottom up; names listed more often than
    they occur (oversigning) select nothing more."""
    fields = [(name, str(i).encode()) for i, name in enumerate(names)]
    assert _select(fields, names, wanted) == dkim.select_headers(fields, wanted)


_B_VALUE = st.lists(
    st.sampled_from([b"AbC", b"+/", b"=", b" ", b"\r\n ", b"\t", b"\r\n", b"\n", b";", b" b=", b"b ="]),
    max_size=10,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_B_VALUE, _B_VALUE)
def test_b_tag_removal_is_dkimpys(before: bytes, after: bytes) -> None:
    for value in (b" v=1; a=rsa-sha256;" + before + b" b=" + after, before + after, b";b=" + after + b"\r\n"):
        assert B_TAG.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value)
        assert without_b(value) == dkim.RE_BTAG.sub(b"\\1", value)


@pytest.mark.parametrize(
    "section",
    [RFC8463_MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n",
     b"Subject: a\r\n\tfolded\r\n line\r\nFrom: x@y.test\r\n",
     b"X-Empty:\r\nX-Colon:: two\r\nDKIM-Signature: v=1; d=a.test; s=s\r\n"],
)  # fmt: skip
def test_parse_head_is_dkimpys_parse(section: bytes) -> None:
    head = parse_head(section)
    assert head.headers == dkim.rfc822_parse(section + b"\r\n")[0]


@pytest.mark.parametrize(
    "section", [b"From alice@x.test Mon Jan  1 00:00:00 2024\r\nSubject: mbox\r\n", b"Bad Name: x\r\n",
                b"no colon at all\r\n"],
)  # fmt: skip
def test_parse_head_leaves_odd_sections_to_dkimpy(section: bytes) -> None:
    assert parse_head(section).headers is None
    verify(section + b"\r\nbody\r\n", {}, head=parse_head(section))  # dkimpy's answer, whatever it is


def test_verify_with_a_parsed_head_gives_the_same_results() -> None:
    section, _ = split_head(RFC8463_MESSAGE)
    head = parse_head(section)
    assert head.key_names() == key_names(section)
    assert verify(RFC8463_MESSAGE, RFC8463_KEYS, head=head) == verify(RFC8463_MESSAGE, RFC8463_KEYS)
    altered = RFC8463_MESSAGE.replace(b"Is dinner ready?", b"Is lunch ready?")
    assert [r.result for r in verify(altered, RFC8463_KEYS, head=parse_head(split_head(altered)[0]))] == [
        "fail",
        "fail",
    ]
