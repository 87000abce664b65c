"""The demo in a real browser: headless Chromium (Debian's, driven by Playwright) chats
with a tiny model and must show coloured tokens, regulator marks and the stats line.

Saves ``test-artifacts/demo.png``. Also checks that nothing leaves the machine: every
request the page makes goes to the demo's 127.0.0.1 address, and the Python process opens
no connection to a non-loopback address while the demo runs.

Needs /usr/bin/chromium (or $VESPER_CHROMIUM): ``tests/browser_setup.sh`` installs it.
Without it this test fails (it is never skipped).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from _fixtures_serve import free_port, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("VESPER_CHROMIUM", "/usr/bin/chromium")
# No first-run, sync, component-update or background traffic: the browser stays offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Filled by the audit hook below while `_watching` is on: every non-loopback address the
# Python process tries to resolve or connect to.
_watching: list[bool] = []
_outbound: list[str] = []


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str) or host in ("", "localhost"):
        return host in ("", "localhost")
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple) -> None:
    if not _watching:
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            _outbound.append(f"connect {address}")
    elif event == "socket.getaddrinfo" and args and args[0] is not None:
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if not _is_loopback(host):
            _outbound.append(f"resolve {host}")


sys.addaudithook(_audit)  # hooks cannot be removed; this one is inert unless watching


def _require_browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed ({CHROMIUM} is missing): run "
                    "tests/browser_setup.sh (as root) to install it, then re-run the tests",
                    pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the 'playwright' Python package is missing ({exc}): pip install "
                    "playwright (no browser download needed; the system Chromium is used)",
                    pytrace=False)
    return sync_playwright


def _set_number(page, elem_id: str, value: str) -> None:
    """Type a value into a Gradio slider's number box and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def test_demo_in_headless_chromium(tmp_path: Path) -> None:
    sync_playwright = _require_browser()
    from vesper_sdk.demo.app import build_demo, launch

    demo = build_demo(make_tiny_model(tmp_path / "tiny"), cache_dir=tmp_path / "cache",
                      device="cpu")
    requests: list[str] = []
    _outbound.clear()
    _watching.append(True)
    try:
        url = launch(demo, "127.0.0.1", free_port(), block=False)
        origin = urlparse(url).netloc
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("request", lambda r: requests.append(r.url))
                page.goto(url)
                page.locator("#vesper-input textarea").wait_for(timeout=60_000)
                # Greedy, and a threshold in the middle of this model's confidences, so the
                # regulator flags some tokens and not others.
                _set_number(page, "vesper-temperature", "0")
                _set_number(page, "vesper-threshold", "0.5")
                _set_number(page, "vesper-max-tokens", "40")
                box = page.locator("#vesper-input textarea")
                box.fill("hello, what is the sun?")
                page.locator("#vesper-send").click()
                page.locator(".vesper-stats").first.wait_for(timeout=60_000)
                box.fill("and the moon?")
                box.press("Enter")
                page.locator(".vesper-stats").nth(1).wait_for(timeout=60_000)

                tokens = page.locator(".vesper-assistant .vesper-tok")
                n_tokens = tokens.count()
                colours = tokens.evaluate_all(
                    "els => els.map(e => getComputedStyle(e).backgroundColor)")
                regulated = page.locator(".vesper-assistant .vesper-regulated").count()
                stats = page.locator(".vesper-stats").all_inner_texts()
                bubbles = page.locator(".vesper-user .vesper-bubble").all_inner_texts()
                legend = page.locator(".vesper-legend .vesper-scale").count()
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
            finally:
                browser.close()
    finally:
        _watching.clear()
        demo.close()

    assert bubbles == ["hello, what is the sun?", "and the moon?"]
    assert n_tokens >= 2
    # Every token has a real colour from the scale, and they are not all the same.
    assert all(re.match(r"rgb\(\d+, \d+, \d+\)$", c) for c in colours), colours
    assert len(set(colours)) > 1
    assert 0 < regulated < n_tokens
    assert len(stats) == 2 and legend == 1
    for line in stats:
        assert re.search(r"[\d.]+ tokens/s", line), line
        assert re.search(r"mean confidence [01]\.\d\d", line), line
        assert re.search(r"lowest [01]\.\d\d", line), line
        assert "regulator:" in line
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
    # Offline: the page loaded nothing from anywhere but the demo itself ...
    remote = [u for u in requests
              if urlparse(u).scheme in ("http", "https", "ws", "wss")
              and urlparse(u).netloc != origin]
    assert remote == [], remote
    # ... and the Python side reached out to nobody.
    assert _outbound == [], _outbound
