"""Registers the Regulator service on a gRPC server.

As the generated ``add_RegulatorServicer_to_server``, with one difference: ``GetSession`` answers
``bytes`` that already are a serialized ``GetSessionResponse`` (history pages are encoded once and
cached, ``history.py``), so its serializer passes bytes through instead of serializing a message.
Streaming methods (``ReportStream``) get stream handlers; a stream message that does not decode
becomes ``servicer.Undecodable`` (the servicer answers INVALID_ARGUMENT, not grpcio's INTERNAL).
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from inforeg.regulator.v1 import regulator_pb2 as pb

from .servicer import Undecodable

SERVICE = pb.DESCRIPTOR.services_by_name["Regulator"]
PREENCODED = frozenset({"GetSession"})


def _passthrough(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, with a message that does not decode returned as ``Undecodable``."""

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Undecodable(str(exc) or type(exc).__name__)

    return parse_or_mark


def add_regulator_servicer(servicer: Any, server: grpc.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        if method.client_streaming or method.server_streaming:  # ReportStream: bidirectional
            assert method.client_streaming and method.server_streaming, method.name
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=tolerant(request_type.FromString),
                response_serializer=response_type.SerializeToString,
            )
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request_type.FromString,
            response_serializer=_passthrough if method.name in PREENCODED else response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
