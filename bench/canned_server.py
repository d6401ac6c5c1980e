"""The floor of a generated servicer: a grpc.aio server of xylen's ``ModelService`` messages
whose ``Predict`` (registered as the generated code registers it) parses the request and
answers one canned prediction (the fields xylen sets, as long as its answer), with nothing
else: no interceptor, no validation, no model. ``python -m bench.canned_server`` prints
``canned listening on port N``.

Beside the bare echo (bytes in, the same bytes out) it measures what protobuf parsing, the
generated handler and a response of xylen's shape add; beside xylen with no engine call, what
xylen's own work per call is (``bench_server.without_the_engine``)."""

from __future__ import annotations

import asyncio
import signal

import grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.health import server_options
from xylen_server.settings import Settings

ANSWER = pb.PredictResponse(
    predictions=[
        pb.Prediction(
            prediction_id="0123456789ab-1f",
            probability_up=0.5123456789,
            signal=types_pb2.SIGNAL_HOLD,
            model_name="model_1",
            model_version=1,
            raw_probability_up=0.5012345678,
        )
    ]
)
ANSWER.inference_duration.nanos = 123_456


async def _predict(
    request: pb.PredictRequest, context: grpc.aio.ServicerContext
) -> pb.PredictResponse:
    return ANSWER


async def main() -> None:
    server = grpc.aio.server(options=server_options(Settings().max_message_bytes))
    # What the generated add_ModelServiceServicer_to_server registers for Predict.
    handler = grpc.unary_unary_rpc_method_handler(
        _predict,
        request_deserializer=pb.PredictRequest.FromString,
        response_serializer=pb.PredictResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("xylen.v1.ModelService", {"Predict": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"canned listening on port {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
