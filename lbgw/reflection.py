"""Method kinds learned from the backends' gRPC server reflection service.

With ``reflection`` on (the default), lbgw asks each endpoint which services
it serves and reads each method's ``client_streaming`` and
``server_streaming`` flags from the file descriptors it returns. This is what
lets unary methods take the ``unary_unary`` fast path with no method listed
in the config. ``grpc.reflection.v1`` is asked first, then the older
``v1alpha`` that grpcio serves; their messages are the same on the wire.

Reflection is best effort, and ``KindLearner`` keeps asking until it has an
answer, off the request path:

* at start-up, every endpoint is asked at once, all within one timeout, so
  endpoints that accept connections but never answer cannot hold start-up
  for long;
* an endpoint that could not be asked (down, slow, a garbled reply) is asked
  again in the background, after 0.5 s, then twice as long each time up to
  a minute (with jitter, as gRPC's connection backoff), until it answers or
  leaves the cluster;
* an endpoint that joins (``Cluster.update``, from any discovery) is asked
  when it appears, the same way;
* an endpoint that answers ``UNIMPLEMENTED`` to both versions serves no
  reflection and is not asked again.

Until a method's kind is known its calls are forwarded as ``stream_stream``,
which is correct for every kind.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2

from lbgw.config import MethodKind
from lbgw.endpoints import Endpoint
from lbgw.logs import fields

__all__ = ["KindLearner", "kinds_of"]

log = logging.getLogger("lbgw.reflection")

_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_SKIP_PREFIX = "grpc.reflection."

#: Called with the kinds an endpoint gave, and its address.
Learned = Callable[[dict[str, MethodKind], str], None]


async def _ask(
    channel: aio.Channel,
    method: str,
    request: reflection_pb2.ServerReflectionRequest,
    timeout: float,
) -> reflection_pb2.ServerReflectionResponse:
    rpc = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = rpc(iter((request,)), timeout=timeout)
    async for response in call:
        if response is None:  # grpc.aio yields None for a reply it could not decode
            raise LookupError("the reflection service sent an undecodable response")
        return response
    raise LookupError("the reflection service sent no response")


async def kinds_of(channel: aio.Channel, timeout: float) -> dict[str, MethodKind]:
    """The method kinds one endpoint's reflection service describes.

    Raises ``aio.AioRpcError`` (``UNIMPLEMENTED``: no reflection served) or
    ``LookupError`` for a reply that cannot be read.
    """
    method = _METHODS[0]
    try:
        listing = await _ask(
            channel, method, reflection_pb2.ServerReflectionRequest(list_services=""), timeout
        )
    except aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.UNIMPLEMENTED:
            raise
        method = _METHODS[1]
        listing = await _ask(
            channel, method, reflection_pb2.ServerReflectionRequest(list_services=""), timeout
        )
    kinds: dict[str, MethodKind] = {}
    for service in listing.list_services_response.service:
        if service.name.startswith(_SKIP_PREFIX):
            continue
        reply = await _ask(
            channel,
            method,
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.name),
            timeout,
        )
        for blob in reply.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            prefix = f"{proto.package}." if proto.package else ""
            for svc in proto.service:
                if f"{prefix}{svc.name}" != service.name:
                    continue
                for m in svc.method:
                    kinds[f"/{service.name}/{m.name}"] = MethodKind.of(
                        m.client_streaming, m.server_streaming
                    )
    return kinds


class KindLearner:
    """Asks a cluster's endpoints for their method kinds until each has answered once.

    ``learned`` gets each answer; the cluster decides what it adds (its own
    kinds and the descriptor sets' come first). ``ask`` starts asking in the
    background; ``forget`` stops asking an endpoint that left; ``close``
    stops everything.
    """

    def __init__(
        self,
        cluster: str,
        learned: Learned,
        *,
        timeout: float = 5.0,
        first_backoff: float = 0.5,
        max_backoff: float = 60.0,
    ) -> None:
        self.cluster = cluster
        self._learned = learned
        self._timeout = timeout
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._asking: dict[Endpoint, asyncio.Task[None]] = {}
        self.answered = 0  # endpoints that gave their kinds
        self.without = 0  # endpoints that serve no reflection

    def __repr__(self) -> str:
        return (
            f"<KindLearner {self.cluster} answered={self.answered} "
            f"without={self.without} asking={len(self._asking)}>"
        )

    @property
    def asking(self) -> list[str]:
        """The addresses of the endpoints still to answer."""
        return [e.address for e in self._asking]

    async def ask_now(self, endpoints: Iterable[Endpoint], timeout: float | None = None) -> None:
        """Ask ``endpoints`` at once (start-up), all within ``timeout``; the rest, later."""
        first = {e: asyncio.ensure_future(self._once(e)) for e in endpoints if e.backend}
        if not first:
            return
        _, pending = await asyncio.wait(first.values(), timeout=timeout or self._timeout)
        for e, task in first.items():
            if task in pending:
                task.cancel()
                self._later(e, "no answer at start-up", self._first_backoff)
            elif not task.result():
                self._later(e, None, self._first_backoff)
        await asyncio.gather(*pending, return_exceptions=True)

    def ask(self, endpoints: Iterable[Endpoint]) -> None:
        """Ask ``endpoints`` in the background, now, then again until each answers."""
        for e in endpoints:
            if e.backend is not None and e not in self._asking:
                self._later(e, None, 0.0)

    def forget(self, endpoints: Iterable[Endpoint]) -> None:
        """Stop asking ``endpoints`` (they left the cluster)."""
        for e in endpoints:
            task = self._asking.pop(e, None)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        tasks = list(self._asking.values())
        self._asking.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _later(self, e: Endpoint, reason: str | None, delay: float) -> None:
        if reason is not None:
            log.warning(
                "reflection failed",
                extra=fields(cluster=self.cluster, endpoint=e.address, reason=reason),
            )
        task = asyncio.ensure_future(self._until_answered(e, delay))
        self._asking[e] = task
        task.add_done_callback(lambda t, e=e: self._done(e, t))  # type: ignore[misc]

    def _done(self, e: Endpoint, task: asyncio.Task[None]) -> None:
        if self._asking.get(e) is task:
            del self._asking[e]

    async def _until_answered(self, e: Endpoint, delay: float) -> None:
        backoff = max(delay, self._first_backoff)
        while True:
            if delay > 0:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter
            if await self._once(e):
                return
            delay, backoff = backoff, min(backoff * 2, self._max_backoff)

    async def _once(self, e: Endpoint) -> bool:
        """Ask ``e`` once; True when it needs no more asking (it answered, or has no reflection)."""
        assert e.backend is not None
        try:
            async with asyncio.timeout(self._timeout):
                kinds = await kinds_of(e.backend.channel, self._timeout)
        except aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                self.without += 1
                log.info(
                    "no reflection served",
                    extra=fields(cluster=self.cluster, endpoint=e.address),
                )
                return True
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a garbled reply: reflection is best effort
            reason = repr(exc)
        else:
            self.answered += 1
            self._learned(kinds, e.address)
            return True
        log.warning(
            "reflection failed, asking again later",
            extra=fields(cluster=self.cluster, endpoint=e.address, reason=reason),
        )
        return False
