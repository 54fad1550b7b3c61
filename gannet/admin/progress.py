"""Progress for long operator commands: a live line on stderr while work goes on.

Shown only when stderr is a terminal (a person is watching) and the work is
long enough to be worth it (more than SHOW_AFTER items, or more than one page
of an unknown total); removed when done, so the command's real output, on
stdout, stays clean for pipes. Never raises into the command: a progress
display that fails is dropped.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

SHOW_AFTER = 100


class Progress:
    """`with Progress("deleting", total) as p: … p.advance(n)`; total None = unknown."""

    def __init__(
        self, what: str, total: int | None, *, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._live: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self._enabled and self.total is not None and self.total > SHOW_AFTER:
            self._start_live()
        return self

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        try:
            console = Console(file=self._stream, markup=False, highlight=False, emoji=False)
            columns = [SpinnerColumn(), TextColumn(self.what)]
            if self.total is not None:
                columns += [BarColumn(), MofNCompleteColumn()]
            else:
                columns += [TextColumn("{task.completed} so far")]
            self._live = RichProgress(*columns, TimeElapsedColumn(), console=console, transient=True)
            self._live.start()
            self._task = self._live.add_task(self.what, total=self.total, completed=self.done)
        except Exception:
            self._live = None

    def advance(self, n: int) -> None:
        self.done += n
        if self._live is None and self._enabled and self.total is None and self.done > SHOW_AFTER:
            self._start_live()  # an unknown total: show once it turns out to be long
        if self._live is not None:
            try:
                self._live.update(self._task, completed=self.done)
            except Exception:
                self._live = None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            try:
                self._live.stop()
            except Exception:
                pass
            self._live = None
