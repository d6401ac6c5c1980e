"""Memory under attack comes back: a real server process flooded with concurrent large Predict
batches, oversized batches, 1 MiB prediction ids and model names (refused) and ordinary
outcomes holds its RSS near the level it had before once the attack ends. (A PredictStream
client that never reads is tests/server/api/test_load_shedding.py's.)

Bounded counts, no wall-clock limits: RSS is read from /proc after the last attacker is done,
then a bounded number of times while the server settles."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import grpc
from harness import feature_input, start_server
from learning_helpers import feedback

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

ATTACKERS = 12
ROUNDS = 5
SETTLE_READS = 200
# Peak is ~90-110 MiB above the level; without MEMORY_TRIM_INTERVAL_SECONDS it stayed 58-94 MiB
# above, with it 29-44 on a quiet machine. 96 MiB leaves room for a loaded CI machine, so this
# bounds what an attack leaves behind; it does not tell a trim from none.
BOUND_MIB = 96
"""How far above its level before the attack RSS may stay (without the server's periodic
``malloc_trim`` it stayed 58-94 MiB above)."""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_rss_returns_near_its_level_after_a_flood(models_root, feature_rows, tmp_path):
    server = start_server(
        models_root,
        env={
            "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
            "PREDICTION_LOG_MAX_ROWS": "1000",
            "MEMORY_TRIM_INTERVAL_SECONDS": "1",
        },
        log_dir=tmp_path,
    )
    big = pb.PredictRequest(inputs=[feature_input(row) for row in feature_rows[:4096]])
    too_many = pb.PredictRequest(inputs=[feature_input(row) for row in feature_rows[:1000]] * 5)
    small = pb.PredictRequest(inputs=[feature_input(row) for row in feature_rows[:8]])
    huge = "x" * (1 << 20)
    huge_name = pb.PredictRequest(model_name=huge, inputs=small.inputs)
    codes: Counter[tuple[str, str]] = Counter()  # (kind of call, status code)
    improper: list[str] = []
    lock = threading.Lock()
    peak = 0

    def count(kind: str, code: grpc.StatusCode) -> None:
        with lock:
            codes[(kind, code.name)] += 1
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                improper.append(code.name)

    def attacker(k: int, stub: pb_grpc.ModelServiceStub) -> None:
        for i in range(ROUNDS):
            pid, row = f"a{k}-{i}", feature_rows[i]
            calls = [
                ("big", stub.Predict, big),
                ("too_many_rows", stub.Predict, too_many),
                ("huge_id", stub.Feedback, feedback(huge + pid, 0.01, row)),
                ("huge_model_name", stub.Predict, huge_name),
                ("outcome", stub.Feedback, feedback(pid, 0.01, row)),
            ]
            for kind, method, request in calls:
                try:
                    method(request, timeout=60)
                    count(kind, grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    count(kind, error.code())  # type: ignore[attr-defined]

    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for _ in range(3):  # the level: warm, as after ordinary use
                for i in range(ATTACKERS):
                    stub.Predict(big, timeout=60)
                    stub.Feedback(feedback(f"warm-{_}-{i}", 0.01, feature_rows[i]), timeout=60)
            before = _rss_kib(server.proc.pid)

            attackers = [
                threading.Thread(target=attacker, args=(k, stub)) for k in range(ATTACKERS)
            ]
            for thread in attackers:
                thread.start()
            while any(thread.is_alive() for thread in attackers):
                peak = max(peak, _rss_kib(server.proc.pid))
                attackers[0].join(0.05)
            for thread in attackers:
                thread.join()
            peak = max(peak, _rss_kib(server.proc.pid))

            after = _rss_kib(server.proc.pid)
            for _ in range(SETTLE_READS):  # bounded: at most this many reads, 0.1 s apart
                if after <= before + BOUND_MIB * 1024:
                    break
                stub.Predict(small, timeout=60)
                threading.Event().wait(0.1)
                after = _rss_kib(server.proc.pid)
            assert len(stub.Predict(small, timeout=60).predictions) == 8
        print(
            f"\nmemory under attack: {sum(codes.values())} calls from {ATTACKERS} attackers "
            f"({dict(codes)}); RSS {before // 1024} MiB before, {peak // 1024} MiB peak, "
            f"{after // 1024} MiB after"
        )
        assert not improper
        every = ATTACKERS * ROUNDS
        assert codes[("too_many_rows", "RESOURCE_EXHAUSTED")] == every
        assert codes[("huge_id", "INVALID_ARGUMENT")] == every
        assert codes[("outcome", "OK")] == every
        assert codes[("big", "OK")] + codes[("big", "RESOURCE_EXHAUSTED")] == every
        assert codes[("huge_model_name", "INVALID_ARGUMENT")] == every
        assert after - before <= BOUND_MIB * 1024, (before, peak, after)
    finally:
        assert server.stop() == 0
