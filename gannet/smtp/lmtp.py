"""LMTP (RFC 2033): what differs from SMTP, and only that.

Owns: the LHLO verb (RFC 2033 §4.1; HELO and EHLO are answered 500 in LMTP
mode, see commands.py flags), and the rule that after the end of the content
the server sends one reply per accepted recipient, in RCPT order (§4.2).
The core counts those sends (`RecipientReplies`) and only returns to the
ready state after the last one. No I/O, no policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gannet.smtp.events import Ehlo
from gannet.smtp.syntax import parse_domain_arg

if TYPE_CHECKING:
    from gannet.smtp.server import ServerOptions


def parse_lhlo(arg: str, opts: ServerOptions, utf8: bool) -> Ehlo:
    """RFC 2033 §4.1: LHLO takes the same argument as EHLO."""
    return Ehlo(parse_domain_arg(arg), lmtp=True)


class RecipientReplies:
    """Counts the per-recipient replies still owed after EndOfData (RFC 2033 §4.2)."""

    __slots__ = ("remaining",)

    def __init__(self, recipients: int) -> None:
        self.remaining = recipients

    def sent_one(self) -> bool:
        """Record one reply; True when it was the last one owed."""
        self.remaining -= 1
        return self.remaining <= 0
