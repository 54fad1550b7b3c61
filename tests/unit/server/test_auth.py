"""PasswordVerifier: real argon2 hashes, verified in an executor, never on the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher, extract_parameters

from gannet.policy.accounts import Accounts, add_account
from gannet.server.auth import PasswordVerifier

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
# Costly enough to measure (~10 ms), cheap enough for a unit test.
MEASURABLE = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)


def make_accounts(tmp_path: Path, hasher: PasswordHasher = CHEAP) -> Accounts:
    users = tmp_path / "users"
    add_account(users, "alice@example.test", "correct horse", hasher=hasher)
    add_account(users, "Bob@example.test", "battery staple", hasher=hasher)
    return Accounts.load(users)


class GatedExecutor(ThreadPoolExecutor):
    """Runs each job on a worker thread only once `gate` is set; records what ran where."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.gate = threading.Event()
        self.submitted = 0
        self.threads: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1

        def gated() -> Any:
            if not self.gate.wait(timeout=10):
                raise TimeoutError("the gate was never opened: was the loop blocked?")
            self.threads.append(threading.get_ident())
            return fn(*args, **kwargs)

        return super().submit(gated)


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    return make_accounts(tmp_path)


async def test_correct_and_wrong_passwords(accounts: Accounts) -> None:
    verifier = PasswordVerifier(lambda: accounts)
    assert await verifier.verify("alice@example.test", "correct horse") is True
    assert await verifier.verify("alice@example.test", "correct horse ") is False
    assert await verifier.verify("alice@example.test", "battery staple") is False
    assert await verifier.verify("bob@example.test", "battery staple") is True


async def test_username_is_case_insensitive(accounts: Accounts) -> None:
    verifier = PasswordVerifier(lambda: accounts)
    assert await verifier.verify("ALICE@Example.Test", "correct horse") is True
    assert await verifier.verify("BOB@EXAMPLE.TEST", "battery staple") is True


async def test_unknown_user_is_false(accounts: Accounts) -> None:
    verifier = PasswordVerifier(lambda: accounts)
    assert await verifier.verify("mallory@example.test", "correct horse") is False
    assert await verifier.verify("alice@other.test", "correct horse") is False


async def test_no_accounts_at_all(tmp_path: Path) -> None:
    verifier = PasswordVerifier(lambda: Accounts.load(tmp_path / "missing"))
    assert await verifier.verify("alice@example.test", "x") is False


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("", ""),
        ("alice@example.test", ""),
        ("\x00", "\x00"),
        ("alice@example.test", "\ud800"),  # a lone surrogate cannot be encoded
        ("nobody@example.test", "\udcff"),
        ("a" * 10_000, "b" * 10_000),
        ("alice@example.test\r\nMAIL FROM:<x>", "correct horse"),
    ],
)
async def test_bad_input_is_false_never_an_exception(accounts: Accounts, username: str,
                                                     password: str) -> None:
    verifier = PasswordVerifier(lambda: accounts)
    assert await verifier.verify(username, password) is False


async def test_corrupt_hash_is_false(caplog: pytest.LogCaptureFixture) -> None:
    broken = Accounts([("alice@example.test", "$argon2id$v=19$m=8,t=1,p=1$bad")])
    verifier = PasswordVerifier(lambda: broken)
    assert await verifier.verify("alice@example.test", "anything") is False
    assert "anything" not in caplog.text and "$bad" not in caplog.text


async def test_each_call_reads_the_current_accounts(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_account(users, "alice@example.test", "old", hasher=CHEAP)
    verifier = PasswordVerifier(lambda: Accounts.load(users))
    assert await verifier.verify("alice@example.test", "old") is True
    add_account(users, "alice@example.test", "new", hasher=CHEAP)
    assert await verifier.verify("alice@example.test", "old") is False
    assert await verifier.verify("alice@example.test", "new") is True


async def test_argon2_runs_in_the_executor_while_the_loop_keeps_running(
        accounts: Accounts) -> None:
    executor = GatedExecutor()
    try:
        verifier = PasswordVerifier(lambda: accounts, executor)
        task = asyncio.create_task(verifier.verify("alice@example.test", "correct horse"))
        # The check is parked in a worker thread behind the gate; if it ran on
        # the loop, we would not get here until it finished (or timed out).
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        assert executor.submitted == 1
        executor.gate.set()
        assert await task is True
        assert executor.threads and threading.get_ident() not in executor.threads
    finally:
        executor.gate.set()
        executor.shutdown(wait=True)


async def test_unknown_user_also_does_argon2_work_off_the_loop(accounts: Accounts) -> None:
    executor = GatedExecutor()
    executor.gate.set()
    try:
        verifier = PasswordVerifier(lambda: accounts, executor)
        assert await verifier.verify("mallory@example.test", "guess") is False
        assert executor.submitted == 1
        assert threading.get_ident() not in executor.threads
    finally:
        executor.shutdown(wait=True)


async def test_max_concurrency_bounds_parallel_hashing(accounts: Accounts) -> None:
    executor = GatedExecutor()
    try:
        verifier = PasswordVerifier(lambda: accounts, executor, max_concurrency=1)
        tasks = [asyncio.create_task(verifier.verify("alice@example.test", "correct horse"))
                 for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert executor.submitted == 1  # the other two wait on the semaphore, on the loop
        executor.gate.set()
        assert await asyncio.gather(*tasks) == [True, True, True]
        assert executor.submitted == 3
    finally:
        executor.gate.set()
        executor.shutdown(wait=True)


async def test_unknown_user_costs_the_same_argon2_work(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The time to say "no" must not reveal whether the account exists: an unknown
    user's attempt runs argon2 with exactly the cost parameters of a real hash.
    (Checked structurally, not with a stopwatch: CI machines are shared and noisy.)"""
    accounts = make_accounts(tmp_path, MEASURABLE)
    real = extract_parameters(accounts.password_hash("alice@example.test") or "")
    seen: list[object] = []
    original = PasswordHasher.from_parameters.__func__  # type: ignore[attr-defined]

    def recording(cls: type[PasswordHasher], params: object) -> PasswordHasher:
        seen.append(params)
        return original(cls, params)  # type: ignore[no-any-return]

    monkeypatch.setattr(PasswordHasher, "from_parameters", classmethod(recording))
    verifier = PasswordVerifier(lambda: accounts, max_concurrency=1)
    assert await verifier.verify("mallory@example.test", "wrong password") is False
    assert seen == [real]
