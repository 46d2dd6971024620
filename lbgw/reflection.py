"""Method kinds learned from the backends' gRPC server reflection service.

A cluster with ``reflection = true`` asks its endpoints at start-up which
services they serve and reads each method's ``client_streaming`` and
``server_streaming`` flags from the file descriptors they return. This is
what lets unary methods take the ``unary_unary`` fast path without listing
them in the config. ``grpc.reflection.v1`` is asked first, then the older
``v1alpha`` that grpcio serves; their messages are the same on the wire.

Reflection is best effort: an endpoint that is down or does not serve it is
logged, and its methods are forwarded as ``stream_stream``, which is correct
for every kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2

from lbgw.config import MethodKind
from lbgw.logs import fields

__all__ = ["discover_kinds"]

log = logging.getLogger("lbgw.reflection")

_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_SKIP_PREFIX = "grpc.reflection."


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


async def _kinds_from(channel: aio.Channel, timeout: float) -> dict[str, MethodKind]:
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


async def discover_kinds(
    cluster: str, addresses: Sequence[str], channels: Sequence[aio.Channel], timeout: float = 5.0
) -> dict[str, MethodKind]:
    """Method kinds from the first endpoint that answers reflection; {} if none does.

    ``timeout`` bounds the whole discovery, however many endpoints are asked,
    so a cluster of endpoints that accept connections but never answer
    cannot hold start-up for long.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for address, channel in zip(addresses, channels, strict=True):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            async with asyncio.timeout(remaining):
                kinds = await _kinds_from(channel, remaining)
        except aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # a timeout, a garbled reply: reflection is best effort
            reason = repr(exc)
        else:
            log.info(
                "reflection",
                extra=fields(cluster=cluster, endpoint=address, methods=len(kinds)),
            )
            return kinds
        log.warning(
            "reflection failed", extra=fields(cluster=cluster, endpoint=address, reason=reason)
        )
    log.warning(
        "no method kinds from reflection; methods not in config are forwarded as stream_stream",
        extra=fields(cluster=cluster),
    )
    return {}
