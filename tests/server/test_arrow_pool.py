"""A server started as operators start it (``python -m xylen_server``) allocates Arrow's
buffers with the C library's malloc unless ``ARROW_DEFAULT_MEMORY_POOL`` says otherwise:
Arrow reads that variable once, at pyarrow's import, so the process sets it from its setting
before anything imports pyarrow (Arrow's default mimalloc kept ~50 MiB of freed flush buffers
in a loaded server; ``python -m bench memory`` measures it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import server_run, start_server, write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arrow-pool")
    write_model(root, "model_1", "lightgbm", trees=10)
    return root


@pytest.mark.parametrize(("asked", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_server_sets_arrows_pool_before_pyarrow_is_imported(
    models: Path, tmp_path: Path, asked: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)  # the operator's choice only
    env = {"FEEDBACK_DATA_DIR": str(tmp_path / "data"), "LOG_LEVEL": "INFO"}
    if asked is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = asked
    server = start_server(models, env=env, log_dir=tmp_path)
    try:
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    finally:
        assert server.stop() == 0
    # pyarrow's C++ default was already the chosen pool when the server first asked
    assert f"Arrow memory pool: {expected} (at pyarrow's import: {expected})" in server.log()
    # ... which the process chose itself when started without the variable
    inherited = [e for e in environ if e.startswith(b"ARROW_DEFAULT_MEMORY_POOL=")]
    assert inherited == ([f"ARROW_DEFAULT_MEMORY_POOL={asked}".encode()] if asked else [])


def test_an_unknown_pool_stops_the_server_at_start(models: Path, tmp_path: Path) -> None:
    env = dict(os.environ, MODEL_PATH=str(models), ARROW_DEFAULT_MEMORY_POOL="tcmalloc")
    done = server_run(env)
    assert done.returncode == 2
    assert "ARROW_DEFAULT_MEMORY_POOL" in done.stderr and "tcmalloc" in done.stderr
