"""PredictStream: many requests on one HTTP/2 stream, each answered with its own status."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, server_settings, window_input

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc


def _item(
    request_id: str, *inputs: pb.PredictInput, timeout_ms: int = 0
) -> pb.PredictStreamRequest:
    item = pb.PredictStreamRequest(request_id=request_id, request=pb.PredictRequest(inputs=inputs))
    if timeout_ms:
        item.timeout.FromMilliseconds(timeout_ms)
    return item


def test_interleaved_requests_with_one_bad_item_in_the_middle(stub, candles, feature_rows):
    items = []
    for i in range(120):
        if i == 60:
            items.append(_item("bad", feature_input(feature_rows[0][:3])))
        elif i % 3 == 0:
            items.append(_item(f"c{i}", window_input(candles, 300 + i)))
        else:
            items.append(
                _item(f"f{i}", feature_input(feature_rows[i]), feature_input(feature_rows[i + 1]))
            )
    answers = {r.request_id: r for r in stub.PredictStream(iter(items))}

    assert set(answers) == {item.request_id for item in items}
    bad = answers.pop("bad")
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.reason == "FEATURE_COUNT_MISMATCH"
    assert "3 feature values" in bad.status.message
    assert not bad.HasField("response")
    assert all(a.status.code == 0 for a in answers.values())

    # Each answer is the one for its own request: compare with unary Predict of the same rows.
    for item in items:
        if item.request_id == "bad":
            continue
        unary = stub.Predict(item.request)
        streamed = answers[item.request_id].response
        assert [p.probability_up for p in streamed.predictions] == [
            p.probability_up for p in unary.predictions
        ]


def test_an_item_without_request_id_is_refused_alone(stub, feature_rows):
    items = [_item("", feature_input(feature_rows[0])), _item("ok", feature_input(feature_rows[1]))]
    answers = list(stub.PredictStream(iter(items)))
    by_id = {a.request_id: a for a in answers}
    assert by_id[""].status.reason == "MISSING_REQUEST_ID"
    assert by_id["ok"].status.code == 0


def test_requests_and_answers_flow_on_an_open_stream(stub, feature_rows):
    """The client sends the next request only after the previous answer: proves the server
    answers items while the stream stays open (no waiting for half-close)."""
    outbox: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    responses = stub.PredictStream(requests())
    for i in range(20):
        outbox.put(_item(str(i), feature_input(feature_rows[i])))
        assert next(responses).request_id == str(i)
    outbox.put(None)
    assert list(responses) == []


@pytest.fixture(scope="module")
def slow_server(models_root):
    running = InProcessServer(server_settings(models_root, inference_delay_ms=300.0))
    yield running
    running.close()


def test_an_item_past_its_own_timeout_gets_deadline_exceeded(slow_server, feature_rows):
    with grpc.insecure_channel(slow_server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        items = [
            _item("late", feature_input(feature_rows[0]), timeout_ms=30),
            _item("fine", feature_input(feature_rows[1]), timeout_ms=20_000),
        ]
        by_id = {a.request_id: a for a in stub.PredictStream(iter(items))}
    assert by_id["late"].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert by_id["late"].status.reason == "ITEM_DEADLINE_EXCEEDED"
    assert by_id["fine"].status.code == 0


def test_an_id_still_in_flight_is_refused_for_the_repeat_alone(slow_server, feature_rows):
    # The first "same" takes 300 ms; a second "same" read meanwhile is refused on its own (two
    # answers with one id could not be told apart; they were both answered, in either order).
    # Once its answer is out, an id may be used again.
    outbox: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    with grpc.insecure_channel(slow_server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        answers = stub.PredictStream(requests(), timeout=30)
        outbox.put(_item("same", feature_input(feature_rows[0]), feature_input(feature_rows[1])))
        outbox.put(_item("same", feature_input(feature_rows[2])))
        outbox.put(_item("other", feature_input(feature_rows[3])))
        first = [next(answers) for _ in range(3)]
        outbox.put(_item("same", feature_input(feature_rows[4])))  # the first's answer is out
        outbox.put(None)
        last = list(answers)
    refused = [a for a in first if a.status.code != 0]
    assert len(refused) == 1
    assert refused[0].request_id == "same"
    assert refused[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused[0].status.reason == "DUPLICATE_REQUEST_ID"
    answered = {a.request_id: len(a.response.predictions) for a in first if a.status.code == 0}
    assert answered == {"same": 2, "other": 1}  # the first "same" is answered as sent
    assert [(a.request_id, a.status.code, len(a.response.predictions)) for a in last] == [
        ("same", 0, 1)
    ]


def test_unary_deadline_is_honoured_and_the_server_keeps_serving(slow_server, feature_rows):
    with grpc.insecure_channel(slow_server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(stub.Predict(request, timeout=30).predictions) == 1


def test_many_concurrent_streams(stub, feature_rows):
    results: dict[int, list[str]] = {}

    def run(k: int) -> None:
        items = [_item(f"{k}-{i}", feature_input(feature_rows[i])) for i in range(50)]
        results[k] = sorted(
            a.request_id for a in stub.PredictStream(iter(items)) if a.status.code == 0
        )

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: sorted(f"{k}-{i}" for i in range(50)) for k in range(8)}


def test_stream_probabilities_are_finite(stub, feature_rows):
    items = [_item(str(i), feature_input(feature_rows[i])) for i in range(30)]
    probs = [a.response.predictions[0].probability_up for a in stub.PredictStream(iter(items))]
    assert np.isfinite(probs).all() and all(0.0 <= p <= 1.0 for p in probs)


def test_a_message_above_the_size_limit_is_refused(models_root, feature_rows):
    small = InProcessServer(server_settings(models_root, max_message_bytes=64 * 1024))
    try:
        with grpc.insecure_channel(small.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            big = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:1000]])
            assert big.ByteSize() > 64 * 1024
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(big)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            fits = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:100]])
            assert len(stub.Predict(fits).predictions) == 100
    finally:
        small.close()
