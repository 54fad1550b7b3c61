"""DKIM verification (RFC 6376, RFC 8463): every DKIM-Signature of a message, one result each.

dkimpy's verification, taken apart so that each step is done once and no DNS
happens inside it: the signature tags are read and checked by `dkim_tags`
(dkimpy's rules, at a fraction of the cost); the canonicalization (relaxed and
simple, l=) is dkimpy's or byte-for-byte the same; the header fields are
selected as RFC 6376 §5.4.2 says; the public-key operation is OpenSSL's
(`cryptography`), on keys parsed once and cached (dkimpy alone parses the key
record and computes RSA with Python integers for every signature). In two
steps:

1. `parse_head(header_section)` (cheap, on the loop) splits the header
   section once and reads the signatures' tags; its `key_names()` are the key
   records they need (`s._domainkey.d`), which the caller takes from the
   resolver's cache or fetches asynchronously, all at once.
2. `verify(message, keys, head=...)` (CPU only, no I/O: the caller runs it in
   an executor for large messages) verifies each signature against those
   records, reusing the parsed head (no second parse of the fields or tags).

Results (RFC 8601 §2.7.1):
- pass: the signature verified;
- fail: the body hash or the signature did not match (altered in transit);
- permerror: no key record (NXDOMAIN, none published), an unusable key record
  (revoked with an empty p=, bad syntax, key too small: RFC 8301 §3.2 asks
  for at least 1024 bits);
- temperror: the key lookup failed temporarily;
- neutral: the signature could not be processed: a syntax error, a missing
  tag, expired (x=), an unknown algorithm;
- policy: rsa-sha1, which RFC 8301 §3.1 says verifiers MUST NOT accept.

Never raises for anything the message or DNS contains.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    compress_whitespace,
    correct_empty_body,
    strip_trailing_lines,
    strip_trailing_whitespace,
    unfold_header_value,
)
from dkim.crypto import HASH_ALGORITHMS

from gannet.mailauth.dkim_tags import InvalidTagValueList, check_signature, parse_tags
from gannet.mailauth.dns_bridge import TxtAnswer
from gannet.message.rewrite import header_fields

log = logging.getLogger("gannet.mailauth")

MIN_KEY_BITS = 1024  # RFC 8301 §3.2
EXPIRY_SLOP = 300  # seconds of clock difference forgiven on x= (RFC 6376 §3.5 lets verifiers choose)
MAX_SIGNATURES = 10  # more are reported as neutral, unverified: each costs a DNS query and CPU


@dataclass(frozen=True, slots=True)
class DkimOutcome:
    result: str  # pass | fail | neutral | policy | temperror | permerror
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    b_prefix: str = ""  # the first 8 characters of b= (RFC 6008 header.b)
    identity: str = ""  # i=
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Sig:
    index: int
    tags: dict[bytes, bytes]


def _signatures(headers: Sequence[Sequence[bytes]], names: Sequence[bytes]) -> list[_Sig | str]:
    """The parsed tags of each DKIM-Signature (or why it cannot be parsed), top first;
    `names`: each field's name, lowercased."""
    out: list[_Sig | str] = []
    signatures = (h for h, name in zip(headers, names, strict=True) if name == b"dkim-signature")
    for i, (_name, value) in enumerate(signatures):
        try:
            out.append(_Sig(i, parse_tags(value)))
        except (InvalidTagValueList, ValueError) as exc:
            out.append(f"unparseable signature: {exc}")
    return out


# dkimpy's RE_BTAG (b= and its value, for emptying it), in an equivalent form that does not
# backtrack: its FWS, `(?:(?:\s*\r?\n)?\s+)?`, matches exactly the runs of whitespace `\s*`
# matches, and a run of value characters is taken whole. dkimpy's form costs ~0.1 ms a signature.
B_TAG = re.compile(rb"([;\s]b\s*+=)(?:\s*+[a-zA-Z0-9+/=]++)*+(?:\r?\n\Z)?")


def without_b(value: bytes) -> bytes:
    """A signature field's value with its b= value emptied: `B_TAG.sub(rb"\\1", value)`, without
    the Python-level template expansion `re.sub` runs for a group reference (~4 µs a call)."""
    out: list[bytes] = []
    pos = 0
    for m in B_TAG.finditer(value):
        out += (value[pos : m.start()], m[1])
        pos = m.end()
    if not out:
        return value
    out.append(value[pos:])
    return b"".join(out)


# A field name as dkimpy's parser takes it (RFC 5322 §3.6.8 ftext: printable, no colon)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


@dataclass(frozen=True, slots=True)
class ParsedHead:
    """A header section split once (`parse_head`) and shared by the key lookups and `verify`,
    so that neither dkimpy nor we parse the fields or the signatures' tags a second time."""

    section: bytes  # the header section, without the blank line
    headers: list[list[bytes]] | None  # dkimpy's [name, value] pairs; None: only dkimpy can parse it
    names: list[bytes]  # each of `headers`' names, lowercased
    signatures: list[_Sig | str]

    def key_names(self) -> list[str]:
        """The key records the (first MAX_SIGNATURES) signatures need, in order, without repeats."""
        names = (key_name(s.tags) for s in self.signatures[:MAX_SIGNATURES] if isinstance(s, _Sig))
        return list(dict.fromkeys(n for n in names if n))


def parse_head(section: bytes, fields: list[bytes] | None = None) -> ParsedHead:
    """`section` (a header section without its blank line; `fields`, its `header_fields`, if
    already split) in dkimpy's shape. A field that dkimpy's own parser would read differently
    (an odd name, no colon, an mbox "From " line) leaves `headers` None: `verify` lets dkimpy
    parse such a message, and says so when it cannot."""
    fields = header_fields(section) if fields is None else fields
    headers: list[list[bytes]] | None = []
    for f in fields:
        name, colon, value = f.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name) or not f.endswith(b"\r\n"):
            headers = None
            break
        headers.append([name, value])  # type: ignore[union-attr]
    if headers is None:
        sigs: list[_Sig | str] = []
        for f in fields:
            name, colon, value = f.partition(b":")
            if colon and name.strip().lower() == b"dkim-signature":
                try:
                    sigs.append(_Sig(len(sigs), parse_tags(value)))
                except (InvalidTagValueList, ValueError) as exc:
                    sigs.append(f"unparseable signature: {exc}")
        return ParsedHead(section, None, [], sigs)
    names = [h[0].lower() for h in headers]
    return ParsedHead(section, headers, names, _signatures(headers, names))


def key_name(tags: Mapping[bytes, bytes]) -> str | None:
    selector, domain = tags.get(b"s"), tags.get(b"d")
    if not selector or not domain:
        return None
    try:
        return f"{selector.decode('ascii')}._domainkey.{domain.decode('ascii')}".lower()
    except UnicodeError:
        return None


def key_names(head: bytes, field_name: bytes = b"dkim-signature") -> list[str]:
    """The key records the signatures in a header section need, in order, without repeats
    (`field_name` b"arc-seal" / b"arc-message-signature" for ARC's)."""
    names = []
    for field in header_fields(head):
        name, colon, value = field.partition(b":")
        if not colon or name.strip().lower() != field_name:
            continue
        try:
            names.append(key_name(parse_tags(value)))
        except (InvalidTagValueList, ValueError):
            continue
        if len(names) >= MAX_SIGNATURES:
            break
    return list(dict.fromkeys(n for n in names if n))


def _text(tags: Mapping[bytes, bytes], tag: bytes) -> str:
    return "".join(tags.get(tag, b"").decode("ascii", "replace").split())


def _outcome(tags: Mapping[bytes, bytes], result: str, reason: str = "") -> DkimOutcome:
    return DkimOutcome(
        result=result,
        domain=_text(tags, b"d").lower(),
        selector=_text(tags, b"s"),
        algorithm=_text(tags, b"a"),
        b_prefix=_text(tags, b"b")[:8],
        identity=_text(tags, b"i"),
        reason=reason,
    )


class KeyRecordError(ValueError):
    """A DKIM key record that cannot be used (RFC 6376 §3.6.1); the text says why."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    algorithm: str  # "rsa" | "ed25519" (the k= tag)
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    bits: int


@functools.lru_cache(maxsize=1024)
def public_key(record: bytes) -> PublicKey:
    """Parse a key record once (cached: the same few keys sign most mail) into an OpenSSL key."""
    try:
        tags = parse_tags(record)
    except (InvalidTagValueList, ValueError) as exc:
        raise KeyRecordError(f"bad syntax: {exc}") from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise KeyRecordError("v= is not DKIM1")
    hashes = tags.get(b"h")
    if hashes is not None and b"sha256" not in [h.strip() for h in hashes.split(b":")]:
        raise KeyRecordError("h= does not allow sha256")
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not p:
        raise KeyRecordError("revoked (empty p=)" if b"p" in tags else "no p=")
    kind = tags.get(b"k", b"rsa").strip().lower()
    try:
        data = base64.b64decode(p, validate=True)
        if kind == b"ed25519":
            return PublicKey("ed25519", ed25519.Ed25519PublicKey.from_public_bytes(data), 256)
        if kind == b"rsa":
            loaded = serialization.load_der_public_key(data)
            if not isinstance(loaded, rsa.RSAPublicKey):
                raise KeyRecordError("p= is not an RSA key")
            if loaded.key_size < MIN_KEY_BITS:
                raise KeyRecordError(f"key too small: {loaded.key_size} bits")
            return PublicKey("rsa", loaded, loaded.key_size)
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        if isinstance(exc, KeyRecordError):
            raise
        raise KeyRecordError(f"p= cannot be read: {exc}") from None
    raise KeyRecordError(f"unknown key type k={kind.decode('ascii', 'replace')}")


def _canonical_body(policy: CanonicalizationPolicy, body: bytes) -> bytes:
    """dkimpy's body canonicalization, with relaxed (RFC 6376 §3.4.4) made cheap for the usual body:
    when it has no tab and no run of spaces, compressing whitespace changes nothing, and the
    regular expression that would do it costs ~0.1 ms per 4 KiB."""
    if policy.body_algorithm is not Relaxed or b"\t" in body or b"  " in body:
        return policy.canonicalize_body(body)  # type: ignore[no-any-return]
    if b" \r\n" in body:  # else there is no trailing whitespace to strip either
        body = strip_trailing_whitespace(body)
    return correct_empty_body(strip_trailing_lines(body))  # type: ignore[no-any-return]


# hashlib lets go of the GIL while hashing 2048 bytes or more. On the event loop's thread that
# is a loss for a small body: the hash takes microseconds, but getting the GIL back from the
# queue's writer thread can take far longer, and the whole loop waits. So small bodies are
# hashed in pieces that keep the GIL; large ones (verified in an executor) as one.
_KEEP_GIL = 2047
_KEEP_GIL_UP_TO = 64 * 1024


def _digest(hasher: Callable[..., Any], data: bytes) -> bytes:
    if len(data) > _KEEP_GIL_UP_TO:
        return hasher(data).digest()  # type: ignore[no-any-return]
    h = hasher()
    view = memoryview(data)
    for start in range(0, len(data), _KEEP_GIL):
        h.update(view[start : start + _KEEP_GIL])
    return h.digest()  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=64)  # a handful of c= spellings exist; the policy objects are never changed
def _policy(c: bytes) -> CanonicalizationPolicy:
    return CanonicalizationPolicy.from_c_value(c)


def _relaxed_headers(headers: Iterable[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 6376 §3.4.2 relaxed header canonicalization: the same bytes as dkimpy's `Relaxed`,
    without its two regular expressions per field where they would change nothing
    (a CRLF-only value with no tab and no run of spaces)."""
    out = []
    for name, value in headers:
        v = value.replace(b"\r\n", b"")
        if b"\n" in v or b"\t" in v or b"  " in v:
            v = compress_whitespace(unfold_header_value(value))
        out.append((name.lower().rstrip(), v.strip() + b"\r\n"))
    return out


@dataclass(frozen=True, slots=True)
class _Message:
    """A message split for verification: header fields as [name, value] pairs, and the body."""

    headers: list[list[bytes]]
    names: list[bytes]  # each field's name, lowercased
    body: bytes


def _split(message: bytes, head: ParsedHead | None, crlf: bool) -> _Message:
    """dkimpy's `rfc822_parse`, for a CRLF message (all Gannet receives) only over the header
    section (it splits the whole message into lines with a regular expression), and not even
    that when the caller parsed it already (`head`). `crlf`: the caller vouches that every LF
    in `message` ends a CRLF, so it is not counted here. dkim.MessageFormatError if it cannot."""
    if not crlf and message.count(b"\n") != message.count(b"\r\n"):
        headers, body = dkim.rfc822_parse(message)
    elif message.startswith(b"\r\n"):
        headers, body = [], message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        section, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 4 :])
        if head is not None and head.headers is not None and head.section == section:
            return _Message(head.headers, head.names, body)
        headers = dkim.rfc822_parse(section)[0]
    return _Message(headers, [h[0].lower() for h in headers], body)


Field = Sequence[bytes]  # a [name, value] pair, as dkimpy splits a header section


def _select(fields: Sequence[Field], names: list[bytes], wanted: list[bytes]) -> list[Field]:
    """The fields to hash, in h= order (`wanted`; `names`: each field's lowercased name). RFC 6376
    §5.4.2: a name listed n times means its last n instances, bottom up; a name listed more often
    than it occurs (oversigning) selects nothing more."""
    instances: dict[bytes, list[int]] = {}
    for i, name in enumerate(names):
        instances.setdefault(name, []).append(i)
    selected = []
    for name in wanted:
        found = instances.get(name)
        if found:
            selected.append(fields[found.pop()])
    return selected


def _verify_signature(
    message: _Message, idx: int, key: PublicKey, sig: Mapping[bytes, bytes], now: float
) -> bool:
    """Signature `idx` (its parsed tags `sig`) against `key`; ValidationError for an unusable tag
    or a body hash mismatch.

    dkimpy 1.1's `verify_headerprep` and `verify_sig_process`, over tags `parse_head` already
    read, with the public-key operation done by OpenSSL (`cryptography`) on a cached key: dkimpy
    parses the key record and computes RSA in pure Python for every signature (over half of a
    check's CPU in our profile). The canonicalization is dkimpy's or byte-for-byte the same
    (`_relaxed_headers`, `_canonical_body`).
    """
    check_signature(sig, now)
    include_headers = [x.strip().lower() for x in sig[b"h"].split(b":")]  # dkimpy: re.split \s*:\s*
    policy = _policy(sig.get(b"c", b"simple/simple"))
    hasher = HASH_ALGORITHMS[sig[b"a"]]
    body = _canonical_body(policy, message.body)
    if b"l" in sig:
        body = body[: int(sig[b"l"])]
    if _digest(hasher, body) != base64.b64decode(b"".join(sig[b"bh"].split())):
        raise dkim.ValidationError("body hash mismatch")
    if b"from" in include_headers:  # dkimpy's guard against a second From (bug 644046)
        include_headers.append(b"from")
    canonicalize = _relaxed_headers if policy.header_algorithm is Relaxed else policy.canonicalize_headers
    # dkim.hash_headers: the selected fields, then the signature field with b= emptied, no CRLF.
    # Canonicalization is per field, so only the selected ones are canonicalized (dkimpy does all).
    signatures = [h for h, n in zip(message.headers, message.names, strict=True) if n == b"dkim-signature"]
    name, value = signatures[idx]
    signed = canonicalize(_select(message.headers, message.names, include_headers))
    ((c_name, c_value),) = canonicalize([(name, without_b(value))])
    hashed = b"".join([x + b":" + y for x, y in signed]) + c_name + b":" + c_value.rstrip()
    digest = _digest(hasher, hashed)  # a long header section keeps the GIL too (see `_digest`)
    signature = base64.b64decode(b"".join(sig[b"b"].split()))
    try:
        if isinstance(key.key, rsa.RSAPublicKey):
            key.key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        else:
            key.key.verify(signature, digest)  # RFC 8463 §3: Ed25519 over the SHA-256 hash
    except InvalidSignature:
        return False
    return True


def verify(
    message: bytes,
    keys: Mapping[str, TxtAnswer],
    *,
    now: float | None = None,
    head: ParsedHead | None = None,
    crlf: bool = False,
) -> list[DkimOutcome]:
    """One outcome per DKIM-Signature (top first); [] when the message has none.
    `head`: the message's header section as `parse_head` read it, so it is not parsed again.
    `crlf`: every line of `message` ends in CRLF, as in all mail an SMTP session hands on
    (its DATA and BDAT readers refuse or normalize a bare CR or LF, RFC 5321 §2.3.8): the
    ~10 µs of counting line ends in 4 KiB is skipped. Anything else must leave it False."""
    now = time.time() if now is None else now
    try:
        split = _split(message, head, crlf)
    except dkim.DKIMException as exc:
        return [DkimOutcome("permerror", reason=f"message cannot be parsed: {exc}")]
    if head is not None and split.headers is head.headers:
        signatures = head.signatures
    else:
        signatures = _signatures(split.headers, split.names)
    results: list[DkimOutcome] = []
    for n, sig in enumerate(signatures):
        if isinstance(sig, str):
            results.append(DkimOutcome("neutral", reason=sig))
        elif n >= MAX_SIGNATURES:
            results.append(_outcome(sig.tags, "neutral", f"more than {MAX_SIGNATURES} signatures"))
        else:
            results.append(_verify_one(split, sig, keys, now))
    return results


def _verify_one(message: _Message, sig: _Sig, keys: Mapping[str, TxtAnswer], now: float) -> DkimOutcome:
    tags = sig.tags
    expires = tags.get(b"x", b"").strip()
    if expires.isdigit() and int(expires) < now - EXPIRY_SLOP:  # dkimpy alone allows 10 hours
        return _outcome(tags, "neutral", f"signature expired (x={int(expires)})")
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return _outcome(tags, "policy", "rsa-sha1 is not accepted (RFC 8301)")
    name = key_name(tags)
    answer = keys.get(name) if name else None
    if name is None:
        return _outcome(tags, "neutral", "signature lacks s= or d=")
    if answer is None:
        return _outcome(tags, "temperror", "key not looked up")
    if answer.temporary_error:
        return _outcome(tags, "temperror", f"key lookup failed: {answer.temporary_error}")
    if not answer.records:
        return _outcome(tags, "permerror", f"no key published at {name}")
    try:
        key = public_key(answer.records[0].encode("utf-8", "replace"))
    except KeyRecordError as exc:
        return _outcome(tags, "permerror", f"unusable key record: {exc}")
    if key.algorithm != tags.get(b"a", b"").strip().lower().partition(b"-")[0].decode("ascii", "replace"):
        return _outcome(tags, "permerror", f"the key at {name} is not for {_text(tags, b'a')}")
    try:
        ok = _verify_signature(message, sig.index, key, sig.tags, now)
    except dkim.ValidationError as exc:
        text = str(exc)
        if "body hash mismatch" in text:
            return _outcome(tags, "fail", "body hash mismatch")
        return _outcome(tags, "neutral", text[:120])
    except (dkim.DKIMException, InvalidCanonicalizationPolicyError) as exc:
        return _outcome(tags, "neutral", str(exc)[:120])
    except Exception as exc:  # dkimpy on hostile input: never let it reach the session
        log.warning("dkim: verifying a signature by %s raised %r", name, exc)
        return _outcome(tags, "neutral", f"verification error: {type(exc).__name__}")
    return _outcome(tags, "pass") if ok else _outcome(tags, "fail", "signature did not verify")
