"""A real server under the seed's container limits (a cgroup: 256 MiB, half a CPU) takes
sustained load past its prediction log's cap and is not OOM-killed: it keeps answering, and
the kernel's own counters say nothing in the cgroup was killed.

Skipped (with the reason) where no cgroup can be made here: not root, or a read-only
/sys/fs/cgroup; ``python -m bench memory`` reports RSS per round there instead."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import feature_input, start_server, write_model

from xylen.v1 import model_service_pb2 as pb
from xylen_server.devtools.limits import limited
from xylen_server.settings import Settings

LIMIT = 256 * 1024 * 1024
CAP_ROWS = Settings.prediction_log_max_rows  # the default: what a deployment gets
BATCH = 500


def test_a_server_in_256_mib_and_half_a_cpu_outlives_its_prediction_log_cap(
    tmp_path: Path, feature_rows: np.ndarray
) -> None:
    write_model(tmp_path / "models", "model_1", "lightgbm", trees=60)
    with limited(LIMIT, 50_000, 100_000) as cgroup:
        if cgroup is None:
            pytest.skip("cgroups are not writable here (need root and a writable /sys/fs/cgroup)")
        server = start_server(
            tmp_path / "models",
            env={
                "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
                "MEMORY_TRIM_INTERVAL_SECONDS": "2",
                "LOG_LEVEL": "WARNING",
            },
            preexec=cgroup.join,
        )
        answered = 0
        try:
            rows = feature_rows[:BATCH]
            big = pb.PredictRequest(inputs=[feature_input(r) for r in rows])
            one = pb.PredictRequest(inputs=[feature_input(rows[0])])
            with server.channel() as channel:
                stub = server.stub(channel)
                # One and a half times the cap in remembered rows, big batches and single rows.
                for i in range(3 * CAP_ROWS // (2 * BATCH)):
                    reply = stub.Predict(big, timeout=60)
                    assert len(reply.predictions) == BATCH
                    answered += BATCH
                    if i % 10 == 0:
                        for _ in range(20):
                            assert len(stub.Predict(one, timeout=60).predictions) == 1
                            answered += 1
                # Still answering, and the newest prediction is still joinable in memory.
                assert len(stub.Predict(one, timeout=60).predictions) == 1
            assert server.proc.poll() is None, "the server died under load"
        except grpc.RpcError as exc:
            pytest.fail(
                f"the server stopped answering after {answered} answers: {exc}; "
                f"OOM kills {cgroup.oom_kills()}, exit {server.proc.poll()}"
            )
        finally:
            code = server.stop()
        assert cgroup.oom_kills() == 0
        assert code == 0
        assert answered >= 3 * CAP_ROWS // 2
        peak = cgroup.peak_bytes()
        print(f"cgroup peak {peak / 2**20:.0f} MiB of {LIMIT / 2**20:.0f} after {answered} answers")
        assert 0 < peak <= LIMIT  # the kernel held it to the limit and it lived
