"""SMTP replies as values: `Reply(code, enhanced, text)` and the named catalog.

A reply is never a "250 OK" string passed around: it is built once here (or
from these constants with `.with_text()`) and encoded only by `encode()`.
The public text stays generic; the private reason for a refusal goes to the
log, not to the peer.

RFC 5321 §4.2 (reply syntax), RFC 3463 / RFC 5248 (enhanced status codes),
RFC 2034 (ENHANCEDSTATUSCODES: the code is the first word of every line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3463 §2: an enhanced status code is class "." subject "." detail, class
# 2, 4 or 5 and the other two 1-3 digits. Match a whole word with fullmatch().
ENHANCED_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. `enhanced` is "x.y.z" or "" (greeting/EHLO lines have none)."""

    code: int
    enhanced: str
    text: tuple[str, ...]

    def __init__(self, code: int, enhanced: str = "", *text: str) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "text", tuple(text) if text else ("",))

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, *text: str) -> Reply:
        return Reply(self.code, self.enhanced, *text)

    def encode(self) -> bytes:
        """RFC 5321 §4.2.1: "code-" on every line but the last, "code " on the last."""
        if len(self.text) == 1:  # the common case, kept cheap
            line = self.text[0]
            words = f"{self.enhanced} {line}" if self.enhanced else line
            if self.code == 334:  # RFC 4954 §4: "334" SP [base64], the space even when empty
                return f"334 {words}\r\n".encode()
            return (f"{self.code} {words}".rstrip(" ") + "\r\n").encode("utf-8")
        last = len(self.text) - 1
        out = []
        for i, line in enumerate(self.text):
            sep = " " if i == last else "-"
            words = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{words}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return " ".join(filter(None, (str(self.code), self.enhanced, " / ".join(self.text))))


# The catalog. Names: R<code>_<MEANING>. Texts are deliberately plain.
R220_READY = Reply(220, "", "ESMTP ready")
R220_GO_AHEAD_TLS = Reply(220, "2.0.0", "Ready to start TLS")
R221_BYE = Reply(221, "2.0.0", "Bye")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_RESET = Reply(250, "2.0.0", "Reset OK")
R252_CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
R214_HELP = Reply(
    214,
    "2.0.0",
    "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
)
R334_CONTINUE = Reply(334, "", "")
R354_START_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
# RFC 4954 §4 / draft-murchison-sasl-login: LOGIN prompts are base64 "Username:" / "Password:".
R334_LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")
R334_LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")

R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
R421_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R421_FORBIDDEN_COMMAND = Reply(421, "4.7.0", "Forbidden command, closing connection")
R421_TOO_BUSY = Reply(421, "4.3.2", "Too many connections, try again later")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Local error, try again later")
R451_TEMP_LOOKUP = Reply(451, "4.4.3", "Temporary lookup failure, try again later")
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
R452_NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage")
R454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
R454_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")

R500_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R500_BARE_LF = Reply(500, "5.5.2", "Bare <LF> or <CR> in command line is not allowed")
R501_SYNTAX_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R501_BAD_ADDRESS = Reply(501, "5.1.7", "Bad address syntax")
R501_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
R501_AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
R501_AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication response")
R502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
R503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R503_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
R503_NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
R503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
R503_NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
R503_AUTH_NOT_OFFERED = Reply(503, "5.5.1", "Authentication not enabled")
R503_TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
R503_IN_TRANSACTION = Reply(503, "5.5.1", "Not allowed during a mail transaction")
R500_USE_LHLO = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
R504_AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
R504_PARAM = Reply(504, "5.5.4", "Unrecognized parameter")
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R530_STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R550_NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
R550_DMARC_REJECT = Reply(550, "5.7.1", "Rejected by DMARC policy")
R552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R553_SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
R553_NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
R554_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
R554_NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
R554_BARE_LF = Reply(554, "5.5.2", "Message contains bare <LF> or <CR>, refused (see RFC 5321 §2.3.8)")
R554_TLS_REQUIRED = Reply(554, "5.7.0", "TLS required for this listener")
R555_PARAM_NOT_RECOGNIZED = Reply(
    555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented"
)


def queued(queue_id: str) -> Reply:
    """The CONTRACT.md reply to DATA / the last BDAT: "250 2.0.0 queued as ID"."""
    return Reply(250, "2.0.0", f"queued as {queue_id}")
