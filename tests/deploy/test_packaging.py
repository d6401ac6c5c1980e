"""A wheel built from a clean checkout carries the generated stubs (setup.py runs protoc), and
the installed package imports from outside the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_wheel_from_a_clean_checkout_has_the_stubs_and_imports(tmp_path: Path) -> None:
    # the tracked files only, as a fresh clone has them: no xylen/ (stubs), no venv
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    checkout = tmp_path / "checkout"
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():
            target = checkout / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (checkout / "xylen").exists()

    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), "."],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("xylen-*.whl")
    listing = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True
    ).stdout
    for stub in ("model_service_pb2.py", "model_service_pb2_grpc.py", "ensemble_service_pb2.py"):
        assert f"xylen/v1/{stub}" in listing, listing

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # -I: no current directory, no PYTHONPATH; the venv's site-packages give the dependencies
    # (the editable install of this repo there is shadowed by the --target copy first on the path)
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        "import xylen.v1.model_service_pb2_grpc as g, xylen_coordinator, xylen_server.server; "
        "print(g.__file__); print(xylen_coordinator.__file__); "
        "print(g.ModelServiceStub.__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    stub_file, package_file, stub_name = run.stdout.split()
    assert stub_file.startswith(str(site)) and package_file.startswith(str(site)), run.stdout
    assert stub_name == "ModelServiceStub"
