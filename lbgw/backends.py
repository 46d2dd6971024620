"""Backends: one long-lived ``grpc.aio`` channel per endpoint, shared by all calls.

Every call to an endpoint goes over its one channel (one HTTP/2 connection,
multiplexed). The proxy makes each method's raw-bytes multicallables once
per endpoint and keeps them with the method's handler. Channels start
connecting when the gateway starts, not at the first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

from lbgw.admission import FLOW_CONTROL
from lbgw.config import ClusterConfig, Limits
from lbgw.keepalive import keepalive_options

__all__ = ["Backend", "channel_options"]


def channel_options(cluster: ClusterConfig, limits: Limits) -> list[tuple[str, Any]]:
    """The backend channels' options: the cluster's own, then the message limits.

    lbgw sends at most what it accepts from clients and accepts at most what
    it may send back, so an oversized message fails at the hop that sees it
    with ``RESOURCE_EXHAUSTED``, which is passed through.
    """
    options: list[tuple[str, Any]] = list(cluster.channel_options)
    names = {name for name, _ in options}
    for name, value in (
        ("grpc.max_send_message_length", limits.max_receive_message_bytes),
        ("grpc.max_receive_message_length", limits.max_send_message_bytes),
        # Each gateway channel is its own connection, not shared through
        # gRPC's process-wide subchannel pool with another cluster's.
        ("grpc.use_local_subchannel_pool", 1),
    ):
        if name not in names:
            options.append((name, value))
    for name, value in FLOW_CONTROL:  # the receive window: bounded memory per stream
        if name not in names:
            options.append((name, value))
    # HTTP/2 keepalive, chosen so a default gRPC server never answers
    # GOAWAY too_many_pings (lbgw/keepalive.py): a frozen backend's calls
    # end with UNAVAILABLE instead of waiting for their deadlines.
    for name, value in keepalive_options(cluster.health_check):
        if name not in names:
            options.append((name, value))
    return options


class Backend:
    """One endpoint of a cluster: its address and its channel."""

    __slots__ = ("address", "channel", "cluster")

    def __init__(
        self,
        cluster: str,
        address: str,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``credentials``: TLS to the endpoint (``tls.ClientTls``); None: plaintext."""
        self.cluster = cluster
        self.address = address
        if credentials is None:
            self.channel = aio.insecure_channel(address, options=list(options))
        else:
            self.channel = aio.secure_channel(address, credentials, options=list(options))

    def __repr__(self) -> str:
        state = self.channel.get_state(try_to_connect=False).name
        return f"<Backend {self.cluster}/{self.address} {state}>"

    def connect(self) -> None:
        """Start connecting now, so the first call does not wait for it."""
        self.channel.get_state(try_to_connect=True)

    def unreachable(self) -> bool:
        """Whether the channel is not connected: an UNAVAILABLE is then lbgw's to explain."""
        return self.channel.get_state(try_to_connect=False) is not grpc.ChannelConnectivity.READY

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)
