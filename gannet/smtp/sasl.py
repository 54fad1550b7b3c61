"""SASL PLAIN (RFC 4616) and LOGIN sub-machines for AUTH (RFC 4954).

Owns: decoding the client's base64 responses and assembling credentials.
Bytes (one response line, CRLF removed) in; `Credentials`, a 334 challenge
or a refusal `Reply` out. It never checks a password, never logs one, and
does no I/O: verification belongs to the session (server/auth.py).

RFC 4954 §4: a response of "*" cancels (501 5.0.0); a response that is not
base64 is refused (501 5.5.2); "=" as an initial response means "empty".
"""

from __future__ import annotations

import binascii

from gannet.smtp.events import Credentials
from gannet.smtp.replies import (
    R334_CONTINUE,
    R334_LOGIN_PASSWORD,
    R334_LOGIN_USERNAME,
    R501_AUTH_BAD_BASE64,
    R501_AUTH_CANCELLED,
    R501_AUTH_MALFORMED,
    R504_AUTH_MECH,
    Reply,
)

MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(Exception):
    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def decode_response(line: bytes) -> bytes:
    """RFC 4954 §4: "*" cancels; otherwise strict base64 (RFC 4648 §4)."""
    if line == b"*":
        raise SaslError(R501_AUTH_CANCELLED, "client cancelled AUTH")
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SaslError(R501_AUTH_BAD_BASE64, "bad base64 in AUTH response") from None


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(R501_AUTH_MALFORMED, f"{what} is not UTF-8") from None


class SaslMechanism:
    """One exchange: `step(line)` until it returns Credentials."""

    __slots__ = ()
    name = ""

    def initial(self, response: bytes | None) -> Reply | Credentials:
        """The AUTH command's own initial response (None when absent)."""
        raise NotImplementedError

    def step(self, line: bytes) -> Reply | Credentials:
        raise NotImplementedError


class Plain(SaslMechanism):
    """RFC 4616 §2: message = [authzid] NUL authcid NUL passwd."""

    __slots__ = ()
    name = "PLAIN"

    def initial(self, response: bytes | None) -> Reply | Credentials:
        if response is None:
            return R334_CONTINUE
        return self.step(response)

    def step(self, line: bytes) -> Reply | Credentials:
        raw = decode_response(line)
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SaslError(R501_AUTH_MALFORMED, "PLAIN message is not authzid NUL authcid NUL passwd")
        authzid, user, password = (_text(p, "PLAIN field") for p in parts)
        return Credentials("PLAIN", authzid, user, password)


class Login(SaslMechanism):
    """The obsolete but ubiquitous LOGIN: username, then password, each base64."""

    __slots__ = ("_user",)
    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def initial(self, response: bytes | None) -> Reply | Credentials:
        if response is None:
            return R334_LOGIN_USERNAME
        return self.step(response)

    def step(self, line: bytes) -> Reply | Credentials:
        value = _text(decode_response(line), "LOGIN field")
        if self._user is None:
            if not value:
                raise SaslError(R501_AUTH_MALFORMED, "empty LOGIN username")
            self._user = value
            return R334_LOGIN_PASSWORD
        return Credentials("LOGIN", "", self._user, value)


def start(argument: str) -> tuple[SaslMechanism, Reply | Credentials]:
    """Begin an exchange from the AUTH argument "MECH [initial-response]"."""
    mech, _, initial = argument.strip(" ").partition(" ")
    initial = initial.strip(" ")
    machine: SaslMechanism
    match mech.upper():
        case "PLAIN":
            machine = Plain()
        case "LOGIN":
            machine = Login()
        case _:
            raise SaslError(R504_AUTH_MECH, f"unknown SASL mechanism {mech[:20]!r}")
    if not initial:
        return machine, machine.initial(None)
    # RFC 4954 §4: "=" is an empty initial response.
    return machine, machine.initial(b"" if initial == "=" else initial.encode("ascii"))
