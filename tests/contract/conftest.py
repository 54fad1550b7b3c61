"""Fixtures for the QueueStore contract suite: one `store` per backend.

`store_env` knows how to make a store of one kind on one piece of backing
storage (a SQLite file, or a fresh schema in the session's PostgreSQL, started
from the installed binaries by tests/conftest.py `postgres_server`); `store` is an
opened store on it, closed after the test. Tests that need a second instance
on the same storage (reopen after close, a second reader) call
`store_env.make()`.

To add a backend: add its name to BACKENDS and a branch in `StoreEnv.make`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gannet.queue.postgres import PostgresStore
from gannet.queue.sqlite import SqliteStore
from gannet.queue.store import QueueStore

# "sqlite-process": the server's SqliteStore, whose enqueues run in a writer process.
BACKENDS = ["sqlite", "sqlite-process", "postgres"]


@dataclass
class StoreEnv:
    backend: str
    root: Path
    url: str = ""  # postgres: the database (schema) of this test

    @property
    def spool_dir(self) -> Path:
        """Where a session spools large bodies (SpooledBody files) for this store."""
        return self.root / "spool"

    def make(self, *, recover: bool = True) -> QueueStore:
        """A new, not yet opened, store on this environment's storage."""
        if self.backend in ("sqlite", "sqlite-process"):
            return SqliteStore(
                self.root / "queue.db",
                spool_dir=self.spool_dir,
                node="test",
                recover=recover,
                enqueue_process=self.backend == "sqlite-process",
            )
        if self.backend == "postgres":
            return PostgresStore(self.url, spool_dir=self.spool_dir, node="test", recover=recover)
        raise AssertionError(f"unknown backend {self.backend}")


@pytest.fixture(params=BACKENDS)
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> StoreEnv:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    env = StoreEnv(request.param, tmp_path, url)
    env.spool_dir.mkdir()
    return env


@pytest.fixture
async def store(store_env: StoreEnv) -> AsyncIterator[QueueStore]:
    s = store_env.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
