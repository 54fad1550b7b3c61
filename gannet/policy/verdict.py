"""Verdicts: what every policy decision returns (STYLE.md habit 5).

`Accept` lets the command through; `Reject` answers with a permanent (5xx)
reply; `Defer` answers with a transient (4xx) one. The `reply` is what the
peer sees and stays generic; `reason` is private, for the mail log only (who,
what, why), and must never be sent on the wire (habit 3: maddy's "say 'DNS
error during policy check'").

Pure values: no I/O, no mutable state. Callers match on the type:

    match verdict:
        case Accept(): ...
        case Reject(reply, reason) | Defer(reply, reason): ...
"""

from __future__ import annotations

from dataclasses import dataclass

from gannet.smtp.replies import Reply


@dataclass(frozen=True, slots=True)
class Accept:
    """Go on. The session picks its own positive reply (250 2.1.5, …)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse permanently with `reply` (5xx). `reason` is for the log only."""

    reply: Reply
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Defer:
    """Refuse for now with `reply` (4xx): the client should try again later."""

    reply: Reply
    reason: str = ""


Verdict = Accept | Reject | Defer

ACCEPT = Accept()
