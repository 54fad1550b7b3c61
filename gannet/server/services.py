"""What every session shares: config, queue store, recipient table, TLS, AUTH.

One `Services` object per running server. Reload (SIGHUP) swaps `config`,
`recipients` and `tls_context` between sessions; a session reads them once,
when it starts, so it keeps one consistent view for its whole life.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from gannet.clock import Clock
from gannet.config import Config
from gannet.mailauth.checks import InboundChecks
from gannet.mailauth.signing import Signer
from gannet.policy.recipients import RecipientTable
from gannet.queue.store import QueueStore
from gannet.server.auth import PasswordVerifier


@dataclass(slots=True)
class Counters:
    """What the session loop itself reads (the max_sessions limit); the counts for
    /metrics are in gannet.metrics."""

    sessions_open: int = 0


@dataclass(slots=True)
class Services:
    config: Config
    store: QueueStore
    recipients: RecipientTable
    verifier: PasswordVerifier
    tls_context: ssl.SSLContext | None
    clock: Clock
    on_enqueued: Callable[[], None] = lambda: None
    refresh_recipients: Callable[[], RecipientTable] | None = None
    counters: Counters = field(default_factory=Counters)
    # SPF/DKIM/DMARC/ARC on mx listeners (None: [mailauth] checks = false), and the
    # [[dkim]] keys that sign and seal (None: no keys); see gannet/mailauth/checks.py.
    mailauth: InboundChecks | None = None
    signer: Signer | None = None

    def current_recipients(self) -> RecipientTable:
        """The recipient table as of now (the users file may have changed)."""
        if self.refresh_recipients is not None:
            self.recipients = self.refresh_recipients()
        return self.recipients
