"""``make bench-peers``'s script: its options and the MLServer settings it writes (the run
itself needs MLServer's venv and is a benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_peers import LEVELS, mlserver_settings, model_settings, parse_args


def test_defaults_measure_batch_one_at_1_8_and_32_in_flight() -> None:
    args = parse_args([])
    assert args.levels == LEVELS == (1, 8, 32)
    assert args.workers == (0,)  # MLServer's default of 1 worker process fails to start here
    assert args.mlserver.name == "mlserver" and args.mlserver.parent.parent.name == ".venv-peers"


def test_options_parse_and_bad_ones_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--levels", "1,64", "--seconds", "2", "--workers", "1"])
    assert args.levels == (1, 64) and args.seconds == 2.0 and args.workers == (1,)
    for bad in (["--seconds", "0"], ["--levels", "0,8"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "must be positive" in capsys.readouterr().err


def test_mlserver_serves_the_training_booster_file_on_loopback_only() -> None:
    settings = model_settings(Path("lightgbm_model.txt"))
    assert settings["implementation"] == "mlserver_lightgbm.LightGBMModel"
    assert settings["parameters"]["uri"] == "lightgbm_model.txt"
    assert settings["name"] == "model_1"
    server = mlserver_settings(18001, 18080, 18082, 0)
    assert server["host"] == "127.0.0.1"
    assert (server["grpc_port"], server["http_port"], server["parallel_workers"]) == (
        18001,
        18080,
        0,
    )
