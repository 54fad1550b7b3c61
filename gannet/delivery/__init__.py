"""Delivery: moving queued recipients to where they are going.

So far: local delivery into Maildirs (`local.LocalDelivery`, its pure
decisions in `local_decisions`, the file format in `maildir`) and the retry
arithmetic every delivery agent shares (`retry`). Importing the package has
no side effects.
"""

from gannet.delivery.local import BounceFactory, DeliveryStats, LocalDelivery
from gannet.delivery.local_decisions import decide_outcome, idle_delay
from gannet.delivery.maildir import deliver_to_maildir, maildir_path
from gannet.delivery.retry import is_expired, next_retry, retry_at

__all__ = [
    "BounceFactory",
    "DeliveryStats",
    "LocalDelivery",
    "decide_outcome",
    "deliver_to_maildir",
    "idle_delay",
    "is_expired",
    "maildir_path",
    "next_retry",
    "retry_at",
]
