#!/usr/bin/env python3
"""The inbound checks alone: CPU per message of `mailauth.pipeline.process`, no server around it.

The message and DNS records are those of `bench/accept.py --mailauth` (a
DKIM-signed 4 KiB message from client.test; SPF, the DKIM key and DMARC
p=reject served by dnsmasq, then from Gannet's resolver cache). Each round
starts SPF as a session does at MAIL FROM and runs the end-of-data checks and
the header rewrite; the figure is CPU time per round, after a warm-up. It
isolates the checks from the rest of the server, so a change to them can be
measured in seconds; in the server under load the same code costs about twice
as much (cache and the other core are shared). `--cold MIB` also times rounds
that each start after a write to every cache line of MIB MiB, as the checker
child often starts a message after the server, the writer and smtp-source
have run: 2 makes this host's L1 and L2 cold (512 KiB a core), 64 its L3 too
(32 MiB); bench/README.md, "Session 22". `--profile` adds a cProfile
listing. Gannet only: Postfix has no built-in DKIM/DMARC to compare with.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import _common
import accept_mailauth
from _common import peers

from gannet.config import DmarcMode
from gannet.delivery.dns import Resolver
from gannet.mailauth import pipeline
from gannet.mailauth.checks import InboundChecks
from gannet.queue.model import InlineBody

COLD_ROUNDS = 500  # each pays for a walk of the memory too: fewer than the hot rounds
RECEIVED = b"Received: from client.test ([127.0.0.1]) by mx.example.test with ESMTP id X; Mon, 1 Jan 2024\r\n"


async def _measure(nameserver: str, body: InlineBody, rounds: int, cold: list[int], profile: bool) -> None:
    checks = InboundChecks(Resolver([nameserver]), "mx.example.test")
    facts = pipeline.MessageFacts(
        queue_id="BENCH",
        hostname="mx.example.test",
        sender=accept_mailauth.SENDER,
        helo="client.test",
        check=True,
        dmarc=DmarcMode.ENFORCE,
        strip_forged=True,
        sign=False,
        forwarded=False,
        max_size=10 << 20,
    )

    async def one() -> pipeline.Processed:
        spf = checks.start_spf("127.0.0.1", accept_mailauth.SENDER, "client.test")
        return await pipeline.process(facts, body, checks, None, spf)

    first = await one()  # fills the resolver's cache
    print(f"results: {dict(first.events).get('check')}")
    for _ in range(200):
        await one()
    started = time.process_time()
    for _ in range(rounds):
        await one()
    print(f"{rounds} rounds: {(time.process_time() - started) / rounds * 1e6:.1f} µs CPU per message")
    for mib in cold:
        evict = bytearray(mib << 20)
        zeros = bytes(len(evict) // 64)
        spent = 0.0
        for _ in range(COLD_ROUNDS):
            evict[::64] = zeros  # a write to every cache line
            started = time.process_time()
            await one()
            spent += time.process_time() - started
        per_message = spent / COLD_ROUNDS * 1e6
        print(f"{COLD_ROUNDS} rounds, each after walking {mib} MiB: {per_message:.1f} µs CPU per message")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(rounds):
            await one()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000, help="messages checked (default 5000)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (default 4096)")
    parser.add_argument("--cold", type=int, action="append", default=[], metavar="MIB",
                        help="also time rounds each after walking MIB MiB of memory (repeatable)")
    parser.add_argument("--profile", action="store_true", help="then a cProfile listing (slower rounds)")
    args = parser.parse_args()
    _common.require("dnsmasq")
    work = _common.workdir("checks")
    message = work / "message.eml"
    records = accept_mailauth.sender_world(message, args.size)
    body = InlineBody(RECEIVED + message.read_bytes().replace(b"\n", b"\r\n"))
    try:
        with peers.DnsServer(work / "dns", records=records, ttl=300) as dns:
            asyncio.run(_measure(dns.nameserver, body, args.rounds, args.cold, args.profile))
    finally:
        _common.remove(work, keep=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
