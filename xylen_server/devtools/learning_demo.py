"""One continuous-learning cycle against a running model server, printed step by step.

For ``make demo`` (:mod:`xylen_server.devtools.demo` calls :func:`run_cycle`)::

    from xylen_server.devtools.learning_demo import run_cycle
    run_cycle("127.0.0.1:8001")

The cycle: Predict on feature rows of generated candles; feed back one outcome per prediction
(by prediction id, so the server joins each to the features it predicted on); start a Retrain;
follow its progress (WatchRetrain) while a background client keeps calling Predict; print the
gate's verdict with both scores and the swap to the new version, and how many background calls
were answered, by which versions, and that none failed.

The outcomes are simulated: the "market" rewards a rule the served model was not trained on
(feature 0 above its median, 10% of outcomes flipped), so the retrained candidate scores better
on the held-out window and is promoted. ``scramble=True`` shuffles the outcomes instead, to show
the gate refusing a candidate trained on noise while the old version keeps serving (it refuses
one by chance's bound, so about one seed in 20 passes: the gate's one-sided 5 %).

Time: a trader's outcomes close bar after bar, and the retrain job purges the samples whose
outcomes closed within the label horizon before its held-out window (their labels overlap the
window's). A demo has no hours to wait, so with ``clock_file`` (the server's ``CLOCK_FILE``, the
replay's simulated clock) it runs the hours itself: the clock set to a bar, one prediction, the
clock an hour on, that prediction's outcome, as many hours back as there are outcomes up to the
present. Without it every outcome closes within the same second, and for a model that names its
bar interval (every model ``make train`` writes) the job, rightly, finds nothing far enough
before its window to train on.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np

from training.features import FEATURE_NAMES
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server import clock
from xylen_server.auth import with_token

_FINAL = (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_FAILED, pb.TRAINING_STATE_REJECTED)


def demo_rows(n: int, seed: int = 7) -> np.ndarray:
    """``n`` float32 feature rows computed (by the shared feature code) from generated candles."""
    from training import features
    from training.generator import simulate

    hour = 3_600_000
    start = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
    bars = n + features.LOOKBACK_PERIODS + 50
    frame = simulate(np.arange(start, start + bars * hour, hour, dtype=np.int64), hour, seed)
    x = features.compute_features(features.candles_from_frame(frame))
    x = x[np.isfinite(x).all(axis=1)]
    return np.ascontiguousarray(x[-n:], dtype=np.float32)


SIMULATED_RULE = (
    "the simulated market rewards a rule the served model was not trained on "
    f"({FEATURE_NAMES[0]} above its median, 10% of outcomes flipped), so a retrained candidate "
    "can learn it: the gate's figures below show the loop at work, not a trading edge"
)
SIMULATED_SHUFFLED = (
    "the outcomes are shuffled, so there is nothing to learn: a candidate passes the gate only "
    "by chance (about one retrain in 20 at the default RETRAIN_GATE_Z 1.645, one-sided)"
)
"""What the demo says of its outcomes, beside the gate's figures (a held-out AUC of ~0.9 on a
market's direction would be implausible; here it is the simulated rule's)."""


def _outcomes(rows: np.ndarray, seed: int, scramble: bool) -> np.ndarray:
    """Whether each row's "market" went up: feature 0 above its median (:data:`SIMULATED_RULE`),
    10% flipped; shuffled with ``scramble``."""
    rng = np.random.default_rng(seed)
    up = rows[:, 0] > np.median(rows[:, 0])
    up = np.where(rng.random(len(up)) < 0.1, ~up, up)
    return rng.permutation(up) if scramble else up


def _vector(row: np.ndarray) -> pb.PredictInput:
    return pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))


def run_cycle(
    address: str,
    *,
    samples: int = 600,
    batch: int = 50,
    mode: str = "incremental",
    scramble: bool = False,
    dry_run: bool = False,
    seed: int = 7,
    timeout: float = 300.0,
    out: Callable[[str], object] = print,
    token: str = "",
    clock_file: Path | None = None,
) -> None:
    """Run and print one cycle against the server at ``address``.

    Args:
        address: ``host:port`` of a running ``xylen-server`` (plaintext gRPC).
        samples: predictions made and outcomes fed back (at least the server's
            RETRAIN_MIN_SAMPLES, 100 by default, plus those its earlier models already saw).
        batch: rows per Predict call while collecting predictions.
        mode: ``"incremental"`` (LightGBM continued training) or ``"full"``.
        scramble: shuffle the outcomes: nothing to learn, so the gate refuses the candidate
            unless chance favours it on the held-out window (seed 7 does: AUC 0.62 against
            the 0.607 chance allows on 80 samples; seed 1 does not).
        dry_run: train and validate, never promote.
        seed: seed of the generated candles and simulated outcomes.
        timeout: seconds to wait for the retrain job to end.
        out: where each printed line goes (``print`` by default).
        token: the server's admin token, sent with every call: the gate scores candidates only
            on outcomes from authenticated callers, so anonymous outcomes cannot be promoted.
        clock_file: the server's ``CLOCK_FILE``, to spread the outcomes one an hour (module
            docstring); None leaves the server's clock alone.

    Raises:
        grpc.RpcError: when the server refuses a call (e.g. FAILED_PRECONDITION with reason
            RETRAIN_RUNNING or NOT_ENOUGH_SAMPLES); the message names the reason.
        TimeoutError: when the job does not end within ``timeout``.
    """
    rows = demo_rows(samples + 1, seed)
    probe, rows = rows[-1], rows[:-1]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(with_token(channel, token))
        info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
        out(f"[learning] {info.name} v{info.version} serving on {address}")

        went_up = _outcomes(rows, seed, scramble)
        ids: list[str] = []
        stored = 0
        if clock_file is None:  # the server's own clock: every prediction, then every outcome
            for start in range(0, len(rows), batch):
                ids += _predict(stub, rows[start : start + batch], out, 3 if start == 0 else 0)
            out(f"[learning] {len(ids)} predictions made")
            for prediction_id, up in zip(ids, went_up, strict=True):
                stored = _feed_back(stub, prediction_id, up, None)
        else:  # bar by bar on the simulated clock: a prediction, an hour, its outcome
            bar_ms = 3_600_000
            then = time.time_ns() // 1_000_000 - len(rows) * bar_ms
            for i, (row, up) in enumerate(zip(rows, went_up, strict=True)):
                clock.write(clock_file, then + i * bar_ms)
                (prediction_id,) = _predict(stub, row[None, :], out, 1 if i < 3 else 0)
                ids.append(prediction_id)
                clock.write(clock_file, then + (i + 1) * bar_ms)
                stored = _feed_back(stub, prediction_id, up, then + (i + 1) * bar_ms)
            out(f"[learning] {len(ids)} predictions made, one an hour of simulated time")
        out(
            f"[learning] {len(ids)} outcomes fed back ({'shuffled' if scramble else 'simulated'})"
            f"; {stored} samples stored, durably"
        )
        out(f"[learning] {SIMULATED_SHUFFLED if scramble else SIMULATED_RULE}")

        versions: Counter[int] = Counter()
        failures: list[str] = []
        stop = threading.Event()

        def keep_predicting() -> None:
            request = pb.PredictRequest(inputs=[_vector(probe)])
            while not stop.is_set():
                try:
                    versions[stub.Predict(request, timeout=5).predictions[0].model_version] += 1
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)

        client = threading.Thread(target=keep_predicting, daemon=True)
        client.start()
        try:
            retrain_mode = pb.RETRAIN_MODE_FULL if mode == "full" else pb.RETRAIN_MODE_INCREMENTAL
            job = stub.Retrain(pb.RetrainRequest(mode=retrain_mode, dry_run=dry_run)).job_id
            out(f"[learning] retrain {job} started ({mode}{', dry run' if dry_run else ''})")
            final = None
            deadline = time.monotonic() + timeout
            shown = ("", "")
            for update in stub.WatchRetrain(pb.WatchRetrainRequest(job_id=job), timeout=timeout):
                status = update.status
                if (status.stage, status.message) != shown:
                    shown = (status.stage, status.message)
                    out(f"[learning]   {status.stage:<10} {status.message}")
                if status.state in _FINAL:
                    final = status
                    break
            if final is None or time.monotonic() > deadline:
                raise TimeoutError(f"retrain {job} did not end within {timeout:g}s")
            time.sleep(0.3)  # a few more calls on whatever serves now
        finally:
            stop.set()
            client.join(10)

        gate = final.gate
        if final.HasField("gate"):
            out(
                f"[learning] gate: candidate log loss {gate.candidate_log_loss:.4f} vs serving "
                f"{gate.serving_log_loss:.4f} (margin {gate.margin:g}); AUC "
                f"{gate.candidate_auc:.4f} vs {gate.serving_auc:.4f} (needed {gate.min_auc:.3f}) "
                f"on {gate.holdout_samples} held-out outcomes -> "
                f"{'PASSED' if gate.passed else 'REFUSED'}"
            )
        out(f"[learning] verdict: {pb.TrainingState.Name(final.state)}: {final.message}")
        after = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
        out(
            f"[learning] now serving v{after.version} (parent v{after.parent_version}); "
            f"background Predict calls during the job: {sum(versions.values())} answered "
            f"by {dict(sorted(versions.items()))}, {len(failures)} failed"
        )


def _predict(
    stub: pb_grpc.ModelServiceStub, rows: np.ndarray, out: Callable[[str], object], show: int
) -> list[str]:
    """Predict ``rows`` in one call; prints the first ``show`` predictions; returns their ids."""
    response = stub.Predict(pb.PredictRequest(inputs=[_vector(r) for r in rows]))
    for p in response.predictions[:show]:
        out(
            f"[learning]   {p.prediction_id}  P(up)={p.probability_up:.4f}  "
            f"{types_pb2.Signal.Name(p.signal)}  v{p.model_version}"
        )
    return [p.prediction_id for p in response.predictions]


def _feed_back(
    stub: pb_grpc.ModelServiceStub, prediction_id: str, up: bool, close_ms: int | None
) -> int:
    """One simulated outcome for ``prediction_id``, closing at ``close_ms`` (None: now);
    returns the samples stored."""
    request = pb.FeedbackRequest(
        prediction_id=prediction_id,
        outcome=pb.TradeOutcome(
            pnl=12.0 if up else -12.0,
            realized_return=0.004 if up else -0.004,
            side=pb.TradeSide.TRADE_SIDE_LONG,
            underlying_log_return=0.004 if up else -0.004,
        ),
    )
    if close_ms is None:
        request.outcome.close_time.GetCurrentTime()
    else:
        request.outcome.close_time.FromMilliseconds(close_ms)
    return int(stub.Feedback(request).stored_samples)
