"""DKIM keys: load the `[[dkim]]` private keys, generate new ones, and say what to publish.

Owns the on-disk format and the DNS form of a key:

- A key file is PEM, PKCS#8 ("-----BEGIN PRIVATE KEY-----"), unencrypted, RSA
  (2048 bits by default; at least 1024, RFC 8301 §3.2) or Ed25519 (RFC 8463).
  Traditional PKCS#1 RSA files ("BEGIN RSA PRIVATE KEY", as opendkim-genkey
  writes them) are read too. The algorithm is the key's, never configured.
- The public key record (RFC 6376 §3.6.1): `v=DKIM1; k=rsa; p=<base64 of the
  DER SubjectPublicKeyInfo>` for RSA; `v=DKIM1; k=ed25519; p=<base64 of the 32
  raw public-key octets>` for Ed25519 (RFC 8463 §4.2).
- In a zone file a TXT string holds at most 255 octets (RFC 1035 §3.3.14), so
  `zone_line` splits the record into several quoted strings of one TXT record;
  verifiers join them without separators (RFC 6376 §3.6.2.2).

`load_key` turns every problem (unreadable file, not a key, encrypted, weak,
unsupported type) into a `ConfigError` naming `dkim[i].key_file`, so
`gannet serve` and `check-config` exit 2 before listening. Keys are read once
(at start-up and on SIGHUP), never per message. `write_key` creates the file
with mode 0600 and never replaces an existing key unless told to.

What it must never do: write a private key readable by others, or print one.
"""

from __future__ import annotations

import base64
import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gannet.config import Config, ConfigError, DkimKey

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits
DEFAULT_RSA_BITS = 2048  # RFC 8301 §3.2: SHOULD use at least 2048 bits
TXT_STRING_MAX = 255  # RFC 1035 §3.3.14: one <character-string>

# RFC 6376 §3.1: a selector is one or more sub-domain labels (letters, digits, hyphens).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")


class KeyAlgorithm(enum.Enum):
    RSA = "rsa"
    ED25519 = "ed25519"

    @property
    def signature_algorithm(self) -> bytes:
        """The a= tag value (RFC 6376 §3.5, RFC 8463 §3)."""
        return b"rsa-sha256" if self is KeyAlgorithm.RSA else b"ed25519-sha256"


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One loaded `[[dkim]]` key: where it signs (d=, s=) and the key itself."""

    domain: str
    selector: str
    algorithm: KeyAlgorithm
    private_key: PrivateKey
    key_file: Path

    @property
    def bits(self) -> int:
        return self.private_key.key_size if isinstance(self.private_key, rsa.RSAPrivateKey) else 256

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 digest: RSASSA-PKCS1-v1_5 (RFC 8017 §8.2, RFC 6376 §3.3.1)
        or Ed25519 over the digest itself (PureEdDSA, RFC 8463 §3)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return self.private_key.sign(digest)

    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)

    def txt_record(self) -> str:
        return f"v=DKIM1; k={self.algorithm.value}; p={self.public_key_b64()}"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone_line(self) -> str:
        return zone_line(self.record_name, self.txt_record())


def public_key_b64(key: PrivateKey) -> str:
    """The p= value of the key's DNS record."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        der = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(der).decode("ascii")


def split_txt(text: str) -> list[str]:
    """`text` cut into the ≤255-octet character-strings of one TXT record (ASCII only here)."""
    return [text[i : i + TXT_STRING_MAX] for i in range(0, len(text), TXT_STRING_MAX)] or [""]


def zone_line(name: str, text: str) -> str:
    """A zone-file line for a TXT record: `NAME. IN TXT "part1" "part2"`."""
    quoted = " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in split_txt(text))
    return f"{name.rstrip('.')}. IN TXT {quoted}"


def valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.fullmatch(selector)) and len(selector) <= 63 * 4


def valid_domain(domain: str) -> bool:
    return bool(_DOMAIN.fullmatch(domain.rstrip("."))) and len(domain) <= 253


# ---------------------------------------------------------------------------- loading


def parse_private_key(pem: bytes) -> tuple[KeyAlgorithm, PrivateKey]:
    """The key in a PEM file; ValueError with a reason a postmaster understands."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the key is encrypted; DKIM keys must be stored unencrypted (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"the RSA key has {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS} (RFC 8301)"
            )
        return KeyAlgorithm.RSA, key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyAlgorithm.ED25519, key
    raise ValueError(f"a {type(key).__name__.removeprefix('_')} key cannot sign DKIM (RSA or Ed25519 only)")


def load_key(entry: DkimKey, config_file: Path | str, index: int) -> SigningKey:
    """Read one `[[dkim]]` entry's key; ConfigError(file, `dkim[i].key_file`, reason, allowed)."""
    key_name = f"dkim[{index}].key_file"
    allowed = "an unencrypted PEM RSA (>= 1024 bits) or Ed25519 private key, as `gannet dkim keygen` writes"
    try:
        pem = entry.key_file.read_bytes()
    except OSError as exc:
        raise ConfigError(config_file, key_name, f"cannot read {entry.key_file}: {exc.strerror}") from None
    try:
        algorithm, key = parse_private_key(pem)
    except ValueError as exc:
        raise ConfigError(config_file, key_name, f"{entry.key_file}: {exc}", allowed) from None
    return SigningKey(entry.domain, entry.selector, algorithm, key, entry.key_file)


def load_keys(config: Config) -> tuple[SigningKey, ...]:
    """Every `[[dkim]]` key of the config, in order; ConfigError on the first bad one or a duplicate."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for i, entry in enumerate(config.dkim):
        where = (entry.domain, entry.selector)
        if where in seen:
            raise ConfigError(
                config.file,
                f"dkim[{i}]",
                f"domain {entry.domain!r} selector {entry.selector!r} is already dkim[{seen[where]}]",
                "one key per domain and selector",
            )
        seen[where] = i
        if not valid_selector(entry.selector):
            raise ConfigError(
                config.file,
                f"dkim[{i}].selector",
                f"{entry.selector!r} is not a selector",
                "DNS labels: letters, digits, hyphens, dots",
            )
        keys.append(load_key(entry, config.file, i))
    return tuple(keys)


# ---------------------------------------------------------------------------- generating


def generate_key(algorithm: KeyAlgorithm, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algorithm is KeyAlgorithm.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ed25519.Ed25519PrivateKey.generate()


def pem_pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def default_key_path(config: Config, domain: str, selector: str) -> Path:
    """Where the config names this key, else `<data_dir>/dkim/<domain>.<selector>.key`."""
    for entry in config.dkim:
        if entry.domain == domain.lower() and entry.selector == selector:
            return entry.key_file
    return config.data_dir / "dkim" / f"{domain.lower()}.{selector}.key"


def write_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write the key as PEM PKCS#8, mode 0600, creating parent directories.

    FileExistsError when `path` exists and not `force`. With `force` the new key
    is written beside it and renamed over it, so a crash leaves one whole key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = pem_pkcs8(key)
    target = path.with_name(path.name + ".new") if force else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if force:
        target.unlink(missing_ok=True)
    fd = os.open(target, flags, 0o600)  # O_EXCL: never follow or reuse an existing file
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(target, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def config_snippet(domain: str, selector: str, key_file: Path) -> str:
    return f'[[dkim]]\ndomain = "{domain.lower()}"\nselector = "{selector}"\nkey_file = "{key_file}"\n'
