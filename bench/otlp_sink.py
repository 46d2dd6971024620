"""An OTLP/gRPC trace receiver that counts what it gets and keeps none of it.

``python bench/otlp_sink.py`` serves ``opentelemetry.proto.collector.trace.v1.
TraceService/Export`` on ``127.0.0.1`` on a port the OS chooses, prints
``127.0.0.1:PORT`` on its first line, and after each export a line
``requests spans``, the totals so far, so the benchmark can say how many
spans lbgw sent. It decodes each request (as a collector must) and drops it:
what it costs is its own, not the proxy's, as it runs in a process of its own.
Serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests = 0
        self.spans = 0

    async def Export(  # noqa: N802 - the gRPC method's name
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        self.spans += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        print(self.requests, self.spans, flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


async def main() -> None:
    server = aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
