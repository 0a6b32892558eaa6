"""The server as a process: start-up, SIGTERM, and the interop helpers themselves."""

from __future__ import annotations

import asyncio
import signal

import pytest
from aioice.turn import TurnClientUdpProtocol

from tests.interop.server_process import (
    PASSWORD,
    USER,
    ServerFactory,
    ServerProcess,
    base_config,
    require_tool,
)

pytestmark = pytest.mark.interop

RACE_ATTEMPTS = 5


@pytest.mark.parametrize(
    ("env", "outcome"),
    [
        pytest.param({}, pytest.skip.Exception, id="local-skips"),
        pytest.param({"CI": "true"}, pytest.fail.Exception, id="ci-fails"),
        pytest.param({"PYTURN_REQUIRE_INTEROP": "1"}, pytest.fail.Exception, id="required-fails"),
    ],
)
def test_require_tool_skips_locally_but_fails_when_interop_is_required(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], outcome: type[BaseException]
) -> None:
    """A missing third-party tool skips the test, except in CI or when asked to require it."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTURN_REQUIRE_INTEROP", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(outcome, match="pyturn-no-such-tool"):
        require_tool("pyturn-no-such-tool")


def test_sigterm_ends_running_allocations_and_exits_cleanly(
    server_factory: ServerFactory,
) -> None:
    """SIGTERM with shutdown_timeout 0 closes every allocation (logged with reason
    shutdown), logs "stopped" and exits with status 0."""
    server = server_factory()

    async def allocate() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(
            lambda: TurnClientUdpProtocol(
                server.udp_address,
                username=USER,
                password=PASSWORD,
                lifetime=600,
                channel_refresh_time=500,
            ),
            remote_addr=server.udp_address,
        )
        try:
            relayed = await asyncio.wait_for(client.connect(), 5.0)
        finally:
            if client.refresh_task is not None:
                client.refresh_task.cancel()
            transport.close()  # leave the allocation on the server
        return relayed

    relayed = asyncio.run(allocate())
    server.wait_for_event("allocation created", relayed=f"{relayed[0]}:{relayed[1]}")
    assert server.stop() == 0, server.log_text
    deleted = server.events("allocation deleted")
    assert [(d["relayed"], d["reason"]) for d in deleted] == [
        (f"{relayed[0]}:{relayed[1]}", "shutdown")
    ]
    assert server.log_text.rstrip().endswith("stopped"), server.log_text


def test_sigterm_right_after_ready_still_stops_gracefully(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Once the server says it is ready, SIGTERM must take the graceful path: a
    supervisor that stops a just-started server should see exit status 0.

    Regression test: an earlier revision logged "ready in" before installing its
    SIGTERM handler, and a SIGTERM in that window killed it (exit -15, no "stopped").
    The window is short, so the server is started and stopped several times.
    """
    for attempt in range(RACE_ATTEMPTS):
        server = ServerProcess(base_config(), tmp_path_factory.mktemp(f"race{attempt}"))
        server.start()  # returns as soon as the "ready in" line is read
        code = server.stop()  # SIGTERM at once
        assert code == 0, (
            f"attempt {attempt}: exit status {code} "
            f"(-{int(signal.SIGTERM)} = killed by SIGTERM); log:\n{server.log_text}"
        )
