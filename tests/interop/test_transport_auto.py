"""transport: auto: TURN over TCP and over TLS on one port (told apart by the first
byte, as coturn's ports do), served to coturn's turnutils_uclient with and without -S."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.server_process import (
    LOOPBACK,
    USER,
    ServerFactory,
    ServerProcess,
)
from tests.interop.test_turnutils import (  # echo_peer: a fixture
    assert_all_echoed,
    echo_peer,  # noqa: F401
    uclient_at,
)

pytestmark = pytest.mark.interop


@pytest.fixture
def server(server_factory: ServerFactory, tls_files: tuple[Path, Path]) -> ServerProcess:
    return server_factory(
        {
            "listen": [{"transport": "auto", "address": LOOPBACK, "port": 0}],
            "tls": {"certificate": str(tls_files[0]), "private_key": str(tls_files[1])},
            "workers": 2,
        }
    )


@pytest.mark.parametrize(("flags", "transport"), [(("-t",), "tcp"), (("-t", "-S"), "tls")])
def test_uclient_relays_over_tcp_and_tls_on_the_same_port(
    server: ServerProcess,
    echo_peer: int,  # noqa: F811 (the fixture)
    flags: tuple[str, ...],
    transport: str,
) -> None:
    mark = server.log_mark()
    run = uclient_at(server.ports["auto"], echo_peer, *flags)
    assert_all_echoed(server, mark, run, USER)
    created = server.events("allocation created", since=mark)
    assert created and {fields["transport"] for fields in created} == {transport}
