"""Pure ABNF parsers for SMTP command arguments (RFC 5321 §4.1.2, RFC 1870, RFC 3461, RFC 6531).

Owns: paths (source-route stripping, quoted local parts, address literals,
domains), ESMTP parameters, xtext, the keyword argument of MAIL/RCPT.
Every function takes a `str` and returns a value or raises `SyntaxProblem`
carrying the reply to send. Nothing here knows the connection state, reads
options or does I/O; it must never raise anything but `SyntaxProblem` on any
input (the fuzz invariant).

Leniency (real clients are sloppy, Postfix accepts these too):
- "MAIL FROM: <a@b>" (spaces after the colon) and lower-case keywords;
- a path without angle brackets ("MAIL FROM:a@b");
- dot-strings with empty atoms ("a..b@c", ".a@c"), seen from old gateways.
Addresses are returned as written, minus any source route; "" is the null path.
"""

from __future__ import annotations

import ipaddress
import re

from gannet.smtp.replies import (
    R501_BAD_ADDRESS,
    R501_SYNTAX_PARAMS,
    Reply,
)


class SyntaxProblem(Exception):
    """A command argument the grammar refuses; `reply` is what to answer."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


# RFC 5322 §3.2.3 atext, plus "." (dot-string, leniently) and RFC 6531 UTF8-non-ascii.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\x80-\U0010ffff-]+")
# RFC 5321 §4.1.2 qtextSMTP / quoted-pairSMTP (UTF-8 allowed per RFC 6531 §3.3).
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"')
# RFC 5321 §4.1.2 sub-domain = Let-dig [Ldh-str]; U-labels allowed (RFC 6531 §3.3).
_LABEL = r"[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\x80-\U0010ffff-]*[A-Za-z0-9\x80-\U0010ffff])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# RFC 5321 §4.1.3 General-address-literal = Standardized-tag ":" 1*dcontent
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# RFC 5321 §4.1.2 esmtp-param = esmtp-keyword ["=" esmtp-value]
# (value: %d33-60 / %d62-126, UTF-8 per RFC 6531).
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+))?")
# RFC 3461 §4: xchar = "!".."~" except "+" and "="; hexchar = "+" 2HEXDIG.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")

MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_LABEL = 63  # RFC 1035 §2.3.4


def is_domain(text: str) -> bool:
    """RFC 5321 §4.1.2 Domain (U-labels allowed), length limits included."""
    if not text or _DOMAIN.fullmatch(text) is None:
        return False
    if len(text) <= MAX_LABEL:  # the common case: no label or octet limit can be hit
        return True
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        return False
    return all(len(label) <= MAX_LABEL for label in text.split("."))


def is_address_literal(text: str) -> bool:
    """RFC 5321 §4.1.3: "[1.2.3.4]", "[IPv6:...]", or a general "[tag:content]"."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    if inner[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    if inner[:1].isdigit() and ":" not in inner:
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            return False
        return True
    return _GENERAL_LITERAL.fullmatch(inner) is not None


def parse_mailbox(text: str) -> str:
    """RFC 5321 §4.1.2 Mailbox = Local-part "@" ( Domain / address-literal )."""
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise SyntaxProblem(R501_BAD_ADDRESS, f"no local part or domain in {text!r}")
    if local[0] == '"':
        if _QUOTED.fullmatch(local) is None:
            raise SyntaxProblem(R501_BAD_ADDRESS, "bad quoted local part")
    elif _DOT_STRING.fullmatch(local) is None:
        raise SyntaxProblem(R501_BAD_ADDRESS, "bad local part")
    if domain[:1] == "[":
        if not is_address_literal(domain):
            raise SyntaxProblem(R501_BAD_ADDRESS, "bad address literal")
    elif not is_domain(domain):
        raise SyntaxProblem(R501_BAD_ADDRESS, "bad domain")
    return text


def _strip_source_route(path: str) -> str:
    """RFC 5321 §4.1.2 A-d-l ":" is obsolete: check it, then drop it (§C)."""
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise SyntaxProblem(R501_BAD_ADDRESS, "source route without ':'")
    for hop in route.split(","):
        if hop[:1] != "@" or not (is_domain(hop[1:]) or is_address_literal(hop[1:])):
            raise SyntaxProblem(R501_BAD_ADDRESS, "bad source route")
    return mailbox


def _path_end(text: str) -> int:
    """Index of the ">" closing a path that starts with "<", skipping quoted parts."""
    end = text.find(">")
    quote = text.find('"')
    if quote < 0 or (end >= 0 and end < quote):
        return end
    i = 1
    in_quotes = False
    while i < len(text):  # only for quoted local parts: rare
        ch = text[i]
        if in_quotes and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            return i
        i += 1
    return -1


def split_path(arg: str, keyword: str) -> tuple[str, str]:
    """Split "FROM:<path> params" into ("path" without brackets, "params").

    `keyword` is "FROM:" or "TO:"; matched case-insensitively, spaces allowed
    after the colon. Without brackets the path runs to the first space.
    """
    n = len(keyword)
    if arg[:n].upper() != keyword:
        raise SyntaxProblem(R501_SYNTAX_PARAMS, f"expected {keyword}")
    rest = arg[n:].lstrip(" ")
    if rest[:1] == "<":
        end = _path_end(rest)
        if end < 0:
            raise SyntaxProblem(R501_BAD_ADDRESS, "unterminated path")
        path, params = rest[1:end], rest[end + 1 :]
        if params and params[0] != " ":
            raise SyntaxProblem(R501_SYNTAX_PARAMS, "no space before parameters")
        return path, params
    path, _, params = rest.partition(" ")
    if not path or path[:1] == ">":
        raise SyntaxProblem(R501_BAD_ADDRESS, "missing path")
    return path, params


def parse_reverse_path(path: str) -> str:
    """RFC 5321 §4.1.2 Reverse-path = Path / "<>"; returns "" for the null path."""
    if not path:
        return ""
    if path[0] == "@":
        path = _strip_source_route(path)
    return parse_mailbox(path)


def parse_forward_path(path: str) -> str:
    """RFC 5321 §4.1.2 Forward-path; also "<Postmaster>" without a domain (§4.5.1)."""
    if not path:
        raise SyntaxProblem(R501_BAD_ADDRESS, "null forward path")
    if path[0] == "@":
        path = _strip_source_route(path)
    if path.lower() == "postmaster":
        return path
    return parse_mailbox(path)


def parse_params(text: str) -> dict[str, str | None]:
    """RFC 5321 §4.1.2 Mail-parameters: SP-separated KEY[=VALUE]; keys upper-cased.

    A repeated keyword is a syntax error (RFC 1870 §6 and friends say each at most once).
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        match = _PARAM.fullmatch(item)
        if match is None:
            raise SyntaxProblem(R501_SYNTAX_PARAMS, f"bad parameter {item[:30]!r}")
        key = match.group(1).upper()
        if key in params:
            raise SyntaxProblem(R501_SYNTAX_PARAMS, f"duplicate parameter {key}")
        params[key] = match.group(2)
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: "+XX" hex escapes; lower-case hex accepted leniently."""
    if _XTEXT.fullmatch(text) is None:
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "bad xtext")
    if "+" not in text:
        return text
    parts = text.split("+")
    out = [parts[0]]
    for part in parts[1:]:
        out.append(chr(int(part[:2], 16)))
        out.append(part[2:])
    return "".join(out)


def parse_size(value: str | None) -> int:
    """RFC 1870 §3: SIZE=1*20DIGIT."""
    if value is None or not (0 < len(value) <= 20) or not value.isdigit() or not value.isascii():
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "bad SIZE value")
    return int(value)


def parse_domain_arg(arg: str) -> str:
    """HELO/EHLO/LHLO argument: leniently the first word, non-empty.

    RFC 5321 §4.1.1.1 asks for a Domain or address literal; real clients send
    worse, so the policy layer judges it (`is_domain`), not the grammar.
    """
    word = arg.strip(" ").split(" ", 1)[0]
    if not word:
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "missing domain")
    return word
