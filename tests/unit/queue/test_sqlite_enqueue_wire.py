"""The enqueue writer's frames (sqlite_enqueue_wire): every field of a message
survives the trip, and a stream cut anywhere gives the same frames."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gannet.queue import sqlite_enqueue_wire as wire
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, QueueError, SpooledBody, Transport

text = st.text(max_size=40)
recipients = st.builds(
    NewRecipient,
    address=text,
    transport=st.sampled_from(Transport),
    domain=text,
    mailbox=text,
    original=text,
    orcpt=st.none() | text,
    notify=st.none() | st.integers(0, 15),
)
bodies = st.builds(InlineBody, st.binary(max_size=300)) | st.builds(
    SpooledBody, st.builds(Path, st.just("/spool/x.eml")), st.integers(0, 1 << 40)
)
messages = st.builds(
    NewMessage,
    queue_id=text,
    sender=text,
    recipients=st.lists(recipients, max_size=4).map(tuple),
    body=bodies,
    received_at=st.floats(allow_nan=False),
    envid=st.none() | text,
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    smtputf8=st.booleans(),
    body_8bit=st.booleans(),
    client=text,
    auth_user=text,
    message_id=text,
    held=st.booleans(),
    report_for=text,
    events=st.lists(st.tuples(text, text), max_size=3).map(tuple),
)


@given(st.integers(0, 1 << 40), messages)
def test_a_message_survives_the_trip(number: int, message: NewMessage) -> None:
    (value,) = wire.FrameBuffer().feed(wire.request(number, message))
    assert wire.message_of(value) == (number, message)


@given(st.lists(messages, min_size=1, max_size=4), st.lists(st.integers(0, 5000), max_size=6))
def test_frames_cut_anywhere_come_out_whole_and_in_order(batch: list[NewMessage], cuts: list[int]) -> None:
    stream = b"".join(wire.request(n, m) for n, m in enumerate(batch))
    frames = wire.FrameBuffer()
    got = []
    last = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        got += frames.feed(stream[last:cut])
        last = cut
    assert [wire.message_of(v) for v in got] == list(enumerate(batch))
    assert frames.pending == 0


def test_a_reply_carries_answers_commits_and_counters() -> None:
    reply = wire.Reply([(1, None), (2, wire.error_of(QueueError("disk full")))], [(0.001, True)], (1.0, 2.0))
    (value,) = wire.FrameBuffer().feed(reply.encode())
    back = wire.Reply.of(value)
    assert back == reply
    error = back.answers[1][1]
    assert error is not None
    raised = wire.exception_of(error)
    assert isinstance(raised, QueueError) and str(raised) == "disk full"
    value_error = wire.exception_of(wire.error_of(ValueError("no recipients")))  # type: ignore[arg-type]
    assert type(value_error) is ValueError
