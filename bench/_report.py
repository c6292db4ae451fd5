"""Shared by the bench scripts: each ends with one ``record`` of its key numbers.

With ``BENCH_JSON=FILE`` in the environment (``bench/gpu.sh`` sets it), the numbers are appended to
FILE as one JSON line, with the peak GPU memory when CUDA was used; ``bench/gpu.sh`` prints them as
one table. Without it, ``record`` does nothing: every bench prints its own results as before.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence


def record(bench: str, **values: Any) -> None:
    path = os.environ.get("BENCH_JSON")
    if not path:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        values.setdefault("peak_gpu_mib", round(torch.cuda.max_memory_allocated() / 2**20))
    with open(path, "a") as f:
        f.write(json.dumps({"bench": bench, **values}, default=float) + "\n")


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free interval for the median of the population ``values`` were drawn from:
    order statistics k and n+1-k, k the largest whose coverage 1 - 2·P(Binomial(n, ½) < k) is at
    least ``confidence``. Returns (low, high, coverage); None when there are too few values (n < 6
    for 95 %). It takes the values as independent draws; where they are not (ratios that share a
    denominator), the coverage is approximate."""
    xs, n = sorted(values), len(values)
    tail, best = 0.0, None
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n  # P(Binomial(n, 1/2) <= k - 1)
        coverage = 1 - 2 * tail
        if coverage < confidence:
            break
        best = (xs[k - 1], xs[n - k], coverage)
    return best
