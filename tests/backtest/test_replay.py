"""The walk-forward replay through the real stack (four server processes and the coordinator on
loopback, a simulated clock): the same data and settings give the same figures; no look-ahead
gains on a series whose future is independent of its past, a leaking window or feature is
caught by the guards; on real candles the accounting matches a hand computation from the raw
prices and the fee."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from backtest.__main__ import run
from backtest.accounting import bar_returns, metrics, side_of
from backtest.guard import LookAheadError, check_causal_features, check_window
from training.features import compute_features
from xylen.v1 import model_service_pb2 as pb
from xylen_server.candles import window_input

HOUR_MS = 3_600_000
FEE = 0.001


@pytest.fixture(scope="module")
def replay_models(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four default models trained by the training pipeline on the small dataset (so a
    retrain finds its training history, as in production)."""
    out = tmp_path_factory.mktemp("replay-models")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--data",
            str(small_dataset),
            "--models-dir",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_two_runs_of_the_same_data_and_settings_give_the_same_figures(
    small_dataset: Path, replay_models: Path, tmp_path: Path
) -> None:
    """Learning pass with a retrain inside the window (trigger every 100 outcomes): the
    report's figures, the retrains with the gate's numbers and every decision are identical."""
    reports = []
    for attempt in ("a", "b"):
        report, timing, paths = run(
            small_dataset,
            replay_models,
            tmp_path / attempt,
            bars=125,
            passes=("learning",),
            retrain_every=100,
            retrain_min_samples=100,
            progress=False,
        )
        assert timing["learning"]["exit_codes"] == {
            "coordinator": 0,
            "model_1": 0,
            "model_2": 0,
            "model_3": 0,
            "model_4": 0,
        }
        assert paths["png"].stat().st_size > 10_000
        assert "| ensemble adaptive (learning) |" in paths["markdown"].read_text()
        reports.append(paths["json"].read_bytes())
        retrains = report["passes"]["learning"]["retrains"]
        # model_1..3 retrained after their 100th outcome, each with the gate's verdict.
        assert sorted(e["model"] for e in retrains) == ["model_1", "model_2", "model_3"]
        for event in retrains:
            assert event["state"] in ("promoted", "refused")
            assert event["samples"] >= 100 and event["gate"]["holdout_samples"] > 0
        assert len(report["passes"]["learning"]["decisions"]) == 125
        assert set(report["strategies"]) >= {
            "model_1 alone (learning)",
            "ensemble static (learning)",
            "ensemble adaptive (learning)",
            "buy and hold",
        }
    assert reports[0] == reports[1]


def independent_future(n: int, seed: int = 5) -> dict[str, np.ndarray]:
    """Hourly candles (in 2030, after any training data) whose every close-to-close return is
    drawn independently of everything before it: nothing known at a bar's close says where the
    next close goes, while one look at the next candle says it exactly."""
    rng = np.random.default_rng(seed)
    start = 1_893_456_000_000  # 2030-01-01
    moves = rng.normal(0.0, 0.004, n)
    close = 30_000.0 * np.exp(np.cumsum(moves))
    open_ = np.concatenate([[30_000.0], close[:-1]])
    spread = np.abs(rng.normal(0.0, 0.002, n)) * close
    volume = rng.uniform(50.0, 150.0, n)
    return {
        "open_time": start + np.arange(n, dtype=np.int64) * HOUR_MS,
        "open": open_,
        "high": np.maximum(open_, close) + spread,
        "low": np.minimum(open_, close) - spread,
        "close": close,
        "volume": volume,
        "quote_volume": volume * close,
        "trades": rng.integers(100, 1000, n).astype(np.float64),
        "taker_buy_base_volume": volume * rng.uniform(0.3, 0.7, n),
        "taker_buy_quote_volume": volume * close * 0.5,
    }


def test_no_look_ahead_gains_where_the_future_does_not_depend_on_the_past(
    replay_models: Path, tmp_path: Path
) -> None:
    candles = independent_future(500)
    report, _, _ = run(
        Path("independent-future"),
        replay_models,
        tmp_path,
        passes=("frozen",),
        progress=False,
        candles=candles,
        step_ms=HOUR_MS,
    )
    decisions = report["passes"]["frozen"]["decisions"]
    assert len(decisions) == 500 - 100 - 4 + 1
    # A peek at the next candle trades every bar and always wins (the bound below has power):
    close = candles["close"]
    bars = list(range(99, 99 + len(decisions)))
    oracle = [1 if close[b + 1] > close[b] else -1 for b in bars]
    _, oracle_trades = bar_returns(close, bars, oracle, 1, 0.0)
    assert metrics(np.zeros(1), oracle_trades, 1, 8766).hit_rate == 1.0
    traded = 0
    for name, figures in report["strategies"].items():
        if name == "buy and hold" or figures["trades"] < 30:
            continue
        traded += 1
        n = figures["trades"]
        # Before fees a trade wins half the time; the fee only lowers that. Four standard
        # errors above one half would be a gain nothing before the decision could explain.
        assert figures["hit_rate"] < 0.5 + 4 * math.sqrt(0.25 / n), (name, figures)
    assert traded >= 1


def leaky_window(candles: Mapping[str, np.ndarray], end: int, length: int) -> pb.PredictInput:
    """A window that peeks one bar ahead (ends at the next bar)."""
    return window_input(candles, end + 1, length)


def leaky_once(candles: Mapping[str, np.ndarray], end: int, length: int) -> pb.PredictInput:
    """Honest except for one bar in the middle of the replay (bar 104), which peeks ahead."""
    return window_input(candles, end + 1 if end == 104 else end, length)


@pytest.mark.parametrize("window_fn", [leaky_window, leaky_once], ids=["every-bar", "one-bar"])
def test_a_window_that_peeks_one_bar_ahead_is_caught(
    replay_models: Path, tmp_path: Path, window_fn
) -> None:
    """Peeking on every bar is caught before any process starts; on one bar in the middle, by
    the check every decision passes through, with the fleet running (and stopped after)."""
    with pytest.raises(LookAheadError, match="after the decision bar"):
        run(
            Path("independent-future"),
            replay_models,
            tmp_path,
            passes=("frozen",),
            progress=False,
            candles=independent_future(200),
            step_ms=HOUR_MS,
            window_fn=window_fn,
        )
    assert (tmp_path / "run" / "frozen").exists() == (window_fn is leaky_once)
    times = np.arange(100, dtype=np.int64) * HOUR_MS
    check_window(times, int(times[-1]), 100)  # the honest window passes
    with pytest.raises(LookAheadError):
        check_window(times[1:], int(times[-1]), 100)


def test_a_feature_that_peeks_one_bar_ahead_is_caught() -> None:
    candles = independent_future(400)
    bars = range(150, 400, 37)
    check_causal_features(candles, bars)  # training's features: causal

    def leaky(c: Mapping[str, np.ndarray]) -> np.ndarray:
        honest = compute_features(c)
        close = np.asarray(c["close"], dtype=np.float64)
        ahead = np.full(len(close), np.nan)
        ahead[:-1] = np.log(close[1:] / close[:-1])  # next bar's return
        return np.column_stack([honest, ahead])

    with pytest.raises(LookAheadError, match="changes when the candles after it are removed"):
        check_causal_features(candles, bars, compute=leaky)


def raw_closes(path: Path) -> tuple[list[int], list[float]]:
    """open_time (ms) and close straight from a Binance Vision CSV (µs from 2025 on)."""
    times, closes = [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            t = int(row[0])
            times.append(t // 1000 if t > 10**14 else t)
            closes.append(float(row[4]))
    return times, closes


def test_the_accounting_on_real_candles_matches_a_hand_computation(
    real_file, replay_models: Path, tmp_path: Path
) -> None:
    path = real_file("jamado95__whatever/BTCUSDT-1h-2025-01.csv")
    report, _, _ = run(
        path,
        replay_models,
        tmp_path,
        start="2025-03-01",
        bars=60,
        passes=("frozen",),
        progress=False,
    )
    times, closes = raw_closes(path)
    at = {t: i for i, t in enumerate(times)}
    columns = report["passes"]["frozen"]["decision_columns"]
    decisions = report["passes"]["frozen"]["decisions"]
    assert decisions[0][0] == 1740787200000  # 2025-03-01T00:00Z
    for strategy in ("model_1 alone", "ensemble adaptive"):
        col = columns.index(strategy)
        equity, wins, trades = 1.0, 0, 0
        for row in decisions:
            side = side_of(row[col])
            if not side:
                continue
            i = at[row[0]]
            entry, exit_ = closes[i], closes[i + 1]
            gross = exit_ / entry if side == 1 else entry / exit_
            net = gross * (1 - FEE) - 1  # a round trip net of the fee, as the label nets it
            equity *= 1 + net
            wins += net > 0
            trades += 1
        figures = report["strategies"][f"{strategy} (frozen)"]
        assert figures["trades"] == trades
        assert trades > 0
        assert figures["net_return"] == pytest.approx(equity - 1, rel=1e-9, abs=1e-12)
        assert figures["hit_rate"] == pytest.approx(wins / trades)
    first, last_exit = at[decisions[0][0]], at[report["bars"]["last_exit_open_time"]]
    hold = report["strategies"]["buy and hold"]["net_return"]
    assert hold == pytest.approx((1 - FEE) * closes[last_exit] / closes[first] - 1, rel=1e-9)
    json.dumps(report)  # the report is JSON as written
