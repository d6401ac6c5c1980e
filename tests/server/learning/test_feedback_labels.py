"""Feedback labels are training labels: on the bars of a real Binance Vision file, the labels a
real server stores from trade outcomes (long and short trades, wins and losses, sent with the
underlying's return or with only side and trade return) equal the labels training gives the
same bars, by the one rule in training/labels.py. An outcome that cannot say which way the
price went is refused with a reason, never stored as a guess."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input, write_model
from learning_helpers import learning_settings

from training import features
from training.klines import interval_ms, load_klines
from training.labels import binary_labels
from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

REAL = "jamado95__whatever/BTCUSDT-1h-2024-01.csv"
HORIZON, FEE, THRESHOLD = 3, 0.001, 0.0005
LONG, SHORT = pb.TradeSide.TRADE_SIDE_LONG, pb.TradeSide.TRADE_SIDE_SHORT


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, candles
) -> Iterator[tuple[InProcessServer, pb_grpc.ModelServiceStub]]:
    root = tmp_path_factory.mktemp("labels")
    model_dir = write_model(root / "models", "model_1", "lightgbm", candles, trees=20)
    meta = ModelMetadata.read(model_dir)
    dataclasses.replace(meta, horizon=HORIZON, fee=FEE, label_threshold=THRESHOLD).write(model_dir)
    server = InProcessServer(learning_settings(root))
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.ModelServiceStub(channel)
    server.close()


def _request(pid: str, row: np.ndarray, side: int, realized: float, log_return: float | None):
    outcome = pb.TradeOutcome(pnl=realized * 1000.0, realized_return=realized, side=side)  # type: ignore[arg-type]
    if log_return is not None:
        outcome.underlying_log_return = log_return
    outcome.close_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    return pb.FeedbackRequest(
        prediction_id=pid,
        outcome=outcome,
        features=types_pb2.FeatureVector(values=row.astype(np.float64).tolist()),
    )


def test_feedback_labels_equal_training_labels_on_real_klines(live, real_file):
    server, stub = live
    klines = load_klines(real_file(REAL))
    candles = features.candles_from_frame(klines.frame)
    step = interval_ms(klines.interval)
    offline = binary_labels(
        candles["open_time"],
        candles["close"],
        horizon=HORIZON,
        step_ms=step,
        fee=FEE,
        threshold=THRESHOLD,
    )
    x = features.compute_features(candles).astype(np.float32)
    bars = np.flatnonzero(np.isfinite(x).all(axis=1) & np.isfinite(offline))
    assert len(bars) > 500

    open_time, close = candles["open_time"], candles["close"]
    index = {int(t): i for i, t in enumerate(open_time)}
    expected: dict[str, float] = {}
    kinds: Counter[str] = Counter()
    pending = []
    for bar in bars:
        later = index[int(open_time[bar]) + HORIZON * step]  # the bar the label looks at
        entry, exit_ = float(close[bar]), float(close[later])
        move = math.log(exit_ / entry)
        trades = (
            # (side, the trade's return before fees, the underlying's return sent or not)
            ("long", LONG, exit_ / entry - 1.0, None),
            ("short", SHORT, 1.0 - exit_ / entry, None),
            ("short+move", SHORT, 1.0 - exit_ / entry, move),
        )
        for name, side, realized, sent in trades:
            pid = f"{name}-{int(open_time[bar])}"
            expected[pid] = float(offline[bar])
            kinds[f"{name} {'win' if realized > 0 else 'loss'}"] += 1
            pending.append(stub.Feedback.future(_request(pid, x[bar], side, realized, sent)))
            if len(pending) >= 64:
                assert all(not f.result().duplicate for f in pending)
                pending.clear()
    assert all(not f.result().duplicate for f in pending)

    samples = server.running.feedback.require_store().read_samples()
    # The server is the module's: the other tests' outcomes are in its store too.
    mine = [
        (pid, label)
        for pid, label in zip(
            samples["prediction_id"].to_list(), samples["label"].to_list(), strict=True
        )
        if pid in expected
    ]
    stored = dict(mine)
    assert len(mine) == len(stored) == len(expected)  # each outcome stored once, none missing
    wrong = [pid for pid, label in expected.items() if stored[pid] != label]
    assert wrong == []
    # The cases that matter occurred: wins and losses on both sides, and labels the trade's
    # profit alone would have got wrong (a winning short is a down move; a rise below the fee
    # is not an up move).
    for kind in ("long win", "long loss", "short win", "short loss"):
        assert kinds[kind] > 50, kinds
    realized = dict(
        zip(samples["prediction_id"].to_list(), samples["realized_return"].to_list(), strict=True)
    )
    profit_rule_wrong = sum((realized[pid] > 0) != bool(stored[pid]) for pid in expected)
    assert profit_rule_wrong > len(bars)
    ups = sum(expected[f"long-{int(open_time[b])}"] for b in bars)
    print(
        f"label equality: {len(bars)} real bars of {REAL}, {len(expected)} outcomes "
        f"({dict(sorted(kinds.items()))}), {int(ups)} up / {len(bars) - int(ups)} not up, "
        f"0 mismatches; the old rule (realized_return > 0) would mislabel {profit_rule_wrong}"
    )


@pytest.mark.parametrize(
    ("side", "realized", "move", "reason"),
    [
        (0, 0.02, None, "MISSING_UNDERLYING_MOVE"),
        (7, 0.02, None, "INVALID_OUTCOME"),
        (LONG, 0.02, float("nan"), "INVALID_OUTCOME"),
        (SHORT, 1.5, None, "INVALID_OUTCOME"),
    ],
)
def test_an_outcome_that_cannot_say_which_way_the_price_went_is_refused(
    live, feature_rows, side, realized, move, reason
):
    server, stub = live
    pid = f"refused-{reason}-{side}"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Feedback(_request(pid, feature_rows[0], side, realized, move))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == reason
    assert len(caught.value.details()) < 300
    assert pid not in server.running.feedback.require_store()


def test_a_profitable_short_is_stored_as_a_down_move(live, feature_rows):
    server, stub = live
    stub.Feedback(_request("short-win", feature_rows[1], SHORT, 0.03, None))
    stub.Feedback(_request("long-win", feature_rows[1], LONG, 0.03, None))
    stub.Feedback(_request("long-win-by-less-than-the-fee", feature_rows[1], LONG, 0.0004, None))
    samples = server.running.feedback.require_store().read_samples()
    labels = dict(zip(samples["prediction_id"].to_list(), samples["label"].to_list(), strict=True))
    assert labels["short-win"] == 0 and labels["long-win"] == 1
    assert labels["long-win-by-less-than-the-fee"] == 0
    sides = dict(zip(samples["prediction_id"].to_list(), samples["side"].to_list(), strict=True))
    assert sides["short-win"] == SHORT and sides["long-win"] == LONG


def test_live_accuracy_scores_the_label_not_the_profit(live, feature_rows):
    """The retrain trigger's live record scores the same label: a winning short after the
    model said P(up) >= 0.5 is a wrong call, a winning long a right one."""
    server, stub = live
    rows = feature_rows[200:400]
    answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))
    [up] = [p for p in answer.predictions if p.probability_up >= 0.5][:1] or [None]
    [down] = [p for p in answer.predictions if p.probability_up < 0.5][:1] or [None]
    assert up is not None and down is not None
    outcomes = server.running.feedback.outcomes
    checks = [
        (up.prediction_id, SHORT, 0.03, False),  # the price fell: P(up) >= 0.5 was wrong
        (down.prediction_id, LONG, 0.03, False),  # the price rose: P(up) < 0.5 was wrong
    ]
    for pid, side, realized, right in checks:
        request = _request(pid, np.zeros(0), side, realized, None)
        request.ClearField("features")
        request.outcome.close_time.FromDatetime(datetime.now(UTC))
        stub.Feedback(request)
        assert outcomes[-1] is right
