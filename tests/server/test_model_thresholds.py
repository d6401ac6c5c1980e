"""Each model's own thresholds and features, served: trained by the pipeline, read from the
metadata, shown in GetModelInfo, overridden by BUY_THRESHOLD / SELL_THRESHOLD, applied to every
signal; and two models with different LOOKBACK_PERIODS / FEATURES served side by side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
from errorinfo import error_info
from metrics_page import by_label, scrape

from training import features as F
from training.config import load_config
from training.metadata import NATIVE_FILES, ModelMetadata
from training.pipeline import prepare_data, train_model
from training.thresholds import RULE
from training.trainers import MODEL_CLASSES
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.signals import signal_for

SUBSET = ("realized_vol_60", "log_return_1", "rsi_14", "taker_buy_ratio_20", "time_of_day")
SHORT = 61


@pytest.fixture(scope="module")
def trained(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``full`` (every feature over 100 candles) and ``short`` (five features over 61), trained
    by the pipeline in one run, as ``make train`` does."""
    root = tmp_path_factory.mktemp("own-thresholds")
    config = load_config(
        overrides={
            "data": str(small_dataset),
            "params": {t: {"n_estimators": 60, "early_stopping_rounds": 15} for t in NATIVE_FILES},
            "models": [
                {"name": "full"},
                {"name": "short", "lookback_periods": SHORT, "features": list(SUBSET)},
            ],
        },
        environ={},
    )
    data = prepare_data(config)
    for spec in config.models:
        train_model(spec, config, data, root)
    return root


def _serve(root: Path, name: str, **settings: object) -> harness.InProcessServer:
    return harness.InProcessServer(harness.server_settings(root, model_name=name, **settings))


@pytest.fixture(scope="module")
def full(trained: Path) -> Iterator[pb_grpc.ModelServiceStub]:
    server = _serve(trained, "full")
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ModelServiceStub(channel)
    server.close()


def _info(stub: pb_grpc.ModelServiceStub) -> pb.ModelInfo:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_info


def test_thresholds_travel_from_validation_to_every_signal(
    trained: Path, full: pb_grpc.ModelServiceStub, candles: dict[str, np.ndarray]
) -> None:
    meta = ModelMetadata.read(trained / "full")
    own = meta.signal_thresholds
    assert own["rule"] == RULE and 0 < own["sell"] < own["buy"] < 1
    info = _info(full)
    assert (info.buy_threshold, info.sell_threshold) == (own["buy"], own["sell"])
    assert info.threshold_source == pb.THRESHOLD_SOURCE_MODEL
    assert info.threshold_rule == RULE
    assert (info.horizon, info.fee, info.label_threshold) == (1, 0.001, 0.0)
    # What the thresholds did on their validation bars travels with them, figure for figure.
    figures = own["validation"]
    assert info.HasField("signal_validation")
    v = info.signal_validation
    assert v.samples == figures["samples"] > 0
    for side in ("buy", "sell"):
        assert getattr(v, f"{side}_share") == figures[f"{side}_share"]
        assert getattr(v, f"{side}_mean_net_return") == figures[f"{side}_mean_net_return"]
        assert getattr(v, f"{side}_edge") is figures[f"{side}_edge"]
        assert figures[f"{side}_edge"] == (figures[f"{side}_mean_net_return"] > 0)

    windows = [harness.window_input(candles, end) for end in range(150, 3000, 7)]
    answer = full.Predict(pb.PredictRequest(inputs=windows))
    seen = set()
    for p in answer.predictions:
        expected = signal_for(p.probability_up, own["buy"], own["sell"])
        assert p.signal == expected.proto
        seen.add(expected)
    assert len(seen) == 3, "a model's own thresholds give BUY, SELL and HOLD on its data"


def test_environment_overrides_a_real_server(trained: Path) -> None:
    own = ModelMetadata.read(trained / "full").signal_thresholds
    process = harness.start_server(trained, "full", env={"BUY_THRESHOLD": "0.99"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            info = _info(stub)
            assert (info.buy_threshold, info.sell_threshold) == (0.99, own["sell"])
            assert info.threshold_source == pb.THRESHOLD_SOURCE_ENVIRONMENT
            row = F.compute_features(harness.synthetic_candles(400, seed=2))[-1]
            p = stub.Predict(pb.PredictRequest(inputs=[harness.feature_input(row)]))
            prediction = p.predictions[0]
            assert prediction.probability_up < 0.99
            assert (
                prediction.signal == signal_for(prediction.probability_up, 0.99, own["sell"]).proto
            )
    finally:
        process.stop()


def test_an_override_that_crosses_the_models_threshold_stops_the_start(trained: Path) -> None:
    own = ModelMetadata.read(trained / "full").signal_thresholds
    with pytest.raises(RuntimeError, match="exited 2") as caught:
        harness.start_server(trained, "full", env={"SELL_THRESHOLD": f"{own['buy'] + 0.01}"})
    assert "SELL threshold" in str(caught.value) and "SELL_THRESHOLD" in str(caught.value)


def test_a_model_without_thresholds_keeps_the_defaults(tmp_path: Path) -> None:
    harness.write_model(tmp_path, "old", trees=10)  # metadata as written before thresholds
    assert ModelMetadata.read(tmp_path / "old").signal_thresholds == {}
    server = _serve(tmp_path, "old")
    try:
        with grpc.insecure_channel(server.address) as channel:
            info = _info(pb_grpc.ModelServiceStub(channel))
    finally:
        server.close()
    assert (info.buy_threshold, info.sell_threshold) == (0.55, 0.45)
    assert info.threshold_source == pb.THRESHOLD_SOURCE_DEFAULT and info.threshold_rule == ""
    assert not info.HasField("signal_validation")  # none recorded: unset, not zeros


def test_models_with_different_lookback_and_features_serve_side_by_side(
    trained: Path, full: pb_grpc.ModelServiceStub, candles: dict[str, np.ndarray]
) -> None:
    short_meta = ModelMetadata.read(trained / "short")
    assert (short_meta.lookback, tuple(short_meta.feature_names)) == (SHORT, SUBSET)
    server = _serve(trained, "short")
    try:
        with grpc.insecure_channel(server.address) as channel:
            short = pb_grpc.ModelServiceStub(channel)
            info = _info(short)
            assert (info.lookback, tuple(info.feature_names)) == (SHORT, SUBSET)
            assert info.features_hash == F.FeatureSet(SUBSET, SHORT).definitions_hash()
            assert info.features_hash != _info(full).features_hash

            ends = [400, 1234, 2999]
            by_window = short.Predict(
                pb.PredictRequest(inputs=[harness.window_input(candles, e, SHORT) for e in ends])
            )
            # The same numbers as training code computes for this model, on its native booster.
            offline = F.FeatureSet(SUBSET, SHORT).compute(candles)[ends]
            native = MODEL_CLASSES["lightgbm"].load(trained / "short", list(SUBSET))
            expected = native.predict_proba(offline.astype(np.float32))
            got = [p.raw_probability_up for p in by_window.predictions]  # before calibration
            assert got == pytest.approx(expected.tolist(), abs=1e-5)
            by_vector = short.Predict(
                pb.PredictRequest(inputs=[harness.feature_input(row) for row in offline])
            )
            assert [p.raw_probability_up for p in by_vector.predictions] == got

            # The full model, beside it, still needs its 100 candles and its 25 features.
            with pytest.raises(grpc.RpcError) as caught:
                full.Predict(pb.PredictRequest(inputs=[harness.window_input(candles, 400, SHORT)]))
            assert error_info(caught.value).reason == "WINDOW_TOO_SHORT"
            with pytest.raises(grpc.RpcError) as caught:
                short.Predict(pb.PredictRequest(inputs=[harness.feature_input(np.zeros(25))]))
            assert error_info(caught.value).reason == "FEATURE_COUNT_MISMATCH"
            answer = full.Predict(pb.PredictRequest(inputs=[harness.window_input(candles, 400)]))
            assert answer.predictions[0].model_name == "full"
    finally:
        server.close()


def test_a_model_whose_features_are_not_defined_is_refused(trained: Path, tmp_path: Path) -> None:
    import shutil

    from xylen_server.errors import ModelLoadError
    from xylen_server.serving.model_store import load_model

    bad = tmp_path / "short"
    shutil.copytree(trained / "short", bad)
    meta = ModelMetadata.read(bad)
    ModelMetadata.from_dict({**meta.to_dict(), "lookback": 40}).write(bad)
    with pytest.raises(ModelLoadError, match="LOOKBACK_PERIODS=40 is shorter"):
        load_model(harness.server_settings(tmp_path, model_name="short"))


def _edges(server: harness.InProcessServer) -> dict[str, float]:
    """The ``xylen_model_signal_edge`` samples of the server's /metrics, by side."""
    return by_label(scrape(server.running.metrics_port), "xylen_model_signal_edge", "side")


def test_the_signal_edge_is_exported_by_side_and_absent_when_not_recorded(
    trained: Path, tmp_path: Path
) -> None:
    figures = ModelMetadata.read(trained / "full").signal_thresholds["validation"]
    server = _serve(trained, "full")
    try:
        assert _edges(server) == {
            "buy": float(figures["buy_edge"]),
            "sell": float(figures["sell_edge"]),
        }
    finally:
        server.close()
    harness.write_model(tmp_path, "old", trees=10)  # no thresholds, no figures
    server = _serve(tmp_path, "old")
    try:
        assert _edges(server) == {}
    finally:
        server.close()
