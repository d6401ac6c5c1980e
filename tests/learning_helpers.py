"""Helpers for the continuous-learning tests: settings with a data directory of their own,
feedback requests, model versions on disk, learnable labels, and a small real disk to fill."""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from harness import server_settings, write_model

from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.learning.job import JobSpec
from xylen_server.learning.samples import FeedbackRecord
from xylen_server.settings import Settings

T = TypeVar("T")


CLOCK_START = 1_800_000_000_000
"""A whole hour (500,000 hours after the epoch), in ms: where the ``clock_file`` fixture
starts the log's clock."""


def learning_settings(root: Path, **overrides: object) -> Settings:
    """Settings for a server whose models live in ``root/models`` and data in ``root/data``,
    with automatic retraining off unless asked for."""
    values: dict[str, object] = {
        "feedback_data_dir": root / "data",
        "retrain_auto": False,
        "parity_probe_rows": 256,
    }
    values.update(overrides)
    return server_settings(root / "models", **values)


def outcome(realized_return: float, close_time: datetime | None = None) -> pb.TradeOutcome:
    """A long trade's outcome closed at ``close_time`` (default: now): the server reads the
    underlying's move from the side and the return."""
    message = pb.TradeOutcome(
        pnl=realized_return * 1000.0,
        realized_return=realized_return,
        side=pb.TradeSide.TRADE_SIDE_LONG,
    )
    moment = close_time or datetime.now(UTC)
    message.close_time.FromDatetime(moment)
    return message


def feedback(
    prediction_id: str,
    realized_return: float,
    features: Any = None,
    close_time: datetime | None = None,
) -> pb.FeedbackRequest:
    request = pb.FeedbackRequest(
        prediction_id=prediction_id, outcome=outcome(realized_return, close_time)
    )
    if features is not None:
        request.features.CopyFrom(types_pb2.FeatureVector(values=[float(v) for v in features]))
    return request


def learnable_labels(rows: np.ndarray, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Labels a tree learns easily: feature 0 above its median, with ``noise`` of them flipped."""
    rng = np.random.default_rng(seed)
    y = (rows[:, 0] > np.median(rows[:, 0])).astype(np.int64)
    flip = rng.random(len(y)) < noise
    return np.where(flip, 1 - y, y)


def send_samples(
    stub: Any, rows: np.ndarray, labels: np.ndarray, prefix: str, threads: int = 8
) -> None:
    """Feedback for every row (with its features, under fresh ids), ``threads`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    start = datetime.now(UTC) - timedelta(hours=len(rows) + 1)

    def send(i: int) -> None:
        close = start + timedelta(hours=i)  # oldest first: the last rows are the most recent
        ret = 0.01 if labels[i] else -0.01
        stub.Feedback(feedback(f"{prefix}-{i}", ret, rows[i], close), timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, range(len(rows))))


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met in {timeout}s")


def wait_job(stub: Any, job_id: str, timeout: float = 180.0) -> pb.TrainingStatus:
    """Follow WatchRetrain until the job ends; returns its final status."""
    final = (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_FAILED, pb.TRAINING_STATE_REJECTED)
    last = None
    for update in stub.WatchRetrain(pb.WatchRetrainRequest(job_id=job_id), timeout=timeout):
        last = update.status
        if last.state in final:
            return last
    raise AssertionError(f"WatchRetrain ended without a final state: {last}")


def add_version(models: Path, version: int, seed: int, name: str = "model_1") -> Path:
    """Train a small model and keep it as ``version`` under ``models/.versions/<name>/``."""
    scratch = models.parent / f"scratch-{version}"
    write_model(scratch, name, "lightgbm", trees=20 + version, version=version, seed=seed)
    target = models / ".versions" / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch / name), target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem (tmpfs of ``size``, e.g. ``"2m"``) mounted at ``mount_point``
    for the test, so a full disk is a full disk. Needs root (CAP_SYS_ADMIN): CI runs as root;
    elsewhere the test is skipped, saying so."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_disk(directory: Path) -> Path:
    """Write a file in ``directory`` until the filesystem has no byte left; returns it (delete
    it to free the disk)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:
        while chunk:
            try:
                handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
    return filler


def label_meta(horizon: int, interval: str = "1h") -> ModelMetadata:
    """The metadata of a one-feature LightGBM model labelling ``horizon``-bar moves of
    ``interval`` bars (what the retrain job's purge rules read)."""
    return ModelMetadata(
        name="model_1",
        model_type="lightgbm",
        version=1,
        training_samples=1,
        trained_at="2026-01-01T00:00:00Z",
        feature_names=["a"],
        lookback=10,
        horizon=horizon,
        interval=interval,
        features_hash="0" * 64,
    )


def job_spec(tmp_path: Path, serving: Path, data: Path, job_id: str, mode: str = "full") -> JobSpec:
    """A retrain job over the samples in ``data`` against the model in ``serving``, with the
    server's default gate and sample minimum (``JobSpec``'s defaults, from ``Settings``), run
    at this process's niceness, writing its candidate and result under ``tmp_path``."""
    return JobSpec(
        job_id=job_id,
        samples=str(data),
        serving_dir=str(serving),
        candidate_dir=str(tmp_path / "candidate"),
        result=str(tmp_path / "result.json"),
        mode=mode,
        version=2,
        nice=0,
    )


def python_calls(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and how many Python function calls it made (``sys.setprofile``): a cost that
    does not move with the machine's load, for tests that must not time anything."""
    import sys

    counted = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal counted
        counted += event == "call"

    sys.setprofile(count)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, counted


def store_ruled_samples(
    data: Path, feature_rows: np.ndarray, total: int, ruled: np.ndarray, seed: int, start_ms: int
) -> None:
    """``total`` outcomes an hour apart from ``start_ms`` into a feedback store at ``data``
    (sent with the admin token): noise labels, except the ``ruled`` rows, reshuffled among
    themselves (the same kind of rows in all of them) and labelled by one rule a tree learns
    at once (:func:`learnable_labels`, no noise)."""
    from xylen_server.auth import ADMIN_TOKEN_IDENTITY
    from xylen_server.learning.feedback_store import FeedbackStore

    rng = np.random.default_rng(seed)
    rows = feature_rows[:total].copy()
    labels = rng.integers(0, 2, total)  # noise: nothing to learn
    rows[ruled] = rows[rng.permutation(ruled)]
    labels[ruled] = learnable_labels(rows[ruled], noise=0.0)
    with FeedbackStore(data, compact_rows=0) as store:
        for record in feedback_records(rows, labels, "s", ADMIN_TOKEN_IDENTITY, start_ms):
            store.append(record)


def feedback_records(
    rows: np.ndarray, labels: np.ndarray, prefix: str, source: str, start_ms: int
) -> Iterator[FeedbackRecord]:
    """One stored outcome per row (ids ``<prefix>-<i>``), closing one an hour from
    ``start_ms``, a long trade's +-1 % by its label, from ``source``."""
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ret = 0.01 if label else -0.01
        yield FeedbackRecord(
            prediction_id=f"{prefix}-{i}",
            model_name="model_1",
            model_version=1,
            features=row.astype(np.float32),
            probability_up=None,
            signal=None,
            pnl=ret * 1000,
            realized_return=ret,
            close_time_ms=start_ms + i * 3_600_000,
            received_time_ms=start_ms + i * 3_600_000 + 1,
            label=int(ret > 0),
            source=source,
        )
