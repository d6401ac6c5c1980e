"""The walk-forward replay: historical candles bar by bar through the real stack.

For each decision bar ``t`` (in order), with the simulated clock at the close of ``t``:

1. every earlier decision whose horizon ends at ``t`` gets its outcome (the underlying's log
   return from its bar's close to ``t``'s close, the trade's side and net return) as Feedback
   through the coordinator, which scores the adaptive weights and forwards it to every server
   that voted with the ensemble's horizon; the replay waits until every delivery is
   acknowledged, then, when a server's trigger started a retrain, until the job ended (gate
   verdict, hot swap), so what the next decision sees never depends on the machine's speed;
2. the window of the ``lookback`` candles ending at ``t`` (checked by
   :func:`backtest.guard.check_window`) goes to the coordinator's Predict: one ensemble decision
   with every model's vote, recorded.

Feedback is never sent before its close time is "now": the servers and the coordinator would
refuse it (OUTCOME_IN_FUTURE), and the replay checks that too. Outcomes go back for every
decision, HOLD included (the underlying moved whether or not the ensemble traded), so the models
learn from every bar, as a live system fed by its market data would.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from backtest.fleet import DEFAULT_WEIGHTS, Fleet, start_fleet
from backtest.guard import check_window
from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.candles import window_input

SIGNAL_NAMES = {
    types_pb2.SIGNAL_BUY: "BUY",
    types_pb2.SIGNAL_SELL: "SELL",
    types_pb2.SIGNAL_HOLD: "HOLD",
}
_FINAL = (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_FAILED, pb.TRAINING_STATE_REJECTED)
_STATE_NAMES = {
    pb.TRAINING_STATE_SUCCEEDED: "promoted",
    pb.TRAINING_STATE_FAILED: "failed",
    pb.TRAINING_STATE_REJECTED: "refused",
}

WindowFn = Callable[[Mapping[str, np.ndarray], int, int], pb.PredictInput]


@dataclass
class Timings:
    """Wall seconds of the replay's phases (the bench's breakdown)."""

    predict: float = 0.0
    """Predict round trips (gRPC to the coordinator, its fan-out, features and inference)."""
    coordinator: float = 0.0
    """Of which inside the coordinator (its own measure of the call)."""
    votes: float = 0.0
    """Of which the slowest server's round trip as the coordinator saw it, summed per bar."""
    feedback: float = 0.0
    """Feedback calls and the wait until every server acknowledged its delivery."""
    retrain_checks: float = 0.0
    """GetModelInfo after each bar's feedback (did a trigger start a retrain?)."""
    retraining: float = 0.0
    """Waiting for started retrains to end (training, gate, swap)."""
    local: float = 0.0
    """The replay's own work (windows, guard, bookkeeping, clock)."""
    startup: float = 0.0
    """Starting the four servers and the coordinator (copy, load, parity check, warm-up)."""
    total: float = 0.0
    """Start-up and the bars (not the shutdown)."""


@dataclass
class Decision:
    bar: int
    open_time: int
    prediction_id: str
    probability: float
    signal: str
    buy_threshold: float
    sell_threshold: float
    votes: dict[str, dict[str, Any]]


@dataclass
class PassResult:
    """One pass (learning or frozen) over the bars."""

    name: str
    decisions: list[Decision]
    retrains: list[dict[str, Any]]
    swaps: list[dict[str, Any]]
    members: dict[str, dict[str, Any]]
    """Per model: horizon, fee and thresholds by version (GetModelInfo)."""
    timings: Timings
    exit_codes: dict[str, int] = field(default_factory=dict)
    adaptive: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each endpoint's adaptive record at the end (GetEnsembleInfo)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each process over the bars (start-up excluded); "replay": this one."""


def close_time_ms(open_time: int, step_ms: int) -> int:
    """Binance's close time of a bar: the last millisecond of its interval."""
    return int(open_time) + step_ms - 1


def _member(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "horizon": int(info.horizon) or 1,
        "fee": float(info.fee),
        "lookback": int(info.lookback),
        "version": int(info.version),
        "buy": float(info.buy_threshold),
        "sell": float(info.sell_threshold),
    }


def run_pass(
    name: str,
    candles: Mapping[str, np.ndarray],
    bars: range,
    models: Path,
    run_dir: Path,
    step_ms: int,
    *,
    learning: bool,
    server_env: Mapping[str, str] | None = None,
    window_fn: WindowFn = window_input,
    progress: TextIO | None = sys.stderr,
) -> PassResult:
    """Replay ``bars`` (decision bar indices into ``candles``) through a fresh fleet."""
    open_time = np.asarray(candles["open_time"], dtype=np.int64)
    close = np.asarray(candles["close"], dtype=np.float64)
    names = tuple(DEFAULT_WEIGHTS)
    timings = Timings()
    began = time.perf_counter()
    first_now = close_time_ms(int(open_time[bars[0]]), step_ms)
    # model_4's horizon (4 bars) differs from the ensemble's (1): the coordinator does not
    # forward it the outcomes (they are moves over 1 bar; HORIZON_MISMATCH), so it gets no
    # samples and does not retrain in the replay (see README).
    learns = {n: learning for n in names}
    # Before any process starts: the first and last windows end at their decision bars (the
    # same check runs on every decision below).
    from training.metadata import ModelMetadata

    planned = max(ModelMetadata.read(models / n).lookback for n in names)
    for t in (bars[0], bars[-1]):
        window = window_fn(candles, t, planned)
        check_window(window_open_times(window), int(open_time[t]), planned)
    fleet = start_fleet(
        models,
        run_dir / name,
        first_now,
        names=names,
        learning=learns,
        server_env=server_env,
        forward_feedback=learning,
    )
    timings.startup = time.perf_counter() - began
    cpu_start = fleet.cpu_seconds()
    own_start = _own_cpu()
    adaptive: dict[str, dict[str, float]] = {}
    cpu: dict[str, float] = {}
    decisions: list[Decision] = []
    retrains: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []
    try:
        ensemble = fleet.ensemble()
        stubs = {n: fleet.model(n) for n in names}
        infos = {
            n: stubs[n].GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model_info for n in names
        }
        members = {n: {"versions": {infos[n].version: _member(infos[n])}} for n in names}
        for n in names:
            members[n].update(_member(infos[n]))
            if infos[n].horizon != infos[names[0]].horizon:
                learns[n] = False
        horizon = max(1, int(infos[names[0]].horizon))
        fee = float(infos[names[0]].fee)
        lookback = max(int(i.lookback) for i in infos.values())
        seen_jobs = {n: infos[n].training_status.job_id for n in names}
        versions = {n: int(infos[n].version) for n in names}
        if bars[0] < lookback - 1:
            raise ValueError(f"the first decision bar {bars[0]} has fewer than {lookback} candles")
        pending: dict[int, Decision] = {}
        arrived = {n: 0 for n in names}
        trigger = int((server_env or {}).get("RETRAIN_TRIGGER_NEW_SAMPLES", 1000))
        loop_began = time.perf_counter()
        total = len(bars)
        for i, t in enumerate(bars):
            mark = time.perf_counter()
            now = close_time_ms(int(open_time[t]), step_ms)
            fleet.set_clock(now)
            timings.local += time.perf_counter() - mark
            # 1. outcomes whose horizon ended at this bar's close
            matured = pending.pop(t - horizon, None)
            if matured is not None and learning:
                mark = time.perf_counter()
                _send_outcome(fleet, ensemble, matured, close, t, now, fee)
                _wait_delivered(ensemble, fleet)
                timings.feedback += time.perf_counter() - mark
                mark = time.perf_counter()
                for n in arrived:
                    arrived[n] += 1
                # The sample-count trigger fires on the outcome that reaches it; every 100 bars
                # a look catches any other trigger a server was configured with.
                due = [n for n in names if learns[n] and (arrived[n] >= trigger or i % 100 == 0)]
                started = _check_retrains(stubs, due, seen_jobs) if due else []
                for n in started:
                    arrived[n] = 0
                timings.retrain_checks += time.perf_counter() - mark
                if started:
                    mark = time.perf_counter()
                    for n in started:
                        event = _wait_retrain(stubs[n], n, t, int(open_time[t]))
                        seen_jobs[n] = event["job_id"]
                        retrains.append(event)
                        if event["state"] == "promoted" and event["version"] != versions[n]:
                            info = stubs[n].GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
                            m = _member(info.model_info)
                            members[n]["versions"][m["version"]] = m
                            swaps.append(
                                {
                                    "model": n,
                                    "bar": t,
                                    "open_time": int(open_time[t]),
                                    "from_version": versions[n],
                                    "to_version": m["version"],
                                }
                            )
                            versions[n] = m["version"]
                    timings.retraining += time.perf_counter() - mark
            elif matured is not None:
                mark = time.perf_counter()
                _send_outcome(fleet, ensemble, matured, close, t, now, fee)
                timings.feedback += time.perf_counter() - mark
            # 2. the decision on the window ending at this bar
            mark = time.perf_counter()
            window = window_fn(candles, t, lookback)
            check_window(window_open_times(window), int(open_time[t]), lookback)
            timings.local += time.perf_counter() - mark
            mark = time.perf_counter()
            response = ensemble.Predict(
                epb.EnsembleServicePredictRequest(inputs=[window]), timeout=120
            )
            timings.predict += time.perf_counter() - mark
            timings.coordinator += response.duration.ToNanoseconds() / 1e9
            mark = time.perf_counter()
            if response.missing_votes:
                missing = ", ".join(f"{m.server_name}: {m.message}" for m in response.missing_votes)
                raise RuntimeError(f"bar {t}: missing votes ({missing}); the replay needs all")
            row = response.predictions[0]
            timings.votes += max(v.latency.ToNanoseconds() for v in row.votes) / 1e9
            decision = Decision(
                bar=t,
                open_time=int(open_time[t]),
                prediction_id=row.prediction_id,
                probability=row.probability_up,
                signal=SIGNAL_NAMES.get(row.signal, "HOLD"),
                buy_threshold=row.buy_threshold,
                sell_threshold=row.sell_threshold,
                votes={
                    v.server_name: {
                        "p": v.probability_up,
                        "signal": SIGNAL_NAMES.get(v.signal, "HOLD"),
                        "version": int(v.model_version),
                        "configured_weight": v.configured_weight,
                        "weight": v.weight,
                        "left_out": v.left_out_reason,
                    }
                    for v in row.votes
                },
            )
            decisions.append(decision)
            pending[t] = decision
            timings.local += time.perf_counter() - mark
            if (progress is not None and (i + 1) % 250 == 0) or i + 1 == total:
                _progress(
                    progress, name, i + 1, total, time.perf_counter() - loop_began, len(retrains)
                )
        info = ensemble.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=30)
        adaptive = {
            e.name: {
                "multiplier": e.adaptive.multiplier,
                "brier_score": e.adaptive.brier_score,
                "hit_rate": e.adaptive.hit_rate,
                "effective_outcomes": e.adaptive.effective_outcomes,
            }
            for e in info.endpoints
        }
        timings.total = time.perf_counter() - began
        cpu_end = fleet.cpu_seconds()
        cpu = {n: round(cpu_end[n] - cpu_start.get(n, 0.0), 2) for n in cpu_end}
        cpu["replay"] = round(_own_cpu() - own_start, 2)
    finally:
        exit_codes = fleet.stop()
    return PassResult(name, decisions, retrains, swaps, members, timings, exit_codes, adaptive, cpu)


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress(
    out: TextIO | None, name: str, done: int, total: int, elapsed: float, retrains: int
) -> None:
    if out is None:
        return
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else math.inf
    print(
        f"replay {name}: {done}/{total} bars, {rate:.0f} bars/s, ETA {eta:.0f} s, "
        f"{retrains} retrains",
        file=out,
        flush=True,
    )


def _send_outcome(
    fleet: Fleet,
    ensemble: Any,
    decision: Decision,
    close: np.ndarray,
    t: int,
    now_ms: int,
    fee: float,
) -> None:
    """Feedback of ``decision``'s trade, closed at bar ``t``'s close (which is "now")."""
    from backtest.accounting import side_of, trade_return

    side = side_of(decision.signal)
    entry, exit_ = float(close[decision.bar]), float(close[t])
    outcome = pb.TradeOutcome(underlying_log_return=math.log(exit_ / entry))
    if side:
        net = trade_return(entry, exit_, side, fee)
        outcome.side = pb.TRADE_SIDE_LONG if side > 0 else pb.TRADE_SIDE_SHORT
        outcome.realized_return = net
        outcome.pnl = net
    outcome.close_time.FromMilliseconds(now_ms)
    ensemble.Feedback(
        epb.EnsembleServiceFeedbackRequest(prediction_id=decision.prediction_id, outcome=outcome),
        metadata=fleet.metadata,
        timeout=60,
    )


def _wait_delivered(ensemble: Any, fleet: Fleet, timeout: float = 120.0) -> None:
    """Until the coordinator has delivered every outcome to every server."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        info = ensemble.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=30)
        if info.pending_feedback == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{info.pending_feedback} outcomes not delivered after {timeout}s")
        time.sleep(pause)
        pause = min(0.01, pause * 2)


def _check_retrains(
    stubs: Mapping[str, Any], names: Sequence[str], seen: Mapping[str, str]
) -> list[str]:
    """Those of ``names`` on whose server a retrain job started since the last look."""
    started = []
    for name in names:
        stub = stubs[name]
        status = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model_info.training_status
        if status.job_id and status.job_id != seen.get(name):
            started.append(name)
    return started


def _wait_retrain(
    stub: Any, name: str, bar: int, open_time: int, timeout: float = 1800.0
) -> dict[str, Any]:
    """Poll until the server's running job ended; the event with the gate's figures."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model_info
        status = info.training_status
        if status.state in _FINAL:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: retrain {status.job_id} still running after {timeout}s")
        time.sleep(0.05)
    gate = status.gate
    return {
        "model": name,
        "bar": bar,
        "open_time": open_time,
        "job_id": status.job_id,
        "trigger": status.trigger,
        "state": _STATE_NAMES.get(status.state, str(status.state)),
        "samples": int(status.samples),
        "version": int(info.version),
        "gate": {
            "holdout_samples": int(gate.holdout_samples),
            "serving_log_loss": gate.serving_log_loss,
            "candidate_log_loss": gate.candidate_log_loss,
            "serving_auc": gate.serving_auc,
            "candidate_auc": gate.candidate_auc,
            "margin": gate.margin,
            "min_auc": gate.min_auc,
            "passed": gate.passed,
            "reason": gate.reason[:300],
        },
    }


def window_open_times(window: pb.PredictInput) -> np.ndarray:
    """The open times (epoch ms) of the candles a Predict input carries."""
    return np.array([c.open_time.ToMilliseconds() for c in window.candles.candles], dtype=np.int64)
