"""Policy: pure verdicts. Facts in, `Verdict` (Accept | Reject(Reply) | Defer(Reply)) out.

What lives here:

- `verdict`     the three verdict values every policy decision returns;
- `accounts`    the users file (submission accounts and local mailboxes) — the
                one module here that touches the disk, and only that file;
- `recipients`  who a local address is: accounts, aliases, "+tag", postmaster;
- `relay`       may this client send to this recipient, may this user send as
                this sender (RFC 5321 §3.3, §4.5.1; RFC 6409 §6.1).

What must never live here: sockets, DNS, clocks, the queue, asyncio. The
session (`gannet.server.session`) gathers the facts, asks, and acts on the
answer; a check that needs the network belongs in `gannet.mailauth` or runs
under the timed runner of STYLE.md habit 5. Because everything is a plain
function of its arguments, the tests are golden tables (Postfix `.in/.ref`
style), not mocks.

Imports allowed: gannet.util, gannet.smtp, gannet.message, gannet.queue.model
and gannet.config (a leaf of frozen dataclasses).
"""
