"""WORKERS: how many (the CPU affinity and the cgroup quota, from fake cgroup files and from a
real cgroup where one can be made), the setting's refusals, and the merged metrics page."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from harness import server_run
from metrics_page import by_label, parse

from xylen_server.errors import SettingsError
from xylen_server.settings import Settings
from xylen_server.workers import (
    available_cpus,
    cpu_quota,
    merge_metrics,
    with_label,
    worker_count,
)

REPO = Path(__file__).resolve().parents[2]
AFFINITY = len(os.sched_getaffinity(0))


def v2(tmp_path: Path, own: str, limits: dict[str, str]) -> dict[str, Path]:
    """A fake cgroup v2 tree: ``limits`` maps a cgroup path to its cpu.max."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for path, value in limits.items():
        directory = root / path.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return {"cgroup_root": root, "proc_cgroup": proc}


def test_compose_half_a_cpu_is_one_worker(tmp_path: Path):
    """docker compose ``cpus: '0.5'`` writes cpu.max 50000 100000 at the container's root."""
    where = v2(tmp_path, "/", {"/": "50000 100000"})
    assert cpu_quota(**where) == 0.5
    assert available_cpus(**where) == 1
    assert worker_count("auto", **where) == 1


def test_the_quota_rounds_down_and_the_tightest_ancestor_counts(tmp_path: Path):
    where = v2(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"/kubepods": "max 100000", "/kubepods/pod1": "150000 100000", "/kubepods/pod1/ctr": "max"},
    )
    assert cpu_quota(**where) == 1.5
    assert available_cpus(**where) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path):
    where = v2(tmp_path, "/", {"/": "max 100000"})
    assert cpu_quota(**where) is None
    assert available_cpus(**where) == AFFINITY
    assert worker_count("auto", **where) == AFFINITY
    assert worker_count("3", **where) == 3


def test_a_quota_above_the_affinity_leaves_the_affinity(tmp_path: Path):
    where = v2(tmp_path, "/", {"/": f"{(AFFINITY + 3) * 100000} 100000"})
    assert available_cpus(**where) == AFFINITY


def test_cgroup_v1_cfs_quota(tmp_path: Path):
    root = tmp_path / "cgroup"
    own = root / "cpu,cpuacct" / "docker" / "abc"
    own.mkdir(parents=True)
    (own / "cpu.cfs_quota_us").write_text("250000\n")
    (own / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota(root, proc) == 2.5
    assert available_cpus(root, proc) == min(AFFINITY, 2)
    (own / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(root, proc) is None


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(tmp_path: Path):
    where = v2(tmp_path, "/", {"/": "lots of cpu"})
    assert cpu_quota(**where) is None
    assert cpu_quota(tmp_path / "nothing", tmp_path / "no-proc") is None
    assert available_cpus(tmp_path / "nothing", tmp_path / "no-proc") == AFFINITY


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "2000"])
def test_bad_workers_settings_are_refused(value: str):
    with pytest.raises(SettingsError, match="WORKERS"):
        Settings.from_env({"WORKERS": value})
    result = server_run({"PATH": "/usr/bin:/bin", "WORKERS": value}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("xylen-server: error: WORKERS")


def test_auto_and_numbers_are_accepted():
    assert Settings.from_env({"WORKERS": "AUTO"}).workers.lower() == "auto"
    assert Settings.from_env({"WORKERS": "4"}).workers == "4"
    assert Settings().workers == "1"  # nothing changes by default


def _v1_cpu_cgroup() -> Path | None:
    """A fresh cgroup v1 cpu group, or None when this machine does not let us make one."""
    base = Path("/sys/fs/cgroup/cpu")
    if not (base / "cpu.cfs_quota_us").exists():
        return None
    group = base / f"xylen-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_quota_us").write_text("50000\n")
    except OSError:
        if group.exists():
            group.rmdir()
        return None
    return group


def test_a_real_half_cpu_cgroup_gives_one_worker(models_root: Path, tmp_path: Path):
    """A real cgroup with half a CPU: WORKERS=auto runs one server process, no supervisor."""
    group = _v1_cpu_cgroup()
    if group is None:
        pytest.skip("no writable cgroup v1 cpu controller here (fake cgroup files tested above)")
    try:
        probe = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                sys.executable,
                "from xylen_server.workers import available_cpus as a, cpu_quota as q; "
                "print(q(), a())",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert probe.stdout.split() == ["0.5", "1"]
        env = {
            "PATH": "/usr/bin:/bin",
            "WORKERS": "auto",
            "MODEL_PATH": str(models_root),
            "GRPC_PORT": "0",
            "METRICS_PORT": "0",
            "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
            "PARITY_PROBE_ROWS": "256",
        }
        server = subprocess.Popen(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" -m xylen_server',
                sys.executable,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first.startswith("xylen-server listening on port ")
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
        assert server.returncode == 0
        assert "supervising" not in err and "[worker" not in err  # one plain server process
    finally:
        group.rmdir()


def test_a_sample_gets_the_worker_label_first():
    assert with_label("up 1", "worker", "0") == 'up{worker="0"} 1'
    assert with_label('rpc_total{a="b"} 2.0', "worker", "1") == 'rpc_total{worker="1",a="b"} 2.0'
    assert with_label("x{} 3", "worker", "2") == 'x{worker="2"} 3'


PAGE = """# HELP calls_total Calls.
# TYPE calls_total counter
calls_total{method="Predict"} {n}
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.001"} {n}
latency_seconds_bucket{le="+Inf"} {n}
latency_seconds_count {n}
latency_seconds_sum 0.5
"""


def test_merged_pages_keep_each_family_together_and_parse():
    merged = merge_metrics([(0, PAGE.replace("{n}", "3")), (1, PAGE.replace("{n}", "5"))])
    lines = merged.splitlines()
    assert lines.count("# TYPE latency_seconds histogram") == 1
    # Every sample of a family follows its header, both workers' together.
    assert lines.index("# TYPE latency_seconds histogram") > max(
        i for i, line in enumerate(lines) if line.startswith("calls_total")
    )
    samples = parse(merged)
    assert by_label(samples, "calls_total", "worker") == {"0": 3.0, "1": 5.0}
    assert by_label(samples, "latency_seconds_count", "worker") == {"0": 3.0, "1": 5.0}
