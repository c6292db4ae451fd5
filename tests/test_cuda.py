"""The CUDA paths (autocast, channels_last, pinned memory, GradScaler): skipped without a GPU.

``bench/gpu.sh`` runs these on a lent GPU. Each compares the GPU result with the CPU one or with
a known outcome, so a broken CUDA path fails here rather than being timed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE
from synthetic import separable_cache
from test_finetune import colour_data, ft_cfg  # noqa: F401 - a fixture

from pipeline.cache import FeatureCache
from pipeline.config import DatasetSpec, ExtractConfig, FrameSpec, TemporalConfig
from pipeline.extract import extract_features
from pipeline.finetune import finetune
from pipeline.predict import Predictor
from pipeline.train import evaluate_checkpoint, train_temporal

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh)")]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.mark.parametrize("precision,min_cos", [("fp32", 0.999), ("bf16", 0.99), ("fp16", 0.995)])
def test_extract_on_cuda_matches_cpu(tiny_dataset, tmp_path, weights_file, precision, min_cos):
    def run(device: str, prec: str, out: Path) -> dict[str, np.ndarray]:
        extract_features(ExtractConfig(dataset=DatasetSpec(str(tiny_dataset)), output=str(out),
                                       weights=str(weights_file), frame_spec=FrameSpec(size=SIZE), batch_size=8,
                                       device=device, precision=prec, dtype="float32", workers=2), progress=False)
        with FeatureCache(out) as c:
            return {s: c.load_split(s).features for s in c.splits}

    cpu = run("cpu", "fp32", tmp_path / "cpu.h5")
    gpu = run("cuda", precision, tmp_path / "gpu.h5")
    for split in cpu:
        assert cpu[split].shape == gpu[split].shape
        assert np.isfinite(gpu[split]).all()
        assert _cosine(cpu[split], gpu[split]).min() > min_cos, split


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_temporal_on_cuda_learns(tmp_path, precision):
    cache = separable_cache(tmp_path / "c.h5", classes=4, per_class={"train": 24, "test": 10})
    r = train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "run"), hidden=32, epochs=8,
                                      seq_len=8, device="cuda", precision=precision), progress=False)
    assert r.best["top1"] >= 0.8  # chance 0.25
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", cache, "test", device="cuda")
    assert ev.metrics["top1"] == pytest.approx(r.best["top1"], abs=0.05)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_with_amp_on_cuda(colour_data, tmp_path, weights_file, precision):  # noqa: F811
    r = finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=4, trainable_blocks=2, device="cuda",
                        precision=precision, workers=2), progress=False)
    assert all(np.isfinite(h["train_loss"]) for h in r.history)
    assert r.best["top1"] >= 0.66  # chance 1/3


def test_predict_on_cuda_equals_evaluate(tiny_dataset, tmp_path, weights_file):
    cache = tmp_path / "f.h5"
    extract_features(ExtractConfig(dataset=DatasetSpec(str(tiny_dataset)), output=str(cache),
                                   weights=str(weights_file), frame_spec=FrameSpec(size=SIZE), batch_size=8,
                                   device="cuda"), progress=False)
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "run"), hidden=16, epochs=2, seq_len=4,
                                  device="cuda", val_split="test"), progress=False)
    ckpt = tmp_path / "run" / "best.pt"
    ev = evaluate_checkpoint(ckpt, cache, "test", device="cuda")
    preds = Predictor(ckpt, device="cuda", batch_size=8).predict([tiny_dataset / v for v in ev.videos],
                                                                 progress=False)
    for p, want in zip(preds, ev.probs):
        assert p.error is None
        np.testing.assert_allclose(p.probs, want, atol=2e-2)  # bf16 autocast: same features up to rounding
