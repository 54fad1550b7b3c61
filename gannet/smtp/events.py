"""Events: one frozen dataclass per SMTP protocol unit the peer can send us.

`ServerConnection.next_event()` returns these (or the sentinels `NEED_DATA` /
`PAUSED`); the session answers each command event with exactly one `Reply`
through `ServerConnection.send()`. Body data arrives as `BodyChunk`s, already
dot-unstuffed (DATA) or raw (BDAT), with CRLF line endings.

Never put I/O, policy or mutable state here: these are values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Sentinel(enum.Enum):
    """What `next_event()` returns when it has no event to give."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # waiting for the session (a reply, or start_tls()) before parsing more


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


class BodyType(enum.Enum):
    """RFC 6152 BODY= parameter; BINARYMIME is not offered."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


class Notify(enum.Flag):
    """RFC 3461 §4.1 NOTIFY= values. NEVER is the empty flag set explicitly."""

    NONE = 0
    SUCCESS = enum.auto()
    FAILURE = enum.auto()
    DELAY = enum.auto()
    NEVER = enum.auto()


class Ret(enum.Enum):
    """RFC 3461 §4.3 RET= : what a DSN carries of the original."""

    FULL = "FULL"
    HDRS = "HDRS"


@dataclass(frozen=True, slots=True)
class Event:
    """Base class for everything the peer sends."""


@dataclass(frozen=True, slots=True)
class Helo(Event):
    domain: str


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    domain: str
    lmtp: bool = False  # True when it came as LHLO (RFC 2033 §4.1)


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM:<reverse-path> [params]. `address` is "" for the null sender <>."""

    address: str
    size: int | None = None  # RFC 1870 SIZE=
    body: BodyType | None = None  # RFC 6152 BODY=
    smtputf8: bool = False  # RFC 6531 SMTPUTF8
    ret: Ret | None = None  # RFC 3461 RET=
    envid: str | None = None  # RFC 3461 ENVID= (xtext-decoded)
    auth: str | None = None  # RFC 4954 §5 AUTH= (xtext-decoded); informational only


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO:<forward-path> [params]."""

    address: str
    notify: Notify | None = None  # RFC 3461 NOTIFY=; None when absent
    orcpt: str | None = None  # RFC 3461 ORCPT= as "addr-type;xtext-decoded address"


@dataclass(frozen=True, slots=True)
class Data(Event):
    """DATA: answer 354 to start the body, or a refusal."""


@dataclass(frozen=True, slots=True)
class Bdat(Event):
    """BDAT size [LAST] (RFC 3030). The core reads the chunk itself.

    The session answers the *command* only through the chunk's end: the events
    after a Bdat are BodyChunk* then EndOfChunk (not last) or EndOfData (last).
    A Bdat event is only emitted when the transaction state allows it; otherwise
    the core swallows the chunk and emits CommandError.
    """

    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class BodyChunk(Event):
    """A piece of the message content, CRLF line endings, unstuffed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfChunk(Event):
    """A non-LAST BDAT chunk has been read whole: answer 250 (or a refusal)."""

    size: int


@dataclass(frozen=True, slots=True)
class EndOfData(Event):
    """The message content is complete (CRLF.CRLF, or the LAST BDAT chunk).

    `size` is the number of octets delivered in BodyChunks.
    """

    size: int


@dataclass(frozen=True, slots=True)
class MessageRefused(Event):
    """The content ended but cannot be accepted (too big, bare LF/CR, …).

    The session discards what it spooled and sends `reply`; the transaction is
    over (as after RSET), the session goes on.
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS: answer 220 then call `start_tls()` and do the handshake."""


@dataclass(frozen=True, slots=True)
class AuthChallenge(Event):
    """AUTH PLAIN/LOGIN needs another round: send `reply` (a 334) unchanged.

    The core runs the SASL dialogue itself (sasl.py); the session only relays
    the challenge. The peer's answer comes back as more Auth* events, and the
    exchange ends with `Credentials` or a `CommandError` (cancelled, bad base64).
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class Credentials(Event):
    """A complete SASL PLAIN/LOGIN exchange: answer 235 or 535."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    argument: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    argument: str


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class CommandError(Event):
    """The peer sent something we refuse at the protocol level.

    The core has already decided the answer (`reply`: 500/501/502/503/504/…);
    the session sends it unchanged and logs `reason`. If `reply.code == 421`
    the connection is over after it is sent.
    """

    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (receive_data(b""))."""


# Imported last: replies.py has no dependency on events.py, and Reply is only
# needed for annotations above (postponed by `from __future__ import annotations`).
from gannet.smtp.replies import Reply  # noqa: E402
