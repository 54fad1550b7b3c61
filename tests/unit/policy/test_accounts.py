"""The users file: format, round trips, atomic and private writes, precise errors."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError

from gannet.policy.accounts import (
    Accounts,
    AccountsError,
    add_account,
    normalize_address,
    remove_account,
)

# argon2 at its standard cost takes ~100 ms per hash; tests use the cheapest
# parameters argon2 allows. The default is checked once, below.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
HASH = CHEAP.hash("x")


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return tmp_path / "users"


def add(path: Path, address: str, password: str = "secret") -> None:
    add_account(path, address, password, hasher=CHEAP)


def verifies(digest: str | None, password: str) -> bool:
    assert digest is not None
    try:
        return CHEAP.verify(digest, password)
    except VerifyMismatchError:
        return False


# -- reading ---------------------------------------------------------------------

def test_missing_file_means_no_accounts(users: Path) -> None:
    accounts = Accounts.load(users)
    assert len(accounts) == 0
    assert accounts.addresses() == []
    assert not accounts.exists("alice@example.test")
    assert accounts.password_hash("alice@example.test") is None


def test_comments_blank_lines_crlf_and_bom_are_accepted(users: Path) -> None:
    users.write_bytes(
        b"\xef\xbb\xbf# a comment\r\n"
        b"\r\n"
        b"   # indented comment\n"
        + f"alice@example.test:{HASH}\r\n".encode()
        + f"  bob@Example.TEST : {HASH}  \n".encode()
        + b"\n"
    )
    accounts = Accounts.load(users)
    assert accounts.addresses() == ["alice@example.test", "bob@example.test"]
    assert accounts.password_hash("BOB@example.test") == HASH


def test_last_line_without_newline(users: Path) -> None:
    users.write_text(f"alice@example.test:{HASH}", encoding="utf-8")
    assert Accounts.load(users).exists("alice@example.test")


@pytest.mark.parametrize(
    ("content", "line_no", "reason"),
    [
        ("# ok\nalice@example.test\n", 2, "expected address:hash"),
        ("\n\nalice@example.test:plaintext\n", 3, "not an Argon2 PHC string"),
        ("alice@example.test:$2b$12$bcrypthashbcrypthashbcrypt\n", 1, "not an Argon2 PHC string"),
        (f"alice:{HASH}\n", 1, "local@domain"),
        (f"al ice@example.test:{HASH}\n", 1, "local part"),
        (f"alice@exa_mple.test:{HASH}\n", 1, "not a domain name"),
        (f"alice@example.test:{HASH}\n#\nALICE@example.test:{HASH}\n", 3, "already on line 1"),
    ],
)
def test_malformed_line_names_the_line(users: Path, content: str, line_no: int, reason: str) -> None:
    users.write_text(content, encoding="utf-8")
    with pytest.raises(AccountsError) as info:
        Accounts.load(users)
    err = info.value
    assert (err.path, err.line_no) == (users, line_no)
    assert reason in err.reason
    assert str(err).startswith(f"{users}:{line_no}: ")


def test_error_never_echoes_what_may_be_a_password(users: Path) -> None:
    users.write_text("alice@example.test:hunter2\n", encoding="utf-8")
    with pytest.raises(AccountsError) as info:
        Accounts.load(users)
    assert "hunter2" not in str(info.value)


def test_non_utf8_line_is_reported_with_its_number(users: Path) -> None:
    users.write_bytes(f"alice@example.test:{HASH}\n".encode() + b"b\xff@example.test:x\n")
    with pytest.raises(AccountsError) as info:
        Accounts.load(users)
    assert info.value.line_no == 2
    assert "UTF-8" in info.value.reason


def test_unreadable_file_is_an_accounts_error(tmp_path: Path) -> None:
    with pytest.raises(AccountsError) as info:
        Accounts.load(tmp_path)  # a directory
    assert info.value.line_no == 0


def test_lookups_are_case_insensitive_and_keep_the_local_part(users: Path) -> None:
    add(users, "Bob.Smith@Example.TEST")
    accounts = Accounts.load(users)
    assert users.read_text(encoding="utf-8").count("Bob.Smith@example.test:") == 1
    for spelling in ("Bob.Smith@example.test", "bob.smith@EXAMPLE.test", "BOB.SMITH@example.TEST"):
        assert accounts.exists(spelling)
        assert spelling in accounts
        assert accounts.canonical(spelling) == "Bob.Smith@example.test"
    assert not accounts.exists("bob.smith@other.test")


def test_snapshot_built_in_memory_lowercases_the_domain() -> None:
    accounts = Accounts([("Alice@EXAMPLE.Test", HASH), ("bob@example.test", HASH)])
    assert accounts.canonical("alice@example.test") == "Alice@example.test"
    assert accounts.addresses() == ["Alice@example.test", "bob@example.test"]
    assert len(accounts) == 2


def test_repr_hides_hashes(users: Path) -> None:
    add(users, "alice@example.test")
    assert "argon2" not in repr(Accounts.load(users))


# -- writing ---------------------------------------------------------------------

def test_round_trip(users: Path) -> None:
    add(users, "carol@example.test", "pw-carol")
    add(users, "alice@example.test", "pw-alice")
    add(users, "bob@other.test", "pw-bob")
    accounts = Accounts.load(users)
    assert len(accounts) == 3
    assert accounts.addresses() == ["alice@example.test", "bob@other.test", "carol@example.test"]
    assert verifies(accounts.password_hash("alice@example.test"), "pw-alice")
    assert not verifies(accounts.password_hash("alice@example.test"), "pw-bob")
    for line in users.read_text(encoding="utf-8").splitlines():
        assert line.startswith("#") or "$argon2id$v=19$" in line


def test_add_replaces_an_existing_hash_in_place(users: Path) -> None:
    add(users, "alice@example.test", "old")
    add(users, "bob@example.test", "bob")
    add(users, "ALICE@example.test", "new")
    accounts = Accounts.load(users)
    assert len(accounts) == 2
    assert accounts.addresses() == ["ALICE@example.test", "bob@example.test"]
    assert verifies(accounts.password_hash("alice@example.test"), "new")
    assert not verifies(accounts.password_hash("alice@example.test"), "old")
    entries = [ln for ln in users.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    assert entries[0].startswith("ALICE@example.test:")  # kept its place


def test_add_preserves_comments_written_by_hand(users: Path) -> None:
    users.write_text(f"# the admins\nalice@example.test:{HASH}\n\n# end\n", encoding="utf-8")
    add(users, "bob@example.test")
    lines = users.read_text(encoding="utf-8").splitlines()
    assert lines[:4] == ["# the admins", f"alice@example.test:{HASH}", "", "# end"]
    assert lines[4].startswith("bob@example.test:$argon2id$")


def test_remove(users: Path) -> None:
    add(users, "alice@example.test")
    add(users, "bob@example.test")
    assert remove_account(users, "ALICE@EXAMPLE.TEST") is True
    assert remove_account(users, "alice@example.test") is False
    assert Accounts.load(users).addresses() == ["bob@example.test"]


def test_remove_from_a_missing_file_creates_nothing(users: Path) -> None:
    assert remove_account(users, "alice@example.test") is False
    assert not users.exists()


def test_file_mode_is_0600_even_if_it_was_wider(users: Path) -> None:
    add(users, "alice@example.test")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    users.chmod(0o644)
    add(users, "bob@example.test")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    users.chmod(0o644)
    remove_account(users, "bob@example.test")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def test_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "var" / "deep" / "users"
    add(path, "alice@example.test")
    assert Accounts.load(path).exists("alice@example.test")


def test_atomic_write_leaves_no_temporary_file(users: Path) -> None:
    add(users, "alice@example.test")
    add(users, "alice@example.test", "again")
    add(users, "bob@example.test")
    remove_account(users, "bob@example.test")
    assert sorted(os.listdir(users.parent)) == ["users"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(users: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    add(users, "alice@example.test")
    before = users.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        add(users, "bob@example.test")
    assert users.read_bytes() == before
    assert sorted(os.listdir(users.parent)) == ["users"]


def test_a_malformed_file_is_not_rewritten(users: Path) -> None:
    users.write_text("garbage\n", encoding="utf-8")
    with pytest.raises(AccountsError):
        add(users, "alice@example.test")
    with pytest.raises(AccountsError):
        remove_account(users, "alice@example.test")
    assert users.read_text(encoding="utf-8") == "garbage\n"


def test_concurrent_adds_lose_nothing(users: Path) -> None:
    names = [f"user{i}@example.test" for i in range(8)]
    threads = [threading.Thread(target=add, args=(users, n)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Accounts.load(users).addresses() == sorted(names)


@pytest.mark.parametrize(
    "address",
    ["alice", "@example.test", "alice@", "al ice@example.test", "a:b@example.test",
     "alice@exa mple.test", "#alice@example.test", "alice@-bad.test", "alice@bad-.test",
     "alice@example..test", ".alice@example.test", "al..ice@example.test",
     '"quoted"@example.test', "alice@[192.0.2.1]", "a" * 65 + "@example.test"],
)
def test_add_rejects_what_is_not_an_address(users: Path, address: str) -> None:
    with pytest.raises(ValueError):
        add(users, address)
    assert not users.exists()


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("alice@example.test", "alice@example.test"),
        ("  Alice@EXAMPLE.test ", "Alice@example.test"),
        ("first.last+tag@mail.example.test", "first.last+tag@mail.example.test"),
        ("josé@exämple.test", "josé@exämple.test"),  # RFC 6531
        ("root@localhost", "root@localhost"),
    ],
)
def test_normalize_address(given: str, stored: str) -> None:
    assert normalize_address(given) == stored


def test_empty_password_is_refused(users: Path) -> None:
    with pytest.raises(ValueError):
        add(users, "alice@example.test", "")


def test_default_hasher_is_standard_argon2id(users: Path) -> None:
    add_account(users, "alice@example.test", "pw")  # one real-cost hash (~0.1 s)
    digest = Accounts.load(users).password_hash("alice@example.test")
    assert digest is not None
    assert digest.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PasswordHasher().verify(digest, "pw")
