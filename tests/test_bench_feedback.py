"""``python -m bench feedback`` appends records each store accepts, and a writer that fails
stops the figure instead of leaving the others' rate (it once printed a crash, far from its
cause, after every writer died on a record missing a field the store had gained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.bench_feedback import NEW, Store, _compaction, _threads, old_store


def test_every_store_measured_takes_the_records_the_bench_appends(tmp_path: Path) -> None:
    old = old_store()
    kinds = [NEW] if isinstance(old, str) else [old, NEW]
    for kind in kinds:
        rate, shown = _threads(kind, tmp_path / kind.name, True, 4, 0.3)
        assert rate > 0, (kind.name, shown)
        assert "records/s" in shown and "append p50=" in shown
    assert _compaction(tmp_path / "compaction", 320).startswith("320 records: compact ")


def test_a_failing_writer_fails_the_figure(tmp_path: Path) -> None:
    class Broken(Store):
        def record(self, worker: int, i: int) -> Any:
            if worker == 1:
                raise ValueError("a record the store refuses")
            return super().record(worker, i)

    broken = Broken("SQLite", NEW.open, NEW.record_type)
    with pytest.raises(RuntimeError, match="1 of 4 writers failed") as failed:
        _threads(broken, tmp_path / "run", True, 4, 0.2)
    assert isinstance(failed.value.__cause__, ValueError)
