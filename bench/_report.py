"""Shared by the bench scripts: each ends with one ``record`` of its key numbers.

With ``BENCH_JSON=FILE`` in the environment (``bench/gpu.sh`` sets it), the numbers are appended to
FILE as one JSON line, with the peak GPU memory when CUDA was used; ``bench/gpu.sh`` prints them as
one table. Without it, ``record`` does nothing: every bench prints its own results as before.
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(bench: str, **values: Any) -> None:
    path = os.environ.get("BENCH_JSON")
    if not path:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        values.setdefault("peak_gpu_mib", round(torch.cuda.max_memory_allocated() / 2**20))
    with open(path, "a") as f:
        f.write(json.dumps({"bench": bench, **values}, default=float) + "\n")
