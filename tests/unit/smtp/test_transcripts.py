"""Every transcripts/*.txt dialogue, run in memory against ServerConnection."""

from __future__ import annotations

from pathlib import Path

import pytest
from transcript_format import load_transcript, parse_transcript

from .transcript import run_in_memory

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.txt"))


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path: Path) -> None:
    run_in_memory(load_transcript(path))


def test_transcript_format() -> None:
    steps = parse_transcript("@ lmtp = True\nC: NOOP\nC! b'x\\r\\n'\nS: 250 ok\nS~ 2.*\n!eof\n")
    assert [s.kind for s in steps] == ["option", "send", "send", "expect", "expect_re", "eof"]
    assert steps[0].value == ("lmtp", True)
    assert steps[1].value == b"NOOP\r\n"
    assert steps[2].value == b"x\r\n"
    with pytest.raises(ValueError):
        parse_transcript("X: what\n")


def test_transcript_mismatch_is_reported() -> None:
    with pytest.raises(AssertionError, match="line 2"):
        run_in_memory(parse_transcript("S: 220 mx.test ESMTP ready\nS: 250 nothing\n"))
