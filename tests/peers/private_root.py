"""A directory a daemon's unprivileged users can reach, for the private Postfix, Dovecot and PostgreSQL.

The suite runs as root on the CI machine (Postfix and Dovecot need root to start
their masters). Both drop to their own users for most work, and those users cannot
traverse pytest's ``/tmp/pytest-of-root`` (mode 0700). So each private Postfix and
Dovecot lives in a directory that its users can reach: ``workdir/NAME`` when every
ancestor of workdir is world-searchable, else a fresh ``/tmp/gannet-NAME-XXXX``
(mode 0755) with a symlink ``workdir/NAME`` pointing at it; the fresh directory is
removed on ``close()`` after its log is copied to ``workdir`` (``postfix.log``,
``dovecot.log``). It must never remove anything but the temporary directory it made
and its own symlink.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _world_searchable(path: Path) -> bool:
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


class _PrivateRoot:
    """A directory for a daemon whose unprivileged users must reach it (see this module's docstring)."""

    def __init__(self, workdir: Path, name: str, *, force_tmp: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.temporary = force_tmp or not _world_searchable(self.workdir)
        if self.temporary:
            self.path = Path(tempfile.mkdtemp(prefix=f"gannet-{name}-", dir="/tmp"))
            self.path.chmod(0o755)
            link = self.workdir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.path)
        else:
            self.path = self.workdir / name
            self.path.mkdir(exist_ok=True)

    def remove(self, keep: Sequence[str] = ()) -> None:
        """Copy the ``keep`` files into ``workdir`` and delete a temporary root."""
        if not self.temporary or not self.path.exists():
            return
        for item in keep:
            src = self.path / item
            if src.exists():
                shutil.copyfile(src, self.workdir / item)
        shutil.rmtree(self.path, ignore_errors=True)
        link = self.workdir / self.name
        if link.is_symlink():
            link.unlink()
