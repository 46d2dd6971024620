"""The floor: the least a grpc.aio proxy can do for a unary call, to measure lbgw against.

``python bench/passthrough.py BACKEND [LISTEN]`` serves every method as a raw
``unary_unary`` over one channel to ``BACKEND`` (default listen
``127.0.0.1:0``) and prints its port. No (de)serializers, no picking, no
metadata forwarded: whatever lbgw spends above this is its own cost.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc import aio


class Passthrough(grpc.GenericRpcHandler):
    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = details.method

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
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:0"))
