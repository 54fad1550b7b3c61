"""Gannet's sans-IO SMTP/LMTP protocol core (h11 style): the public names.

Everything not re-exported here is private to gannet.smtp. This package does
no I/O, reads no clock and imports nothing from Gannet but gannet.smtp.* and
gannet.util.
"""

from gannet.smtp.buffer import BareNewline
from gannet.smtp.client import Capabilities, ClientConnection, ClientOptions
from gannet.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from gannet.smtp.events import (
    NEED_DATA,
    PAUSED,
    AuthChallenge,
    Bdat,
    BodyChunk,
    BodyType,
    CommandError,
    ConnectionClosed,
    Credentials,
    Data,
    Ehlo,
    EndOfChunk,
    EndOfData,
    Event,
    Helo,
    Help,
    MailFrom,
    MessageRefused,
    Noop,
    Notify,
    Quit,
    RcptTo,
    Ret,
    Rset,
    Sentinel,
    StartTls,
    Vrfy,
)
from gannet.smtp.replies import Reply, queued
from gannet.smtp.server import ServerConnection, ServerOptions
from gannet.smtp.state import ClientState, ServerState

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthChallenge",
    "BareNewline",
    "Bdat",
    "BodyChunk",
    "BodyType",
    "Capabilities",
    "ClientConnection",
    "ClientOptions",
    "ClientState",
    "CommandError",
    "ConnectionClosed",
    "Credentials",
    "Data",
    "Ehlo",
    "EndOfChunk",
    "EndOfData",
    "Event",
    "Helo",
    "Help",
    "LocalProtocolError",
    "MailFrom",
    "MessageRefused",
    "Noop",
    "Notify",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "Reply",
    "Ret",
    "Rset",
    "ServerConnection",
    "ServerOptions",
    "ServerState",
    "Sentinel",
    "StartTls",
    "Vrfy",
    "queued",
]
