"""gannet.metrics: the event functions count what they are told, labels stay
bounded, recent events are cleaned and capped, and nothing is counted (or
raised) before `configure`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gannet import metrics


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(labels.items())): value for labels, value in metrics.labelled(name, registry)}


def test_unconfigured_functions_do_nothing() -> None:
    metrics.disable()
    metrics.received("l", ["a.test"])
    metrics.delivery_outcome("x@a.test", "delivered", 1.0)
    metrics.auth_failed("l", "c", "u", "PLAIN")
    assert metrics.recent() == []


def test_counts_per_recipient_by_listener_and_domain(registry: CollectorRegistry) -> None:
    metrics.received("127.0.0.1:25", ["example.test", "far.test", "far.test"])
    for outcome in ("delivered", "delivered", "deferred", "bounced"):
        metrics.delivery_outcome("x@Far.Test", outcome, 2.0)
    got = samples(registry, "gannet_messages_received_total")
    assert got == {
        (("domain", "example.test"), ("listener", "127.0.0.1:25")): 1.0,
        (("domain", "far.test"), ("listener", "127.0.0.1:25")): 2.0,
    }
    assert samples(registry, "gannet_messages_delivered_total") == {(("domain", "far.test"),): 2.0}
    assert samples(registry, "gannet_messages_deferred_total") == {(("domain", "far.test"),): 1.0}
    assert samples(registry, "gannet_messages_bounced_total") == {(("domain", "far.test"),): 1.0}
    # only deliveries feed the latency histogram
    assert metrics.totals(registry)["gannet_delivery_latency_seconds_count"] == 2.0
    assert metrics.totals(registry)["gannet_delivery_latency_seconds_sum"] == 4.0


def test_domain_labels_are_bounded() -> None:
    labels = metrics.DomainLabels(["example.test"], limit=3)
    seen = [labels(f"d{i}.test") for i in range(6)]
    assert seen == ["d0.test", "d1.test", "d2.test", "other", "other", "other"]
    assert labels("d1.test") == "d1.test"  # known ones keep their label
    assert labels("EXAMPLE.test") == "example.test"  # local domains always have theirs


def test_sessions_tls_share_and_rejections(registry: CollectorRegistry) -> None:
    metrics.session_opened("L")
    metrics.session_opened("L")
    metrics.session_closed("L", tls=True)
    assert samples(registry, "gannet_sessions_open") == {(("listener", "L"),): 1.0}
    assert samples(registry, "gannet_sessions_total") == {(("listener", "L"), ("tls", "yes")): 1.0}
    metrics.rejected("L", "[192.0.2.1]:1", "RCPT", "550 5.1.1 no", "<a@example.test>")
    metrics.rejected("L", "[192.0.2.1]:1", "RCPT", "550 5.1.1 no", "<b@example.test>")
    # the recipient is in the recent events, never in a label
    assert samples(registry, "gannet_smtp_rejections_total") == {(("listener", "L"), ("stage", "rcpt")): 2.0}
    assert [e.detail for e in metrics.recent(metrics.EventKind.REFUSED)] == [
        "RCPT <b@example.test>: 550 5.1.1 no",
        "RCPT <a@example.test>: 550 5.1.1 no",
    ]


def test_recent_events_are_capped_and_cleaned(registry: CollectorRegistry) -> None:
    for i in range(metrics.RECENT + 10):
        metrics.auth_failed("L", f"[192.0.2.1]:{i}", f"user{i}\x1b[31m", "login")
    recent = metrics.recent(metrics.EventKind.AUTH_FAILURE, limit=1000)
    assert len(recent) == metrics.RECENT
    assert recent[0].client == f"[192.0.2.1]:{metrics.RECENT + 9}"  # newest first
    assert recent[0].detail == f"user{metrics.RECENT + 9}?[31m"
    assert samples(registry, "gannet_auth_failures_total") == {
        (("listener", "L"), ("mechanism", "LOGIN")): float(metrics.RECENT + 10)
    }


def test_dns_and_store_commit_latency(registry: CollectorRegistry) -> None:
    metrics.dns_lookup("MX", 0.02, ok=True)
    metrics.dns_lookup("MX", 5.0, ok=False)
    metrics.store_commit(0.003, fsync=True)
    totals = metrics.totals(registry)
    assert totals["gannet_dns_lookup_seconds_count"] == 2
    assert totals["gannet_dns_lookup_failures_total"] == 1
    assert samples(registry, "gannet_store_commit_seconds_count") == {(("sync", "fsync"),): 1.0}


def test_two_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """What `gannet serve` does: the server sets the directory up, a child (the delivery
    worker) inherits it, and the server's collection sums both processes' files. A
    second server on the same directory is refused, and wipes nothing."""
    script = textwrap.dedent(
        r"""
        import os, subprocess, sys
        from pathlib import Path
        from gannet import metrics
        metrics.start_server_process(Path(sys.argv[1]), ["example.test"])
        metrics.received("L", ["example.test"] * 3)
        child = "from gannet import metrics; metrics.configure(['example.test']); "
        child += "metrics.delivery_outcome('a@example.test', 'delivered', 0.1)"
        subprocess.run([sys.executable, "-c", child], check=True)
        subprocess.run([sys.executable, "-c", child], check=True)
        second = "import sys; from pathlib import Path; from gannet import metrics\n"
        second += "try: metrics.start_server_process(Path(sys.argv[1]), [])\n"
        second += "except metrics.DirectoryBusy as exc: sys.exit(3)"
        busy = subprocess.run([sys.executable, "-c", second, sys.argv[1]])
        assert busy.returncode == 3, "a second server must not wipe the first one's counts"
        from prometheus_client import generate_latest
        print(generate_latest(metrics.registry()).decode())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
        if not s.labels.get("le")
    }
    assert values["gannet_messages_received_total"] == 3
    assert values["gannet_messages_delivered_total"] == 2
    assert values["gannet_delivery_latency_seconds_count"] == 2
