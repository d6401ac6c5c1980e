"""``make deploy`` where no container engine works: a clear message pointing at ``make up`` and a
non-zero exit (these machines have a docker CLI but no engine; the test puts a docker first on
PATH that fails the way an unreachable daemon does, so it means the same on any machine)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_deploy_without_an_engine_points_at_make_up(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.write_text(
        "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock' >&2\n"
        "exit 1\n"
    )
    docker.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    result = subprocess.run(
        ["make", "--no-print-directory", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no working container engine" in result.stderr
    assert "make up" in result.stderr
    assert "docker compose up" not in result.stdout  # nothing was attempted
