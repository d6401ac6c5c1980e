"""Build hook: a wheel or ``pip install .`` from a clean checkout carries the generated stubs.

``xylen/v1/*_pb2*.py`` are generated from ``protos/xylen/v1/*.proto`` and never committed. When
they are missing or older than a ``.proto`` (a clean checkout, a fresh clone in a container
build), this runs ``grpc_tools.protoc`` (a build requirement in pyproject.toml, the same pinned
version as the runtime) before setuptools looks for packages. ``make proto`` makes the same
files plus the mypy stubs for development.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
OUT = ROOT / "xylen" / "v1"


def generate_stubs() -> None:
    # xylen/v1 and the vendored Open Inference Protocol (protos/xylen/inference/README.md).
    sources = sorted(PROTOS.glob("xylen/v1/*.proto")) + sorted(
        PROTOS.glob("xylen/inference/*.proto")
    )
    if not sources:  # an sdist without protos/ already carries the stubs
        return
    newest = max(p.stat().st_mtime for p in sources)
    outs = [ROOT / p.parent.relative_to(PROTOS) for p in sources]
    targets = [out / f"{p.stem}_pb2.py" for p, out in zip(sources, outs, strict=True)] + [
        out / f"{p.stem}_pb2_grpc.py" for p, out in zip(sources, outs, strict=True)
    ]
    if all(t.exists() and t.stat().st_mtime >= newest for t in targets):
        return
    import grpc_tools
    from grpc_tools import protoc

    for out in {OUT, *outs}:
        out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(str(p) for p in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("setup.py: grpc_tools.protoc failed on protos/xylen")
    for marker in (
        ROOT / "xylen" / "__init__.py",
        OUT / "__init__.py",
        ROOT / "xylen" / "inference" / "__init__.py",
        ROOT / "xylen" / "py.typed",
    ):
        marker.touch()


generate_stubs()
setup()
