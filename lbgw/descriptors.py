"""Method kinds from descriptor sets: the output of ``protoc --descriptor_set_out``.

A descriptor set is a serialized ``google.protobuf.FileDescriptorSet``, the
file ``protoc --include_imports --descriptor_set_out=api.protoset api.proto``
writes, and the one grpcurl's ``-protoset`` and Envoy's gRPC-JSON transcoder
(``proto_descriptor``) read. Each service's methods carry their
``client_streaming`` and ``server_streaming`` flags, which give the method's
kind, as they do in server reflection. protobuf's own ``descriptor_pb2``
parses it; lbgw reads nothing else from it.

The config's ``descriptor_sets`` (and ``--protoset``) are checked when the
config is loaded, so a missing, unreadable or garbled file stops lbgw at
start-up with the file's name; the kinds are read again when the cluster is
built (``Cluster``), from the same files.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from lbgw.config.model import MethodKind

__all__ = ["DescriptorSetError", "kinds_from_descriptor_set", "kinds_from_descriptor_sets"]


class DescriptorSetError(ValueError):
    """A descriptor set that cannot be read; the message names the file and why."""


def kinds_from_descriptor_set(path: str) -> dict[str, MethodKind]:
    """``/package.Service/Method`` -> kind, for every method of every service in the file.

    Raises ``DescriptorSetError`` naming ``path`` for a file that is missing,
    unreadable, not a ``FileDescriptorSet`` or holds no service.
    """
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise DescriptorSetError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(blob)
    except DecodeError as exc:
        raise DescriptorSetError(
            f"{path}: not a FileDescriptorSet (protoc --descriptor_set_out output): {exc}"
        ) from None
    kinds: dict[str, MethodKind] = {}
    for proto in files.file:
        prefix = f"{proto.package}." if proto.package else ""
        for service in proto.service:
            for m in service.method:
                kinds[f"/{prefix}{service.name}/{m.name}"] = MethodKind.of(
                    m.client_streaming, m.server_streaming
                )
    if not kinds:
        # An empty file parses as an empty set; so does many a file that is not one.
        raise DescriptorSetError(
            f"{path}: no service in it; expected the output of "
            "protoc --include_imports --descriptor_set_out=FILE for .proto files with services"
        )
    return kinds


def kinds_from_descriptor_sets(paths: tuple[str, ...]) -> dict[str, MethodKind]:
    """The kinds of all ``paths``; a method in two files takes the first file's kind."""
    kinds: dict[str, MethodKind] = {}
    for path in paths:
        for method, kind in kinds_from_descriptor_set(path).items():
            kinds.setdefault(method, kind)
    return kinds
