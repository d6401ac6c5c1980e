"""``python -m xylen_server.serving.reference NICE MODEL_DIR OUT.npz ROWS``: the parity reference
child (:mod:`xylen_server.serving.parity`), started by
:func:`~xylen_server.serving.model_store.native_reference` for a load or hot swap of files that
have no stored reference (``parity.npz``) bound to them.

It adds ``NICE`` (``MODEL_LOAD_NICE``) to its niceness *before* importing numpy, the booster
library or onnx: that is half a second or more of CPU per swap (interpreter, imports, probe,
native predictions), and at the server's priority it took a core from Predict on a 2-core
machine for as long as it ran (the p99 during back-to-back swaps was 2.5x the p99 without). At
nice 10 the kernel gives the server's threads the cores first and the child what is left; the
swap takes longer, Predict does not. Not SCHED_IDLE: see :mod:`xylen_server.learning.job`.

Only the standard library is imported here, so nothing runs at the server's priority but the
interpreter's start.
"""

from __future__ import annotations

import contextlib
import os
import sys


def main(argv: list[str]) -> int:
    nice = int(argv[0])
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    from xylen_server.serving.parity import reference_main

    return reference_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
