"""One coordinator per outbox: a second one opening the same ``feedback_queue.path`` (another
process, or a second coordinator in the same one) is refused with a ConfigError naming the file,
instead of both forwarding the same deliveries and pruning under each other (or one of them
dying of ``duplicate column name`` while both upgrade an old file). Closing hands it over."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import harness
import pytest
from coordinator.helpers import endpoint, free_port, write_config

from xylen_coordinator.config import ConfigError
from xylen_coordinator.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]


def _serve(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _wait_serving(process: subprocess.Popen[str]) -> None:
    """Until ``process`` (a coordinator that printed nothing yet) reports SERVING: its outbox
    is open then, and SIGTERM drains it (before, it is not handled yet)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("xylen-coordinator listening on port "), line
    with grpc.insecure_channel(f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}") as channel:
        deadline = time.monotonic() + 30
        while True:
            try:
                if harness.health_status(channel) == 1:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "never SERVING"
            time.sleep(0.05)


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
) -> None:
    # No server listens on the endpoint: a coordinator starts (and holds its outbox) without one
    config = write_config(tmp_path / "config.yaml", [endpoint("model_1", free_port(), 1.0)])
    outbox = tmp_path / "feedback.sqlite3"
    first = _serve(config)
    try:
        _wait_serving(first)
        second = _serve(config)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert f"feedback_queue.path {outbox} is in use by another coordinator" in err, err
        assert "Traceback" not in err
        # The first is untouched: still serving, and it stops cleanly
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        # ... which hands the outbox over: the next coordinator starts on it
        third = _serve(config)
        try:
            _wait_serving(third)
        finally:
            third.send_signal(signal.SIGTERM)
            assert third.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
