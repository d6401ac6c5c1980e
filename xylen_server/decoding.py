"""Request bytes that do not parse, for every gRPC server of the project (the model server's
admission and the coordinator's): grpc's Python server answers a request whose deserializer
raises with UNKNOWN, the exception's name and a logged traceback per call. :func:`tolerant`
wraps a method's deserializer so that it never raises: bytes that do not parse become an
:class:`Undecodable` marker, which the handler refuses with :func:`refusal` (INVALID_ARGUMENT,
reason UNDECODABLE_REQUEST, a short message that quotes none of the bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from xylen_server.errors import InvalidArgument


class Undecodable:
    """What a :func:`tolerant` deserializer returns for bytes it cannot parse."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _as_is(message: Any, size: int) -> Any:
    return message


def tolerant(
    deserialize: Callable[[bytes], Any], decoded: Callable[[Any, int], Any] = _as_is
) -> Callable[[bytes], Any]:
    """``deserialize`` that never raises: :class:`Undecodable` for bytes that do not parse,
    else ``decoded(message, size of its bytes)`` (the message itself by default)."""

    def decode(data: bytes) -> Any:
        try:
            message = deserialize(data)
        except (DecodeError, ValueError, TypeError, RuntimeError):
            # upb raises DecodeError; other deserializers their own. Never UNKNOWN.
            return Undecodable(len(data))
        return decoded(message, len(data))

    return decode


def refusal(raw: Undecodable) -> InvalidArgument:
    """The error an undecodable request is answered with."""
    return InvalidArgument(
        f"the request message ({raw.size} bytes) could not be decoded as the method's request type",
        reason="UNDECODABLE_REQUEST",
        size=raw.size,
    )
