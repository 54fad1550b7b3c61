"""The dashboard in a real browser: Debian's Chromium, headless, driven by
Playwright (the system browser through `executable_path`; Playwright never
downloads one). A real `gannet serve` gets mail from smtplib; the page must show
the counts move, list the deferred message, and retry it from its page.

Screenshots go to the test's tmp dir; with GANNET_UPDATE_SCREENSHOT=1 the
overview also replaces docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import peers
import pytest

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
WAIT_MS = 20_000  # the page polls every 3 s; a few polls, on a loaded CI machine


def playwright_module() -> Any:
    try:
        from playwright import sync_api
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
        if peers.in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return sync_api


@pytest.fixture
def page() -> Iterator[Any]:
    chromium = peers.need("chromium")
    sync_api = playwright_module()
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1360, "height": 900}, color_scheme="light")
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        yield tab
        browser.close()
    assert errors == [], errors  # no script errors, no CSP violations


def send(host: str, port: int, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "news@elsewhere.test", to, subject
    msg.set_content("hello\n")
    with smtplib.SMTP(host, port) as s:
        s.send_message(msg)


def test_dashboard_shows_mail_moving_and_retries_a_deferred_message(
    gannet: Callable[..., peers.GannetProcess], page: Any, tmp_path: Path
) -> None:
    expect = playwright_module().expect
    closed = peers.free_port("127.0.0.1")  # the smarthost: nothing listens, so relayed mail is deferred
    g = gannet(relay={"smarthost": f"127.0.0.1:{closed}"})
    admin_host, admin_port = peers.split_address(g.config["admin"]["address"])
    peers.wait_port(admin_host, admin_port, 15)
    base = f"http://{admin_host}:{admin_port}"
    host, port = g.address("mx")

    page.goto(base + "/")
    received = page.get_by_test_id("card-received")
    expect(received).to_have_text("0", timeout=WAIT_MS)

    for i in range(3):
        send(host, port, "alice@example.test", f"local {i}")
    send(host, port, "carol@far.test", "for a dead smarthost")
    # something for the "refused" panel
    with smtplib.SMTP(host, port) as s, pytest.raises(smtplib.SMTPRecipientsRefused):
        s.sendmail("news@elsewhere.test", ["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n")

    expect(received).to_have_text("4", timeout=WAIT_MS)  # the numbers move without a reload
    expect(page.get_by_test_id("card-delivered")).to_have_text("3", timeout=WAIT_MS)
    expect(page.get_by_test_id("deferrals")).to_contain_text("far.test", timeout=WAIT_MS)
    expect(page.get_by_test_id("refused")).to_contain_text("nobody@example.test", timeout=WAIT_MS)
    expect(page.get_by_test_id("card-queue")).to_have_text("1", timeout=WAIT_MS)
    page.get_by_test_id("chart-throughput").locator("circle.s-delivered").wait_for(timeout=WAIT_MS)
    overview = tmp_path / "overview.png"
    page.screenshot(path=str(overview), full_page=True)
    if os.environ.get("GANNET_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(overview, REPO / "docs" / "dashboard.png")

    # the message list: search by the recipient, open the message
    page.get_by_role("link", name="Messages", exact=True).click()
    page.get_by_test_id("search").fill("carol@far.test")
    page.get_by_test_id("search").press("Enter")
    row = page.get_by_test_id("messages").locator("tr[data-id]")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    queue_id = row.get_attribute("data-id")
    page.screenshot(path=str(tmp_path / "messages.png"), full_page=True)
    row.click()
    expect(page.locator("h1")).to_have_text(queue_id, timeout=WAIT_MS)
    expect(page.get_by_test_id("trace")).to_contain_text("deferred", timeout=WAIT_MS)
    attempts = page.get_by_test_id("attempts")
    expect(attempts).not_to_have_text("0", timeout=WAIT_MS)
    before = (attempts.inner_text(), page.get_by_test_id("next-attempt").get_attribute("title"))
    page.screenshot(path=str(tmp_path / "message-before-retry.png"), full_page=True)

    page.locator("button[data-action=retry]").click()
    expect(page.locator("#toast")).to_contain_text("1 recipient(s) due now", timeout=WAIT_MS)
    expect(page.get_by_test_id("trace")).to_contain_text("retry", timeout=WAIT_MS)

    def changed() -> bool:
        now = (attempts.inner_text(), page.get_by_test_id("next-attempt").get_attribute("title"))
        return now != before and now[1] != ""  # tried again and deferred anew

    peers.wait_for(changed, WAIT_MS / 1000, "the attempt count or next attempt to change after retry", 0.25)
    page.screenshot(path=str(tmp_path / "message-after-retry.png"), full_page=True)

    # hold and release from the page
    page.locator("button[data-action=hold]").click()
    expect(page.get_by_test_id("recipients")).to_contain_text("held", timeout=WAIT_MS)
    page.locator("button[data-action=release]").click()
    expect(page.locator("button[data-action=hold]")).to_be_visible(timeout=WAIT_MS)

    # delete, confirmed in the browser's dialog: back to the list, which no longer has it
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("button[data-action=delete]").click()
    expect(page).to_have_url(f"{base}/#/messages", timeout=WAIT_MS)
    expect(page.get_by_test_id("messages")).not_to_contain_text(queue_id, timeout=WAIT_MS)
    assert overview.stat().st_size > 10_000
