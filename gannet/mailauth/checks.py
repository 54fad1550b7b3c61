"""The inbound checks a session runs: SPF at MAIL FROM, DKIM/ARC/DMARC at the end of data.

`InboundChecks` is built once per server (it holds the resolver, so every
check shares one DNS cache). A session calls:

- `start_spf(ip, sender, helo)` as soon as MAIL FROM is accepted: a task, so
  the SPF lookups overlap the client's RCPT and DATA (or, for the same
  address, MAIL FROM and HELO within SPF_CACHE_SECONDS, the last result);
- `finish(spf, body, dmarc_mode)` once the message is spooled: parses the
  header section once (shared by DKIM, ARC and DMARC), takes every DKIM and
  ARC key and the DMARC record(s) from the resolver's cache, fetching what is
  not cached all at once, verifies (in an executor for messages above
  `INLINE_VERIFY_LIMIT`; below it a thread hop costs more than the work),
  evaluates DMARC and returns a `Verdict`: the Authentication-Results field to
  prepend, a filter that drops forged fields, and what DMARC says to do;
- or `verdict_now(spf, data, mode)`, the same without awaiting anything, for
  a message in memory whose checks need no lookup and no executor (None
  when they would: then `finish`).

The messages are as a session hands them on: every line ends in CRLF (the
DATA and BDAT readers refuse or normalize a bare CR or LF, RFC 5321 §2.3.8),
which DKIM verification relies on rather than count line ends again.

Speed (issue 4: the checks may cost at most a third of the accept rate): a
message whose records are cached costs no DNS query, no task and no trip
through the event loop; measured with `bench/accept.py --mailauth`.

Decisions:
- A message larger than `max_verify_size` is not loaded for DKIM/ARC:
  dkim=neutral / arc=none with the reason, so a session's memory stays
  bounded; SPF and DMARC (which may still pass on SPF) are evaluated.
- DMARC mode per listener: enforce (p=reject → 550 5.7.1 at the end of data;
  p=quarantine → accepted with `X-Gannet-Quarantine: dmarc`), report (the
  result is only recorded in Authentication-Results), off (no DMARC lookup;
  SPF, DKIM and ARC are still checked and recorded).
- A DNS failure never refuses or defers mail: it is temperror in the header
  and the policy is not applied (mail is never lost to a resolver outage).
- Several From domains (RFC 7489 §6.6.1): each is evaluated, the strictest
  disposition wins; no From domain: dmarc=permerror, nothing enforced.
- Forged fields: any Authentication-Results whose authserv-id is our hostname
  and any X-Gannet-Quarantine are dropped from the incoming header.
- SPF results are reused for SPF_CACHE_SECONDS (30 s) per (client address,
  MAIL FROM, HELO): a record changed in DNS may be seen that much later (the
  resolver holds it for its TTL anyway); a temperror is never reused.

Never raises into the session: an unexpected error gives temperror results
and a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import random
from dataclasses import dataclass, field

from gannet.clock import Clock, SystemClock
from gannet.config import Config, DmarcMode
from gannet.delivery.dns import Resolver
from gannet.mailauth import arc_verify, authres, dkim_verify, dmarc
from gannet.mailauth import spf as spf_mod
from gannet.mailauth.authres import ResInfo
from gannet.mailauth.dns_bridge import TxtAnswer, spf_dns, txt_records
from gannet.message.rewrite import FieldFilter, header_fields, read_all, read_head, split_head
from gannet.queue.model import Body
from gannet.smtp.replies import Reply

log = logging.getLogger("gannet.mailauth")

INLINE_VERIFY_LIMIT = 64 * 1024
SPF_TIMEOUT = 20.0  # RFC 7208 §4.6.4 suggests at least 20 seconds for the whole check
SPF_CACHE_SECONDS = 30.0  # a result is reused this long for the same address, MAIL FROM and HELO
SPF_CACHE_ENTRIES = 10_000
MAX_FROM_DOMAINS = 5
QUARANTINE_FIELD = b"X-Gannet-Quarantine: dmarc\r\n"
_FORGEABLE = frozenset({b"authentication-results", b"x-gannet-quarantine"})

# What `finish` is given for SPF: the future `start_spf` returned at MAIL FROM, an outcome
# already known (the checker child gets it from the server), or None (not checked).
SpfSource = asyncio.Future[spf_mod.SpfOutcome] | spf_mod.SpfOutcome | None


@dataclass(slots=True)
class Verdict:
    prepend: bytes  # Authentication-Results (+ X-Gannet-Quarantine), CRLF-terminated
    value: str  # the Authentication-Results value on one line (for ARC sealing)
    hostname: str
    reject: Reply | None = None  # DMARC enforce + p=reject: refuse with this
    quarantine: bool = False
    summary: str = ""  # "spf=pass dkim=pass dmarc=pass arc=none" for the log and the queue's history
    reasons: list[str] = field(default_factory=list)

    @property
    def drop(self) -> FieldFilter:
        """The filter for `message.rewrite`: forged results claiming our name, and quarantine marks."""
        return FieldFilter(_FORGEABLE, self._forged)

    def _forged(self, raw_field: bytes) -> bool:
        return authres.is_ours(raw_field, self.hostname) or raw_field[:20].lower() == b"x-gannet-quarantine:"


@dataclass(slots=True)
class _Needs:
    """What one message's header section asks of the checks, and the DNS answers found so far."""

    head: dkim_verify.ParsedHead
    from_domains: list[str]
    with_dmarc: bool  # DMARC is evaluated (the listener's mode is not off)
    arc_present: bool
    dkim_names: list[str]  # the key records to fetch (none for a message too large to verify)
    arc_names: list[str]
    known: dict[str, TxtAnswer] = field(default_factory=dict)
    # Per From domain (when `with_dmarc`): its policy discovery, or the name to look up next.
    steps: list[dmarc.Discovery | str] = field(default_factory=list)
    missing: bool = False  # some answer is not cached: `_fetch` it

    @property
    def dmarc_domains(self) -> list[str]:
        return self.from_domains if self.with_dmarc else []

    @property
    def verifiable(self) -> bool:
        return bool(self.head.signatures or self.arc_names)


class InboundChecks:
    def __init__(
        self,
        resolver: Resolver,
        hostname: str,
        *,
        max_verify_size: int = 10 * 1024 * 1024,
        rng: random.Random | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.resolver = resolver
        self.hostname = hostname.lower().rstrip(".")
        self.max_verify_size = max_verify_size
        self.rng = rng or random.Random()
        self.clock: Clock = clock or SystemClock()
        self._spf_dns = spf_dns(resolver)
        self._spf_hints = spf_mod.Hints()
        self._spf_results: dict[tuple[str, str, str], tuple[spf_mod.SpfOutcome, float]] = {}
        dmarc.org_domain(self.hostname)  # load the Public Suffix List now, not on the first message

    async def close(self) -> None:
        """Release what the checks hold beyond memory (see `checker.ProcessChecks`); here, nothing."""

    # ------------------------------------------------------------------ SPF

    def start_spf(self, ip: str, sender: str, helo: str) -> asyncio.Future[spf_mod.SpfOutcome]:
        """The SPF result, as a future: already done when the same (client address, MAIL FROM,
        HELO) was checked less than SPF_CACHE_SECONDS ago, else a task that checks now."""
        key = (ip, sender, helo)
        cached = self._spf_results.get(key)
        if cached is not None and cached[1] > self.clock.monotonic():
            done: asyncio.Future[spf_mod.SpfOutcome] = asyncio.get_running_loop().create_future()
            done.set_result(cached[0])
            return done
        return asyncio.create_task(self._spf(ip, sender, helo))

    async def _spf(self, ip: str, sender: str, helo: str) -> spf_mod.SpfOutcome:
        identity, domain, _ = spf_mod.identity_for(sender, helo)
        try:
            async with asyncio.timeout(SPF_TIMEOUT):
                outcome = await spf_mod.check(
                    ip, sender, helo, self._spf_dns, receiver=self.hostname, hints=self._spf_hints
                )
        except TimeoutError:
            return spf_mod.SpfOutcome(spf_mod.SpfResult.TEMPERROR, identity, domain, "SPF check timed out")
        if outcome.result is not spf_mod.SpfResult.TEMPERROR:  # a DNS failure is asked again next time
            results = self._spf_results
            results.pop((ip, sender, helo), None)
            if len(results) >= SPF_CACHE_ENTRIES:
                del results[next(iter(results))]  # the oldest
            results[(ip, sender, helo)] = (outcome, self.clock.monotonic() + SPF_CACHE_SECONDS)
        return outcome

    # ------------------------------------------------------------------ end of data

    async def finish(
        self,
        spf: SpfSource,
        body: Body,
        mode: DmarcMode,
        *,
        sender: str = "",
        helo: str = "",
    ) -> Verdict:
        try:
            return await self._finish(spf, body, mode, sender, helo)
        except Exception as exc:  # fail soft: the message is accepted with what we know
            return self._internal_error(exc, mode)

    def verdict_now(
        self, spf: spf_mod.SpfOutcome, data: bytes, mode: DmarcMode, *, sender: str = "", helo: str = ""
    ) -> Verdict | None:
        """`finish` without waiting, for a message in memory whose checks need nothing awaited:
        every DNS answer cached, and small enough to verify inline. None when something must
        be awaited (call `finish` then). The checker child answers most messages this way, with
        no task per message."""
        if len(data) > min(INLINE_VERIFY_LIMIT, self.max_verify_size):
            return None
        try:
            needs = self._needs(data, mode)  # all of it is the start: it is small
            if needs.missing:
                return None
            dkim_outcomes, arc = self._verify_now(data, needs)
            return self._conclude(needs, spf, dkim_outcomes, arc, mode, sender, helo)
        except Exception as exc:  # as in `finish`
            return self._internal_error(exc, mode)

    def _internal_error(self, exc: Exception, mode: DmarcMode) -> Verdict:
        log.exception("mailauth: checks failed unexpectedly (%r); results recorded as temperror", exc)
        results = [ResInfo(m, "temperror", "internal error") for m in ("spf", "dkim", "dmarc", "arc")]
        return self._verdict(results, None, mode)

    async def _finish(
        self,
        spf_source: SpfSource,
        body: Body,
        mode: DmarcMode,
        sender: str,
        helo: str,
    ) -> Verdict:
        small = body.size <= self.max_verify_size
        needs = self._needs(await read_head(body), mode, verifies=small)
        if needs.missing:
            await self._fetch(needs)
        spf = await self._spf_result(spf_source, sender, helo)
        dkim_outcomes: list[dkim_verify.DkimOutcome] = []
        arc = arc_verify.ArcOutcome("none")
        if small and needs.verifiable:
            data = await read_all(body)
            if len(data) <= INLINE_VERIFY_LIMIT:  # a thread hop would cost more than the work
                dkim_outcomes, arc = self._verify_now(data, needs)
            else:
                work = functools.partial(self._verify_now, data, needs)
                dkim_outcomes, arc = await asyncio.get_running_loop().run_in_executor(None, work)
        elif needs.head.signatures:
            dkim_outcomes = [
                dkim_verify.DkimOutcome("neutral", reason=f"message too large to verify ({body.size} bytes)")
            ]
        if not small and needs.arc_present:
            arc = arc_verify.ArcOutcome("none", "message too large to verify")
        return self._conclude(needs, spf, dkim_outcomes, arc, mode, sender, helo)

    def _needs(self, start: bytes, mode: DmarcMode, *, verifies: bool = True) -> _Needs:
        """What the header section (in `start`, the message's first bytes) asks of the checks,
        with every answer the resolver has cached. `verifies`: DKIM and ARC keys are wanted
        (False for a message too large to verify)."""
        section, _ = split_head(start)
        fields = header_fields(section)  # the one parse of the header section, shared below
        from_domains = _from_domains(fields)
        head = dkim_verify.parse_head(section, fields)
        arc_present = arc_verify.has_arc(section)
        dkim_names = head.key_names() if verifies else []
        arc_names = arc_verify.arc_key_names(section) if verifies and arc_present else []
        needs = _Needs(head, from_domains, mode is not DmarcMode.OFF, arc_present, dkim_names, arc_names)
        # Every answer from the resolver's cache first, synchronously; `_fetch` looks up the rest.
        lookup = functools.partial(self._known, needs.known)
        needs.steps = [dmarc.discover_step(d, lookup) for d in needs.dmarc_domains]
        needs.missing = any(isinstance(step, str) for step in needs.steps) or any(
            lookup(n) is None for n in dkim_names + arc_names
        )
        return needs

    async def _fetch(self, needs: _Needs) -> None:
        """Look up, all at once, every answer `_needs` did not find cached."""
        fetch = functools.partial(self._lookup, needs.known)
        names = dict.fromkeys(needs.dkim_names + needs.arc_names)
        _, discoveries = await asyncio.gather(
            asyncio.gather(*(fetch(n) for n in names)),  # cached ones: no query
            asyncio.gather(*(dmarc.discover(d, fetch) for d in needs.dmarc_domains)),
        )
        needs.steps = list(discoveries)

    def _verify_now(
        self, data: bytes, needs: _Needs
    ) -> tuple[list[dkim_verify.DkimOutcome], arc_verify.ArcOutcome]:
        known = needs.known
        head = needs.head
        dkim_keys = {n: known[n] for n in needs.dkim_names}
        # crlf=True: a session's mail has no bare CR or LF (the module docstring)
        dkim_out = dkim_verify.verify(data, dkim_keys, head=head, crlf=True) if head.signatures else []
        if not needs.arc_names:
            return dkim_out, arc_verify.ArcOutcome("none")
        return dkim_out, arc_verify.verify(data, {n: known[n] for n in needs.arc_names})

    def _conclude(
        self,
        needs: _Needs,
        spf: spf_mod.SpfOutcome,
        dkim_outcomes: list[dkim_verify.DkimOutcome],
        arc: arc_verify.ArcOutcome,
        mode: DmarcMode,
        sender: str,
        helo: str,
    ) -> Verdict:
        results = [_spf_info(spf, sender, helo)]
        results += [_dkim_info(o) for o in dkim_outcomes] or [ResInfo("dkim", "none")]
        outcomes: list[dmarc.DmarcOutcome] = []
        if mode is not DmarcMode.OFF:
            spf_domain = spf.domain if spf.result is spf_mod.SpfResult.PASS else ""
            passed = [o.domain for o in dkim_outcomes if o.result == "pass"]
            for domain, discovery in zip(needs.from_domains, needs.steps, strict=True):
                assert isinstance(discovery, dmarc.Discovery)  # `_needs` or `_fetch` found them all
                outcomes.append(
                    dmarc.evaluate(
                        domain, discovery, spf_pass_domain=spf_domain, dkim_pass_domains=passed, rng=self.rng
                    )
                )
            if not needs.from_domains:
                outcomes.append(dmarc.DmarcOutcome("permerror", "", reason="no From address"))
            results += [_dmarc_info(o) for o in outcomes]
        results.append(ResInfo("arc", arc.result, arc.reason))
        return self._verdict(results, outcomes, mode)

    def _known(self, known: dict[str, TxtAnswer], name: str) -> TxtAnswer | None:
        """The TXT answer for `name` if this check has it or the resolver has it cached, else None."""
        found = known.get(name)
        if found is None:
            records = self.resolver.cached_txt(name)
            if records is not None:
                found = known[name] = TxtAnswer(tuple(records))
        return found

    async def _lookup(self, known: dict[str, TxtAnswer], name: str) -> TxtAnswer:
        found = self._known(known, name)
        if found is None:
            found = known[name] = await txt_records(self.resolver, name)
        return found

    async def _spf_result(self, spf: SpfSource, sender: str, helo: str) -> spf_mod.SpfOutcome:
        if spf is None:
            identity, domain, _ = spf_mod.identity_for(sender, helo)
            return spf_mod.SpfOutcome(spf_mod.SpfResult.NONE, identity, domain, "not checked")
        if isinstance(spf, spf_mod.SpfOutcome):
            return spf
        return await spf

    def _verdict(
        self, results: list[ResInfo], outcomes: list[dmarc.DmarcOutcome] | None, mode: DmarcMode
    ) -> Verdict:
        field, value = authres.render_both(self.hostname, results)
        verdict = Verdict(
            prepend=field,
            value=value,
            hostname=self.hostname,
            summary=" ".join(f"{r.method}={r.result}" for r in results),
        )
        if mode is not DmarcMode.ENFORCE or not outcomes:
            return verdict
        rejecting = [o for o in outcomes if o.disposition is dmarc.Policy.REJECT]
        if rejecting:
            domain = rejecting[0].from_domain
            verdict.reject = Reply(550, "5.7.1", f"Message rejected per DMARC policy for {domain}")
            verdict.reasons.append(f"dmarc=fail p=reject header.from={domain}")
        elif any(o.disposition is dmarc.Policy.QUARANTINE for o in outcomes):
            verdict.quarantine = True
            verdict.prepend += QUARANTINE_FIELD
        return verdict


def _from_domains(fields: list[bytes]) -> list[str]:
    """The distinct domains of the From addresses (RFC 7489 §6.6.1), at most MAX_FROM_DOMAINS."""
    return list(_domains_of(tuple(f.partition(b":")[2] for f in fields if f[:5].lower() == b"from:")))


@functools.lru_cache(maxsize=4096)  # a sender's From field is the same in each of its messages
def _domains_of(values: tuple[bytes, ...]) -> tuple[str, ...]:
    addresses = email.utils.getaddresses([v.decode("utf-8", "replace").replace("\r\n", "") for v in values])
    domains = [a.rpartition("@")[2].strip().lower().rstrip(".") for _, a in addresses if "@" in a]
    return tuple(dict.fromkeys(d for d in domains if d))[:MAX_FROM_DOMAINS]


def _spf_info(spf: spf_mod.SpfOutcome, sender: str, helo: str) -> ResInfo:
    identity = sender if spf.identity == "mailfrom" else helo
    reason = "" if spf.result is spf_mod.SpfResult.PASS else spf.explanation
    return ResInfo("spf", spf.result.value, reason, ((spf.property_name, identity),))


def _dkim_info(o: dkim_verify.DkimOutcome) -> ResInfo:
    props = (("header.d", o.domain), ("header.s", o.selector), ("header.b", o.b_prefix))
    return ResInfo("dkim", o.result, o.reason, props)


def _dmarc_info(o: dmarc.DmarcOutcome) -> ResInfo:
    reason = o.reason if o.result in ("none", "temperror", "permerror") else ""
    if o.published is not None:
        r = o.published
        reason = f"p={r.p.value} sp={r.sp.value} dis={o.disposition.value}" + (
            f" pct={r.pct}" if r.pct < 100 else ""
        )
    return ResInfo("dmarc", o.result, reason, (("header.from", o.from_domain),))


def from_config(config: Config, clock: Clock | None = None) -> InboundChecks | None:
    """The server's checks (one resolver, so one DNS cache), or None when `[mailauth] checks = false`."""
    if not config.mailauth.checks:
        return None
    resolver = Resolver(config.dns.nameservers, clock=clock)
    return InboundChecks(
        resolver, config.hostname, max_verify_size=config.mailauth.max_verify_size, clock=clock
    )
