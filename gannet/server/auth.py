"""Password verification for SMTP AUTH (RFC 4954), off the event loop.

`PasswordVerifier.verify(username, password)` answers True or False against
the users file (`gannet.policy.accounts`, argon2 PHC hashes). It owns no
state but a semaphore: the accounts come from `accounts_provider()` on every
call, so a reloaded users file takes effect on the next AUTH.

Invariants:

- Argon2 is deliberately slow (tens to hundreds of milliseconds, 64 MiB per
  hash with the defaults): it always runs in an executor
  (`loop.run_in_executor`), never on the event loop (STYLE.md anti-pattern 4),
  and at most `max_concurrency` at once, so a burst of AUTH attempts cannot
  take all the memory.
- An unknown user costs the same work as a known one: the password is hashed
  with the parameters of a real account's hash, so the time to answer does
  not reveal which accounts exist.
- `verify` never raises for bad input (odd usernames, unencodable passwords,
  a hash argon2 cannot parse): those are False. A failing `accounts_provider`
  is not bad input and propagates, so the session can answer 454 4.7.0.
- Passwords and hashes are never logged.

The SASL exchange itself is `gannet.smtp.sasl`; the reply to send (235, 535,
454) is the session's choice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor

from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import HashingError, InvalidHashError, VerificationError
from argon2.profiles import get_default_parameters

from gannet.policy.accounts import Accounts

log = logging.getLogger(__name__)

# PasswordHasher.verify reads the type and cost from the hash itself, so one
# instance verifies every hash in the file whatever its parameters.
_VERIFIER = PasswordHasher()


class PasswordVerifier:
    """Checks AUTH credentials against the current users file."""

    __slots__ = ("_accounts_provider", "_executor", "_limit", "_reference")

    def __init__(self, accounts_provider: Callable[[], Accounts],
                 executor: Executor | None = None, *,
                 max_concurrency: int | None = None) -> None:
        """`executor` None means the loop's default executor. `max_concurrency`
        bounds simultaneous argon2 runs (default: the number of CPUs)."""
        self._accounts_provider = accounts_provider
        self._executor = executor
        self._limit = asyncio.Semaphore(max_concurrency or os.cpu_count() or 2)
        # (snapshot, parameters) of the hash an unknown user's attempt imitates.
        self._reference: tuple[Accounts, Parameters] | None = None

    async def verify(self, username: str, password: str) -> bool:
        """True when `username` (case-insensitive) is an account and `password` matches."""
        accounts = self._accounts_provider()
        try:
            digest = accounts.password_hash(username)
        except (AttributeError, TypeError, ValueError):  # not a str, or similar
            digest = None
        loop = asyncio.get_running_loop()
        async with self._limit:
            if digest is not None:
                return await loop.run_in_executor(self._executor, _check, digest, password)
            params = self._reference_parameters(accounts)
            return await loop.run_in_executor(self._executor, _imitate, params, password)

    def _reference_parameters(self, accounts: Accounts) -> Parameters:
        """The cost parameters of a real hash (the first account's), cached per snapshot.

        Imitating a real hash, not argon2's defaults, keeps the timing equal
        when an operator (or a test) uses other parameters.
        """
        if self._reference is not None and self._reference[0] is accounts:
            return self._reference[1]
        params = get_default_parameters()
        for address in accounts.addresses()[:1]:
            digest = accounts.password_hash(address)
            try:
                params = extract_parameters(digest or "")
            except InvalidHashError:
                pass
        self._reference = (accounts, params)
        return params


def _check(digest: str, password: str) -> bool:
    """Runs in the executor. argon2 compares in constant time."""
    try:
        return _VERIFIER.verify(digest, password)
    except VerificationError:  # includes VerifyMismatchError: the wrong password
        return False
    except InvalidHashError:
        # Accounts.load validates hashes, so this is a corrupted entry.
        log.warning("auth: an account's hash cannot be parsed; rejecting the login")
        return False
    except (TypeError, ValueError):  # e.g. a password with lone surrogates
        return False


def _imitate(params: Parameters, password: str) -> bool:
    """Runs in the executor: the same argon2 work as `_check`, for an unknown user."""
    try:
        PasswordHasher.from_parameters(params).hash(password)
    except (HashingError, TypeError, ValueError):
        pass
    return False
