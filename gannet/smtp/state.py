"""Both SMTP state machines (server and client) as transition tables, in one file.

Owns: the states, which command is in sequence in which server state (and
the 503 to send when it is not), and how a reply moves each side.
It does no parsing and no I/O, and holds no per-connection data.

The two rules (after h11's _state.py):

Rule 1: everything that can change the state is an event (or, on the
        client, a command we send), and a state changes only by looking up
        (state, event type, reply kind) in a table below. Events that need no
        reply (Bdat, BodyChunk, ConnectionClosed) use ReplyKind.NONE and move
        the state when they are emitted.

Rule 2: a key missing from a table is a bug in Gannet (the session sent an
        impossible reply, e.g. 250 to DATA), never the peer's fault: it
        raises LocalProtocolError. The peer's mistakes are answered from
        SERVER_REFUSALS, inside SMTP.

Two global rules sit above the tables: any 421 closes the connection, and in
LMTP mode the reply to the end of the content is repeated per recipient
(lmtp.py) before the transition is taken.
"""

from __future__ import annotations

import enum

from gannet.smtp.errors import LocalProtocolError
from gannet.smtp.events import (
    AuthChallenge,
    Bdat,
    BodyChunk,
    CommandError,
    ConnectionClosed,
    Credentials,
    Data,
    Ehlo,
    EndOfChunk,
    EndOfData,
    Event,
    Helo,
    MailFrom,
    MessageRefused,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
)
from gannet.smtp.events import Help as HelpEvent
from gannet.smtp.replies import (
    R503_BAD_SEQUENCE,
    R503_IN_TRANSACTION,
    R503_NEED_HELO,
    R503_NEED_MAIL,
    R503_NEED_RCPT,
    R503_NESTED_MAIL,
    Reply,
)


class ServerState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is slow Python

    GREETING = "GREETING"  # before the session sent the greeting
    REFUSED = "REFUSED"  # greeted with 554: only QUIT (RFC 5321 §3.1)
    READY = "READY"  # no HELO/EHLO yet
    GREETED = "GREETED"  # HELO/EHLO done, no transaction
    MAIL = "MAIL"  # sender accepted, no recipient yet
    RCPT = "RCPT"  # at least one recipient accepted
    BODY = "BODY"  # reading DATA content
    BDAT = "BDAT"  # reading a BDAT chunk
    BDAT_NEXT = "BDAT_NEXT"  # between BDAT chunks (RFC 3030)
    AUTH = "AUTH"  # inside a SASL exchange
    TLS_PENDING = "TLS_PENDING"  # 220 sent to STARTTLS, waiting for start_tls()
    CLOSED = "CLOSED"


class ClientState(enum.Enum):
    __hash__ = object.__hash__

    CONNECTING = "CONNECTING"  # waiting for the greeting
    READY = "READY"  # greeted by the server, no EHLO accepted yet
    GREETED = "GREETED"
    MAIL = "MAIL"  # MAIL accepted, no recipient yet
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # 354 received: send the content, then end_body()
    BDAT = "BDAT"  # non-LAST BDAT chunks accepted
    TLS_PENDING = "TLS_PENDING"  # 220 to STARTTLS: do the handshake, then start_tls()
    CLOSED = "CLOSED"


class ClientStep(enum.Enum):
    """What a reply answers, on the client side (the key of CLIENT_TRANSITIONS)."""

    __hash__ = object.__hash__

    GREETING = "greeting"
    HELLO = "EHLO/HELO/LHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "end of data"
    BDAT = "BDAT"
    BDAT_LAST = "BDAT LAST"
    RSET = "RSET"
    NOOP = "NOOP"
    VRFY = "VRFY"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"


class ReplyKind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is slow Python

    NONE = "none"  # the event needs no reply
    POSITIVE = "2xx"
    INTERMEDIATE = "3xx"
    NEGATIVE = "4xx/5xx"


def reply_kind(reply: Reply) -> ReplyKind:
    code = reply.code
    if 200 <= code < 300:
        return ReplyKind.POSITIVE
    if 300 <= code < 400:
        return ReplyKind.INTERMEDIATE
    if 400 <= code < 600:
        return ReplyKind.NEGATIVE
    raise LocalProtocolError(f"reply code {code} is not a valid SMTP reply code")


class Cmd(enum.Enum):
    """Command verbs (the wire spelling is in commands.py)."""

    HELO = "HELO"
    EHLO = "EHLO"
    LHLO = "LHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    VRFY = "VRFY"
    HELP = "HELP"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"


S = ServerState
_POS, _MID, _NEG, _NONE = (
    ReplyKind.POSITIVE,
    ReplyKind.INTERMEDIATE,
    ReplyKind.NEGATIVE,
    ReplyKind.NONE,
)

# States in which command lines are read.
COMMAND_STATES = (S.READY, S.GREETED, S.MAIL, S.RCPT, S.BDAT_NEXT)
_ANYTIME = frozenset({Cmd.HELO, Cmd.EHLO, Cmd.LHLO, Cmd.RSET, Cmd.NOOP, Cmd.VRFY, Cmd.HELP, Cmd.QUIT})

# Which commands are in sequence in which state (RFC 5321 §4.1.4, RFC 3030, RFC 3207, RFC 4954).
SERVER_ACCEPTS: dict[ServerState, frozenset[Cmd]] = {
    S.REFUSED: frozenset({Cmd.QUIT}),
    S.READY: _ANYTIME,
    S.GREETED: _ANYTIME | {Cmd.MAIL, Cmd.STARTTLS, Cmd.AUTH},
    S.MAIL: _ANYTIME | {Cmd.RCPT},
    S.RCPT: _ANYTIME | {Cmd.RCPT, Cmd.DATA, Cmd.BDAT},
    S.BDAT_NEXT: _ANYTIME | {Cmd.BDAT},
}

# The answer to a command out of sequence; anything not listed gets R503_BAD_SEQUENCE.
SERVER_REFUSALS: dict[tuple[ServerState, Cmd], Reply] = {
    **{(S.READY, c): R503_NEED_HELO for c in Cmd},
    (S.GREETED, Cmd.RCPT): R503_NEED_MAIL,
    (S.GREETED, Cmd.DATA): R503_NEED_MAIL,
    (S.GREETED, Cmd.BDAT): R503_NEED_MAIL,
    **{(s, Cmd.MAIL): R503_NESTED_MAIL for s in (S.MAIL, S.RCPT, S.BDAT_NEXT)},
    (S.MAIL, Cmd.DATA): R503_NEED_RCPT,
    (S.MAIL, Cmd.BDAT): R503_NEED_RCPT,
    **{(s, c): R503_IN_TRANSACTION for s in (S.MAIL, S.RCPT, S.BDAT_NEXT) for c in (Cmd.STARTTLS, Cmd.AUTH)},
}


def server_refusal(state: ServerState, cmd: Cmd) -> Reply | None:
    """None if `cmd` is in sequence in `state`, else the 503 to send."""
    if cmd in SERVER_ACCEPTS.get(state, ()):
        return None
    return SERVER_REFUSALS.get((state, cmd), R503_BAD_SEQUENCE)


_Key = tuple[ServerState, "type[Event] | None", ReplyKind]


def _server_table() -> dict[_Key, ServerState]:
    t: dict[_Key, ServerState] = {
        # The greeting (event None): 220 → READY; 554 → only QUIT is answered.
        (S.GREETING, None, _POS): S.READY,
        (S.GREETING, None, _NEG): S.REFUSED,
        (S.REFUSED, Quit, _POS): S.CLOSED,
        (S.REFUSED, CommandError, _NEG): S.REFUSED,
        (S.GREETED, MailFrom, _POS): S.MAIL,
        (S.GREETED, MailFrom, _NEG): S.GREETED,
        (S.MAIL, RcptTo, _POS): S.RCPT,
        (S.MAIL, RcptTo, _NEG): S.MAIL,
        (S.RCPT, RcptTo, _POS): S.RCPT,
        (S.RCPT, RcptTo, _NEG): S.RCPT,
        (S.RCPT, Data, _MID): S.BODY,  # 354
        (S.RCPT, Data, _NEG): S.RCPT,
        (S.BODY, BodyChunk, _NONE): S.BODY,
        (S.BODY, EndOfData, _POS): S.GREETED,
        (S.BODY, EndOfData, _NEG): S.GREETED,
        (S.BODY, MessageRefused, _NEG): S.GREETED,
        (S.RCPT, Bdat, _NONE): S.BDAT,
        (S.BDAT_NEXT, Bdat, _NONE): S.BDAT,
        (S.BDAT, BodyChunk, _NONE): S.BDAT,
        (S.BDAT, EndOfChunk, _POS): S.BDAT_NEXT,
        (S.BDAT, EndOfChunk, _NEG): S.GREETED,  # RFC 3030 §3: a refused chunk ends the transaction
        (S.BDAT, EndOfData, _POS): S.GREETED,
        (S.BDAT, EndOfData, _NEG): S.GREETED,
        (S.BDAT, MessageRefused, _NEG): S.GREETED,
        (S.GREETED, StartTls, _POS): S.TLS_PENDING,  # 220: start_tls() moves on to READY
        (S.GREETED, StartTls, _NEG): S.GREETED,
        (S.GREETED, AuthChallenge, _MID): S.AUTH,
        (S.GREETED, AuthChallenge, _NEG): S.GREETED,
        (S.AUTH, AuthChallenge, _MID): S.AUTH,
        (S.AUTH, AuthChallenge, _NEG): S.GREETED,
        (S.GREETED, Credentials, _POS): S.GREETED,
        (S.GREETED, Credentials, _NEG): S.GREETED,
        (S.AUTH, Credentials, _POS): S.GREETED,
        (S.AUTH, Credentials, _NEG): S.GREETED,
        (S.AUTH, CommandError, _NEG): S.GREETED,  # cancelled / bad base64 ends the exchange
    }
    for s in (*COMMAND_STATES, S.BODY, S.BDAT, S.AUTH, S.TLS_PENDING, S.REFUSED, S.GREETING):
        t[(s, ConnectionClosed, _NONE)] = S.CLOSED
    for s in COMMAND_STATES:
        for hello in (Helo, Ehlo):
            t[(s, hello, _POS)] = S.GREETED  # RFC 5321 §4.1.4: EHLO resets the transaction
            t[(s, hello, _NEG)] = s
        t[(s, Rset, _POS)] = S.READY if s is S.READY else S.GREETED
        t[(s, Rset, _NEG)] = s
        for ev in (Noop, Vrfy, HelpEvent):
            t[(s, ev, _POS)] = s
            t[(s, ev, _NEG)] = s
        t[(s, Quit, _POS)] = S.CLOSED
        t[(s, CommandError, _NEG)] = s
    return t


SERVER_TRANSITIONS: dict[_Key, ServerState] = _server_table()


def server_transition(state: ServerState, event: type[Event] | None, kind: ReplyKind) -> ServerState:
    try:
        return SERVER_TRANSITIONS[(state, event, kind)]
    except KeyError:
        name = event.__name__ if event is not None else "greeting"
        raise LocalProtocolError(
            f"no server transition from {state.name} on {name} with a {kind.value} reply"
        ) from None


# -- the client ---------------------------------------------------------------------------
#
# Rule 1 holds as on the server: the state only moves by a lookup of
# (state, step, reply kind). Rule 2 is split by whose fault a missing key is:
# *sending* a command that no key allows (checked against the state the
# already pipelined commands will reach if they succeed) is Gannet's bug,
# LocalProtocolError; a *reply* that no key allows (250 to RCPT after the MAIL
# was refused) is the server's, RemoteProtocolError.

C = ClientState
P = ClientStep
_ClientKey = tuple[ClientState, ClientStep, ReplyKind]


def _client_table() -> dict[_ClientKey, ClientState]:
    t: dict[_ClientKey, ClientState] = {
        (C.CONNECTING, P.GREETING, _POS): C.READY,
        (C.CONNECTING, P.GREETING, _NEG): C.READY,  # 554: the client should QUIT
        (C.GREETED, P.MAIL, _POS): C.MAIL,
        (C.GREETED, P.MAIL, _NEG): C.GREETED,
        (C.MAIL, P.RCPT, _POS): C.RCPT,
        (C.MAIL, P.RCPT, _NEG): C.MAIL,
        (C.RCPT, P.RCPT, _POS): C.RCPT,
        (C.RCPT, P.RCPT, _NEG): C.RCPT,
        (C.GREETED, P.RCPT, _NEG): C.GREETED,  # pipelined after a refused MAIL
        (C.RCPT, P.DATA, _MID): C.DATA,
        (C.RCPT, P.DATA, _NEG): C.RCPT,
        (C.MAIL, P.DATA, _MID): C.DATA,  # RFC 2920 §3.1: no recipient, yet 354: send "."
        (C.MAIL, P.DATA, _NEG): C.MAIL,
        (C.GREETED, P.DATA, _NEG): C.GREETED,
        (C.DATA, P.END_OF_DATA, _POS): C.GREETED,
        (C.DATA, P.END_OF_DATA, _NEG): C.GREETED,
        (C.GREETED, P.STARTTLS, _POS): C.TLS_PENDING,
        (C.GREETED, P.STARTTLS, _NEG): C.GREETED,
        (C.GREETED, P.AUTH, _POS): C.GREETED,
        (C.GREETED, P.AUTH, _NEG): C.GREETED,
    }
    for s in (C.RCPT, C.BDAT):
        t[(s, P.BDAT, _POS)] = C.BDAT
        t[(s, P.BDAT, _NEG)] = C.GREETED  # RFC 3030 §3: a refused chunk ends the transaction
        t[(s, P.BDAT_LAST, _POS)] = C.GREETED
        t[(s, P.BDAT_LAST, _NEG)] = C.GREETED
    for s in (C.GREETED, C.MAIL):  # pipelined after a refused MAIL or RCPTs
        t[(s, P.BDAT, _NEG)] = s
        t[(s, P.BDAT_LAST, _NEG)] = s
    for s in (C.READY, C.GREETED):
        t[(s, P.HELLO, _POS)] = C.GREETED
        t[(s, P.HELLO, _NEG)] = s
    for s in (C.READY, C.GREETED, C.MAIL, C.RCPT, C.BDAT):
        t[(s, P.RSET, _POS)] = C.READY if s is C.READY else C.GREETED
        t[(s, P.RSET, _NEG)] = s
        for step in (P.NOOP, P.VRFY):
            t[(s, step, _POS)] = s
            t[(s, step, _NEG)] = s
        t[(s, P.QUIT, _POS)] = C.CLOSED
        t[(s, P.QUIT, _NEG)] = C.CLOSED
    return t


CLIENT_TRANSITIONS: dict[_ClientKey, ClientState] = _client_table()


def client_transition(state: ClientState, step: ClientStep, kind: ReplyKind) -> ClientState | None:
    """None when no key allows it; the caller knows whose fault that is."""
    return CLIENT_TRANSITIONS.get((state, step, kind))
