"""Traces across real servers: an ensemble call to a real coordinator gRPC server fans out to
three real model servers (and one address where nothing listens); the spans, collected in this
process by the SDK's in-memory exporter, share one trace id from the coordinator's server span
through every voting server's item span and its featurise, inference and log steps, and the
missing vote is an event on the fan-out span."""

from __future__ import annotations

from pathlib import Path

import grpc
import harness
import pytest
from coordinator.helpers import MODELS, endpoint, free_port, write_config
from opentelemetry.trace import SpanKind

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen_coordinator.config import load_config
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.server import build_server
from xylen_server.server import start

ITEM = "xylen.v1.ModelService/PredictStream item"


async def start_coordinator(config: Path):
    """The coordinator's gRPC server, built as ``serve`` builds it (on the servers' loop: grpc
    aio wants one loop per process)."""
    coordinator = AsyncCoordinator(load_config(config))
    running = await build_server(coordinator, "127.0.0.1", 0, metrics_port=0)
    await running.server.start()
    await coordinator.start()
    assert await coordinator.wait_serving(["model_1", "model_2", "model_3"], timeout=30)
    await running.set_serving(True)
    return coordinator, running


async def stop_coordinator(coordinator: AsyncCoordinator, running) -> None:
    await running.server.stop(0)
    await running.metrics_http.stop()
    await coordinator.close()


@pytest.mark.slow
def test_one_trace_spans_the_coordinator_and_every_server_that_voted(
    span_exporter, fleet_models, tmp_path, feature_rows
):
    names = [name for name, _, _ in MODELS[:3]]
    first = harness.InProcessServer(harness.server_settings(fleet_models, model_name=names[0]))
    others = []
    try:
        for name in names[1:]:  # on the first one's loop
            settings = harness.server_settings(fleet_models, model_name=name)
            others.append(first.call(start(settings)))
        ports = [first.running.port] + [o.port for o in others]
        endpoints = [endpoint(n, p, 1.0) for n, p in zip(names, ports, strict=True)]
        endpoints.append(endpoint("model_4", free_port(), 1.0))  # nothing listens there
        config = write_config(tmp_path / "config.yaml", endpoints, deadline_ms=5000)
        coordinator, running = first.call(start_coordinator(config))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = epb_grpc.EnsembleServiceStub(channel)
                request = epb.EnsembleServicePredictRequest(
                    inputs=[harness.feature_input(feature_rows[0])]
                )
                span_exporter.clear()
                response = stub.Predict(request, timeout=10)
        finally:
            first.call(stop_coordinator(coordinator, running))
    finally:
        for other in others:
            first.call(other.stop(0))
        first.close()

    voted = sorted(v.server_name for v in response.predictions[0].votes)
    assert voted == names
    assert [m.server_name for m in response.missing_votes] == ["model_4"]
    spans = span_exporter.get_finished_spans()
    [root] = [s for s in spans if s.name == "/xylen.v1.EnsembleService/Predict"]
    assert root.kind == SpanKind.SERVER
    trace_id = root.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]

    [fan_out] = [s for s in in_trace if s.name == "ensemble fan-out"]
    assert fan_out.parent.span_id == root.context.span_id
    missing = [e.attributes["xylen.endpoint"] for e in fan_out.events if e.name == "missing vote"]
    assert missing == ["model_4"]

    client_items = [s for s in in_trace if s.name == ITEM and s.kind == SpanKind.CLIENT]
    assert sorted(s.attributes["xylen.endpoint"] for s in client_items) == names
    assert {s.parent.span_id for s in client_items} == {fan_out.context.span_id}

    server_items = [s for s in in_trace if s.name == ITEM and s.kind == SpanKind.SERVER]
    assert sorted(s.attributes["xylen.model"] for s in server_items) == names
    client_ids = {s.context.span_id for s in client_items}
    assert {s.parent.span_id for s in server_items} <= client_ids
    for item in server_items:  # each server's steps, under its item span
        steps = sorted(
            s.name for s in in_trace if s.parent and s.parent.span_id == item.context.span_id
        )
        assert steps == ["featurise", "inference", "log"], (item.attributes, steps)
    # Nothing of this call left the trace.
    assert [s.name for s in spans if s.name in ("featurise", "inference", "log")].count(
        "inference"
    ) == len(names)
