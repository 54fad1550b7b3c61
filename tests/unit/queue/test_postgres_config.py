"""`[queue]` for PostgreSQL: the node identity that keeps nodes' lease owners
apart, the pool size, and the store each process opens (gannet.queue.configured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gannet.config import ConfigError, load
from gannet.queue.configured import Opener, make_store, owner_name
from gannet.queue.postgres import PostgresStore, safe_url
from gannet.queue.sqlite import SqliteStore

BASE = """
hostname = "mx.example.test"
data_dir = "{data_dir}"
[[listen]]
address = "127.0.0.1:2525"
[relay]
local_domains = ["example.test"]
[queue]
url = "postgresql://gannet@db.example.test:5432/mail"
{extra}
"""


def config(tmp_path: Path, data_dir: str = "var", extra: str = "") -> Path:
    path = tmp_path / f"gannet-{data_dir}.toml"
    path.write_text(BASE.format(data_dir=data_dir, extra=extra))
    return path


def test_a_node_name_by_default_is_stable_and_distinct_per_data_dir(tmp_path: Path) -> None:
    one = load(config(tmp_path, "var1")).queue
    assert one.node == load(config(tmp_path, "var1")).queue.node  # a restart finds its own leases
    assert one.node != load(config(tmp_path, "var2")).queue.node  # two nodes on one host never clash
    assert one.pool_size == 10 and one.sqlite_path is None
    assert owner_name(one, "local") == f"{one.node}/local"


def test_a_configured_node_name_and_pool_size(tmp_path: Path) -> None:
    q = load(config(tmp_path, extra='node = "mx-2"\npool_size = 4')).queue
    assert (q.node, q.pool_size) == ("mx-2", 4)
    assert [owner_name(q, a) for a in ("local", "smtp", "sweep")] == ["mx-2/local", "mx-2/smtp", "mx-2/sweep"]


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('node = "a/b"', "queue.node"),
        ('node = "x y"', "queue.node"),
        ("pool_size = 1", "queue.pool_size"),
        ("pool_size = 0", "queue.pool_size"),
    ],
)
def test_bad_queue_settings_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(config(tmp_path, extra=extra))
    assert info.value.key == key


def test_sqlite_keeps_plain_owner_names(tmp_path: Path) -> None:
    path = tmp_path / "gannet.toml"
    path.write_text(
        BASE.format(data_dir="var", extra="").replace(
            'url = "postgresql://gannet@db.example.test:5432/mail"', 'url = "sqlite:"'
        )
    )
    q = load(path).queue
    assert q.node == "" and owner_name(q, "local") == "local"
    assert isinstance(make_store(q, tmp_path / "var", Opener.TOOL), SqliteStore)


def test_each_process_opens_the_postgres_store_its_way(tmp_path: Path) -> None:
    q = load(config(tmp_path, extra='node = "mx-1"')).queue
    server = make_store(q, tmp_path / "var", Opener.SERVER)
    worker = make_store(q, tmp_path / "var", Opener.WORKER)
    assert isinstance(server, PostgresStore) and isinstance(worker, PostgresStore)
    assert server.node == worker.node == "mx-1"
    assert server.spool_dir == tmp_path / "var" / "spool"
    # Only the server clears the node's spool directory at open.
    assert (server.recover, worker.recover) == (True, False)


def test_passwords_stay_out_of_the_logs() -> None:
    assert safe_url("postgresql://gannet:s3cret@db:5432/mail") == "postgresql://gannet:***@db:5432/mail"
    assert safe_url("postgresql://gannet@db/mail") == "postgresql://gannet@db/mail"
