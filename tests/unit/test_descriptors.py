"""Descriptor sets: method kinds from protoc's --descriptor_set_out, and bad files named."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from lbgw.config import MethodKind
from lbgw.descriptors import (
    DescriptorSetError,
    kinds_from_descriptor_set,
    kinds_from_descriptor_sets,
)


def _write(path: Path, package: str, methods: dict[str, tuple[bool, bool]]) -> str:
    files = descriptor_pb2.FileDescriptorSet()
    proto = files.file.add(name=f"{package or 'none'}.proto", package=package)
    service = proto.service.add(name="S")
    for name, (client, server) in methods.items():
        service.method.add(
            name=name,
            input_type=".x.M",
            output_type=".x.M",
            client_streaming=client,
            server_streaming=server,
        )
    path.write_bytes(files.SerializeToString())
    return str(path)


def test_every_kind_is_read_from_the_streaming_flags(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.protoset",
        "pkg.v1",
        {"U": (False, False), "SS": (False, True), "CS": (True, False), "B": (True, True)},
    )
    assert kinds_from_descriptor_set(path) == {
        "/pkg.v1.S/U": MethodKind.UNARY,
        "/pkg.v1.S/SS": MethodKind.SERVER_STREAMING,
        "/pkg.v1.S/CS": MethodKind.CLIENT_STREAMING,
        "/pkg.v1.S/B": MethodKind.BIDI_STREAMING,
    }


def test_a_service_without_a_package_and_the_first_file_wins(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.protoset", "", {"M": (False, False)})
    second = _write(tmp_path / "b.protoset", "", {"M": (True, True), "N": (True, False)})
    assert kinds_from_descriptor_sets((first, second)) == {
        "/S/M": MethodKind.UNARY,
        "/S/N": MethodKind.CLIENT_STREAMING,
    }


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read it"),
        (b"\x0a\xff\xff", "not a FileDescriptorSet"),
        (b"", "no service in it"),
    ],
    ids=["missing", "garbled", "empty"],
)
def test_a_bad_file_is_named_with_why(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / "x.protoset"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DescriptorSetError, match=rf"^{path}: {why}"):
        kinds_from_descriptor_set(str(path))
