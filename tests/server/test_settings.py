"""Settings from the environment: defaults, parsing, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from xylen_server.errors import SettingsError
from xylen_server.settings import Settings


def test_defaults_are_the_seeds():
    settings = Settings.from_env({})
    assert settings.model_name == "model_1"
    assert settings.model_path == Path("models")
    assert settings.onnx_enabled is True
    assert settings.log_level == "INFO"
    assert settings.grpc_port == 8001
    assert settings.pool_size * settings.session_threads <= 2  # fits the 2-core machines


def test_every_variable_is_read():
    settings = Settings.from_env(
        {
            "MODEL_NAME": "model_3",
            "MODEL_PATH": "/srv/models",
            "ONNX_ENABLED": "false",
            "LOG_LEVEL": "debug",
            "GRPC_PORT": "9100",
            "SESSION_POOL_SIZE": "4",
            "SESSION_THREADS": "2",
            "MAX_BATCH_ROWS": "10",
            "BUY_THRESHOLD": "0.6",
            "SELL_THRESHOLD": "0.4",
        }
    )
    assert settings.model_dir == Path("/srv/models/model_3")
    assert (settings.onnx_enabled, settings.log_level, settings.grpc_port) == (False, "DEBUG", 9100)
    assert (settings.pool_size, settings.session_threads, settings.max_batch_rows) == (4, 2, 10)
    assert (settings.buy_threshold, settings.sell_threshold) == (0.6, 0.4)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"GRPC_PORT": "x"}, "GRPC_PORT"),
        ({"GRPC_PORT": "-1"}, "GRPC_PORT"),
        ({"METRICS_PORT": "65536"}, "METRICS_PORT"),
        ({"ONNX_ENABLED": "2"}, "ONNX_ENABLED"),
        ({"SESSION_THREADS": "0"}, "SESSION_THREADS"),
        ({"BUY_THRESHOLD": "nan"}, "BUY_THRESHOLD"),
        ({"SELL_THRESHOLD": "0.7", "BUY_THRESHOLD": "0.6"}, "SELL_THRESHOLD"),
        ({"SELL_THRESHOLD": "1.5"}, "SELL_THRESHOLD"),
        ({"MODEL_NAME": "../etc"}, "MODEL_NAME"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"MAX_MESSAGE_BYTES": "10"}, "MAX_MESSAGE_BYTES"),
    ],
)
def test_bad_values_name_the_variable(env, names):
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_blank_values_keep_the_default():
    assert Settings.from_env({"GRPC_PORT": " "}).grpc_port == 8001
