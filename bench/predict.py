"""predict throughput on a long video against the bare backbone, in one run.

    python bench/predict.py [--seconds 60] [--fps 30] [--window 64]

Writes a long 320×240 video (mpeg4 .avi, a panning texture), a backbone weights file and a
checkpoint for it, then times ``predict`` with a timeline (decode every frame once, backbone in
fixed batches, the LSTM over every window) and the bare backbone (the same FrozenBackbone network
predict runs) on pre-decoded tensors at the same batch size. Prints frames/s of each and the
ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import bare_rate  # noqa: E402

from pipeline.backbones import FrozenBackbone, create_backbone, default_frame_spec, recalibrate_batchnorm  # noqa: E402
from pipeline.files import sha256_file  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import FrameSelection, Provenance, TemporalConfig, WeightsIdentity  # noqa: E402
from pipeline.demo import write_video  # noqa: E402
from pipeline.runtime import resolve_device, resolve_precision  # noqa: E402
from pipeline.heads import HeadConfig, build_head  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402

from _report import record  # noqa: E402


def long_video(path: Path, n: int, fps: int) -> None:
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 25, 80), dtype=np.uint8))[None].float()
    wide = torch.nn.functional.interpolate(coarse, size=(240, 960), mode="bilinear")[0]
    frames = [wide[:, :, (2 * i) % 640:(2 * i) % 640 + 320].clamp(0, 255).byte().permute(1, 2, 0).numpy()
              for i in range(n)]
    write_video(path, frames, fps=fps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_cpu_allocator()  # as the CLI does
    device = resolve_device(args.device)
    amp = resolve_precision("auto", device)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        n = args.seconds * args.fps
        t = time.perf_counter()
        long_video(work / "long.avi", n, args.fps)
        print(f"video : {n} frames 320x240 at {args.fps} fps ({time.perf_counter() - t:.0f} s to write)")
        torch.manual_seed(0)
        backbone = create_backbone("mobilenet_v2", "none").net
        recalibrate_batchnorm(backbone, [torch.randn(16, 3, 224, 224) for _ in range(2)])
        torch.save(backbone.state_dict(), work / "backbone.pt")
        spec = default_frame_spec("mobilenet_v2")  # the ImageNet weights' transform: 232 -> 224
        head_cfg = HeadConfig(num_classes=51, input_dim=1280)
        prov = Provenance(backbone="mobilenet_v2", weights=WeightsIdentity(
            source="file", sha256=sha256_file(work / "backbone.pt"), path=str(work / "backbone.pt")),
            frame_spec=spec, selection=FrameSelection(), feature_dim=1280, classes=tuple(f"c{i}" for i in range(51)),
            precision=str(amp or torch.float32).removeprefix("torch."))
        save_checkpoint(work / "model.pt", {
            "kind": "temporal", "model_config": head_cfg.to_dict(), "train_config": TemporalConfig("", "").to_dict(),
            "frame_spec": spec.to_dict(), "classes": list(prov.classes), "cache": prov.to_dict(), "epoch": 0,
            "model_state": build_head(head_cfg).state_dict(), "metrics": {}})

        predictor = Predictor(work / "model.pt", device=args.device, batch_size=args.batch_size)
        model = FrozenBackbone(backbone.to(device).eval(), spec)  # what predict runs
        bare1 = bare_rate(model, min(n, 1024), args.batch_size, spec, device, amp)
        t = time.perf_counter()
        (pred,) = predictor.predict([work / "long.avi"], window=args.window, progress=False)
        rate = pred.frames / (time.perf_counter() - t)
        bare2 = bare_rate(model, min(n, 1024), args.batch_size, spec, device, amp)
        bare = (bare1 + bare2) / 2
        print(f"predict: {rate:.1f} frames/s ({pred.frames} frames, {len(pred.windows)} windows of {args.window}, "
              f"decode + backbone + LSTM timeline)")
        print(f"bare backbone: {bare:.1f} frames/s (before {bare1:.1f}, after {bare2:.1f}), batch {args.batch_size}, "
              f"{device}")
        print(f"ratio predict/bare: {rate / bare:.3f}")
        record("predict", device=str(device), pipeline_fps=rate, bare_fps=bare, ratio=rate / bare)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
