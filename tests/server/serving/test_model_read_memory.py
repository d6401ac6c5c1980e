"""Reading a model's files costs memory by their own size, not by the limit: the reader asked
for ``MODEL_MAX_FILE_BYTES + 1`` bytes at once, and Python allocates such a read's whole buffer
before it reads (256 MiB for every ONNX or parity file, whatever its size). A file over the
limit is still refused with a message that names it and the limit, and so is a file that grows
past the limit while it is read. Real model files, a real load (ONNX Runtime session, parity
check), Python's allocations traced by tracemalloc."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from harness import server_settings, write_model

from training.metadata import (
    MAX_MODEL_FILE_BYTES,
    ONNX_FILE,
    PARITY_FILE,
    MetadataError,
    read_regular_file,
)
from xylen_server.serving.model_store import load_model

MIB = 1 << 20


def _peak_above_start(action) -> tuple[object, int]:
    """``action()``'s result and the most bytes Python had allocated meanwhile above what it
    held when it began."""
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - start


def test_a_load_allocates_by_the_files_not_by_the_limit(tmp_path: Path, candles) -> None:
    model_dir = write_model(tmp_path, "model_1", "lightgbm", candles, trees=10)
    settings = server_settings(tmp_path, parity_probe_rows=256)
    load_model(settings).close()  # the first load may make parity.npz (in a child)
    files = (model_dir / ONNX_FILE).stat().st_size + (model_dir / PARITY_FILE).stat().st_size
    assert settings.model_max_file_bytes == MAX_MODEL_FILE_BYTES == 256 * MIB

    loaded, peak = _peak_above_start(lambda: load_model(settings))
    loaded.close()  # type: ignore[attr-defined]
    # Before: 256 MiB above the files' size (one read buffer of the limit); now the files and
    # the load's own working memory (a few MiB).
    assert peak < files + 32 * MIB, (peak, files)

    onnx = model_dir / ONNX_FILE
    data, peak = _peak_above_start(lambda: read_regular_file(onnx, MAX_MODEL_FILE_BYTES))
    assert data == onnx.read_bytes()
    assert peak < 2 * len(data) + MIB, (peak, len(data))  # before: 256 MiB


def test_a_file_over_the_limit_is_still_refused(tmp_path: Path) -> None:
    big = tmp_path / ONNX_FILE
    big.write_bytes(b"\0" * 5000)
    with pytest.raises(MetadataError) as refused:
        read_regular_file(big, 4999)
    assert str(refused.value) == f"{big} is 5000 bytes, over the limit of 4999"
    assert read_regular_file(big, 5000) == b"\0" * 5000


def test_a_file_larger_than_its_measured_size_is_read_whole_or_refused() -> None:
    """A file that grows after it was measured reads past its measured size: a kernel file
    (its size 0, its content not) is the same case, deterministically."""
    grown = Path("/proc/self/status")
    if not grown.is_file() or grown.stat().st_size != 0:
        pytest.skip("no /proc file of size 0 here")
    whole = read_regular_file(grown, MAX_MODEL_FILE_BYTES)
    assert whole.startswith(b"Name:") and len(whole) > 100
    with pytest.raises(MetadataError) as refused:
        read_regular_file(grown, 10)
    assert str(refused.value) == f"{grown} is over the limit of 10 bytes"
