"""The users file: submission accounts, which are also the local mailboxes.

This module owns that one file: it parses it into an immutable `Accounts`
snapshot, and `gannet users add|remove` rewrite it through `add_account` and
`remove_account`. It is the only module in `gannet.policy` that does I/O, and
it touches no other file. It never logs, prints or puts in an exception a
password or a hash, and it never verifies passwords (that is
`gannet.server.auth`, off the event loop).

# File format

UTF-8 text, one account per line:

    # comments start with "#"; blank lines are ignored
    alice@example.test:$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>
    Bob.Smith@example.test:$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>

- The address is `local@domain`. The domain is stored lowercased (domains are
  case-insensitive, RFC 5321 §2.4); the local part is kept as written, but
  every lookup is case-insensitive, so `bob.smith@` and `BOB.SMITH@` are the
  same account. The local part may not contain white space, control
  characters, ":" (the separator), or the RFC 5322 specials that would need
  quoting; non-ASCII (RFC 6531) is allowed.
- The hash is an Argon2 PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
  Gannet writes argon2id with argon2-cffi's default parameters; argon2i/d
  hashes imported from elsewhere are accepted and still verify.
- A line that is neither blank, a comment, nor a valid `address:hash` makes
  the whole file invalid (`AccountsError` with the line number): a typo must
  not silently lock a user out or, worse, leave a stale password working.
  The same address twice is an error too.
- A missing file means no accounts.

Writes are atomic and durable (STYLE.md habit 7, chasquid `safeio`): a
temporary file in the same directory, written, fsync'd, renamed over the old
one, then the directory fsync'd. Concurrent writers are serialised with
`flock` on the directory. The file is always left mode 0600: the hashes are
offline-crackable secrets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher

from gannet.util.files import atomic_write

log = logging.getLogger("gannet.policy")

try:  # POSIX only; elsewhere concurrent `gannet users` runs are not serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FILE_MODE = 0o600

_NEW_FILE_HEADER = (
    "# Gannet users file: one `address:argon2-hash` per line.\n"
    "# Managed by `gannet users add|remove|list`; see gannet/policy/accounts.py.\n"
)

# An Argon2 PHC string as argon2-cffi writes and verifies it. The version
# field is optional (pre-1.3 hashes omit it); salt and hash are unpadded B64.
_HASH_RE = re.compile(
    r"\$argon2(?:id|i|d)\$(?:v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}"
)
# Local part: dot-atom text (RFC 5322 §3.2.3, widened to UTF-8 by RFC 6531),
# without the characters that would need quoting or that break this format.
_LOCAL_RE = re.compile(r'[^\s\x00-\x1f\x7f:@"\\<>()\[\],;]+')
_LABEL = r"[^\W_](?:(?:[^\W_]|-)*[^\W_])?"  # letters/digits (any script), inner "-"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_LOCAL = 64  # RFC 5321 §4.5.3.1.1, in octets
_MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2


class AccountsError(Exception):
    """The users file is unreadable or malformed. `line_no` is 0 for whole-file problems."""

    def __init__(self, path: Path | str, line_no: int, reason: str) -> None:
        self.path = Path(path)
        self.line_no = line_no
        self.reason = reason
        where = f"{path}:{line_no}" if line_no else str(path)
        super().__init__(f"{where}: {reason}")


def normalize_address(address: str) -> str:
    """Validate `local@domain` and return it with the domain lowercased.

    Raises ValueError (with a reason fit for the operator) when it is not an
    address this file can hold.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an address of the form local@domain")
    if not _LOCAL_RE.fullmatch(local) or local.startswith(("#", ".")) or local.endswith(".") \
            or ".." in local:
        raise ValueError(f"{address!r}: the local part {local!r} is not allowed here")
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise ValueError(f"{address!r}: the local part is longer than {_MAX_LOCAL} octets")
    domain = domain.lower()
    if not _DOMAIN_RE.fullmatch(domain) or len(domain.encode("utf-8")) > _MAX_DOMAIN:
        raise ValueError(f"{address!r}: {domain!r} is not a domain name")
    return f"{local}@{domain}"


def _key(address: str) -> str:
    """The lookup key: the whole address, lowercased (see the module docstring)."""
    return address.strip().lower()


class Accounts:
    """An immutable snapshot of the users file. Reload by calling `load` again."""

    __slots__ = ("_by_key",)

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        """`entries` are (address, hash) pairs; a later duplicate replaces an earlier one."""
        by_key: dict[str, tuple[str, str]] = {}
        for address, digest in entries:
            local, at, domain = address.strip().rpartition("@")
            by_key[_key(address)] = (f"{local}{at}{domain.lower()}", digest)
        self._by_key = by_key

    @classmethod
    def load(cls, path: Path) -> Accounts:
        """Parse the users file. A missing file is empty; raises AccountsError otherwise."""
        lines = _read_lines(path)
        return cls(ln.entry for ln in lines if ln.entry is not None)

    def exists(self, address: str) -> bool:
        return _key(address) in self._by_key

    def password_hash(self, address: str) -> str | None:
        entry = self._by_key.get(_key(address))
        return entry[1] if entry else None

    def canonical(self, address: str) -> str | None:
        """The account's address as stored (local part as written), or None."""
        entry = self._by_key.get(_key(address))
        return entry[0] if entry else None

    def addresses(self) -> list[str]:
        """All account addresses as stored, sorted case-insensitively."""
        return [self._by_key[k][0] for k in sorted(self._by_key)]

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self.exists(address)

    def __repr__(self) -> str:  # never the hashes
        return f"<Accounts: {len(self._by_key)} account(s)>"


# -- reading -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Line:
    text: str  # the line as read (no line terminator), kept for rewriting
    entry: tuple[str, str] | None  # (address, hash), or None for comments/blank lines


def _read_lines(path: Path) -> list[_Line]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AccountsError(path, 0, f"cannot read the users file: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise AccountsError(path, line_no, "the line is not UTF-8") from None
    text = text.removeprefix("\ufeff")  # tolerate a BOM left by an editor
    lines: list[_Line] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        entry = _parse_line(path, line_no, line)
        if entry is not None:
            first = seen.setdefault(_key(entry[0]), line_no)
            if first != line_no:
                raise AccountsError(path, line_no, f"{entry[0]} is already on line {first}")
        lines.append(_Line(line, entry))
    if lines and lines[-1].text == "":
        lines.pop()  # the empty string after the final "\n"
    return lines


def _parse_line(path: Path, line_no: int, line: str) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    address, sep, digest = stripped.partition(":")
    if not sep:
        raise AccountsError(path, line_no, "expected address:hash")
    try:
        address = normalize_address(address)
    except ValueError as exc:
        raise AccountsError(path, line_no, str(exc)) from None
    digest = digest.strip()
    if not _HASH_RE.fullmatch(digest):
        # Never echo the text: it may be a password someone pasted by mistake.
        raise AccountsError(path, line_no, f"the hash for {address} is not an Argon2 PHC string")
    return address, digest


# -- writing -------------------------------------------------------------------

def add_account(path: Path, address: str, password: str, *,
                hasher: PasswordHasher | None = None) -> None:
    """Add the account, or give an existing one (any case) this new password.

    `hasher` exists for tests (cheap parameters); the default is argon2-cffi's
    standard argon2id. Raises ValueError for a bad address or an empty
    password, AccountsError if the existing file is malformed (it is then left
    untouched), OSError if the file cannot be written.
    """
    normalized = normalize_address(address)
    if not password:
        raise ValueError("the password is empty")
    # Hash before taking the lock: it is the slow part.
    digest = (hasher or PasswordHasher()).hash(password)
    new_line = f"{normalized}:{digest}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_dir(path.parent):
        lines = _read_lines(path)
        texts = [ln.text for ln in lines]
        key = _key(normalized)
        for i, ln in enumerate(lines):
            if ln.entry is not None and _key(ln.entry[0]) == key:
                texts[i] = new_line
                break
        else:
            if not lines:
                texts.append(_NEW_FILE_HEADER.rstrip("\n"))
            texts.append(new_line)
        atomic_write(path, "".join(t + "\n" for t in texts).encode("utf-8"), FILE_MODE)


def remove_account(path: Path, address: str) -> bool:
    """Remove the account (matched case-insensitively). False when it is not there."""
    if not path.exists():
        return False
    key = _key(address)
    with _locked_dir(path.parent):
        lines = _read_lines(path)
        kept = [ln.text for ln in lines if ln.entry is None or _key(ln.entry[0]) != key]
        if len(kept) == len(lines):
            return False
        atomic_write(path, "".join(t + "\n" for t in kept).encode("utf-8"), FILE_MODE)
    return True


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[int]:
    """Hold an exclusive flock on the directory while the file is rewritten.

    Two `gannet users add` at once would otherwise both read the old file and
    the second rename would drop the first one's account.
    """
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
        yield dir_fd
    finally:
        os.close(dir_fd)  # closing releases the flock


@dataclass(slots=True)
class AccountsFile:
    """The users file for a long-running process: `get()` re-reads it when its
    mtime or size changed, and keeps the previous accounts (logging why) when
    the new file is malformed."""

    path: Path
    stamp: tuple[int, int] = (-1, -1)
    accounts: Accounts | None = None

    def get(self) -> Accounts:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self.stamp or self.accounts is None:
            try:
                self.accounts = Accounts.load(self.path)
                self.stamp = stamp
            except AccountsError as exc:
                if self.accounts is None:
                    raise
                log.error("users file not reloaded, keeping the previous one: %s", exc)
        return self.accounts
