"""The transcript format: SMTP dialogues as text, shared by the in-memory core
tests (tests/unit/smtp/transcript.py) and the TCP tests against a real
`gannet serve` (tests/integration/test_transcripts.py).

Format (one step per line; blank lines and lines starting with "#" are ignored):

    @ key = value        an option for the runner (a Python literal)
    C: text              the client sends text + CRLF ("C:" alone: an empty line)
    C! b'raw bytes'      the client sends raw bytes (ast.literal_eval; no CRLF added)
    S: text              the server's next reply line is exactly text (CRLF not shown)
    S~ regex             the server's next reply line matches regex (re.fullmatch)
    !starttls            the client does the TLS handshake
    !eof                 the client closes its side
    !closed              the server has closed the connection (221/421)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # "option", "send", "expect", "expect_re", "starttls", "eof", "closed"
    value: Any = None
    line: int = 0


def parse_transcript(text: str) -> list[Step]:
    steps: list[Step] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("@"):
            key, _, value = line[1:].partition("=")
            steps.append(Step("option", (key.strip(), ast.literal_eval(value.strip())), n))
        elif line.startswith("C: ") or line == "C:":
            steps.append(Step("send", line[3:].encode("utf-8") + b"\r\n", n))
        elif line.startswith("C! "):
            data = ast.literal_eval(line[3:].strip())
            if not isinstance(data, bytes):
                raise ValueError(f"line {n}: C! needs a bytes literal")
            steps.append(Step("send", data, n))
        elif line.startswith("S: "):
            steps.append(Step("expect", line[3:], n))
        elif line.startswith("S~ "):
            steps.append(Step("expect_re", re.compile(line[3:]), n))
        elif line.strip() in ("!starttls", "!eof", "!closed"):
            steps.append(Step(line.strip()[1:], None, n))
        else:
            raise ValueError(f"line {n}: cannot parse {line!r}")
    return steps


def load_transcript(path: str | Path) -> list[Step]:
    return parse_transcript(Path(path).read_text(encoding="utf-8"))
