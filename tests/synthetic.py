"""Synthetic feature caches with known structure, written through the real cache writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache import VideoRecord, write_cache
from pipeline.config import FrameSelection, FrameSpec, Provenance, WeightsIdentity


def provenance(classes: list[str], dim: int, dtype: str = "float16") -> Provenance:
    return Provenance(backbone="mobilenet_v2", weights=WeightsIdentity(source="file", sha256="0" * 64),
                      frame_spec=FrameSpec(size=32), selection=FrameSelection(), feature_dim=dim,
                      classes=tuple(classes), dtype=dtype)


def separable_cache(path: Path, *, classes: int = 4, per_class: dict[str, int] | None = None, dim: int = 32,
                    length: tuple[int, int] = (12, 40), noise: float = 1.0, seed: int = 0,
                    dtype: str = "float16") -> Path:
    """Each class has its own mean feature vector; every frame is that plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    per_class = per_class or {"train": 24, "test": 10}
    splits = {}
    for split, n in per_class.items():
        recs = []
        for c in range(classes):
            for k in range(n):
                t = int(rng.integers(*length))
                f = centres[c] + noise * rng.normal(0, 1, (t, dim))
                recs.append(VideoRecord(f"{split}/c{c}/v{k}", c, f.astype(dtype), np.arange(t), 30.0))
        splits[split] = iter(recs)
    return write_cache(path, provenance([f"c{c}" for c in range(classes)], dim, dtype), splits)


def reversal_cache(path: Path, *, per_class: dict[str, int] | None = None, dim: int = 16,
                   length: tuple[int, int] = (16, 33), noise: float = 0.3, seed: int = 0) -> Path:
    """Two classes whose videos are exact time reversals of each other: the same frames, in the
    opposite order, so any order-invariant summary of the frames cannot tell them apart."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, dim), rng.normal(0, 1, dim)
    per_class = per_class or {"train": 40, "test": 20}
    splits = {}
    for split, n in per_class.items():
        recs = []
        for k in range(n):
            t = int(rng.integers(*length))
            w = np.linspace(0, 1, t)[:, None]
            f = (1 - w) * a + w * b + noise * rng.normal(0, 1, (t, dim))
            for label, seq in ((0, f), (1, f[::-1])):  # identical frame multiset per pair
                recs.append(VideoRecord(f"{split}/{'ab' if label == 0 else 'ba'}/v{k}", label,
                                        np.ascontiguousarray(seq).astype(np.float16), np.arange(t), 30.0))
        splits[split] = iter(recs)
    return write_cache(path, provenance(["forward", "backward"], dim), splits)
