"""The rooms and the direction of their imports, and what importing them costs.

``xylen_server`` is built in layers, imports running one way only::

    root (settings, errors, candles, signals, health) <- serving <- versions <- learning <- api
        <- server.py, __main__

``devtools`` drives a server from outside: nothing in the package imports it. The coordinator
uses only the server's import-light root modules. Every import in every module counts, the ones
inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from harness import write_model

REPO = Path(__file__).resolve().parents[1]

#: Rank of each room: a module may import modules of its own rank or lower.
RANKS = {"root": 0, "serving": 1, "versions": 2, "learning": 3, "api": 4, "top": 5}
TOP = {"server", "__main__"}
HEAVY = ("onnx", "onnxruntime", "polars", "sklearn", "xgboost", "catboost", "lightgbm", "pyarrow")


def room(module: str) -> str:
    """``xylen_server.learning.job.run`` -> ``learning``; root modules -> ``root``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in RANKS or parts[1] == "devtools":
        return parts[1]
    return "top" if parts[1] in TOP else "root"


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (line, dotted name), at any depth of the file."""
    tree = ast.parse(path.read_text())
    found = []
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_imports_run_one_way_through_the_rooms_of_the_server():
    wrong = []
    for path in sources("xylen_server"):
        here = module_name(path)
        mine = room(here)
        for line, target in imports_of(path):
            if not target.startswith("xylen_server.") or target == "xylen_server":
                continue
            theirs = room(target)
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if theirs == "devtools" and mine != "devtools":
                wrong.append(f"{where} (nothing in the package imports devtools)")
            elif mine != "devtools" and RANKS.get(theirs, 0) > RANKS[mine]:
                wrong.append(f"{where} ({mine} may not import {theirs})")
    assert not wrong, "\n".join(wrong)


#: The prediction log's rooms (``xylen_server/learning/``), each importing only those before it.
PREDICTION_LOG_ROOMS = [
    "part_files",
    "prediction_ring",
    "part_index",
    "part_rollup",
    "prediction_log",
]


def test_the_prediction_logs_rooms_import_one_way():
    """The parts' files, the ring, the parts' index, the rollup, then the log that uses them:
    nothing lower imports what is built on it."""
    wrong = []
    for rank, name in enumerate(PREDICTION_LOG_ROOMS):
        path = REPO / "xylen_server" / "learning" / f"{name}.py"
        for line, target in imports_of(path):
            other = target.removeprefix("xylen_server.learning.").split(".")[0]
            if other in PREDICTION_LOG_ROOMS[rank:] and other != name:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_coordinator_uses_only_the_servers_root_modules():
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path in sources("xylen_coordinator")
        for line, target in imports_of(path)
        if target.startswith("xylen_server.") and room(target) != "root"
    ]
    assert not wrong, "\n".join(wrong)


def test_the_root_modules_import_no_training_code_but_the_feature_free_parts():
    """The coordinator imports the root: it must stay free of the converter and the trainers'
    libraries. ``settings`` may read the training minimum (numpy only)."""
    for name in ("errors", "candles", "signals", "health"):
        targets = [t for _, t in imports_of(REPO / "xylen_server" / f"{name}.py")]
        assert not [t for t in targets if t.startswith(("training", "onnx"))], name


def loaded_after(code: str) -> list[str]:
    """The heavy libraries in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.parametrize(
    ("code", "allowed"),
    [
        ("import xylen_coordinator", ()),
        ("import xylen_coordinator.server", ()),
        ("import xylen_server.candles, xylen_server.signals, xylen_server.errors", ()),
        # The request path: validation, featurising, the predictor and the servicer.
        ("import xylen_server.serving.predictor", ()),
        # The whole server before a model loads; pyarrow writes the prediction log.
        ("import xylen_server.server", ("pyarrow",)),
    ],
)
def test_importing_loads_no_heavy_library_it_does_not_need(code, allowed):
    assert [m for m in loaded_after(code) if m not in allowed] == []


def test_a_lightgbm_server_loads_no_other_model_library(tmp_path: Path):
    """Serving a LightGBM model (loaded, converted, parity-checked, warmed, SERVING) loads
    neither XGBoost nor CatBoost nor scikit-learn nor polars, nor (serving ONNX) LightGBM itself:
    the parity reference is computed by a child process."""
    write_model(tmp_path, "model_1", "lightgbm", trees=10)
    code = f"""
import asyncio
from pathlib import Path
from xylen_server.server import start
from xylen_server.settings import Settings
settings = Settings(
    model_path=Path({str(tmp_path)!r}), host="127.0.0.1", grpc_port=0, metrics_port=0
)
async def main():
    running = await start(settings)
    await running.stop(0)
asyncio.run(main())
"""
    loaded = loaded_after(code)
    assert "onnxruntime" in loaded  # it did serve
    # the native booster, the converter and their stacks ran in the parity child, not here
    unwanted = ("sklearn", "polars", "xgboost", "catboost", "lightgbm", "scipy", "pandas", "onnx")
    assert [m for m in loaded if m in unwanted] == []
