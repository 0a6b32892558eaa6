"""The status page and the browser test page in a real headless Chromium.

Chromium (Debian's package, installed by scripts/install-system-deps.sh) is driven by
Playwright against a real pyturn with two workers: the test page gathers relay
candidates and completes a data channel round trip through the relay over UDP, TCP and
TLS, and the status page shows the allocation a page holds. Screenshots go to
$PYTURN_SCREENSHOTS, or test-artifacts/screenshots beside the project.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.interop.server_process import PASSWORD, USER, make_loopback_certificate, tls_config
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer

pytestmark = pytest.mark.interop

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic would go to the internet: off, as are GPU and QUIC.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    # The test server's certificate is self-signed: TURN over TLS must still connect.
    "--ignore-certificate-errors",
]
RUN_TIMEOUT_MS = 90_000
SCREENSHOTS = Path(
    os.environ.get("PYTURN_SCREENSHOTS")
    or Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium (scripts/install-system-deps.sh installs it)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_loopback_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page whose console errors (a blocked script, say) fail the test."""
    context = browser.new_context()
    opened = context.new_page()
    errors: list[str] = []
    opened.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == []


def url(server: OpsServer, path: str) -> str:
    host, port = server.metrics_address
    return f"http://{host}:{port}{path}"


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def run_test_page(page: Page) -> list[dict[str, Any]]:
    page.click("#run")
    page.wait_for_selector("body[data-done=yes]", timeout=RUN_TIMEOUT_MS)
    results: list[dict[str, Any]] = page.evaluate("window.pyturnTest.results")
    return results


def test_the_test_page_relays_a_data_channel_over_udp_tcp_and_tls(
    start_server: StartServer, page: Page, tls_files: tuple[Path, Path]
) -> None:
    server = start_server({**tls_config(*tls_files), "workers": 2})
    page.goto(url(server, "/test"))
    page.wait_for_selector("body[data-loaded=yes]")
    assert "minted for this test" in page.inner_text("#credential-line")
    results = run_test_page(page)
    screenshot(page, "test-page-rest-secret.png")

    assert [result["transport"] for result in results] == ["udp", "tcp", "tls"]
    min_port, max_port = server.config["relay"]["min_port"], server.config["relay"]["max_port"]
    for result in results:
        assert result["error"] is None, result
        assert result["rttMs"] > 0, result
        assert result["relays"], result
        for relay in result["relays"]:
            host, port = relay.rsplit(":", 1)
            assert host == "127.0.0.1"
            assert min_port <= int(port) <= max_port
    # The round trips went through pyturn, over each client transport.
    samples = server.scrape()
    for transport in ("udp", "tcp", "tls"):
        key = (
            "pyturn_relayed_bytes_total",
            frozenset({("direction", "client_to_peer"), ("transport", transport)}),
        )
        assert samples[key] > 0, transport
    rows = page.locator("#candidates tr").count()
    assert rows >= 4  # a header and a relay candidate per transport

    # The status page's chart: the next traffic sample after the round trips (one every
    # 5 s) shows a rate above zero, drawn as a line.
    status = page.context.new_page()
    status.goto(url(server, "/"))
    status.wait_for_function(
        "() => document.getElementById('rate-now').textContent.startsWith('now')"
        " && !document.getElementById('rate-now').textContent.startsWith('now 0 bit/s out')",
        timeout=15_000,
        polling=500,
    )
    points = status.get_attribute("#chart polyline.up", "points")
    assert points is not None
    heights = [float(point.split(",")[1]) for point in points.split()]
    assert len(heights) >= 2
    assert min(heights) < 10  # the peak reaches the top of the 180-unit chart
    screenshot(status, "status-page-after-test.png")
    status.close()


def test_the_status_page_shows_the_allocation_a_page_holds(
    start_server: StartServer, browser: Browser, page: Page
) -> None:
    server = start_server({"workers": 2})
    page.goto(url(server, "/test"))
    page.wait_for_selector("body[data-loaded=yes]")
    # A relay-only peer connection left open: one UDP allocation while it lives.
    page.evaluate(
        """async () => {
            const ice = window.pyturnTest.ice;
            const udp = ice.listeners.find((l) => l.transport === "udp");
            const pc = new RTCPeerConnection({
                iceServers: [{urls: [`turn:${udp.address}:${udp.port}?transport=udp`],
                              username: ice.username, credential: ice.credential}],
                iceTransportPolicy: "relay"});
            window.heldOpen = pc;
            const relay = new Promise((resolve) => {
                pc.onicecandidate = (e) => {
                    if (e.candidate && e.candidate.type === "relay") resolve();
                };
            });
            pc.createDataChannel("hold");
            await pc.setLocalDescription(await pc.createOffer());
            await relay;
        }"""
    )
    status = page.context.new_page()
    status.goto(url(server, "/"))
    status.wait_for_selector("body[data-allocations='1']", timeout=15_000)
    assert status.inner_text("#state") == "serving"
    assert "UDP\t1" in status.inner_text("#allocations")
    assert status.locator("#workers tr").count() == 3  # a header and two workers
    screenshot(status, "status-page.png")

    page.evaluate("window.heldOpen.close()")
    # Chromium ends its allocation (Refresh, lifetime 0); the page catches up within a
    # refresh or two.
    status.wait_for_selector("body[data-allocations='0']", timeout=15_000)
    status.close()


def test_without_a_secret_the_test_page_takes_a_username_and_password(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(
        {
            "auth": {"secrets": None},
            "listen": [{"transport": "udp", "address": "127.0.0.1", "port": 0}],
        }
    )
    page.goto(url(server, "/test"))
    page.wait_for_selector("body[data-loaded=yes]")
    assert page.is_visible("#login")
    page.fill("#username", USER)
    page.fill("#password", "not-" + PASSWORD)
    refused = run_test_page(page)
    assert refused[0]["relays"] == []
    assert "401" in refused[0]["error"] or "no relay candidate" in refused[0]["error"]

    page.fill("#password", PASSWORD)
    results = run_test_page(page)
    screenshot(page, "test-page-username.png")
    assert len(results) == 1
    assert results[0]["error"] is None, results
    assert results[0]["rttMs"] > 0
