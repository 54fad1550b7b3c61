"""Load from Postfix's smtp-source: 10,000 messages over 20 sessions, each delivered exactly once.

smtp-source (4 KiB bodies, one recipient, one message per connection, as it
does by default) must get a 2xx reply to every command; it stops at the first
other reply, so exit status 0 means 10,000 "250 queued as". Then every
message must show up once in alice's Maildir: 10,000 files, 10,000 distinct
Message-IDs. smtp-source writes ``Message-Id: <PID.FD.COUNT@HELO>``; COUNT is
the run's remaining-message counter read at DATA time, so the (FD, COUNT)
pair is unique within a run but COUNT alone is not: the test counts distinct
whole Message-IDs, all of this run's PID. At the end the queue is empty
(``gannet queue list --json`` prints ``[]``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable

import peers
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MESSAGES = 10_000
SESSIONS = 20
HELO = "source.client.test"
SOURCE_ID = re.compile(rf"<([0-9a-f]+)\.[0-9a-f]+\.[0-9a-f]+@{re.escape(HELO)}>")  # <PID.FD.COUNT@HELO>


def queued(g: peers.GannetProcess) -> list[dict[str, object]] | None:
    """The queue as `gannet queue list --json` shows it, or None if that command fails."""
    r = g.cli("queue", "list", "--json", check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout or "[]")


def test_smtp_source_10000_messages_20_sessions(gannet: Callable[..., peers.GannetProcess]) -> None:
    peers.need("smtp-source")
    g = gannet()
    result = peers.smtp_source(g.target(), messages=MESSAGES, sessions=SESSIONS, size=4096,
                               sender="load@client.test", recipient="alice@example.test", helo=HELO,
                               timeout=200)
    rate = MESSAGES / result.elapsed
    print(f"smtp-source: {MESSAGES} messages in {result.elapsed:.1f}s ({rate:.0f}/s)")

    peers.wait_progress(lambda: len(g.delivered("alice@example.test")), MESSAGES, stall=30,
                        what="delivery into alice's Maildir")
    queue = queued(g)
    if queue:  # a delivery is recorded in the queue just after its file appears
        peers.wait_for(lambda: queued(g) == [], 30, "an empty queue")
        queue = queued(g)
    files = g.delivered("alice@example.test")
    ids = peers.message_ids(files)
    assert len(files) == MESSAGES, f"{len(files)} files for {MESSAGES} messages"
    duplicates = {k: n for k, n in Counter(ids).items() if n > 1}
    assert not duplicates, f"{len(duplicates)} delivered more than once, e.g. {list(duplicates)[:3]}"
    ours = [m.group(1) for i in ids if (m := SOURCE_ID.fullmatch(i))]
    assert len(ours) == MESSAGES and len(set(ours)) == 1, "some files are not this smtp-source run's"
    if queue is None:
        pytest.skip("all delivered once; `gannet queue list --json` failed, so the queue was not checked")
    assert queue == []
