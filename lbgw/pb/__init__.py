"""Python code generated from ``protos/`` by grpcio-tools when lbgw is built.

Nothing here is written by hand or committed: ``setup.py`` runs ``protoc``
over every ``.proto`` file under ``protos/lbgw/pb`` and writes the
``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` modules next to this file.
lbgw's forwarding path never imports them; the demo backend, the tests and
the benchmarks do.
"""
