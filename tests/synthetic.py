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


def write_checkpoint(path: Path, *, weights: Path | None, backbone: str = "mobilenet_v2", size: int = 32,
                     head: dict | None = None, classes: tuple[str, ...] = ("a", "b", "c"), seq_len: int = 6,
                     eval_clips: int = 2, feature_dim: int | None = None, seed: int = 0, scale: float = 1.0,
                     precision: str = "float32") -> Path:
    """A stage-two checkpoint as train-temporal writes it, without training: a random head (its
    weights times ``scale``) over ``backbone`` features from ``weights``."""
    import torch

    from pipeline.backbones import create_backbone
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import TemporalConfig
    from pipeline.files import sha256_file
    from pipeline.heads import HeadConfig, build_head

    bb = create_backbone(backbone, "none", input_size=size) if feature_dim is None else None
    dim = feature_dim or bb.num_features
    spec = FrameSpec(size=size, mean=bb.frame_spec.mean, std=bb.frame_spec.std) if bb else FrameSpec(size=size)
    ident = (WeightsIdentity(source="file", sha256=sha256_file(weights), path=str(weights)) if weights
             else WeightsIdentity(source="file", sha256="0" * 64, path="/nonexistent/backbone.pt"))
    prov = Provenance(backbone=backbone, weights=ident, frame_spec=spec, selection=FrameSelection(), feature_dim=dim,
                      classes=tuple(classes), precision=precision)
    cfg = HeadConfig(**{"num_classes": len(classes), "input_dim": dim, "hidden": 16, "dropout": 0.0, **(head or {})})
    torch.manual_seed(seed)
    model = build_head(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    tc = TemporalConfig(cache="", out="", seq_len=seq_len, eval_clips=eval_clips).to_dict()
    save_checkpoint(path, {"kind": "temporal", "model_config": cfg.to_dict(), "train_config": tc,
                           "frame_spec": spec.to_dict(), "classes": list(classes), "cache": prov.to_dict(),
                           "epoch": 1, "model_state": model.state_dict(), "metrics": {"top1": 0.5}})
    return path
