"""The Authentication-Results header field (RFC 8601): writing ours, recognising forged ones.

    Authentication-Results: mx.example.test;
        spf=pass smtp.mailfrom=alice@sender.test;
        dkim=pass header.d=sender.test header.s=s1 header.b="AbC/dEf+";
        dmarc=pass (p=reject) header.from=sender.test;
        arc=none

`render()` writes one field with one `resinfo` per result (RFC 8601 §2.2),
each on its own folded line. Reasons go in comments, with the characters a
comment cannot hold replaced; property values are written as RFC 8601
`pvalue`: a dot-atom address or domain as it is, anything else as a quoted
string (so `header.b` with "/" or "+" is quoted, RFC 2045 tspecials).

`authserv_id()` reads the authserv-id of an existing field (skipping
comments, RFC 8601 §2.2); `is_ours()` says whether it claims our hostname:
RFC 8601 §5 requires removing such fields from mail arriving from outside,
since only we may speak for our authserv-id.

Pure functions over strings and bytes; no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_NAME = "Authentication-Results"

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+")  # RFC 2045 token: no tspecials, no space


@dataclass(frozen=True, slots=True)
class ResInfo:
    """One method's result: `method=result (reason) ptype.property=value ...`."""

    method: str  # spf, dkim, dmarc, arc
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        out = f"{self.method}={self.result}"
        if self.reason:
            out += f" ({comment_text(self.reason)})"
        for name, value in self.properties:
            if value:
                out += f" {name}={pvalue(value)}"
        return out


_COMMENT_SAFE = re.compile(r"[ -'*-\[\]-~]*")  # printable ASCII but ( ) and backslash


def comment_text(text: str, limit: int = 200) -> str:
    """Text safe inside an RFC 5322 comment: printable, no parentheses or backslashes."""
    text = text[:limit]
    if not _COMMENT_SAFE.fullmatch(text):
        text = "".join(c if 32 <= ord(c) < 127 and c not in "()\\" else " " for c in text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=4096)  # addresses, domains and selectors repeat from message to message
def pvalue(value: str) -> str:
    """An RFC 8601 pvalue: an address or domain as is, a token as is, else a quoted string."""
    local, at, domain = value.rpartition("@")
    if at and _DOMAIN.fullmatch(domain) and (not local or _DOT_ATOM.fullmatch(local)):
        return value
    if _DOMAIN.fullmatch(value) or _TOKEN.fullmatch(value):
        return value
    escaped = "".join(c for c in value[:256] if 32 <= ord(c) < 127).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def value(authserv_id: str, results: Sequence[ResInfo]) -> str:
    """The field's value on one line (what ARC's seal copies): "id; spf=pass ...; dkim=..."."""
    return render_both(authserv_id, results)[1]


def render(authserv_id: str, results: Sequence[ResInfo]) -> bytes:
    """The whole header field, folded one resinfo per line, CRLF-terminated."""
    return render_both(authserv_id, results)[0]


def render_both(authserv_id: str, results: Sequence[ResInfo]) -> tuple[bytes, str]:
    """(`render`, `value`), each resinfo's text made once."""
    if not results:  # RFC 8601 §2.2: "none" when nothing was checked
        return f"{HEADER_NAME}: {authserv_id}; none\r\n".encode(), f"{authserv_id}; none"
    texts = [r.text() for r in results]
    field = f"{HEADER_NAME}: {authserv_id};\r\n\t" + ";\r\n\t".join(texts) + "\r\n"
    return field.encode("utf-8"), "; ".join([authserv_id, *texts])


def authserv_id(field_value: bytes | str) -> str:
    """The authserv-id of an Authentication-Results value (comments skipped), lowercased."""
    text = field_value.decode("utf-8", "replace") if isinstance(field_value, bytes) else field_value
    text = _strip_comments(text).strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1 : end if end > 0 else None].lower()
    m = re.match(r"[^\s;]+", text)
    return m.group(0).lower().rstrip(".") if m else ""


def is_ours(field: bytes, hostname: str) -> bool:
    """True for a raw header field ("Authentication-Results: ...") whose authserv-id is `hostname`."""
    name, colon, rest = field.partition(b":")
    if not colon or name.strip().lower() != b"authentication-results":
        return False
    return authserv_id(rest) == hostname.lower().rstrip(".")


def _strip_comments(text: str) -> str:
    """Remove RFC 5322 comments (nested, with quoted-pairs) outside quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for c in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(c)
            continue
        if c == "\\":
            escaped = True
            if depth == 0:
                out.append(c)
            continue
        if quoted:
            quoted = c != '"'
            out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth == 0:
            quoted = c == '"'
            out.append(c)
    return "".join(out)
