"""DKIM keys: loading (and every refusal as a ConfigError), the DNS record form, writing with mode 0600."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gannet.config import ConfigError, load
from gannet.mailauth import keys
from gannet.mailauth.keys import KeyAlgorithm

BASE = """
hostname = "mx.example.test"
[relay]
local_domains = ["example.test"]
"""


def config_with(tmp_path: Path, *entries: tuple[str, str, str]) -> Path:
    text = BASE + "".join(
        f'\n[[dkim]]\ndomain = "{d}"\nselector = "{s}"\nkey_file = "{f}"\n' for d, s, f in entries
    )
    path = tmp_path / "gannet.toml"
    path.write_text(text)
    return path


def pem(
    key: object,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    enc: serialization.KeySerializationEncryption | None = None,
) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, fmt, enc or serialization.NoEncryption()
    )


# A 512-bit RSA key (cryptography refuses to make one; made once with `openssl genpkey`).
WEAK_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEAvdP4cLTKvwco80U1
Nb2GVUt0IJcLwrXsTQU+dhSm/FRrPDURrwcywIjQs4uwDzAFZcRNeyyM5r7mlx/1
/AwqAQIDAQABAkAHMqNn+qL5bVcTKlujJwWR9GN53OBYSLemD/3XUl8mkCgsqu8b
Gd43NjG6PgcVdcqJ9QQ6veXs9Fu7Jf5uOabxAiEA32XQ653PzGRjRtHSsx+FbbRJ
PZXqXf+rh+/RLG2cl8UCIQDZh/u2L5wEEoyqflXZ3BsWozT9lU2nCXRXmJrBStjx
DQIhAK3o6lJyYVFhmTOJprhRQqMbpaSu72vL3HIPzMwEbNJtAiEAtfnNN87CPKHr
7SD83uEEBD8KMG07ZdZB7pmqNLNRou0CIAIefT4vUSCWcbM3MDqPEHnNUift0ssS
+9ULOHeu1RU/
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_reads_pkcs8_rsa_pkcs1_rsa_and_pkcs8_ed25519(rsa_key: rsa.RSAPrivateKey) -> None:
    algorithm, key = keys.parse_private_key(pem(rsa_key))
    assert algorithm is KeyAlgorithm.RSA and isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    algorithm, key = keys.parse_private_key(pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    assert algorithm is KeyAlgorithm.RSA  # "BEGIN RSA PRIVATE KEY", as opendkim-genkey writes
    algorithm, key = keys.parse_private_key(pem(ed25519.Ed25519PrivateKey.generate()))
    assert algorithm is KeyAlgorithm.ED25519


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: WEAK_RSA_PEM, "512 bits"),
        (lambda: pem(ec.generate_private_key(ec.SECP256R1())), "RSA or Ed25519 only"),
        (
            lambda: pem(
                ed25519.Ed25519PrivateKey.generate(), enc=serialization.BestAvailableEncryption(b"secret")
            ),
            "encrypted",
        ),
        (lambda: b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", "not a PEM"),
        (lambda: b"", "not a PEM"),
    ],
    ids=["weak-rsa", "ecdsa", "encrypted", "garbage", "empty"],
)
def test_refuses_keys_that_cannot_sign(make: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        keys.parse_private_key(make())  # type: ignore[operator]


def test_load_keys_names_the_bad_entry_as_a_config_error(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    good = tmp_path / "good.key"
    good.write_bytes(pem(rsa_key))
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"hello")
    cfg = load(config_with(tmp_path, ("example.test", "a", str(good)), ("example.test", "b", str(bad))))
    with pytest.raises(ConfigError) as err:
        keys.load_keys(cfg)
    assert err.value.key == "dkim[1].key_file" and "bad.key" in err.value.reason
    assert "unencrypted PEM" in err.value.allowed

    cfg = load(config_with(tmp_path, ("example.test", "a", str(tmp_path / "missing.key"))))
    with pytest.raises(ConfigError) as err:
        keys.load_keys(cfg)
    assert err.value.key == "dkim[0].key_file" and "cannot read" in err.value.reason

    cfg = load(config_with(tmp_path, ("example.test", "a", str(good)), ("Example.Test", "a", str(good))))
    with pytest.raises(ConfigError) as err:
        keys.load_keys(cfg)
    assert err.value.key == "dkim[1]" and "already dkim[0]" in err.value.reason

    cfg = load(config_with(tmp_path, ("example.test", "bad_selector!", str(good))))
    with pytest.raises(ConfigError) as err:
        keys.load_keys(cfg)
    assert err.value.key == "dkim[0].selector"


def test_loaded_key_knows_its_record(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(pem(rsa_key))
    (key,) = keys.load_keys(load(config_with(tmp_path, ("Example.TEST", "s1", str(path)))))
    assert key.domain == "example.test" and key.selector == "s1" and key.bits == 2048
    assert key.record_name == "s1._domainkey.example.test"
    spki = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key.txt_record() == f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"


def test_ed25519_record_is_the_raw_32_octet_key() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert keys.public_key_b64(private) == base64.b64encode(raw).decode()  # RFC 8463 §4.2


def test_zone_line_splits_into_255_octet_strings() -> None:
    text = "v=DKIM1; k=rsa; p=" + "A" * 600
    line = keys.zone_line("s1._domainkey.example.test", text)
    assert line.startswith('s1._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert [len(s) for s in strings] == [255, 255, len(text) - 510]
    assert "".join(strings) == text
    assert keys.split_txt("short") == ["short"]


def test_write_key_is_0600_creates_parents_and_never_replaces_without_force(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "example.test.s1.key"
    first = keys.generate_key(KeyAlgorithm.ED25519)
    keys.write_key(path, first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.parse_private_key(path.read_bytes())[1].public_key() == first.public_key()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8

    second = keys.generate_key(KeyAlgorithm.ED25519)
    with pytest.raises(FileExistsError):
        keys.write_key(path, second)
    assert keys.parse_private_key(path.read_bytes())[1].public_key() == first.public_key()

    keys.write_key(path, second, force=True)
    assert keys.parse_private_key(path.read_bytes())[1].public_key() == second.public_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["example.test.s1.key"]


def test_default_key_path_prefers_the_configured_one(tmp_path: Path) -> None:
    cfg = load(config_with(tmp_path, ("example.test", "s1", "keys/mine.key")))
    assert keys.default_key_path(cfg, "example.test", "s1") == tmp_path / "keys" / "mine.key"
    default = keys.default_key_path(cfg, "Example.Test", "s2")
    assert default == tmp_path / "var" / "dkim" / "example.test.s2.key"


@pytest.mark.parametrize("name", ["s1", "2026-01", "a.b", "x" * 63])
def test_valid_selectors(name: str) -> None:
    assert keys.valid_selector(name)


@pytest.mark.parametrize("name", ["", "-a", "a-", "a..b", "a_b", "sel ector", "x" * 64, "ä"])
def test_invalid_selectors(name: str) -> None:
    assert not keys.valid_selector(name)
