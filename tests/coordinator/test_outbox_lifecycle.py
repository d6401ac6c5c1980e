"""What a reload (SIGHUP) changes in the coordinator's outbox: the retention for the next sweep
and the forwarder's backoff for its next delivery, without a restart.

Real SQLite files, a real coordinator, a real recording model server on loopback; time is
controlled by rows written with past timestamps, never by sleeping."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.recording_model_server import RecordingModelServer
from coordinator.test_outbox_retention import DAY, Prepared, _record, _wait

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_server.errors import NotFound

HOUR = 3600.0
ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]


def test_a_reload_changes_the_retention_and_the_backoff_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A prediction made 2 days ago survives sweeps under the 7-day retention; after the
    config file says 1 day and the coordinator reloads it, the next sweep removes it and a
    Feedback for it is NOT_FOUND naming the new retention. A server refusing outcomes
    (UNAVAILABLE) is retried every 0.2 s; after a reload to a 1-hour backoff, its delivery's
    next attempt is an hour away. Each change is logged."""
    path = tmp_path / "feedback.sqlite3"
    prepared = Prepared(path)
    try:
        created = time.time() - 2 * DAY
        prepared.predictions([("ens-2d", created, _record(created, ("m1",)))])
    finally:
        prepared.close()
    server = RecordingModelServer("m1", 0.7, fail_feedback=10**9)
    fast = {"path": str(path), "retry_initial_seconds": 0.2, "retry_max_seconds": 0.2}
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("m1", server.port, 1.0)],
        retraining={"enabled": True, "feedback_delay_seconds": 0},
        feedback_queue=fast,
    )
    try:
        with caplog.at_level(logging.INFO), Coordinator(config) as coordinator:
            pid = coordinator.predict(ROW).decision.prediction_id
            coordinator.feedback(pid, realized_return=0.01)
            _wait(lambda: server.feedback_attempts >= 3, "retries every 0.2 s")
            assert coordinator.sweep_outbox()["predictions"] == 0

            write_config(
                config,
                [endpoint("m1", server.port, 1.0)],
                retraining={"enabled": True, "feedback_delay_seconds": 0},
                feedback_queue={
                    **fast,
                    "retention_seconds": DAY,
                    "retry_initial_seconds": HOUR,
                    "retry_max_seconds": HOUR,
                },
            )
            coordinator.reload()
            assert coordinator.sweep_outbox()["predictions"] == 1
            with pytest.raises(NotFound) as gone:
                coordinator.feedback("ens-2d", realized_return=0.01)
            assert "predictions are kept for 1 day" in str(gone.value)

            def next_attempt() -> float:
                reader = Prepared(path)
                try:
                    (due,) = reader.call(
                        lambda: reader.outbox.db.execute(
                            "SELECT due FROM deliveries WHERE prediction_id = ?", (pid,)
                        ).fetchone()
                    )
                    return float(due)
                finally:
                    reader.close()

            _wait(lambda: next_attempt() > time.time() + HOUR / 2, "a retry an hour away")
            assert coordinator.pending_feedback() == 1  # still queued, nothing lost
    finally:
        server.close()
    changes = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("feedback_queue.")
    ]
    assert changes == [
        "feedback_queue.retention_seconds: 604800 -> 86400, in force now",
        "feedback_queue.retry_initial_seconds: 0.2 -> 3600, in force now",
        "feedback_queue.retry_max_seconds: 0.2 -> 3600, in force now",
    ]
