"""Fixtures for the protocol-core tests (helpers live in helpers.py)."""

from __future__ import annotations

import pytest

from gannet.smtp import ServerConnection

from .helpers import greeted
from .transcript import AcceptAll


@pytest.fixture
def smtp() -> tuple[ServerConnection, AcceptAll]:
    """A greeted ESMTP connection (after EHLO) with an accept-everything session."""
    return greeted()
