"""Fuzzing a live server process: random and adversarial messages of every RPC, and raw bytes
through a generic channel, must each get a proper status (never UNKNOWN or INTERNAL); the
server must keep answering a fixed request identically, and its RSS stay bounded over the run.

Bounded: a fixed number of examples per RPC, no deadline per example, no example database.

Each campaign (one RPC family) runs once per module through the ``campaigns`` fixture, which
keeps what it tried: a fuzz test runs its own campaign, and the summary test runs whichever
have not run yet, so the tests pass alone, in any order, or shuffled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import ServerProcess, feature_input, start_server, window_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

EXAMPLES = 120
IMPROPER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
IMPROPER_NUMBERS = {code.value[0] for code in IMPROPER}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fuzzed(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("fuzz-data")
    server = start_server(
        models_root,
        env={
            "FEEDBACK_DATA_DIR": str(data),
            "RETRAIN_AUTO": "false",
            "RETRAIN_MIN_SAMPLES": "1000000",  # a fuzzed Retrain never trains
            "LOG_LEVEL": "WARNING",
        },
        log_dir=data,
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def fuzz_channel(fuzzed: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def fuzz_stub(fuzz_channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(fuzz_channel)


@pytest.fixture(scope="module")
def baseline(fuzzed, fuzz_stub, feature_rows, candles):
    """A fixed request, its answer before the fuzzing, and the server's RSS then (warmed)."""
    request = pb.PredictRequest(inputs=[feature_input(feature_rows[7]), window_input(candles, 900)])
    for _ in range(50):
        answer = fuzz_stub.Predict(request, timeout=10)
    return request, answer, _rss_kib(fuzzed.proc.pid)


class Tally:
    """Every call made and every improper status seen, for the summary."""

    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.improper: list[str] = []

    def check(self, name: str, call, *args) -> None:
        """Make one call; any status but UNKNOWN/INTERNAL is proper."""
        self.tried[name] += 1
        try:
            result = call(*args, timeout=20)
            if isinstance(result, Iterator):
                for answer in result:
                    if isinstance(answer, pb.PredictStreamResponse):
                        self.tried[name + " item"] += 1
                        if answer.status.code in IMPROPER_NUMBERS:
                            self.improper.append(f"{name} item: {answer.status}")
        except grpc.RpcError as error:
            if error.code() in IMPROPER:
                self.improper.append(f"{name}: {error.code()} {error.details()}")
        assert not self.improper, self.improper[-1]


class Campaigns:
    """The module's fuzz campaigns against one server, each run at most once (``run``), and
    the tally of all that ran."""

    def __init__(self, stub, channel, candles, feature_rows) -> None:
        self.stub, self.channel = stub, channel
        self.base = window_input(candles, 700)
        self.n_features = feature_rows.shape[1]
        self.tally = Tally()
        self.done: set[str] = set()

    def run(self, name: str) -> Tally:
        if name not in self.done:
            CAMPAIGNS[name](self)
            self.done.add(name)
        return self.tally

    def run_all(self) -> Tally:
        for name in CAMPAIGNS:
            self.run(name)
        return self.tally


@pytest.fixture(scope="module")
def campaigns(fuzz_stub, fuzz_channel, baseline, candles, feature_rows) -> Campaigns:
    """After ``baseline``: the fixed request's answer and RSS are taken before any fuzzing."""
    return Campaigns(fuzz_stub, fuzz_channel, candles, feature_rows)


# -- strategies -------------------------------------------------------------------------------

texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=200),
    st.sampled_from(["", "model_1", "x" * 5000, "\x00", "é" * 300, "../../etc/passwd"]),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-320, 3.5e38, -3.5e38, 1e308, float("nan"), float("inf")]),
)
int64s = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**62, -(2**62), 253_402_300_800, 1_700_000_000]),
)
int32s = st.integers(-(2**31), 2**31 - 1)
nanos = st.one_of(int32s, st.sampled_from([0, -1, 999_999_999, 1_000_000_000]))


@st.composite
def candle_windows(draw, base: pb.PredictInput) -> pb.PredictInput:
    """A real window with some candles spoiled, or a random short one."""
    if draw(st.booleans()):
        window = pb.PredictInput()
        window.CopyFrom(base)
        for _ in range(draw(st.integers(0, 3))):
            candle = window.candles.candles[draw(st.integers(0, len(window.candles.candles) - 1))]
            field = draw(
                st.sampled_from(["open", "high", "low", "close", "volume", "time", "nanos"])
            )
            if field == "time":
                candle.open_time.seconds = draw(int64s)
            elif field == "nanos":
                candle.open_time.nanos = draw(nanos)
            else:
                setattr(candle, field, draw(floats))
        return window
    candles = []
    for _ in range(draw(st.integers(0, 8))):
        candle = types_pb2.Candle(
            open=draw(floats), high=draw(floats), low=draw(floats), close=draw(floats)
        )
        if draw(st.booleans()):
            candle.open_time.seconds = draw(int64s)
            candle.open_time.nanos = draw(nanos)
        candles.append(candle)
    return pb.PredictInput(candles=types_pb2.CandleWindow(candles=candles))


@st.composite
def predict_requests(draw, base: pb.PredictInput, n_features: int) -> pb.PredictRequest:
    inputs = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["features", "good", "candles", "empty"]))
        if kind == "features":
            size = draw(st.sampled_from([n_features, n_features, 0, 1, n_features + 1]))
            inputs.append(feature_input([draw(floats) for _ in range(size)]))
        elif kind == "good":
            inputs.append(feature_input(np.zeros(n_features)))
        elif kind == "candles":
            inputs.append(draw(candle_windows(base)))
        else:
            inputs.append(pb.PredictInput())
    return pb.PredictRequest(
        model_name=draw(st.sampled_from(["", "", "model_1"]) | texts), inputs=inputs
    )


# -- the fuzz campaigns -------------------------------------------------------------------------


def fuzz_predict(c: Campaigns) -> None:
    @FUZZ
    @given(data=st.data())
    def run(data):
        c.tally.check("Predict", c.stub.Predict, data.draw(predict_requests(c.base, c.n_features)))

    run()


def fuzz_predict_stream(c: Campaigns) -> None:
    @FUZZ
    @given(data=st.data())
    def run(data):
        items = []
        for _ in range(data.draw(st.integers(1, 5))):
            item = pb.PredictStreamRequest(
                request_id=data.draw(texts),
                request=data.draw(predict_requests(c.base, c.n_features)),
            )
            if data.draw(st.booleans()):
                item.timeout.seconds = data.draw(int64s)
                item.timeout.nanos = data.draw(nanos)
            items.append(item)
        c.tally.check("PredictStream", c.stub.PredictStream, iter(items))

    run()


def fuzz_feedback(c: Campaigns) -> None:
    @FUZZ
    @given(data=st.data())
    def run(data):
        request = pb.FeedbackRequest(
            prediction_id=data.draw(texts),
            outcome=pb.TradeOutcome(pnl=data.draw(floats), realized_return=data.draw(floats)),
        )
        if data.draw(st.booleans()):
            request.outcome.close_time.seconds = data.draw(int64s)
            request.outcome.close_time.nanos = data.draw(nanos)
        if data.draw(st.booleans()):
            size = data.draw(st.sampled_from([c.n_features, 0, 3]))
            request.features.values.extend(data.draw(floats) for _ in range(size))
        c.tally.check("Feedback", c.stub.Feedback, request)

    run()


def fuzz_admin_and_info(c: Campaigns) -> None:
    stub, check = c.stub, c.tally.check

    @FUZZ
    @given(
        name=texts,
        version=int64s,
        mode=int32s,
        min_samples=int64s,
        dry_run=st.booleans(),
    )
    def run(name, version, mode, min_samples, dry_run):
        check("GetModelInfo", stub.GetModelInfo, pb.GetModelInfoRequest(model_name=name))
        check(
            "ListModelVersions",
            stub.ListModelVersions,
            pb.ListModelVersionsRequest(model_name=name),
        )
        check("RollbackModel", stub.RollbackModel, pb.RollbackModelRequest(version=version))
        check(
            "Retrain",
            stub.Retrain,
            pb.RetrainRequest(mode=mode, min_samples=min_samples, dry_run=dry_run),
        )
        check("WatchRetrain", stub.WatchRetrain, pb.WatchRetrainRequest(job_id=name))

    run()
    check("ReloadModel", stub.ReloadModel, pb.ReloadModelRequest())


METHODS = [
    ("/xylen.v1.ModelService/Predict", "unary"),
    ("/xylen.v1.ModelService/PredictStream", "stream"),
    ("/xylen.v1.ModelService/Feedback", "unary"),
    ("/xylen.v1.ModelService/Retrain", "unary"),
    ("/xylen.v1.ModelService/GetModelInfo", "unary"),
    ("/xylen.v1.ModelService/WatchRetrain", "server-stream"),
    ("/xylen.v1.ModelService/ListModelVersions", "unary"),
    ("/xylen.v1.ModelService/RollbackModel", "unary"),
    ("/xylen.v1.ModelService/ReloadModel", "unary"),
    ("/grpc.health.v1.Health/Check", "unary"),
]
#: Bytes that are nearly valid: invalid UTF-8 in a string field, a length past the end, a
#: varint that never ends, a group tag, a huge field number, a nested message cut short.
ADVERSARIAL = [
    b"\x0a\x02\xff\xfe",
    b"\x0a\x7f",
    b"\x08" + b"\xff" * 12,
    b"\x0b\x0c",
    b"\xf8\xff\xff\xff\x0f\x01",
    b"\x12\x05\x0a\x03\x0a\x01",
    b"\x12\x02\x12\x00" * 1000,
    b"",
]


def fuzz_raw_bytes(c: Campaigns) -> None:
    def send(method: str, shape: str, data: bytes) -> None:
        if shape == "unary":
            c.tally.check("raw " + method, c.channel.unary_unary(method), data)
        elif shape == "server-stream":
            c.tally.check("raw " + method, c.channel.unary_stream(method), data)
        else:
            c.tally.check("raw " + method, c.channel.stream_stream(method), iter([data, data]))

    for method, shape in METHODS:
        for data in ADVERSARIAL:
            send(method, shape, data)

    @FUZZ
    @given(index=st.integers(0, len(METHODS) - 1), data=st.binary(max_size=3000))
    def run(index, data):
        send(*METHODS[index], data)

    run()


CAMPAIGNS = {
    "Predict": fuzz_predict,
    "PredictStream": fuzz_predict_stream,
    "Feedback": fuzz_feedback,
    "admin and info": fuzz_admin_and_info,
    "raw bytes": fuzz_raw_bytes,
}


# -- the tests ----------------------------------------------------------------------------------


def test_fuzz_predict(campaigns):
    assert campaigns.run("Predict").tried["Predict"] >= EXAMPLES


def test_fuzz_predict_stream(campaigns):
    tried = campaigns.run("PredictStream").tried
    assert tried["PredictStream"] >= EXAMPLES and tried["PredictStream item"] >= EXAMPLES


def test_fuzz_feedback(campaigns):
    assert campaigns.run("Feedback").tried["Feedback"] >= EXAMPLES


def test_fuzz_admin_and_info(campaigns):
    tried = campaigns.run("admin and info").tried
    assert tried["Retrain"] >= EXAMPLES and tried["ReloadModel"] >= 1


def test_fuzz_raw_bytes(campaigns):
    tried = campaigns.run("raw bytes").tried
    assert sum(n for name, n in tried.items() if name.startswith("raw ")) >= EXAMPLES


def test_after_the_fuzzing_the_same_answer_and_bounded_memory(
    fuzzed, fuzz_stub, baseline, campaigns
):
    """After every campaign (those the other tests did not run yet run here first)."""
    tally = campaigns.run_all()
    request, before, rss_before = baseline
    after = fuzz_stub.Predict(request, timeout=10)
    assert [p.probability_up for p in after.predictions] == [
        p.probability_up for p in before.predictions
    ]
    assert [p.signal for p in after.predictions] == [p.signal for p in before.predictions]
    assert all(math.isfinite(p.probability_up) for p in after.predictions)
    rss_after = _rss_kib(fuzzed.proc.pid)
    total = sum(n for name, n in tally.tried.items() if not name.endswith(" item"))
    items = sum(n for name, n in tally.tried.items() if name.endswith(" item"))
    print(
        f"\nfuzz: {total} calls ({items} stream items), {len(tally.improper)} improper "
        f"statuses; server RSS {rss_before // 1024} MiB -> {rss_after // 1024} MiB"
    )
    assert campaigns.done == set(CAMPAIGNS)
    assert total >= 8 * EXAMPLES
    assert not tally.improper
    assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
    assert "Traceback" not in fuzzed.log()
