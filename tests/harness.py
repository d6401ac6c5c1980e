"""Test harness shared by the server, coordinator and demo tests: small real models, real
server processes on loopback, and an in-process server on its own event-loop thread."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training import features
from training.generator import simulate
from training.metadata import ModelMetadata, sha256_file
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.candles import window_input as candle_window
from xylen_server.devtools import launcher
from xylen_server.devtools.launcher import ServerProcess, health_status

__all__ = ["ServerProcess", "health_status"]  # re-exported for the tests
from xylen_server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "binance-vision"
HOUR_MS = 3_600_000


def synthetic_candles(
    n: int = 3000, seed: int = 11, step_ms: int = HOUR_MS
) -> dict[str, np.ndarray]:
    """``n`` generated 1h candles (the offline generator's price path) as feature-ready arrays."""
    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
    frame = simulate(np.arange(start, start + n * step_ms, step_ms, dtype=np.int64), step_ms, seed)
    return features.candles_from_frame(frame)


def training_rows(candles: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """float32 features and next-bar-up labels for every row with full history and a future."""
    x = features.compute_features(candles)
    close = candles["close"]
    y = np.r_[(close[1:] > close[:-1]).astype(np.float64), np.nan]
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return x[keep].astype(np.float32), y[keep].astype(np.int64)


def write_model(
    root: Path,
    name: str = "model_1",
    model_type: str = "lightgbm",
    candles: Mapping[str, np.ndarray] | None = None,
    trees: int = 60,
    version: int = 1,
    seed: int = 1,
) -> Path:
    """Train a small real model of ``model_type`` and write its directory under ``root``."""
    x, y = training_rows(synthetic_candles() if candles is None else candles)
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    meta = ModelMetadata(
        name=name,
        model_type=model_type,
        version=version,
        training_samples=len(y),
        trained_at="2026-11-30T00:00:00Z",
        feature_names=list(features.FEATURE_NAMES),
        lookback=features.LOOKBACK_PERIODS,
        features_hash=features.feature_definitions_hash(),
    )
    if model_type == "lightgbm":
        import lightgbm as lgb

        params = {
            "objective": "binary",
            "verbose": -1,
            "num_leaves": 15,
            "seed": seed,
            "num_threads": 2,
        }
        booster = lgb.train(params, lgb.Dataset(x, y), trees)
        booster.save_model(str(model_dir / meta.native_file))
    elif model_type == "xgboost":
        import xgboost as xgb

        clf = xgb.XGBClassifier(n_estimators=trees, max_depth=4, random_state=seed, n_jobs=2)
        clf.fit(x, y)
        clf.save_model(str(model_dir / meta.native_file))
    else:
        from catboost import CatBoostClassifier

        cb = CatBoostClassifier(
            iterations=trees,
            depth=4,
            random_seed=seed,
            verbose=0,
            thread_count=2,
            allow_writing_files=False,
        )
        cb.fit(x, y)
        cb.save_model(str(model_dir / meta.native_file))
    checksums = {meta.native_file: sha256_file(model_dir / meta.native_file)}
    dataclasses.replace(meta, checksums=checksums).write(model_dir)
    return model_dir


def candle_proto(candles: Mapping[str, np.ndarray], i: int) -> types_pb2.Candle:
    return candle_window(dict(candles), i, 1).candles.candles[0]


def window_input(
    candles: Mapping[str, np.ndarray], end: int, length: int | None = None
) -> pb.PredictInput:
    """A PredictInput holding the window of candles that ends at index ``end``."""
    return candle_window(dict(candles), end, length or features.LOOKBACK_PERIODS)


def feature_input(values: Any) -> pb.PredictInput:
    return pb.PredictInput(features=types_pb2.FeatureVector(values=[float(v) for v in values]))


def predict_request(rows: Any) -> pb.PredictRequest:
    """A PredictRequest of one feature vector per row."""
    return pb.PredictRequest(inputs=[feature_input(r) for r in rows])


def logged_predictor(models_root: Path, model: Any) -> tuple[Any, list[Any]]:
    """A Predictor serving ``model`` and the list every Result it answers is appended to (its
    prediction-log hook)."""
    from xylen_server.serving.predictor import Predictor, Result

    predictor = Predictor(server_settings(models_root))
    predictor.install(model)
    logged: list[Result] = []
    predictor.on_answer = logged.append
    return predictor, logged


def start_server(
    model_path: Path,
    model_name: str = "model_1",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    log_dir: Path | None = None,
    tls: Any = None,
    preexec: Any = None,
) -> ServerProcess:
    """A real server process on a free loopback port (run from the repo root); ``tls`` (a
    :class:`~xylen_server.tls.ClientTls`) dials one that serves TLS."""
    return launcher.start_server(
        model_path,
        model_name,
        env=env,
        wait=wait,
        log_dir=log_dir,
        cwd=REPO,
        tls=tls,
        preexec=preexec,
    )


def server_run(env: Mapping[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m xylen_server`` in the repository with exactly ``env``, run to its exit (a
    server that cannot start: a bad setting, a taken port), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "xylen_server"],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def modules_of_child(code: str, *args: str, timeout: float = 300) -> set[str]:
    """Run ``python -c code args`` in the repository; the names the child printed as a JSON
    list on its last line of output (its ``sys.modules``, as the child chose to report them)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def server_settings(models_root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model_path": models_root,
        "model_name": "model_1",
        "host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class InProcessServer:
    """A real gRPC server on a loopback port, started the way ``serve()`` starts one
    (:func:`xylen_server.server.start`), run by an event loop on a background thread."""

    def __init__(self, settings: Settings) -> None:
        from xylen_server.server import start

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.running = self.call(start(settings))
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"127.0.0.1:{self.running.port}"

    @property
    def model(self) -> Any:
        """The model served now."""
        return self.running.predictor.model

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.running.stop(0))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def settled(recorder: Any, timeout: float = 10.0) -> None:
    """Wait until every call a server's recorder saw has ended: a call is counted as it ends on
    the server, which can be just after its client has the answer, so a test reading counts
    as a baseline first lets the earlier tests' calls finish."""
    deadline = time.monotonic() + timeout
    while recorder.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.in_flight() == 0
