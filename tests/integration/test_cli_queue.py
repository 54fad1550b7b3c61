"""`gannet queue …` and `gannet trace` against a real running Gannet.

One server for the module: local mail (alice@example.test) goes to Maildirs,
everything else to a smarthost on 127.0.0.3 where nothing listens, so that
remote mail stays deferred (retry every hour) until a test starts smtp-sink
there. Each test sends its own messages and looks only at their IDs.
"""

from __future__ import annotations

import json
import smtplib
import uuid
from collections.abc import Iterator

import peers
import pytest
from conftest import USERS, gannet_base_config

CONTRACT_MESSAGE_KEYS = {"id", "sender", "size", "received_at", "recipients"}
CONTRACT_RECIPIENT_KEYS = {"address", "state", "attempts", "next_attempt", "last_error"}
STATES = {"queued", "deferred", "held", "delivering", "delivered", "failed"}


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, tls_certs: peers.TlsCerts) -> Iterator[peers.GannetProcess]:
    workdir = tmp_path_factory.mktemp("gannet-cli")
    config = gannet_base_config(workdir, tls_certs)
    sink = f"{peers.SINK_HOST}:{peers.free_port(peers.SINK_HOST)}"
    config["relay"]["smarthost"] = sink
    config["delivery"] = {"retry": ["1h"], "give_up_after": "5d", "warn_after": "5d"}
    proc = peers.GannetProcess(workdir, peers.to_toml(config), start=False)
    proc.sink_address = sink  # type: ignore[attr-defined]
    for address, password in USERS.items():
        proc.cli("users", "add", address, "--password-stdin", input=password + "\n")
    proc.start()
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


def send(
    server: peers.GannetProcess, to: list[str], *, sender: str = "x@elsewhere.test", subject: str = ""
) -> tuple[str, str]:
    """Send one message; returns (queue ID, Message-ID)."""
    message_id = f"<{uuid.uuid4().hex}@test>"
    host, port = server.address("mx")
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail(sender)[0] == 250
        for address in to:
            assert s.rcpt(address)[0] == 250
        code, reply = s.data(f"Subject: {subject or message_id}\r\nMessage-ID: {message_id}\r\n\r\nhi\r\n")
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1], message_id


def queue_json(server: peers.GannetProcess, *args: str) -> list[dict[str, object]]:
    return json.loads(server.cli("queue", "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def entry(server: peers.GannetProcess, queue_id: str) -> dict[str, object] | None:
    return next((m for m in queue_json(server) if m["id"] == queue_id), None)


def wait_state(server: peers.GannetProcess, queue_id: str, state: str) -> dict[str, object]:
    def check() -> dict[str, object] | None:
        m = entry(server, queue_id)
        rcpts = m["recipients"] if m else []
        return m if rcpts and all(r["state"] == state for r in rcpts) else None  # type: ignore[union-attr, index]

    return peers.wait_for(check, 20, f"{queue_id} {state}")  # type: ignore[no-any-return]


def test_list_json_keeps_the_contract_shape(mta: peers.GannetProcess) -> None:
    qid, _ = send(mta, ["bob@remote.test", "carol@remote.test"], sender="shape@elsewhere.test")
    m = wait_state(mta, qid, "deferred")
    assert set(m) >= CONTRACT_MESSAGE_KEYS
    assert m["sender"] == "shape@elsewhere.test" and isinstance(m["size"], int)
    assert str(m["received_at"]).endswith("Z")
    for r in m["recipients"]:  # type: ignore[attr-defined]
        assert set(r) >= CONTRACT_RECIPIENT_KEYS and r["state"] in STATES
        assert r["attempts"] >= 1 and r["next_attempt"].endswith("Z") and r["last_error"]


def test_list_filters(mta: peers.GannetProcess) -> None:
    a, _ = send(mta, ["one@filter-a.test"], sender="first@filters.test")
    b, _ = send(mta, ["two@filter-b.test"], sender="second@filters.test")
    wait_state(mta, a, "deferred")
    wait_state(mta, b, "deferred")

    def ids(*args: str) -> set[str]:
        return {str(m["id"]) for m in queue_json(mta, *args)} & {a, b}

    assert ids("--sender", "first@filters.test") == {a}
    assert ids("--sender", "<SECOND@filters.test>") == {b}
    assert ids("--recipient", "two@filter-b.test") == {b}
    assert ids("--domain", "filter-a.test") == {a}
    assert ids("--state", "deferred") == {a, b}
    assert ids("--state", "queued") == set()
    assert ids("--newer-than", "1h") == {a, b}
    assert ids("--older-than", "1h") == set()
    assert len(queue_json(mta, "--limit", "1")) == 1


def test_list_for_people_is_a_table_of_plain_lines_when_piped(mta: peers.GannetProcess) -> None:
    qid, _ = send(mta, ["dave@remote.test"], sender="table@elsewhere.test")
    wait_state(mta, qid, "deferred")
    out = mta.cli("queue", "list", "--sender", "table@elsewhere.test").stdout
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "AGE",
        "SIZE",
        "SENDER",
        "RECIPIENT",
        "STATE",
        "TRIES",
        "NEXT",
        "LAST",
        "ERROR",
    ]
    row = next(line for line in lines if line.startswith(qid))
    assert "<table@elsewhere.test>" in row and "<dave@remote.test>" in row and " deferred " in row
    assert "in 59m" in row or "in 1h" in row  # next attempt, an hour after the first
    assert all(line == line.rstrip() for line in lines), "no trailing blanks"
    assert "\x1b[" not in out, "no colour codes in a pipe"
    assert lines[-1].startswith("-- 1 message(s), 1 recipient(s): 1 deferred")


def test_an_empty_selection_says_so(mta: peers.GannetProcess) -> None:
    assert mta.cli("queue", "list", "--sender", "nobody@nowhere.test").stdout.strip() == (
        "no message matches those filters"
    )


def test_a_bad_age_is_a_usage_error_that_shows_the_form(mta: peers.GannetProcess) -> None:
    r = mta.cli("queue", "list", "--older-than", "yesterday", check=False)
    assert r.returncode == 2
    assert "--older-than takes an age" in r.stderr and "5m" in r.stderr


def test_show_displays_envelope_recipients_history_and_headers(mta: peers.GannetProcess) -> None:
    qid, message_id = send(mta, ["erin@remote.test"], sender="show@elsewhere.test", subject="shown")
    wait_state(mta, qid, "deferred")
    out = mta.cli("queue", "show", qid).stdout
    assert f"id:          {qid}" in out
    assert "sender:      <show@elsewhere.test>" in out
    assert f"message-id:  {message_id}" in out
    assert "<erin@remote.test>" in out and "deferred" in out
    assert "Subject: shown" in out
    data = json.loads(mta.cli("queue", "show", qid, "--json").stdout)
    assert data["id"] == qid and data["message_id"] == message_id
    assert [h["event"] for h in data["history"]][:2] == ["queued", "deferred"]
    assert "Subject: shown" in data["headers"]


def test_an_unknown_id_says_where_to_look(mta: peers.GannetProcess) -> None:
    for args in (
        ("queue", "show", "NOSUCHMESSAGE0"),
        ("queue", "hold", "NOSUCHMESSAGE0"),
        ("queue", "delete", "NOSUCHMESSAGE0"),
        ("queue", "retry", "NOSUCHMESSAGE0"),
    ):
        r = mta.cli(*args, check=False)
        assert r.returncode == 1, args
        assert "no message NOSUCHMESSAGE0 in the queue" in r.stderr
        assert "`gannet queue list`" in r.stderr and "`gannet trace NOSUCHMESSAGE0`" in r.stderr


def test_a_delivered_message_is_gone_from_the_queue_but_traced(mta: peers.GannetProcess) -> None:
    qid, message_id = send(mta, ["alice@example.test"], subject="traced-local")
    peers.wait_for(lambda: entry(mta, qid) is None, 20, "local delivery")
    r = mta.cli("queue", "show", qid, check=False)
    assert r.returncode == 1
    assert f"{qid} is no longer in the queue (completed at" in r.stderr and f"gannet trace {qid}" in r.stderr
    events = json.loads(mta.cli("trace", message_id, "--json").stdout)
    assert [e["event"] for e in events] == ["received", "delivered", "completed"]
    assert {e["queue_id"] for e in events} == {qid}
    assert "from=<x@elsewhere.test>" in events[0]["detail"] and "client=" in events[0]["detail"]
    assert events[1]["recipient"] == "alice@example.test" and "new/" in events[1]["detail"]
    human = mta.cli("trace", qid).stdout
    assert "received" in human and "delivered (attempt 1)" in human and "completed" in human


def test_trace_of_a_deferred_message_shows_the_reply(mta: peers.GannetProcess) -> None:
    qid, message_id = send(mta, ["frank@remote.test"])
    wait_state(mta, qid, "deferred")
    events = json.loads(mta.cli("trace", message_id.strip("<>"), "--json").stdout)
    assert [e["event"] for e in events] == ["received", "deferred"]
    assert events[1]["recipient"] == "frank@remote.test"
    assert events[1]["detail"].startswith("4.")  # the smarthost cannot be reached


def test_trace_of_an_unknown_key(mta: peers.GannetProcess) -> None:
    r = mta.cli("trace", "<never-sent@test>", check=False)
    assert r.returncode == 1
    assert "nothing known about <never-sent@test>" in r.stderr and "keep_history" in r.stderr


def test_hold_release_delete_by_id(mta: peers.GannetProcess) -> None:
    qid, _ = send(mta, ["gina@remote.test"])
    wait_state(mta, qid, "deferred")
    assert mta.cli("queue", "hold", qid).stdout.splitlines()[0] == f"{qid}: held"
    wait_state(mta, qid, "held")
    assert {str(m["id"]) for m in queue_json(mta, "--state", "held")} >= {qid}
    assert qid not in {str(m["id"]) for m in queue_json(mta, "--state", "deferred")}
    assert mta.cli("queue", "release", qid).stdout.splitlines()[0] == f"{qid}: released"
    wait_state(mta, qid, "deferred")
    out = json.loads(mta.cli("queue", "delete", qid, "--json").stdout)
    assert out == {"action": "delete", "done": [qid], "missing": []}
    assert entry(mta, qid) is None
    assert [e["event"] for e in json.loads(mta.cli("trace", qid, "--json").stdout)][-1] == "deleted"


def test_actions_take_ids_on_stdin_and_by_filter(mta: peers.GannetProcess) -> None:
    ids = [send(mta, [f"h{i}@bulk.test"], sender="bulk@elsewhere.test")[0] for i in range(3)]
    for qid in ids:
        wait_state(mta, qid, "deferred")
    r = mta.cli("queue", "hold", "-", input="\n".join(ids[:2]) + "\n")
    assert "held 2 message(s)" in r.stdout
    assert {str(m["id"]) for m in queue_json(mta, "--state", "held", "--domain", "bulk.test")} == set(ids[:2])
    r = mta.cli("queue", "delete", "--sender", "bulk@elsewhere.test")
    assert "deleted 3 message(s)" in r.stdout
    assert queue_json(mta, "--domain", "bulk.test") == []


def test_an_action_without_a_selection_is_a_usage_error(mta: peers.GannetProcess) -> None:
    r = mta.cli("queue", "delete", check=False)
    assert r.returncode == 2
    assert "give queue IDs" in r.stderr and "--all" in r.stderr
    r = mta.cli("queue", "hold", "SOMEID00000000", "--all", check=False)
    assert r.returncode == 2 and "not both" in r.stderr


def test_retry_all_flushes_the_queue_to_a_smarthost_that_came_back(
    mta: peers.GannetProcess, smtp_sink: object
) -> None:
    ids = [send(mta, [f"flush{i}@later.test"], sender="flush@elsewhere.test")[0] for i in range(3)]
    for qid in ids:
        wait_state(mta, qid, "deferred")
    sink = smtp_sink(listen=mta.sink_address)  # type: ignore[attr-defined, operator]
    out = mta.cli("queue", "retry", "--all").stdout
    assert "recipient(s) due now" in out and "the delivery worker was told to start now" in out
    peers.wait_for(lambda: all(entry(mta, qid) is None for qid in ids), 20, "the flushed mail delivered")
    assert sink.count() >= 3
    events = json.loads(mta.cli("trace", ids[0], "--json").stdout)
    assert [e["event"] for e in events] == ["received", "deferred", "retry", "delivered", "completed"]
    assert events[3]["detail"].startswith("250")  # the remote reply


def test_no_queue_yet_says_which_file_and_what_to_do(tmp_path: object, tls_certs: peers.TlsCerts) -> None:
    from pathlib import Path

    workdir = Path(str(tmp_path))
    config = gannet_base_config(workdir, tls_certs)
    (workdir / "gannet.toml").write_text(peers.to_toml(config))
    r = peers.gannet_cli(workdir, "queue", "list", check=False)
    assert r.returncode == 74
    assert f"no queue at {workdir / 'var' / 'queue.db'}" in r.stderr and "gannet serve" in r.stderr
    assert not (workdir / "var" / "queue.db").exists(), "a look at the queue creates none"
    r = peers.gannet_cli(workdir, "trace", "X", check=False)
    assert r.returncode == 74 and "no queue at" in r.stderr


def test_a_held_message_is_never_delivered_until_released(gannet: object) -> None:
    """Real local delivery: the mailbox is broken (a file where its directory goes),
    so the message is deferred; it is held, the mailbox mended and the queue
    flushed, and a later message to the same mailbox gets through (the worker
    had its chance) while the held one stays; released, it is delivered."""
    g = gannet(delivery={"retry": ["1h"]})  # type: ignore[operator]
    mailbox = g.maildir("alice@example.test")
    mailbox.parent.mkdir(parents=True, exist_ok=True)
    mailbox.write_text("not a Maildir")
    held, _ = send(g, ["alice@example.test"], subject="held-one")
    wait_state(g, held, "deferred")
    g.cli("queue", "hold", held)
    mailbox.unlink()
    g.cli("queue", "retry", "--all")
    send(g, ["alice@example.test"], subject="probe")

    def subjects() -> set[str]:
        return {peers.read_headers(p)["Subject"] for p in g.delivered("alice@example.test")}

    peers.wait_for(lambda: "probe" in subjects(), 20, "the probe delivered")
    assert "held-one" not in subjects()
    assert wait_state(g, held, "held")["recipients"][0]["attempts"] == 1  # type: ignore[index]
    g.cli("queue", "release", held)
    peers.wait_for(lambda: "held-one" in subjects(), 20, "the released message delivered")
    events = [e["event"] for e in json.loads(g.cli("trace", held, "--json").stdout)]
    assert events == ["received", "deferred", "held", "retry", "released", "delivered", "completed"]
