"""The queue tools' pure parts: tables (plain and rich), JSON shapes, filters from
options, ages, and the progress display. No store, no server (those are in
tests/integration/test_cli_queue.py)."""

from __future__ import annotations

import argparse
import io

import pytest

from gannet.admin import tables
from gannet.admin.progress import Progress
from gannet.admin.queue_cli import UsageError, parse_age, queue_filter
from gannet.queue.model import QueuedMessageView, RecipientState, RecipientView, TraceEvent

NOW = 1_800_000_000.0


def view(held: bool = False) -> QueuedMessageView:
    return QueuedMessageView(
        "06H0A0D5298195", "a@x.test", 412, NOW - 7200, held,
        (RecipientView(1, "b@y.test", RecipientState.DEFERRED, 2, NOW + 300, "451 4.3.0 try later"),
         RecipientView(2, "c@y.test", RecipientState.DELIVERED, 1, None, "")),
    )  # fmt: skip


def test_message_json_is_the_contract_shape() -> None:
    assert tables.message_json(view()) == {
        "id": "06H0A0D5298195", "sender": "a@x.test", "size": 412, "received_at": "2027-01-15T06:00:00Z",
        "recipients": [
            {"address": "b@y.test", "state": "deferred", "attempts": 2,
             "next_attempt": "2027-01-15T08:05:00Z", "last_error": "451 4.3.0 try later"},
            {"address": "c@y.test", "state": "delivered", "attempts": 1, "next_attempt": None,
             "last_error": None},
        ],
    }  # fmt: skip


def test_a_held_message_shows_its_unfinished_recipients_as_held() -> None:
    states = [r["state"] for r in tables.message_json(view(held=True))["recipients"]]
    assert states == ["held", "delivered"]


def test_plain_table_is_aligned_without_trailing_blanks() -> None:
    out = io.StringIO()
    tables.Output(out, terminal=False).table(tables.queue_table([view()], NOW))
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "ID",
        "AGE",
        "SIZE",
        "SENDER",
        "RECIPIENT",
        "STATE",
        "TRIES",
        "NEXT",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split()[:8] == [
        "06H0A0D5298195",
        "2h",
        "412",
        "<a@x.test>",
        "<b@y.test>",
        "deferred",
        "2",
        "in",
    ]
    assert lines[2].split() == ["<c@y.test>", "delivered", "1"]
    assert lines[1].index("<b@y.test>") == lines[2].index("<c@y.test>") == lines[0].index("RECIPIENT")
    assert all(line == line.rstrip() for line in lines)


def test_rich_table_on_a_terminal_has_colour_and_keeps_brackets_literal() -> None:
    out = io.StringIO()
    v = QueuedMessageView(
        "ID1",
        "[bold]x@y.test",
        1,
        NOW,
        False,
        (RecipientView(1, "b@y.test", RecipientState.DEFERRED, 0, NOW, "[red]no"),),
    )
    tables.Output(out, terminal=True, width=200).table(tables.queue_table([v], NOW))
    text = out.getvalue()
    assert "\x1b[" in text  # colour
    assert "[bold]x@y.test" in text and "[red]no" in text  # data is never markup


def test_summary_counts_states() -> None:
    assert tables.queue_summary([view(), view(held=True)]) == (
        "2 message(s), 4 recipient(s): 1 deferred, 2 delivered, 1 held"
    )


def test_trace_table_numbers_attempts_and_names_expiry() -> None:
    events = [
        TraceEvent(NOW, "Q1", "", "received", "from=<a@x.test> size=1 client=c"),
        TraceEvent(NOW + 60, "Q1", "b@y.test", "deferred", "451 busy"),
        TraceEvent(NOW + 360, "Q1", "b@y.test", "deferred", "451 busy"),
        TraceEvent(NOW + 5 * 86400, "Q1", "b@y.test", "failed", "4.4.7 message expired after 5 days"),
        TraceEvent(NOW + 5 * 86400, "Q1", "", "dsn", "report queued as Q2 to <a@x.test>"),
    ]
    lines = tables.plain_lines(tables.trace_table(events))
    assert "deferred (attempt 1)" in lines[2] and "+1m" in lines[2]
    assert "deferred (attempt 2)" in lines[3]
    assert "expired" in lines[4] and "+5d" in lines[4]
    assert lines[5].split()[3:5] == ["dsn", "report"]
    both = [*events, TraceEvent(NOW + 1, "Q2", "", "received", "x")]
    assert (
        tables.plain_lines(tables.trace_table(both))[0].split()[0] == "ID"
    )  # several messages: an ID column


def test_trace_json() -> None:
    (e,) = tables.trace_json([TraceEvent(NOW, "Q1", "", "received", "d")])
    assert e == {
        "at": "2027-01-15T08:00:00Z",
        "queue_id": "Q1",
        "recipient": None,
        "event": "received",
        "detail": "d",
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("4h", 14400), ("2d", 172800), ("1w", 604800), ("1.5h", 5400)],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text, "--older-than") == seconds


@pytest.mark.parametrize("text", ["", "5", "yesterday", "5 minutes", "-1h"])
def test_a_bad_age_says_the_form(text: str) -> None:
    with pytest.raises(UsageError, match="30s, 5m, 4h, 5d"):
        parse_age(text, "--older-than")


def args(**kw: object) -> argparse.Namespace:
    base = {
        "sender": None,
        "recipient": None,
        "domain": None,
        "state": None,
        "older_than": None,
        "newer_than": None,
    }
    return argparse.Namespace(**{**base, **kw})


def test_filters_from_options() -> None:
    assert queue_filter(args(), NOW) is None
    f = queue_filter(args(sender="<>", older_than="1h", state="deferred"), NOW)
    assert f is not None and (f.sender, f.older_than, f.state, f.held) == (
        "",
        NOW - 3600,
        RecipientState.DEFERRED,
        False,
    )
    f = queue_filter(args(state="held", recipient="<B@y.test>"), NOW)
    assert f is not None and (f.held, f.state, f.recipient) == (True, None, "B@y.test")
    f = queue_filter(args(state="quarantined"), NOW)
    assert f is not None and (f.quarantined, f.held) == (True, None)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_for_long_work_only() -> None:
    screen = Terminal()
    with Progress("delete: messages", 500, stream=screen) as p:
        for _ in range(5):
            p.advance(100)
    assert "delete: messages" in screen.getvalue() and "500/500" in screen.getvalue()
    short = Terminal()
    with Progress("delete: messages", 3, stream=short) as p:
        p.advance(3)
    assert short.getvalue() == ""
    piped = io.StringIO()
    with Progress("delete: messages", 500, stream=piped) as p:
        p.advance(500)
    assert piped.getvalue() == ""


def test_progress_of_an_unknown_total_appears_once_it_is_long() -> None:
    screen = Terminal()
    with Progress("reading the queue", None, stream=screen) as p:
        p.advance(50)
        assert screen.getvalue() == ""
        p.advance(500)
    assert "reading the queue" in screen.getvalue()
