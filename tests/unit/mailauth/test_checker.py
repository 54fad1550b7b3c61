"""ProcessChecks: the end-of-data checks in a child process, against the same checks in the server.

dnsmasq (peers.DnsServer) serves the sender's SPF, DKIM key and DMARC p=reject
records: the child has a resolver of its own, so it must find them as the
server would. Checked: the child's verdicts are the server's, for a message
that passes and one whose body was altered (DMARC rejects); a child killed with
SIGKILL costs no message (its requests are checked in the server) and is
replaced; one that stops answering is killed after ANSWER_TIMEOUT; close() ends
it; a spooled body is checked in the server; an answer that does not decode
kills the child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import peers
import pytest

from gannet.config import DmarcMode
from gannet.delivery.dns import Resolver
from gannet.mailauth import checker
from gannet.mailauth.checker import ProcessChecks
from gannet.mailauth.checks import InboundChecks, Verdict
from gannet.queue.model import Body, InlineBody, SpooledBody
from gannet.util import frames

HOST = "mx.example.test"
SENDER = "bob@sender.test"
PASSED = "spf=fail dkim=pass dmarc=pass arc=none"


@pytest.fixture
def nameserver(tmp_path: Path, signed: tuple[bytes, str]) -> Iterator[str]:
    peers.need("dnsmasq")
    records: peers.DnsRecords = {
        "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},  # SPF fails: DMARC rests on DKIM
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        "s1._domainkey.sender.test": {"TXT": [signed[1]]},
    }
    with peers.DnsServer(tmp_path / "dns", records=records, ttl=300) as dns:
        yield dns.nameserver


@pytest.fixture
async def checks(nameserver: str) -> AsyncIterator[ProcessChecks]:
    process_checks = ProcessChecks(Resolver([nameserver]), HOST, nameservers=(nameserver,))
    yield process_checks
    await process_checks.close()  # again after a test's own close(): a no-op


async def _check(checks: InboundChecks, data: bytes | Body) -> Verdict:
    body = InlineBody(data) if isinstance(data, bytes) else data
    spf = checks.start_spf("127.0.0.1", SENDER, "client.sender.test")
    return await checks.finish(spf, body, DmarcMode.ENFORCE, sender=SENDER, helo="client.sender.test")


async def _child_running(checks: ProcessChecks, message: bytes) -> int:
    """Check messages until the child is up (the first ones start it and are checked here)."""
    async with asyncio.timeout(30):
        while checks.child_pid is None:
            await _check(checks, message)
            await asyncio.sleep(0.05)
    pid = checks.child_pid
    assert pid is not None
    return pid


def _same(a: Verdict, b: Verdict) -> None:
    assert (a.summary, a.reject, a.quarantine, a.reasons) == (b.summary, b.reject, b.quarantine, b.reasons)
    assert a.prepend.split(b"header.b=")[0] == b.prepend.split(b"header.b=")[0]


async def test_the_childs_verdicts_are_the_servers(
    checks: ProcessChecks, nameserver: str, signed: tuple[bytes, str]
) -> None:
    message = signed[0]
    altered = message.replace(b"Hello.", b"Hello!")
    here = InboundChecks(Resolver([nameserver]), HOST)
    await _child_running(checks, message)
    before = checks.in_child
    passed, failed = await _check(checks, message), await _check(checks, altered)
    assert checks.in_child == before + 2
    assert passed.summary == PASSED
    assert failed.reject is not None and failed.reject.code == 550
    _same(passed, await _check(here, message))
    _same(failed, await _check(here, altered))


async def test_a_killed_child_costs_no_message_and_is_replaced(
    checks: ProcessChecks, signed: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checker, "RESTART_SECONDS", 0.0)
    first = await _child_running(checks, signed[0])
    os.kill(first, signal.SIGKILL)
    # Whether the request meets the dying child or finds it gone, it is answered.
    in_server = checks.in_server
    verdict = await _check(checks, signed[0])
    assert verdict.summary == PASSED
    second = await _child_running(checks, signed[0])
    assert second != first
    assert checks.in_server > in_server
    assert (await _check(checks, signed[0])).summary == verdict.summary


async def test_a_wedged_child_is_killed_and_the_message_checked_here(
    checks: ProcessChecks, signed: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checker, "ANSWER_TIMEOUT", 1.0)
    pid = await _child_running(checks, signed[0])
    os.kill(pid, signal.SIGSTOP)  # alive, holding its socket, answering nothing
    in_server = checks.in_server
    assert (await _check(checks, signed[0])).summary == PASSED
    assert checks.in_server == in_server + 1
    async with asyncio.timeout(10):
        while checks.child_pid == pid:
            await asyncio.sleep(0.05)


async def test_close_ends_the_child_and_checks_go_on_in_the_server(
    checks: ProcessChecks, signed: tuple[bytes, str]
) -> None:
    pid = await _child_running(checks, signed[0])
    await checks.close()
    assert checks.child_pid is None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    in_child = checks.in_child
    assert (await _check(checks, signed[0])).summary == PASSED
    assert checks.in_child == in_child


async def test_a_spooled_body_is_checked_in_the_server(
    checks: ProcessChecks, signed: tuple[bytes, str], tmp_path: Path
) -> None:
    await _child_running(checks, signed[0])
    path = tmp_path / "spooled"
    path.write_bytes(signed[0])
    in_server = checks.in_server
    verdict = await _check(checks, SpooledBody(path, len(signed[0])))
    assert verdict.summary == PASSED
    assert checks.in_server == in_server + 1


async def test_an_answer_that_does_not_decode_kills_the_child_and_fails_its_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server's end of the channel, against a real process and a real socket whose
    other end writes a frame that is not a pickle (as a corrupted child would)."""
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: checker._Channel(proc), sock=ours)
    asking = asyncio.ensure_future(channel.ask(("anything",)))
    await asyncio.sleep(0.05)
    theirs.sendall(frames.frame(b"junk!"))  # not a pickle
    with pytest.raises(checker.CheckerLost):
        await asyncio.wait_for(asking, 10)
    await asyncio.wait_for(channel.lost, 10)
    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
    assert not channel.alive
    assert "unreadable answer from the checker process" in caplog.text
    theirs.close()


async def test_a_request_that_does_not_decode_ends_the_childs_end(
    nameserver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The child's end, on a real socket: a frame that is not a request closes it (the child
    then exits, and the server checks in itself)."""
    ours, theirs = socket.socketpair()
    here = InboundChecks(Resolver([nameserver]), HOST)
    loop = asyncio.get_running_loop()
    _, answers = await loop.create_unix_connection(lambda: checker._Answers(here), sock=ours)
    assert theirs.recv(64) == checker._frame(checker.READY_ID, ())
    theirs.sendall(frames.frame(b"junk!"))  # not a pickle
    await asyncio.wait_for(answers.lost, 10)
    assert "unreadable request from the server" in caplog.text
    theirs.close()


async def test_requests_made_together_are_each_answered_with_their_own_verdict(
    checks: ProcessChecks, signed: tuple[bytes, str]
) -> None:
    """Forty sessions ending their DATA in the same turn of the loop: their requests go out
    in one write, and the child reads several at once; each message gets its own verdict."""
    message = signed[0]
    altered = message.replace(b"Hello.", b"Hello!")
    await _child_running(checks, message)
    await _check(checks, message)  # the child has the records cached from here on
    before = checks.in_child
    bodies = [altered if n % 3 == 0 else message for n in range(40)]
    verdicts = await asyncio.gather(*(_check(checks, body) for body in bodies))
    assert checks.in_child == before + 40
    for body, verdict in zip(bodies, verdicts, strict=True):
        assert (verdict.reject is None) == (body is message)
