"""Stage two's splits as ``ClipSource``s: held in memory, or read lazily for caches larger than RAM.

``open_splits`` is the one way train, evaluate and the sweep open the splits they read::

    with FeatureCache(path) as cache:
        opened = open_splits(cache, ["train", "val"], device, load="auto", memory_budget=None)
    train = opened["train"]        # .source (ClipSource), .data (labels, videos, ...), .mode
    train_one_epoch(model, train.source, ...)
    opened.close()                 # lazy splits hold a file handle until then (or garbage collection)

``load``: ``memory`` reads each split whole into one tensor (``FeatureBank``); ``lazy`` leaves it
on disk and reads the rows each batch samples (``LazyBank``); ``auto`` holds splits in memory,
smallest first, while their features fit in the memory budget (``memory_budget`` GB, default
``AUTO_FRACTION`` of the memory available now, and of the free GPU memory on CUDA), and reads the
rest lazily. Both give the same values, so a seeded run gets identical results either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .cache import FeatureCache, LazySplit, SplitData, check_finite
from .engine import ClipSource, FeatureBank, LazyBank
from .errors import CacheError, ConfigError
from .runtime import available_memory

log = logging.getLogger(__name__)

LoadMode = Literal["auto", "memory", "lazy"]
LOAD_MODES = ("auto", "memory", "lazy")
AUTO_FRACTION = 0.5  # of the available memory: room for the model, the batches and everything else


@dataclass
class OpenSplit:
    split: str
    mode: Literal["memory", "lazy"]
    data: SplitData | LazySplit  # labels, videos, offsets, lengths, feature_dim, feature_bytes
    source: ClipSource
    seconds: float  # to read it (memory) or open it (lazy)

    def close(self) -> None:
        if isinstance(self.source, LazyBank):
            self.source.close()


class OpenSplits(dict[str, OpenSplit]):
    """split -> ``OpenSplit``; ``close()`` (or ``with``) releases the lazy ones' file handles."""

    def close(self) -> None:
        for o in self.values():
            o.close()

    def __enter__(self) -> OpenSplits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def modes(self) -> dict[str, str]:
        return {s: o.mode for s, o in self.items()}

    def describe(self) -> str:
        """One line for a log or a summary: what is in memory and what is read lazily."""
        parts = [f"{s} {o.mode} ({o.data.feature_bytes / 1e6:.0f} MB" + (f" in {o.seconds:.2f} s)" if o.mode == "memory"
                                                                          else ", read per batch)")
                 for s, o in self.items()]
        return ", ".join(parts)


def memory_budget(device: torch.device, budget_gb: float | None = None) -> tuple[int | None, str]:
    """Bytes of features ``auto`` may hold in memory, and how that number was found."""
    if budget_gb is not None:
        return int(budget_gb * 1e9), f"--memory-budget {budget_gb:g} GB"
    avail = available_memory()
    how = (f"{AUTO_FRACTION:.0%} of {avail / 1e9:.1f} GB available" if avail is not None
           else "available memory unknown")
    budget = None if avail is None else int(avail * AUTO_FRACTION)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = int(free * AUTO_FRACTION)
        if budget is None or gpu < budget:
            budget, how = gpu, f"{AUTO_FRACTION:.0%} of {free / 1e9:.1f} GB free on {device}"
    return budget, how


def plan_load(sizes: dict[str, int], load: str, budget: int | None) -> dict[str, str]:
    """split -> ``memory`` | ``lazy``. ``auto``: smallest splits in memory while the sum fits
    ``budget`` (None: unknown, everything in memory as before lazy loading existed)."""
    if load not in LOAD_MODES:
        raise ConfigError(f"unknown load mode {load!r}: use {', '.join(LOAD_MODES)}")
    if load != "auto":
        return {s: load for s in sizes}
    plan, held = {}, 0
    for s in sorted(sizes, key=lambda k: (sizes[k], k)):
        fits = budget is None or held + sizes[s] <= budget
        plan[s] = "memory" if fits else "lazy"
        held += sizes[s] if fits else 0
    return {s: plan[s] for s in sizes}


def open_splits(cache: FeatureCache, splits: list[str], device: torch.device, *, load: str = "auto",
                memory_budget_gb: float | None = None, prefetch: int = 2) -> OpenSplits:
    """Open ``splits`` of ``cache`` for the engine (see the module docstring); logs what was chosen."""
    names = list(dict.fromkeys(splits))
    for s in names:
        if s not in cache.splits:
            raise CacheError(f"split {s!r} is not in {cache.path} (has: {', '.join(cache.splits)})")
    sizes = {s: cache.feature_bytes(s) for s in names}
    if memory_budget_gb is not None and load != "auto":
        log.warning("--memory-budget is for --load auto, which it sizes; --load %s ignores it", load)
    budget, how = memory_budget(device, memory_budget_gb) if load == "auto" else (None, "")
    plan = plan_load(sizes, load, budget)
    out = OpenSplits()
    try:
        for s in names:
            t0 = time.perf_counter()
            if plan[s] == "memory":
                data, source = load_bank(cache, s, device)
            else:
                data, source = open_lazy_bank(cache, s, device, prefetch=prefetch)
            out[s] = OpenSplit(s, plan[s], data, source, time.perf_counter() - t0)
    except BaseException:  # a later split refused (damaged): the lazy ones opened before it are released
        out.close()
        raise
    if load == "auto":
        log.info("--load auto, memory budget %s (%s): %s", _gb(budget), how, out.describe())
    else:
        log.info("--load %s: %s", load, out.describe())
    return out


def _gb(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 1e9:.2f} GB"


def load_bank(cache: FeatureCache, split: str, device: torch.device) -> tuple[SplitData, FeatureBank]:
    """``split`` read whole into memory (one sequential read), checked for NaN/Inf."""
    data = cache.load_split(split)
    if len(data) == 0:
        raise CacheError(f"split {split!r} of {cache.path} has no videos; extract it first")
    step = 1 << 20
    for a in range(0, len(data.features), step):
        block = data.features[a:a + step]
        check_finite(block, np.arange(a, a + len(block)), data.offsets, data.videos, split, cache.path)
    return data, FeatureBank.from_arrays(data.features, data.offsets, data.labels, device)


def open_lazy_bank(cache: FeatureCache, split: str, device: torch.device, *,
                   prefetch: int = 2) -> tuple[LazySplit, LazyBank]:
    """``split`` left on disk: batches read the rows they sample. It is read through once first, in
    blocks (flat memory, ~0.3 s a GB warm), for what loading it in memory checks (checksums,
    NaN/Inf): found in the first epoch instead, damage came after --overwrite had cleared the old
    run, and in the test split after training."""
    cache.verify(split, finite=True)
    data = cache.open_lazy(split, checked=True)
    if len(data) == 0:
        data.close()
        raise CacheError(f"split {split!r} of {cache.path} has no videos; extract it first")
    return data, LazyBank(data, device, prefetch=prefetch)
