"""``make demo``: the main job on the offline default data, end to end, in about a minute.

1. One model server: GetModelInfo, Predict by feature vector and by candle window (the same
   answer, since the server computes features with training's code), a PredictStream with a bad
   item in the middle that gets its own status while the stream carries on.
2. Four servers (LightGBM, XGBoost, CatBoost, LightGBM) behind the coordinator: weighted
   ensemble decisions with every vote; one server killed mid-demo, the ensemble carrying on with
   three and naming the missing one, the server restarted on its port and voting again.
3. Continuous learning on model_1: predictions, their outcomes fed back, a Retrain, the
   validation gate's verdict and the hot swap to the new version while requests keep flowing;
   then the ensemble again, with model_1's new version voting.
4. Everything stopped with SIGTERM; each process must exit 0.

The servers listen on loopback in plaintext, with a fresh admin token (``<run dir>/admin.token``,
passed as ``ADMIN_TOKEN_FILE``): the coordinator's ``auth`` section and the learning cycle send
it, and the retrain gate trusts only such authenticated outcomes. For TLS, see ``make certs``
and the README.

Expects the default models (``make train``) under ``models/`` and the default data under
``data/default`` (``make data``); ``make demo`` makes both first. The servers serve a copy of
the models under the run directory, so the demo's retraining leaves ``models/`` as trained.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_coordinator.candles import read_candles
from xylen_coordinator.report import format_result
from xylen_server import clock
from xylen_server.candles import window_input
from xylen_server.devtools.launcher import ServerProcess, start_server
from xylen_server.devtools.learning_demo import run_cycle

MODELS = ("model_1", "model_2", "model_3", "model_4")
WEIGHTS = {"model_1": 0.4, "model_2": 0.3, "model_3": 0.2, "model_4": 0.1}
SIGNALS = {v: k.removeprefix("SIGNAL_") for k, v in types_pb2.Signal.items()}
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


TOKEN_FILE = "admin.token"
CLOCK_FILE = "clock"
"""The servers' simulated "now" (``CLOCK_FILE``): the learning cycle spreads its outcomes over
the past hours with it (:mod:`~xylen_server.devtools.learning_demo`)."""


def validation_line(info: pb.ModelInfo) -> str:
    """What the model's own thresholds did on their validation bars, net of the fee, in one
    line, saying "no edge" where acting did not beat holding (GetModelInfo's
    ``signal_validation``)."""
    if not info.HasField("signal_validation"):
        return "validation of the thresholds: not recorded for this model"
    v = info.signal_validation

    def side(name: str, share: float, mean: float, edge: bool) -> str:
        verdict = "an edge" if edge else "no edge"
        return f"{name} on {share:.1%} of bars, mean net {mean * 1e4:+.2f} bp: {verdict}"

    return (
        f"on its {v.samples} validation bars, net of the fee: "
        f"{side('BUY', v.buy_share, v.buy_mean_net_return, v.buy_edge)}; "
        f"{side('SELL', v.sell_share, v.sell_mean_net_return, v.sell_edge)}"
    )


def write_token(path: Path) -> None:
    """A fresh random admin token, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")


def server_env(run_dir: Path) -> dict[str, str]:
    """The demo servers' environment: loopback, plaintext, the admin token from its file, the
    learning loop's clock from :data:`CLOCK_FILE` (the present until the learning cycle sets
    it)."""
    return {
        "ADMIN_TOKEN_FILE": str((run_dir / TOKEN_FILE).resolve()),
        "CLOCK_FILE": str((run_dir / CLOCK_FILE).resolve()),
    }


def heading(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def candle_window(candles: dict[str, np.ndarray], end: int) -> pb.PredictInput:
    return window_input(candles, end, features.LOOKBACK_PERIODS)


def feature_vector(row: np.ndarray) -> pb.PredictInput:
    return pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))


def show(prediction: pb.Prediction, label: str) -> None:
    print(
        f"  {label:<28} p_up={prediction.probability_up:.4f} {SIGNALS[prediction.signal]:<4} "
        f"{prediction.model_name} v{prediction.model_version}  id={prediction.prediction_id}"
    )


def single_server(server: ServerProcess, candles: dict[str, np.ndarray], rows: np.ndarray) -> None:
    last = len(candles["close"]) - 1
    with server.channel() as channel:
        stub = server.stub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
        heading(f"one server on {server.address}: GetModelInfo")
        print(
            f"  {info.name} v{info.version} {pb.ModelType.Name(info.model_type)} "
            f"engine={pb.Engine.Name(info.engine)} trained on {info.training_samples} rows, "
            f"{len(info.feature_names)} features, lookback {info.lookback} candles"
        )
        print(
            f"  p_up = P(up over {info.horizon} bar(s) net of fee {info.fee:g}); "
            f"BUY at >= {info.buy_threshold:.4f}, SELL at <= {info.sell_threshold:.4f} "
            f"({pb.ThresholdSource.Name(info.threshold_source)}"
            f"{': ' + info.threshold_rule if info.threshold_rule else ''})"
        )
        print(f"  {validation_line(info)}")

        heading("Predict (unary): by feature vector and by candle window")
        by_features = stub.Predict(pb.PredictRequest(inputs=[feature_vector(rows[last])]))
        by_candles = stub.Predict(pb.PredictRequest(inputs=[candle_window(candles, last)]))
        show(by_features.predictions[0], "features of the last candle")
        show(by_candles.predictions[0], "window of its 100 candles")
        same = by_features.predictions[0].probability_up == by_candles.predictions[0].probability_up
        print(
            f"  same probability both ways: {same}; server-side time "
            f"{by_candles.inference_duration.ToMicroseconds()} us for the window"
        )

        heading("PredictStream: 7 requests on one HTTP/2 stream, a bad one in the middle")
        items = []
        for k in range(7):
            end = last - 6 + k
            item = candle_window(candles, end) if k % 2 else feature_vector(rows[end])
            if k == 3:
                item = feature_vector(rows[end][:5])  # 5 values where the model takes 25
            items.append(
                pb.PredictStreamRequest(
                    request_id=f"req-{k}", request=pb.PredictRequest(inputs=[item])
                )
            )
        for answer in stub.PredictStream(iter(items)):
            if answer.status.code == 0:
                show(answer.response.predictions[0], answer.request_id)
            else:
                code = CODE_NAMES[answer.status.code]
                status = answer.status
                print(f"  {answer.request_id:<28} {code} {status.reason}: {status.message}")


def write_config(path: Path, servers: dict[str, ServerProcess], token_file: Path) -> Path:
    config = {
        "model_endpoints": [
            {
                "name": name,
                "host": "127.0.0.1",
                "port": servers[name].port,
                "weight": WEIGHTS[name],
                "enabled": True,
            }
            for name in MODELS
        ],
        "deadline_ms": 2000,
        "retraining": {
            "enabled": False,
            "send_feedback_to_models": False,
            "feedback_delay_seconds": 0,
        },
        "auth": {"token_file": str(token_file.resolve())},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ensemble(
    servers: dict[str, ServerProcess], run_dir: Path, candles: dict[str, np.ndarray], models: Path
) -> None:
    last = len(candles["close"]) - 1
    config = write_config(run_dir / "config.yaml", servers, run_dir / TOKEN_FILE)
    with Coordinator(config) as coordinator:
        if not coordinator.wait_serving(timeout=60):
            raise RuntimeError("the four servers did not all become SERVING")
        heading("ensemble of four servers (weights 0.4 / 0.3 / 0.2 / 0.1), the last two candles")
        print(
            format_result(
                coordinator.predict(
                    [candle_window(candles, last - 1), candle_window(candles, last)]
                )
            )
        )

        victim = servers["model_3"]
        heading(f"kill -9 model_3 ({victim.address}) and ask again")
        victim.stop(signal.SIGKILL)
        print(format_result(coordinator.predict([candle_window(candles, last)])))

        heading("restart model_3 on the same port: it votes again")
        servers["model_3"] = start_server(
            models, "model_3", port=victim.port, log_dir=run_dir, env=server_env(run_dir)
        )
        coordinator.wait_serving(["model_3"], timeout=60)
        print(format_result(coordinator.predict([candle_window(candles, last)])))

        heading("continuous learning on model_1: outcomes in, retrain, gate, hot swap")
        token = (run_dir / TOKEN_FILE).read_text().strip()
        run_cycle(servers["model_1"].address, token=token, clock_file=run_dir / CLOCK_FILE)

        heading("the ensemble after the swap: model_1 votes with its new version")
        print(format_result(coordinator.predict([candle_window(candles, last)])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xylen-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/default"))
    parser.add_argument("--run-dir", type=Path, default=Path("run/demo"))
    args = parser.parse_args(argv)
    missing = [name for name in MODELS if not (args.models / name / "metadata.json").exists()]
    if missing:
        print(
            f"demo: models {', '.join(missing)} not found under {args.models}; run `make train`",
            file=sys.stderr,
        )
        return 2
    # A fresh copy of the models each run: the learning cycle writes new versions into it.
    shutil.rmtree(args.run_dir, ignore_errors=True)
    models = args.run_dir / "models"
    shutil.copytree(args.models, models, ignore=shutil.ignore_patterns(".versions"))
    started = time.perf_counter()
    candles = read_candles(args.data)
    rows = features.compute_features(candles)
    print(
        f"data: {len(rows)} candles from {args.data}; models: {args.models}; logs: {args.run_dir}"
    )

    write_token(args.run_dir / TOKEN_FILE)
    clock.write(args.run_dir / CLOCK_FILE, time.time_ns() // 1_000_000)
    env = server_env(args.run_dir)
    servers: dict[str, ServerProcess] = {}
    try:
        servers["model_1"] = start_server(models, "model_1", log_dir=args.run_dir, env=env)
        single_server(servers["model_1"], candles, rows)
        for name in MODELS[1:]:
            servers[name] = start_server(models, name, log_dir=args.run_dir, wait=False, env=env)
        for name in MODELS[1:]:
            servers[name].wait_serving()
        ensemble(servers, args.run_dir, candles, models)
    finally:
        heading("stopping every server with SIGTERM")
        codes = {name: server.stop() for name, server in servers.items()}
        print("  exit codes: " + ", ".join(f"{name}={code}" for name, code in codes.items()))
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
