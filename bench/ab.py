#!/usr/bin/env python3
"""Is a change faster? Two Gannet checkouts under the same smtp-source load, alternating in one run.

    .venv/bin/python bench/ab.py TREE_A TREE_B [--mailauth [--b-off] | --relay] [--sessions 10]
                                 [--style many] [--rounds 4] [--messages 10000]

TREE_A and TREE_B are checkouts of Gannet (e.g. `git worktree add /tmp/a HEAD~1`,
or `git archive REV | tar -x -C DIR`); each run's Gannet imports its tree's
`gannet` package, everything else (this harness, smtp-source, the message)
is the same. Each round runs A then B, the next B then A, so that a drift of
the host's speed within a round favours neither.

Why this and not two invocations of accept.py: on the shared hosts this
project is measured on, the same tree's rate moves by a quarter to a half
within an hour (bench/README.md, "Session 20": checks off, the same tree,
1,143 to 1,672 msgs/s in four rounds), so one run of each side says little.
Interleaved rounds in one process, with no settling wait between them, give
pairs taken minutes apart at most; the summary is each round's B/A and the
rounds B won.

Plain (default): accept.py's Gannet run (one recipient, 4 KiB, fsync before 250,
Maildir delivery). `--relay`: relay.py's Gannet run (smtp-source → Gannet →
smtp-sink, timed until the sink has them all; --style does not apply).
`--mailauth`: accept_mailauth's, with the inbound checks on for both trees and
one run of A with checks off each round, so that each tree's on/off (issue 4's
figure) is printed too: both over A's checks-off run, which is right for a
change to the checks and nothing else. A change that also moves the checks-off
path (a faster session, say) makes B's on/off over A's off a false figure:
`--b-off` runs B with checks off too, each round, and B's on/off is then over
B's own (session 21: mypyc sped both up).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common
from _common import peers

Runner = Callable[[bool], tuple[float, dict[str, float]]]


def _runner(args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> Runner:
    """A function running one Gannet (checks on or off) and returning its rate and CPU ms a
    message by process. For --mailauth, the DNS server it needs stays up until `stack` closes."""
    if not args.mailauth:  # plain or --relay (main() refuses both with --mailauth)
        import accept
        import relay

        def plain(_checks: bool) -> tuple[float, dict[str, float]]:
            run: accept.Run | relay.Run
            if args.relay:
                run = relay.run_once("gannet", args.sessions, args.messages, args.size, False, None)
            else:
                run = accept.run_once("gannet", args.sessions, args.style, args.messages, args.size, False)
            return run.rate, {k: 1000 * v / args.messages for k, v in run.split.items()}

        return plain
    import accept_mailauth

    message = work / "message.eml"
    records = accept_mailauth.sender_world(message, args.size)
    dns = stack.enter_context(peers.DnsServer(work / "dns", records=records, ttl=300))

    def checked(checks: bool) -> tuple[float, dict[str, float]]:
        figure = accept_mailauth.run_once(
            dns, message, checks, args.sessions, args.style, args.messages, keep=False, profile=None
        )
        return figure.rate, figure.by_process

    return checked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs=2, type=Path, metavar="TREE", help="two Gannet checkouts: A and B")
    parser.add_argument("--mailauth", action="store_true", help="inbound checks on (and A with them off)")
    parser.add_argument("--relay", action="store_true", help="relay.py's run, to smtp-sink")
    parser.add_argument("--b-off", action="store_true", help="with --mailauth: B with checks off too")
    parser.add_argument("--sessions", type=int, default=10, help="smtp-source -s (default 10)")
    parser.add_argument(
        "--style",
        choices=("one", "many"),
        default="many",
        help="a connection per message, or all over one (smtp-source -d; the default)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of A and B (default 4)")
    parser.add_argument("--messages", type=int, default=10_000, help="messages per run (default 10000)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (default 4096)")
    args = parser.parse_args()
    if args.b_off and not args.mailauth:
        parser.error("--b-off is for --mailauth")
    if args.relay and args.mailauth:
        parser.error("--relay and --mailauth are separate runs")
    trees = [t.resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "gannet" / "__init__.py").exists():
            parser.error(f"{tree}: not a Gannet checkout (no gannet/__init__.py)")
    _common.require("smtp-source", *(["dnsmasq"] if args.mailauth else []))
    peers.raise_nofile(4096)
    work = _common.workdir("ab")
    rates: dict[str, list[float]] = {"A": [], "B": [], "A off": [], "B off": []}
    with contextlib.ExitStack() as stack:
        stack.callback(_common.use_tree, None)
        run = _runner(args, work, stack)
        for r in range(args.rounds):
            sides = [("A", trees[0]), ("B", trees[1])]
            offs = [("A off", trees[0])] if args.mailauth else []
            offs += [("B off", trees[1])] if args.b_off else []
            order = (offs + sides) if r % 2 == 0 else (offs + sides)[::-1]
            for name, tree in order:
                _common.use_tree(tree)
                rate, by_process = run(not name.endswith(" off"))
                rates[name].append(rate)
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_process.items()))
                print(
                    f"round {r + 1} {name}: {rate:,.0f} msgs/s; CPU ms/msg: {cpu}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(1)
    _common.remove(work, False)
    pairs = [b / a for a, b in zip(rates["A"], rates["B"], strict=True)]
    if args.relay:
        print(f"\n{args.messages} messages a run, {args.sessions} sessions, relayed to smtp-sink")
    else:
        what = "checks on" if args.mailauth else "plain"
        style = f"{args.style} per connection"
        print(f"\n{args.messages} messages a run, {args.sessions} sessions, {style}, {what}")
    print(f"A = {trees[0]}\nB = {trees[1]}\n")
    offs = [name for name in ("A off", "B off") if rates[name]]
    rows: list[list[object]] = [[name, *rates[name]] for name in offs]
    rows += [["A", *rates["A"]], ["B", *rates["B"]]]
    for side in ("A", "B") if args.mailauth else ():
        off = rates[f"{side} off"] or rates["A off"]  # B over A's checks-off run without --b-off
        rows.append([f"{side} on/off", *(f"{on / o:.2f}" for on, o in zip(rates[side], off, strict=True))])
    rows.append(["B/A", *(f"{p:.2f}" for p in pairs)])
    print(_common.table(["msgs/s", *(f"round {i + 1}" for i in range(args.rounds))], rows))
    won = sum(p > 1 for p in pairs)
    print(f"\nB/A median {statistics.median(pairs):.2f}; B ahead in {won} of {len(pairs)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
