"""Logging set-up of a Gannet process: the mail log's fast path and the root
handler on stderr, in text or JSON. Called once at start by `gannet serve`, its
delivery worker and its enqueue writer process, so that every process's lines
look alike on the one stderr they share. Never called by library code.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(fmt: str, level: str) -> None:
    """`fmt`: "text" or "json"; `level`: a logging level name ("info")."""
    from gannet import maillog
    from gannet.maillog import JsonFormatter

    # Not needed in our lines, and each costs time on every record (frame walk).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    maillog.configure(
        structured=fmt == "json",
        fast_stream=sys.stderr if fmt == "text" and level in ("debug", "info") else None,
    )

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s gannet[%(process)d]: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
