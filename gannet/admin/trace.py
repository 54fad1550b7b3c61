"""`gannet trace ID|MESSAGE-ID`: the timeline of one message, from the queue's history.

Shows what QueueStore.trace returns (store.py "History and trace"): received
(from whom, client, size), checks, each attempt per recipient with the remote
reply, delivered / bounced / expired, the DSN sent, completion. Works while
the message is queued and for `[queue] keep_history` after it left. Human
table (tables.trace_table) or `--json` (an array of events). Read-only.

Exit codes: 0 found; 1 nothing known by that key; 74 the queue cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import sys

from gannet.admin import tables
from gannet.admin.queue_cli import EXIT_IOERR, EXIT_NO, EXIT_OK, QueueUnavailable, run_with_queue
from gannet.config import Config
from gannet.queue.store import QueueStore


def main(args: argparse.Namespace, config: Config) -> int:
    async def work(store: QueueStore) -> int:
        events = await store.trace(args.key)
        if not events:
            keep = tables.span(config.queue.keep_history)
            print(
                f"gannet: nothing known about {args.key}: not in the queue, and no message with that queue "
                f"ID or Message-ID left it in the last {keep} ([queue] keep_history). "
                "`gannet queue list` shows what is queued; the mail log (grep the ID) goes further back.",
                file=sys.stderr,
            )
            return EXIT_NO
        if args.json:
            print(json.dumps(tables.trace_json(events), indent=1))
            return EXIT_OK
        out = tables.Output()
        out.table(tables.trace_table(events))
        ids = list(dict.fromkeys(e.queue_id for e in events))
        reports = [e.detail.split()[3] for e in events if e.event == "dsn" and len(e.detail.split()) > 3]
        tail = f"-- {len(ids)} message(s): {', '.join(ids)}"
        if reports:
            tail += f"; reports: {', '.join(reports)} (`gannet trace` them too)"
        out.line(tail)
        return EXIT_OK

    try:
        return run_with_queue(config, work)
    except QueueUnavailable as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_IOERR
