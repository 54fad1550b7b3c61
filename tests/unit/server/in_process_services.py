"""`Services` for a `Listeners` run in-process by the server tests: the config's
recipient table, an empty account list, a swapped-in queue store."""

from __future__ import annotations

import ssl
from typing import Any

from gannet.clock import SystemClock
from gannet.config import Config
from gannet.policy.accounts import Accounts
from gannet.policy.recipients import RecipientTable
from gannet.server.auth import PasswordVerifier
from gannet.server.services import Services


def services_for(cfg: Config, store: Any = None, tls_context: ssl.SSLContext | None = None) -> Services:
    """`store`: whatever part of QueueStore the test's sessions use (None: no mail is sent)."""
    accounts = Accounts()
    return Services(
        config=cfg,
        store=store,
        recipients=RecipientTable.from_config(cfg.relay, cfg.mailboxes, accounts),
        verifier=PasswordVerifier(lambda: accounts),
        tls_context=tls_context,
        clock=SystemClock(),
    )
