"""Python code generated from ``protos/lbgw/pb/interop`` (package ``grpc.testing``).

The gRPC interop test messages and services (``TestService``,
``UnimplementedService``), written for lbgw from the public interop spec with
upstream field numbers, so they are wire-compatible with other interop
clients and servers. ``setup.py`` runs ``protoc`` over them at build time and
writes ``empty_pb2``, ``messages_pb2`` and ``test_pb2`` (with ``.pyi`` stubs
and ``*_pb2_grpc`` modules) next to this file; nothing here is hand-written
or committed. Only the interop tests import them.
"""
