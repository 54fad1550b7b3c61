"""The mail log: one function per mail event, one line each, keyed by queue ID.

A postmaster follows a message with `grep QUEUEID`. Lines look like Postfix's
so that existing habits and tools carry over:

    4Y7K2M9QX3ZB: from=<a@x.test>, size=1234, nrcpt=1, client=host[1.2.3.4], tls=TLSv1.3, auth=alice (queued)
    4Y7K2M9QX3ZB: to=<b@example.test>, relay=maildir, delay=0.03, status=sent (var/mail/example.test/b)

Every value that came from the network is passed through `_clean()` so that a
peer cannot forge log lines (no CR/LF/control characters). This module never
raises: logging must not break mail flow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import TextIO

log = logging.getLogger("gannet.mail")

# How lines leave, chosen once by the CLI at start-up (`configure`):
# - default: the `logging` module, plain records (tests use caplog on this);
# - structured: `logging` with the field dict the JSON formatter needs;
# - a fast text sink: one pre-formatted write per line, no LogRecord. Mail
#   lines are the hot path of logging (three or four per message), and the
#   logging machinery cost ~8% of the accept path's CPU in a profile.
_structured = False
_sink: Callable[[str], None] | None = None


def configure(*, structured: bool = False, fast_stream: TextIO | None = None) -> None:
    global _structured, _sink
    _structured = structured
    _sink = _FastTextSink(fast_stream) if fast_stream is not None and not structured else None


class _FastTextSink:
    """Writes "TIMESTAMP gannet[PID]: line" like the CLI's text formatter, with the
    timestamp prefix rebuilt once a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.pid = os.getpid()
        self.second = -1
        self.prefix = ""

    def __call__(self, line: str) -> None:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f" gannet[{self.pid}]: "
        try:
            self.stream.write(self.prefix + line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # logging must not break mail flow


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: object, limit: int = 300) -> str:
    text = str(value)
    if not text.isprintable():  # C-fast check first: most values need no substitution
        text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _emit(
    queue_id: str, fields: dict[str, object], tail: str = "", *, event: str = "", word: str = ""
) -> None:
    """One line: the queue ID, the fields, a bare `word` (Postfix's "removed"),
    then the `tail` in parentheses."""
    if _sink is None and not log.isEnabledFor(logging.INFO):
        return
    body = ", ".join(f"{k}={_clean(v)}" for k, v in fields.items() if v not in (None, ""))
    if word:
        body = f"{body} {word}" if body else word
    line = f"{queue_id}: {body}" if queue_id else body
    if tail:
        line += f" ({_clean(tail, 500)})"
    if _sink is not None:
        _sink(line)
    elif _structured:
        # `event` names the line's kind for log shippers (connect, reject, queued, sent …).
        extra = {"event": event, "queue_id": queue_id, **fields, "detail": tail}
        log.info(line, extra={"gannet_fields": extra})
    else:
        log.info(line)


def connect(session_id: str, client: str, listener: str) -> None:
    _emit("", {"connect from": client, "listener": listener, "session": session_id}, event="connect")


def disconnect(session_id: str, client: str, counts: dict[str, int], seconds: float) -> None:
    summary = " ".join(f"{k}={v}" for k, v in counts.items())
    _emit(
        "",
        {"disconnect from": client, "session": session_id, "commands": summary, "duration": f"{seconds:.2f}"},
        event="disconnect",
    )


def rejected(
    session_id: str,
    client: str,
    stage: str,
    reply: object,
    reason: str = "",
    sender: str | None = None,
    recipient: str | None = None,
) -> None:
    fields: dict[str, object] = {"reject": stage, "client": client, "session": session_id}
    if sender is not None:
        fields["from"] = f"<{sender}>"
    if recipient is not None:
        fields["to"] = f"<{recipient}>"
    fields["reply"] = reply
    _emit("", fields, reason, event="reject")


def auth_failed(session_id: str, client: str, username: str, mechanism: str) -> None:
    _emit(
        "",
        {"auth failed": username, "mechanism": mechanism, "client": client, "session": session_id},
        event="auth_failed",
    )


def queued(
    queue_id: str,
    sender: str,
    size: int,
    recipients: Iterable[str],
    client: str,
    tls: str = "",
    auth: str = "",
    message_id: str = "",
) -> None:
    rcpts = list(recipients)
    _emit(
        queue_id,
        {
            "from": f"<{sender}>",
            "size": size,
            "nrcpt": len(rcpts),
            "to": ",".join(f"<{r}>" for r in rcpts),
            "client": client,
            "tls": tls,
            "auth": auth,
            "message-id": message_id,
        },
        "queued",
        event="queued",
    )


def delivered(
    queue_id: str, recipient: str, relay: str, delay: float, detail: str, dsn: str = "2.0.0", tls: str = ""
) -> None:
    _emit(
        queue_id,
        {
            "to": f"<{recipient}>",
            "relay": relay,
            "delay": f"{delay:.2f}",
            "tls": tls,
            "dsn": dsn,
            "status": "sent",
        },
        detail,
        event="sent",
    )


def deferred(
    queue_id: str,
    recipient: str,
    relay: str,
    delay: float,
    reason: str,
    dsn: str = "4.0.0",
    retry_in: float | None = None,
    tls: str = "",
) -> None:
    fields: dict[str, object] = {
        "to": f"<{recipient}>",
        "relay": relay,
        "delay": f"{delay:.2f}",
        "tls": tls,
        "dsn": dsn,
        "status": "deferred",
    }
    if retry_in is not None:
        fields["retry_in"] = f"{retry_in:.0f}s"
    _emit(queue_id, fields, reason, event="deferred")


def bounced(
    queue_id: str, recipient: str, relay: str, delay: float, reason: str, dsn: str = "5.0.0", tls: str = ""
) -> None:
    _emit(
        queue_id,
        {
            "to": f"<{recipient}>",
            "relay": relay,
            "delay": f"{delay:.2f}",
            "tls": tls,
            "dsn": dsn,
            "status": "bounced",
        },
        reason,
        event="bounced",
    )


def removed(queue_id: str) -> None:
    _emit(queue_id, {}, event="removed", word="removed")


class JsonFormatter(logging.Formatter):
    """`--log-format json`: one JSON object per line, the event's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "gannet_fields", None)
        if isinstance(fields, dict):
            obj.update({k: v for k, v in fields.items() if v not in (None, "")})
        obj["msg"] = record.getMessage()
        return json.dumps(obj, default=str)
