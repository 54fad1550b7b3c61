"""What `gannet queue` and `gannet trace` print: tables for people, JSON for scripts.

Owns the JSON shapes (`gannet queue list --json` is CONTRACT.md's and must keep
its keys) and the tables. Pure apart from writing to the stream it is given:
views in, text out; never touches the store, never reads the clock (`now` is
an argument).

On a terminal the tables are drawn by rich (colour for states, long cells
folded to the screen's width). Anywhere else (a pipe, a file, a test) the same
columns come out as plain text: space-aligned, no colour, no wrapping, no
trailing blanks, one line per row, so that grep, awk and cut work on it.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gannet.queue.model import QueuedMessageView, RecipientView, TraceEvent

STATE_STYLES = {
    "queued": "cyan",
    "deferred": "yellow",
    "held": "magenta",
    "delivering": "blue",
    "delivered": "green",
    "failed": "red",
    "received": "cyan",
    "completed": "green",
    "deleted": "red",
    "dsn": "magenta",
    "check": "blue",
}


@dataclass(frozen=True, slots=True)
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    style_column: int | None = None  # whose value picks the row's colour (STATE_STYLES)
    title: str = ""


class Output:
    """Where tables and lines go: rich on a terminal, plain text elsewhere."""

    def __init__(
        self, stream: TextIO | None = None, *, terminal: bool | None = None, width: int | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._width = width

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def table(self, table: Table) -> None:
        if self.terminal:
            self._rich(table)
        else:
            for line in plain_lines(table):
                self.stream.write(line + "\n")
        self.stream.flush()

    def _rich(self, table: Table) -> None:
        from rich import box
        from rich.console import Console
        from rich.table import Table as RichTable
        from rich.text import Text

        console = Console(
            file=self.stream,
            width=self._width,
            markup=False,
            highlight=False,
            emoji=False,
            force_terminal=True,
        )
        t = RichTable(box=box.SIMPLE_HEAD, title=table.title or None, header_style="bold", pad_edge=False)
        for header in table.headers:
            t.add_column(header, overflow="fold")
        for row in table.rows:
            key = row[table.style_column].split(" ")[0] if table.style_column is not None else ""
            style = STATE_STYLES.get(key, "")
            cells = [Text(cell) for cell in row]
            if style and table.style_column is not None:
                cells[table.style_column].stylize(style)
            t.add_row(*cells)
        console.print(t)


def plain_lines(table: Table) -> list[str]:
    """The table as aligned text: columns two spaces apart, the last one unpadded."""
    rows = [table.headers, *table.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(table.headers))]
    lines = [table.title] if table.title else []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return lines


# --- times ----------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """CONTRACT.md's timestamps: UTC, seconds, "Z"."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def span(seconds: float) -> str:
    """A short duration for people: 45s, 12m, 3h, 2d (rounded down)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def when(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    return "now" if ts <= now else f"in {span(ts - now)}"


# --- the queue ----------------------------------------------------------------------


def shown_state(view: QueuedMessageView, rcpt: RecipientView) -> str:
    """CONTRACT.md's state: a held message's unfinished recipients show as "held"."""
    return "held" if view.held and not rcpt.state.is_final else rcpt.state.value


def message_json(view: QueuedMessageView, *, detail: bool = False) -> dict[str, Any]:
    """One element of `gannet queue list --json` (CONTRACT.md); `detail` adds what
    `queue show --json` has on top (envelope extras and history)."""
    out: dict[str, Any] = {
        "id": view.queue_id,
        "sender": view.sender,
        "size": view.size,
        "received_at": iso(view.received_at),
        "recipients": [
            {
                "address": r.address,
                "state": shown_state(view, r),
                "attempts": r.attempts,
                "next_attempt": iso(r.next_attempt),
                "last_error": r.last_error or None,
                **({"original": r.original} if r.original else {}),
            }
            for r in view.recipients
        ],
    }
    if view.quarantined:
        out["quarantined"] = True
    if detail:
        out.update(
            {
                "client": view.client,
                "auth_user": view.auth_user or None,
                "message_id": view.message_id or None,
                "envid": view.envid,
                "ret": view.ret,
                "held": view.held,
                "history": [
                    {"at": iso(h.at), "recipient": h.recipient or None, "event": h.event, "detail": h.detail}
                    for h in view.history
                ],
            }
        )
    return out


def queue_table(views: Sequence[QueuedMessageView], now: float) -> Table:
    """One row per recipient; the message's columns only on its first row."""
    rows: list[tuple[str, ...]] = []
    for v in views:
        first = (v.queue_id, span(now - v.received_at), str(v.size), f"<{v.sender}>")
        for i, r in enumerate(v.recipients):
            state = shown_state(v, r)
            if v.quarantined and not r.state.is_final:
                state = "quarantined"
            msg = first if i == 0 else ("", "", "", "")
            nxt = when(r.next_attempt, now) if state in ("queued", "deferred") else ""
            rows.append((*msg, f"<{r.address}>", state, str(r.attempts), nxt, r.last_error))
    headers = ("ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATE", "TRIES", "NEXT", "LAST ERROR")
    return Table(headers, rows, style_column=5)


def queue_summary(views: Sequence[QueuedMessageView]) -> str:
    counts: dict[str, int] = {}
    for v in views:
        for r in v.recipients:
            state = shown_state(v, r)
            counts[state] = counts.get(state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    recipients = sum(counts.values())
    return f"{len(views)} message(s), {recipients} recipient(s): {states}"


def message_lines(view: QueuedMessageView, headers: str, now: float) -> tuple[list[str], Table, Table]:
    """`queue show`: the envelope as "key: value" lines, the recipients, the history."""
    lines = [
        f"id:          {view.queue_id}",
        f"sender:      <{view.sender}>",
        f"size:        {view.size}",
        f"received:    {clock_time(view.received_at)} UTC ({span(now - view.received_at)} ago)",
        f"client:      {view.client}",
    ]
    if view.message_id:
        lines.append(f"message-id:  {view.message_id}")
    if view.auth_user:
        lines.append(f"auth:        {view.auth_user}")
    if view.envid or view.ret:
        lines.append(f"dsn:         envid={view.envid or '-'} ret={view.ret or '-'}")
    if view.held:
        lines.append("held:        yes (`gannet queue release` to deliver it)")
    if view.quarantined:
        lines.append("quarantined: yes (its body could not be read; see the history)")
    rcpts = queue_table([view], now)
    recipients = Table(rcpts.headers[4:], [row[4:] for row in rcpts.rows], style_column=1, title="recipients")
    history = Table(
        ("TIME (UTC)", "RECIPIENT", "EVENT", "DETAIL"),
        [
            (clock_time(h.at), f"<{h.recipient}>" if h.recipient else "", h.event, h.detail)
            for h in view.history
        ],
        style_column=2,
        title="history",
    )
    lines += ["headers:", *(f"  {line}" for line in headers.splitlines())]
    return lines, recipients, history


# --- trace --------------------------------------------------------------------------


def trace_json(events: Sequence[TraceEvent]) -> list[dict[str, Any]]:
    return [
        {
            "at": iso(e.at),
            "queue_id": e.queue_id,
            "recipient": e.recipient or None,
            "event": e.event,
            "detail": e.detail,
        }
        for e in events
    ]


def trace_table(events: Sequence[TraceEvent]) -> Table:
    """The timeline: attempts numbered per recipient, an expiry called so."""
    several = len({e.queue_id for e in events}) > 1
    attempts: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, ...]] = []
    start = events[0].at if events else 0.0
    for e in events:
        label = e.event
        if e.event in ("delivered", "deferred", "failed") and e.recipient:
            n = attempts[(e.queue_id, e.recipient)] = attempts.get((e.queue_id, e.recipient), 0) + 1
            label = f"{e.event} (attempt {n})"
            if e.event == "failed" and e.detail.startswith("4.4.7"):
                label = "expired"
        offset = f"+{span(e.at - start)}" if e.at > start else ""
        who = f"<{e.recipient}>" if e.recipient else ""
        row: tuple[str, ...] = (clock_time(e.at), offset, who, label, e.detail)
        rows.append(((e.queue_id,) if several else ()) + row)
    headers: tuple[str, ...] = ("TIME (UTC)", "", "RECIPIENT", "EVENT", "DETAIL")
    if several:
        headers = ("ID", *headers)
    return Table(headers, rows, style_column=4 if several else 3)
