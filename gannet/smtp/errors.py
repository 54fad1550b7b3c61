"""Protocol errors (h11 style).

`LocalProtocolError`: *we* (the session code) misused the connection object,
e.g. sent a reply when none was pending. That is a bug in Gannet, never the
peer's fault, and is allowed to propagate.

`RemoteProtocolError`: the *peer* broke the protocol in a way the core cannot
answer inside the SMTP dialogue (client side: a malformed reply line). It
carries the reply/reason to report. On the server side, the core turns peer
mistakes into `CommandError` events instead of raising.
"""

from __future__ import annotations

from gannet.smtp.replies import Reply


class ProtocolError(Exception):
    """Base of both."""


class LocalProtocolError(ProtocolError):
    """Gannet's own code used the protocol object wrongly."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that cannot be handled within SMTP."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
