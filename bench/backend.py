"""The proxy benchmark's backend: a raw-bytes grpc.aio echo server, as cheap as grpc.aio allows.

Run ``python bench/backend.py`` (``--help`` lists the knobs). It binds
``127.0.0.1`` on a port the OS chooses, prints that port on a line of its
own and serves until SIGTERM or SIGINT:

* ``/lbgw.echo.v1.Echo/Unary`` replies with the request's bytes;
* ``/lbgw.echo.v1.Echo/ServerStream`` ignores the request and writes
  ``--stream-count`` messages of ``--stream-size`` bytes.

One generic handler with no (de)serializers: the bytes are never parsed, so
the backend spends as little CPU per call as grpc.aio can. With
``--reflection`` it also serves grpc.reflection (v1alpha, which lbgw asks
after v1) describing the echo service, as a backend a newcomer puts behind
``lbgw serve --backend`` would, so lbgw's quick form learns the kinds. It stands behind
every configuration of ``bench/proxy.py`` in its own process, so its CPU is
not mixed with the proxy's or the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc import aio

UNARY = "/lbgw.echo.v1.Echo/Unary"
SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"

DEFAULT_STREAM_COUNT = 1000
DEFAULT_STREAM_SIZE = 100


class _Echo(grpc.GenericRpcHandler):
    """Routes the two benchmark methods; any other method is UNIMPLEMENTED."""

    def __init__(self, stream_count: int, stream_size: int) -> None:
        self._count = stream_count
        self._payload = b"x" * stream_size
        self._unary: grpc.RpcMethodHandler[bytes, bytes]
        self._unary = grpc.unary_unary_rpc_method_handler(self._echo)
        self._stream: grpc.RpcMethodHandler[bytes, bytes]
        self._stream = grpc.unary_stream_rpc_method_handler(self._server_stream)

    async def _echo(self, request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def _server_stream(
        self, request: bytes, context: aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        payload = self._payload
        for _ in range(self._count):
            yield payload

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        if method == UNARY:
            return self._unary
        if method == SERVER_STREAM:
            return self._stream
        return None


async def _serve(
    stream_count: int, stream_size: int, cert: str = "", key: str = "", *, reflection: bool = False
) -> None:
    server = aio.server()
    server.add_generic_rpc_handlers((_Echo(stream_count, stream_size),))
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection  # noqa: PLC0415

        from lbgw.pb import echo_pb2  # noqa: PLC0415 - puts the echo service in the pool

        names = (echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name,)
        grpc_reflection.enable_server_reflection((*names, grpc_reflection.SERVICE_NAME), server)
    if cert:  # TLS (bench/proxy.py's TLS rows): this certificate, no client certificate asked
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/backend.py", description=__doc__.splitlines()[0])
    p.add_argument("--stream-count", type=int, default=DEFAULT_STREAM_COUNT)
    p.add_argument("--stream-size", type=int, default=DEFAULT_STREAM_SIZE, metavar="BYTES")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="serve TLS with this chain")
    p.add_argument("--tls-key", default="", metavar="FILE", help="the key of --tls-cert")
    p.add_argument("--reflection", action="store_true", help="serve grpc.reflection too")
    args = p.parse_args(argv)
    asyncio.run(
        _serve(
            args.stream_count,
            args.stream_size,
            args.tls_cert,
            args.tls_key,
            reflection=args.reflection,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
