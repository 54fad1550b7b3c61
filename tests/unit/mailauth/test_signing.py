"""DKIM signing and ARC sealing: what is signed, with which key, and that verifiers agree.

Verification here is dkimpy's verifier with the key records handed over in
memory; tests/interop/test_dkim_sign.py has OpenDKIM and dkimverify checking
the same signatures through a real DNS server. The RFC 8463 Appendix A
example is reproduced byte for byte (Ed25519 signatures are deterministic).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from gannet.config import ConfigError, load
from gannet.mailauth import signing
from gannet.mailauth.keys import KeyAlgorithm, SigningKey, generate_key, pem_pkcs8
from gannet.mailauth.signing import Signer

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@elsewhere.test>\r\n"
    b"Subject: lunch\r\n"
    b"Date: Sat, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"Received: from somewhere by mx.example.test\r\n"
    b"List-Id: <friends.example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Shall we?  \r\n"
    b"\r\n"
    b"-- \r\nAlice\r\n"
)


def make_key(algorithm: KeyAlgorithm, domain: str = "example.test", selector: str = "") -> SigningKey:
    return SigningKey(domain, selector or algorithm.value, algorithm, generate_key(algorithm), Path("unused"))


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return make_key(KeyAlgorithm.RSA)


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return make_key(KeyAlgorithm.ED25519)


def dns_for(*keys: SigningKey) -> dict[str, bytes]:
    return {f"{k.record_name}.": k.txt_record().encode() for k in keys}


def verify(message: bytes, records: dict[str, bytes], index: int = 0) -> bool:
    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode())

    return bool(dkim.DKIM(message).verify(index, dnsfunc=txt))


def tags(field: bytes) -> dict[str, str]:
    value = field.split(b":", 1)[1]
    return {k.decode(): re.sub(r"\s+", "", v.decode()) for k, v in dkim.util.parse_tag_value(value).items()}


def fields_of(block: bytes) -> list[bytes]:
    """Split prepended header lines into fields (a field's folded lines stay together)."""
    return [m.group(0) for m in re.finditer(rb"[A-Za-z-]+:.*?\r\n(?![ \t])", block, re.DOTALL)]


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_signature_verifies_and_fails_when_the_body_changes(algorithm: KeyAlgorithm) -> None:
    key = make_key(algorithm)
    header = Signer([key]).sign(MESSAGE)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))  # folded (RFC 5322 §2.1.1)
    assert verify(header + MESSAGE, dns_for(key))
    assert not dkim.verify(
        header + MESSAGE.replace(b"Shall we?", b"Shall we!"),
        dnsfunc=lambda n, timeout=5: dns_for(key).get(n.decode()),
    )


def test_relaxed_canonicalization_survives_refolding_and_trailing_space(rsa_key: SigningKey) -> None:
    signed = Signer([rsa_key]).sign(MESSAGE) + MESSAGE
    rewritten = signed.replace(b"Subject: lunch", b"Subject:   lunch ").replace(b"Shall we?  ", b"Shall we?")
    assert verify(rewritten, dns_for(rsa_key))


def test_header_set_signs_present_fields_and_oversigns_from(rsa_key: SigningKey) -> None:
    t = tags(Signer([rsa_key]).sign(MESSAGE, now=1_800_000_000))
    assert t["h"].split(":") == [
        "from", "to", "subject", "date", "message-id", "list-id", "mime-version", "content-type", "from",
    ]  # fmt: skip
    assert "received" not in t["h"]  # RFC 6376 §5.4.1: trace fields are not signed
    assert t["c"] == "relaxed/relaxed" and t["d"] == "example.test" and t["s"] == "rsa"
    assert t["a"] == "rsa-sha256" and t["t"] == "1800000000" and "l" not in t and "x" not in t


def test_a_second_from_added_later_breaks_the_signature(rsa_key: SigningKey) -> None:
    signed = Signer([rsa_key]).sign(MESSAGE) + MESSAGE
    forged = signed.replace(b"To: Bob", b"From: Mallory <m@evil.test>\r\nTo: Bob", 1)
    assert not verify(forged, dns_for(rsa_key))


def test_dual_signing_with_rsa_and_ed25519(rsa_key: SigningKey, ed_key: SigningKey) -> None:
    block = Signer([rsa_key, ed_key]).sign(MESSAGE)
    signatures = fields_of(block)
    assert [tags(f)["a"] for f in signatures] == ["rsa-sha256", "ed25519-sha256"]
    signed = block + MESSAGE
    assert verify(signed, dns_for(rsa_key, ed_key), 0) and verify(signed, dns_for(rsa_key, ed_key), 1)


@pytest.mark.parametrize(
    "from_line",
    [
        b"From: someone@news.example.test",  # a subdomain: not covered by example.test's key
        b"From: someone@other.test",
        b"From: a@example.test, b@other.test",  # two domains: ambiguous
        b"X-No-From: a@example.test",
    ],
)
def test_no_signature_without_a_key_for_the_one_from_domain(rsa_key: SigningKey, from_line: bytes) -> None:
    message = MESSAGE.replace(b"From: Alice <alice@example.test>", from_line)
    assert Signer([rsa_key]).sign(message) == b""


def test_from_domain_is_matched_case_insensitively_and_two_from_fields_are_not_signed(
    rsa_key: SigningKey,
) -> None:
    assert Signer([rsa_key]).sign(MESSAGE.replace(b"alice@example.test", b"Alice@EXAMPLE.Test"))
    two = MESSAGE.replace(b"To: Bob", b"From: x@example.test\r\nTo: Bob")
    assert Signer([rsa_key]).sign(two) == b""


def test_unparseable_header_is_left_unsigned(rsa_key: SigningKey) -> None:
    assert Signer([rsa_key]).sign(b"From: a@example.test\r\nthis is not a header\r\n\r\nbody\r\n") == b""


def test_rfc8463_ed25519_example_byte_for_byte() -> None:
    """RFC 8463 Appendix A: the same key, message and tags give the RFC's bh= and b=."""
    seed = base64.b64decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    key = SigningKey(
        "football.example.com",
        "brisbane",
        KeyAlgorithm.ED25519,
        ed25519.Ed25519PrivateKey.from_private_bytes(seed),
        Path("unused"),
    )
    assert key.public_key_b64() == "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    message = (
        b"From: Joe SixPack <joe@football.example.com>\r\n"
        b"To: Suzie Q <suzie@shopping.example.net>\r\n"
        b"Subject: Is dinner ready?\r\n"
        b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
        b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
        b"\r\n"
        b"Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
    )
    headers, body = dkim.rfc822_parse(message)
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"from", b"subject", b"date"]
    bh = base64.b64encode(
        dkim.HASH_ALGORITHMS[b"ed25519-sha256"](signing._RELAXED.canonicalize_body(body)).digest()
    )
    assert bh == b"2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    fields = [
        (b"v", b"1"),
        (b"a", b"ed25519-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"football.example.com"),
        (b"i", b"@football.example.com"),
        (b"q", b"dns/txt"),
        (b"s", b"brisbane"),
        (b"t", b"1528637909"),
        (b"h", b" : ".join(include)),
        (b"bh", bh),
        (b"b", b""),
    ]
    value = signing.signed_field(b"DKIM-Signature", fields, include, headers, key)
    assert re.sub(rb"\s+", b"", value).endswith(
        b"b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
    )
    # and our own header for that message verifies with the RFC's published key
    own = Signer([key]).sign(message)
    assert verify(own + message, dns_for(key))


@given(
    st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"  "]), max_size=40).map(b"".join)
)
def test_relaxed_body_gives_the_bytes_dkimpy_gives(body: bytes) -> None:
    assert signing.relaxed_body(body) == signing._RELAXED.canonicalize_body(body)


@given(
    st.lists(st.sampled_from([b"X-A: 1\r\n", b" folded\r\n", b"From: a@example.test\r\n"]), max_size=6),
    st.lists(st.sampled_from([b"line\r\n", b"\r\n", b"X: not a header\r\n"]), max_size=6),
)
def test_split_message_gives_what_rfc822_parse_gives(head: list[bytes], body: list[bytes]) -> None:
    while head and head[0].startswith(b" "):
        head = head[1:]  # a continuation line cannot come first
    message = b"".join(head) + b"\r\n" + b"".join(body)
    assert signing.split_message(message) == tuple(dkim.rfc822_parse(message))


# ---------------------------------------------------------------------------- ARC


def arc_verify(message: bytes, *keys: SigningKey) -> tuple[bytes, str]:
    records = dns_for(*keys)
    cv, _, reason = dkim.arc_verify(message, dnsfunc=lambda n, timeout=5: records.get(n.decode()))
    return cv, reason


def test_seal_starts_a_chain_that_verifies(rsa_key: SigningKey) -> None:
    signer = Signer([rsa_key], seal_key=rsa_key)
    results = "mx.example.test; spf=pass smtp.mailfrom=alice@elsewhere.test; dkim=none; arc=none"
    block = signer.seal(MESSAGE, results)
    names = [f.split(b":", 1)[0] for f in fields_of(block)]
    assert names == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    aar = fields_of(block)[2]
    assert b"i=1; mx.example.test;" in aar and b"spf=pass" in aar
    assert tags(fields_of(block)[0])["cv"] == "none"
    assert arc_verify(block + MESSAGE, rsa_key) == (b"pass", "success")
    tampered = (block + MESSAGE).replace(b"Shall we?", b"Shall we!")
    assert arc_verify(tampered, rsa_key)[0] == b"fail"


def test_seal_continues_an_existing_chain_with_cv_from_the_results(rsa_key: SigningKey) -> None:
    first_hop = make_key(KeyAlgorithm.RSA, domain="lists.test", selector="arc")
    first = Signer([first_hop], seal_key=first_hop).seal(MESSAGE, "mx.lists.test; spf=pass; arc=none")
    hop1 = first + MESSAGE
    ours = Signer([rsa_key], seal_key=rsa_key).seal(hop1, "mx.example.test; dkim=fail; arc=pass")
    seal = tags(fields_of(ours)[0])
    assert seal["i"] == "2" and seal["cv"] == "pass" and seal["d"] == "example.test"
    assert arc_verify(ours + hop1, rsa_key, first_hop) == (b"pass", "success")


def test_no_seal_without_a_key_or_after_the_chain_ended(rsa_key: SigningKey) -> None:
    assert Signer([rsa_key]).seal(MESSAGE, "mx.example.test; arc=none") == b""
    sealer = Signer([rsa_key], seal_key=rsa_key)
    assert sealer.seal(MESSAGE, "") == b""
    hop1 = sealer.seal(MESSAGE, "mx.lists.test; arc=none") + MESSAGE
    assert sealer.seal(hop1, "mx.example.test; spf=pass") == b""  # i=2 and no arc= result: ended


# ---------------------------------------------------------------------------- from_config


def write_config(tmp_path: Path, hostname: str, entries: list[tuple[str, str, SigningKey]]) -> Path:
    text = f'hostname = "{hostname}"\n[relay]\nlocal_domains = ["example.test", "other.test"]\n'
    for domain, selector, key in entries:
        path = tmp_path / f"{domain}.{selector}.key"
        path.write_bytes(pem_pkcs8(key.private_key))
        text += f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{path}"\n'
    config = tmp_path / "gannet.toml"
    config.write_text(text)
    return config


def test_from_config_without_keys_is_none(tmp_path: Path) -> None:
    assert Signer.from_config(load(write_config(tmp_path, "mx.example.test", []))) is None


def test_from_config_seals_with_the_hostname_domain_rsa_key(
    tmp_path: Path, rsa_key: SigningKey, ed_key: SigningKey
) -> None:
    other = make_key(KeyAlgorithm.RSA, "other.test")
    config = load(
        write_config(
            tmp_path,
            "mx.example.test",
            [("other.test", "o1", other), ("example.test", "ed", ed_key), ("example.test", "rs", rsa_key)],
        )
    )
    signer = Signer.from_config(config)
    assert signer is not None and signer.seal_key is not None
    assert (signer.seal_key.domain, signer.seal_key.selector) == ("example.test", "rs")
    assert [k.algorithm for k in signer.by_domain["example.test"]] == [KeyAlgorithm.ED25519, KeyAlgorithm.RSA]


def test_from_config_seals_with_the_first_local_domain_when_the_hostname_has_no_key(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    config = load(
        write_config(
            tmp_path, "mail.hosting.test", [("other.test", "o", rsa_key), ("example.test", "e", rsa_key)]
        )
    )
    signer = Signer.from_config(config)
    assert signer is not None and signer.seal_key is not None and signer.seal_key.domain == "example.test"


def test_from_config_raises_config_error_for_a_bad_key(tmp_path: Path, rsa_key: SigningKey) -> None:
    config_path = write_config(tmp_path, "mx.example.test", [("example.test", "s1", rsa_key)])
    (tmp_path / "example.test.s1.key").write_text("not a key")
    with pytest.raises(ConfigError) as err:
        Signer.from_config(load(config_path))
    assert err.value.key == "dkim[0].key_file"
