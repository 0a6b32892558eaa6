"""Two aiortc RTCPeerConnections in one process, talking only through pyturn relays.

`iceTransportPolicy=RELAY` (RFC 9429 §3.5.3, backed by aioice's TransportPolicy.RELAY)
makes each side gather relay candidates only, so every ICE check and every SCTP packet
of the data channel crosses the server twice: client A -> relay A -> relay B ->
client B. All of it stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from tests.interop.server_process import LOOPBACK, PASSWORD, USER, ServerProcess, relayed_packets

pytestmark = pytest.mark.interop

T = TypeVar("T")

SCENARIO_TIMEOUT = 30.0
STEP_TIMEOUT = 15.0
MESSAGES = 100


def run(coro: Awaitable[T], timeout: float = SCENARIO_TIMEOUT) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def candidate_types(sdp: str) -> list[str]:
    """The `typ` of every a=candidate line (RFC 8839 §5.1)."""
    types = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            words = line.split()
            types.append(words[words.index("typ") + 1])
    return types


def selected_pair_types(pc: RTCPeerConnection) -> tuple[str, str]:
    """(local, remote) candidate types of the nominated ICE pair.

    aiortc has no getSelectedCandidatePair(); the pair lives in aioice's Connection.
    """
    sctp = pc.sctp
    assert sctp is not None
    connection: Any = sctp.transport.transport._connection
    pair = connection._nominated[1]
    return pair.local_candidate.type, pair.remote_candidate.type


async def receive_all(
    queue: asyncio.Queue[str | bytes], count: int, timeout: float = STEP_TIMEOUT
) -> list[str | bytes]:
    return [await asyncio.wait_for(queue.get(), timeout) for _ in range(count)]


async def data_channel_through_relays(
    url: str, messages: int = MESSAGES, step_timeout: float = STEP_TIMEOUT, size: int = 0
) -> None:
    """Two aiortc peers with relay-only ICE through the TURN server at `url` open a data
    channel and carry `messages` messages each way (padded to `size` characters);
    candidates and the nominated pairs must all be relays."""
    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=url, username=USER, credential=PASSWORD)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    caller = RTCPeerConnection(config)
    callee = RTCPeerConnection(config)
    at_caller: asyncio.Queue[str | bytes] = asyncio.Queue()
    at_callee: asyncio.Queue[str | bytes] = asyncio.Queue()
    callee_channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
    opened = asyncio.Event()
    try:
        channel = caller.createDataChannel("interop", ordered=True)
        channel.on("open", opened.set)
        channel.on("message", at_caller.put_nowait)

        @callee.on("datachannel")
        def on_datachannel(remote: RTCDataChannel) -> None:
            remote.on("message", at_callee.put_nowait)
            callee_channel.set_result(remote)

        # Non-trickle offer/answer: setLocalDescription waits for gathering to end.
        await caller.setLocalDescription(await caller.createOffer())
        offer = caller.localDescription
        assert candidate_types(offer.sdp) and set(candidate_types(offer.sdp)) == {"relay"}
        await callee.setRemoteDescription(offer)
        await callee.setLocalDescription(await callee.createAnswer())
        answer = callee.localDescription
        assert candidate_types(answer.sdp) and set(candidate_types(answer.sdp)) == {"relay"}
        await caller.setRemoteDescription(answer)

        await asyncio.wait_for(opened.wait(), step_timeout)
        forward = [f"caller->callee {i}".ljust(size, ".") for i in range(messages)]
        for message in forward:
            channel.send(message)
        assert await receive_all(at_callee, messages, step_timeout) == forward

        remote = await asyncio.wait_for(callee_channel, step_timeout)
        backward = [f"callee->caller {i}".ljust(size, ".") for i in range(messages)]
        for message in backward:
            remote.send(message)
        assert await receive_all(at_caller, messages, step_timeout) == backward

        assert selected_pair_types(caller) == ("relay", "relay")
        assert selected_pair_types(callee) == ("relay", "relay")
    finally:
        await caller.close()
        await callee.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aiortc_data_channel_carries_100_messages_each_way_through_relays_only(
    turn_server: ServerProcess, transport: str
) -> None:
    """RFC 8656 + RFC 8445 with relay-only candidates (RFC 9429 §3.5.3): both offers
    hold only `typ relay` candidates, the nominated pairs are relay/relay, and an
    ordered data channel delivers 100 messages each way in order. The server logs an
    allocation per peer connection, and when aiortc closes them, traffic both ways."""
    mark = turn_server.log_mark()
    port = turn_server.udp_port if transport == "udp" else turn_server.tcp_port
    run(data_channel_through_relays(f"turn:{LOOPBACK}:{port}?transport={transport}"))

    created = [
        fields
        for fields in turn_server.events("allocation created", since=mark)
        if fields["user"] == USER
    ]
    assert len(created) >= 2, turn_server.log_since(mark)
    assert {fields.get("transport", transport) for fields in created} == {transport}
    # Closing the peer connections deletes the allocations (Refresh, LIFETIME 0).
    used = 0
    for fields in created:
        deleted = turn_server.wait_for_event(
            "allocation deleted", since=mark, relayed=fields["relayed"]
        )
        to_peer, to_client = relayed_packets(deleted)
        if to_peer and to_client:
            used += 1
    assert used >= 2, turn_server.log_since(mark)
