"""The floor: the least a grpc.aio proxy can do for a unary call, to measure lbgw against.

``python bench/passthrough.py BACKEND [LISTEN]`` serves every method as a raw
``unary_unary`` (the echo service's ``ServerStream`` as a raw
``unary_stream``) over one channel to ``BACKEND`` (default listen
``127.0.0.1:0``) and prints its port. No (de)serializers, no picking, no
metadata forwarded: whatever lbgw spends above this is its own cost. With
``LBGW_BENCH_UVLOOP=1`` in its environment it runs on uvloop (the
``floor-uvloop`` row); the floor itself stays on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import grpc
from grpc import aio

SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"


class Passthrough(grpc.GenericRpcHandler):
    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = details.method
        if method == SERVER_STREAM:

            async def stream(
                request: bytes, ctx: aio.ServicerContext[bytes, bytes]
            ) -> AsyncIterator[bytes]:
                rpc: aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(method)
                async for response in rpc(request, timeout=ctx.time_remaining()):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream)

        async def forward(request: bytes, ctx: aio.ServicerContext[bytes, bytes]) -> bytes:
            call: aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(method)
            return await call(request, timeout=ctx.time_remaining())

        return grpc.unary_unary_rpc_method_handler(forward)


async def main(backend: str, listen: str) -> None:
    async with aio.insecure_channel(backend) as channel:
        server = aio.server()
        server.add_generic_rpc_handlers((Passthrough(channel),))
        print(server.add_insecure_port(listen), flush=True)
        await server.start()
        await server.wait_for_termination()


if __name__ == "__main__":
    factory = asyncio.new_event_loop
    if os.environ.get("LBGW_BENCH_UVLOOP") == "1":
        import uvloop  # only for the floor-uvloop row

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:0"))
