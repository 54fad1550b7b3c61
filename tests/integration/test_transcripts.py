"""The transcript files (tests/unit/smtp/transcript.py's format) played over TCP
against a real `gannet serve`: the same dialogue format as the in-memory core
tests, with Gannet's own policy answering.

`@ listener = "mode"` picks the listener; other options are the config's
business and are not allowed here.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import peers
import pytest
from transcript_format import Step, load_transcript

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.txt"))


class LineSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.buf = b""

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; buffered {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8")

    def closed(self) -> bool:
        try:
            return not self.buf and self.sock.recv(1) == b""
        except OSError:
            return True


def play(server: peers.GannetProcess, steps: list[Step], ca_file: Path) -> None:
    options = dict(s.value for s in steps if s.kind == "option")
    assert set(options) <= {"listener"}, f"unsupported options over TCP: {options}"
    sock = socket.create_connection(server.address(options.get("listener", "mx")), timeout=10)
    conn = LineSocket(sock)
    try:
        for step in steps:
            where = f"transcript line {step.line}"
            if step.kind == "send":
                conn.sock.sendall(step.value)
            elif step.kind == "expect":
                got = conn.line()
                assert got == step.value, f"{where}: got {got!r}"
            elif step.kind == "expect_re":
                got = conn.line()
                assert step.value.fullmatch(got), f"{where}: {got!r} !~ {step.value.pattern}"
            elif step.kind == "starttls":
                assert not conn.buf, f"{where}: plaintext left over before TLS"
                ctx = ssl.create_default_context(cafile=str(ca_file))
                conn.sock = ctx.wrap_socket(conn.sock, server_hostname="mx.example.test")
            elif step.kind == "eof":
                conn.sock.shutdown(socket.SHUT_WR)
            elif step.kind == "closed":
                assert conn.closed(), f"{where}: the server did not close"
    finally:
        conn.sock.close()


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript_over_tcp(server: peers.GannetProcess, tls_certs: peers.TlsCerts, path: Path) -> None:
    play(server, load_transcript(path), tls_certs.ca_file)
