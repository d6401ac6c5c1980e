"""One coordinator per outbox: a second one opening the same ``feedback_queue.path`` (another
process, or a second coordinator in the same one) is refused with a ConfigError naming the file,
instead of both forwarding the same deliveries and pruning under each other (or one of them
dying of ``duplicate column name`` while both upgrade an old file). Closing hands it over."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import harness
import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, free_port, write_config

from xylen_coordinator.config import ConfigError
from xylen_coordinator.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]


def _refused(config: Path) -> subprocess.CompletedProcess[str]:
    """``xylen-coordinator serve`` on ``config`` run to its end (the outbox is taken)."""
    return subprocess.run(
        [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--grace", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_a_second_outbox_on_the_same_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "feedback.sqlite3"

    async def scenario() -> None:
        first = Outbox(path)
        with pytest.raises(ConfigError) as refused:
            Outbox(path)
        assert str(path) in str(refused.value) and "another coordinator" in str(refused.value)
        await first.close()
        second = Outbox(path)  # the lock went with the first
        try:
            assert {row[0] for row in second.db.execute("SELECT name FROM sqlite_master")} >= {
                "predictions",
                "outcomes",
                "deliveries",
            }
        finally:
            await second.close()

    asyncio.run(scenario())


def test_a_second_coordinator_process_exits_naming_the_outbox_the_first_holds(
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    # No server listens on the endpoint: a coordinator starts (and holds its outbox) without one
    config = write_config(tmp_path / "config.yaml", [endpoint("model_1", free_port(), 1.0)])
    outbox = tmp_path / "feedback.sqlite3"
    first = coordinator_factory(config)
    assert harness.health_status(first.channel) == 1  # SERVING: its outbox is open
    second = _refused(config)
    assert second.returncode == 2, second.stderr
    assert f"feedback_queue.path {outbox} is in use by another coordinator" in second.stderr
    assert "Traceback" not in second.stderr, second.stderr
    # The first is untouched: still serving, and it stops cleanly ...
    assert first.proc.poll() is None
    assert harness.health_status(first.channel) == 1
    assert first.stop() == 0
    # ... which hands the outbox over: the next coordinator starts on it
    third = coordinator_factory(config)
    assert harness.health_status(third.channel) == 1
    assert third.stop() == 0
