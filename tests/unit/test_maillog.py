"""The mail log's line shapes (gannet/maillog.py), as a postmaster greps them."""

from __future__ import annotations

import io
from collections.abc import Callable

from gannet import maillog


def lines(emit: Callable[[], None]) -> list[str]:
    stream = io.StringIO()
    maillog.configure(fast_stream=stream)
    try:
        emit()
    finally:
        maillog.configure()
    return [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]  # past "TIME gannet[PID]"


def test_removed_reads_as_postfix_writes_it() -> None:
    assert lines(lambda: maillog.removed("06H0ABC")) == ["06H0ABC: removed"]


def test_fields_then_the_tail() -> None:
    got = lines(lambda: maillog.disconnect("S1", "[127.0.0.1]:4000", {"ehlo": 1, "quit": 1}, 0.5))
    assert got == ["disconnect from=[127.0.0.1]:4000, session=S1, commands=ehlo=1 quit=1, duration=0.50"]
