"""One retraining job, run as its own low-priority process:
``python -m xylen_server.learning.job SPEC.json``. Nothing of it runs inside the serving process:
the server imports only :class:`JobSpec` from this package, which stays import-light.

* :class:`JobSpec` -- what the server asks for (``spec.json``), :func:`progress` -- the lines the
  server follows;
* ``__main__`` -- the entry point: lowers its priority, *then* imports the heavy code;
* :mod:`~xylen_server.learning.job.run` -- reading the samples, training the candidate, the
  gate, writing the candidate model directory and ``result.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from xylen_server.settings import Settings


class JobFailed(RuntimeError):
    """The job cannot produce a trustworthy candidate; the message is the reason."""


@dataclass(frozen=True)
class JobSpec:
    """What the server asks one job to do (``spec.json``)."""

    job_id: str
    samples: str
    """The feedback samples directory (read while the server appends, see
    :func:`~xylen_server.learning.samples.read_samples`), or a Parquet file of samples."""
    serving_dir: str
    """The serving model's kept directory (read only)."""
    candidate_dir: str
    """Where to write the candidate model directory (only when the gate passes)."""
    result: str
    """Where to write the result JSON."""
    mode: str
    """``incremental`` or ``full``."""
    version: int
    """Version to give the candidate."""
    # Defaults come from the server's settings: one source of truth (see Settings.retrain_*).
    min_samples: int = Settings.retrain_min_samples
    holdout_fraction: float = Settings.retrain_holdout_fraction
    margin: float = Settings.retrain_gate_margin
    min_auc: float = Settings.retrain_gate_min_auc
    z: float = Settings.retrain_gate_z
    """Confidence (normal quantile) that the candidate's AUC is not chance."""
    threads: int = Settings.retrain_threads
    nice: int = Settings.retrain_nice
    cutoff_ms: int = 0
    """Samples received after this (UTC ms) are new to the serving model."""

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def progress(stage: str, message: str) -> None:
    """One progress line for the server."""
    print(json.dumps({"stage": stage, "message": message}), flush=True)
