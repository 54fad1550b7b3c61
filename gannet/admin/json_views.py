"""The admin API's JSON shapes. Queue views and trace events are the CLI's
(gannet/admin/tables.py: `gannet queue list|show --json`, `gannet trace --json`,
CONTRACT.md), so that a script can use either; this module adds the shapes of
statistics, throughput and recent events.

Pure functions from gannet records to JSON-ready dicts; no I/O. Times are
RFC 3339 UTC strings ("2026-11-22T10:00:00Z"), or null.
"""

from __future__ import annotations

from typing import Any

from gannet.admin import tables
from gannet.admin.sampler import CachedStats, Minute
from gannet.admin.tables import iso, trace_json
from gannet.metrics import RecentEvent
from gannet.queue.model import DeferralReason, HistoryEntry, QueuedMessageView

Json = dict[str, Any]


def message(view: QueuedMessageView) -> Json:
    """One element of `gannet queue list --json` (CONTRACT.md), plus `held`."""
    return {**tables.message_json(view), "held": view.held}


def message_detail(view: QueuedMessageView, headers: str) -> Json:
    """`gannet queue show --json`: the list element, envelope details, history, headers."""
    return {**tables.message_json(view, detail=True), "headers": headers}


def history_entry(queue_id: str, h: HistoryEntry) -> Json:
    """A history entry in a trace event's shape (for stores without `trace`)."""
    return {
        "at": iso(h.at),
        "queue_id": queue_id,
        "recipient": h.recipient or None,
        "event": h.event,
        "detail": h.detail,
    }


def queue_stats(cached: CachedStats, now: float) -> Json:
    return {
        "as_of": iso(cached.at),
        "scan_seconds": round(cached.seconds, 4),
        "messages": cached.stats.messages,
        "states": {
            s.state: {
                "recipients": s.recipients,
                "messages": s.messages,
                "oldest_age_seconds": round(max(0.0, now - s.oldest), 1),
            }
            for s in cached.stats.states
        },
    }


def deferral(r: DeferralReason, now: float) -> Json:
    return {
        "domain": r.domain,
        "reason": r.reason,
        "recipients": r.recipients,
        "oldest_age_seconds": round(max(0.0, now - r.oldest), 1),
    }


def recent_event(e: RecentEvent) -> Json:
    return {"at": iso(e.at), "listener": e.listener, "client": e.client, "detail": e.detail}


def minute(start: float, m: Minute | None) -> Json:
    """One point of /api/series; counts are null before the server started."""
    return {
        "at": iso(start),
        "received": int(m.received) if m else None,
        "delivered": int(m.delivered) if m else None,
        "deferred": int(m.deferred) if m else None,
        "bounced": int(m.bounced) if m else None,
        "queue": m.queue if m else None,
    }


__all__ = [
    "deferral",
    "history_entry",
    "iso",
    "message",
    "message_detail",
    "minute",
    "queue_stats",
    "recent_event",
    "trace_json",
]
