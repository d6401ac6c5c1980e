"""The native library's version that binds a parity reference is read from the package metadata
once per process, not at every load: ``importlib.metadata.version`` searches ``sys.path`` for
the distribution at each call, and every load and hot swap asked. Two real loads of a real
model (ONNX Runtime session, stored parity reference, parity check); the calls are counted by
wrapping the real ``importlib.metadata.version``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from harness import server_settings, write_model

from training import metadata
from xylen_server.serving.model_store import load_model


def test_two_loads_read_the_library_version_once(
    tmp_path: Path, candles, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(tmp_path, "model_1", "lightgbm", candles, trees=10)
    settings = server_settings(tmp_path, parity_probe_rows=256)
    load_model(settings).close()  # makes parity.npz if training did not
    # What a fresh process starts from (no cache before the fix: nothing to clear).
    getattr(metadata.native_library, "cache_clear", lambda: None)()
    real = importlib.metadata.version
    asked: list[str] = []

    def counted(package: str) -> str:
        asked.append(package)
        return real(package)

    monkeypatch.setattr(importlib.metadata, "version", counted)
    first = load_model(settings)
    second = load_model(settings)
    try:
        assert first.meta.version == second.meta.version == 1
    finally:
        first.close()
        second.close()
    assert asked == ["lightgbm"]  # before: once per load (or more)
    assert metadata.native_library("lightgbm") == f"lightgbm {real('lightgbm')}"
