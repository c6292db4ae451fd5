"""End-to-end fine-tuning against train-temporal on the same clips, in one run.

    python bench/finetune.py [--videos 48] [--frames 32] [--size 224] [--seq-len 8] [--batch-size 8]

Generates a JPEG frame-folder dataset (320×240), extracts its features, then times one training
epoch of each stage over the same videos, clip sampler (TSN segments), seq-len and batch size:

* end-to-end: decode + MobileNetV2 forward/backward (all blocks trainable) + LSTM;
* cached:     the LSTM on the cached features.

Prints seconds per epoch, their ratio, and peak memory per clip of the end-to-end step (CUDA: peak
allocated; CPU: growth of the process's peak RSS during the epoch, divided by the batch size).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import make_jpeg_dataset  # noqa: E402

from pipeline.backbones import create_backbone, recalibrate_batchnorm  # noqa: E402
from pipeline.config import DatasetSpec, ExtractConfig, FinetuneConfig, FrameSpec, TemporalConfig  # noqa: E402
from pipeline.extract import extract_features  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from pipeline.finetune import finetune  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402

from _report import record  # noqa: E402
from pipeline.train import train_temporal  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seq-len", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_cpu_allocator()  # as the CLI does
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        make_jpeg_dataset(work / "data", args.videos * args.frames, per_video=args.frames)
        # a validation split (one clip per class folder) so both stages can evaluate
        for d in sorted((work / "data" / "train").iterdir()):
            first = sorted(d.iterdir())[0]
            (work / "data" / "val" / d.name).mkdir(parents=True)
            shutil.copytree(first, work / "data" / "val" / d.name / f"val_{first.name}")
        torch.manual_seed(0)
        backbone = create_backbone("mobilenet_v2", "none").net
        recalibrate_batchnorm(backbone, [torch.randn(16, 3, args.size, args.size) for _ in range(2)])
        torch.save(backbone.state_dict(), work / "backbone.pt")
        spec = FrameSpec(size=args.size)
        t = time.perf_counter()
        extract_features(ExtractConfig(dataset=DatasetSpec(str(work / "data")), output=str(work / "f.h5"),
                                       weights=str(work / "backbone.pt"), frame_spec=spec, device=args.device),
                         progress=False)
        print(f"data  : {args.videos} videos x {args.frames} JPEG frames 320x240; features cached in "
              f"{time.perf_counter() - t:.0f} s (a one-off cost)")

        common = dict(seq_len=args.seq_len, batch_size=args.batch_size, hidden=512, device=args.device)
        s2 = train_temporal(TemporalConfig(cache=str(work / "f.h5"), out=str(work / "s2"), epochs=3, **common),
                            progress=False)
        cached = float(np.median([h["epoch_seconds"] for h in s2.history]))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        e2e = finetune(FinetuneConfig(dataset=DatasetSpec(str(work / "data")), out=str(work / "e2e"),
                                      weights=str(work / "backbone.pt"), frame_spec=spec, epochs=1, **common),
                       progress=False)
        e2e_s = e2e.history[0]["epoch_seconds"]
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**20 / args.batch_size
            mem_txt = f"{mem:.0f} MiB peak allocated per clip"
        else:
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            mem_txt = f"{grown / args.batch_size:.0f} MiB peak RSS growth per clip (CPU; a rough measure)"
        print(f"cached epoch    : {cached:.3f} s ({args.videos} clips x {args.seq_len} frames, batch {args.batch_size}, "
              f"median of 3)")
        print(f"end-to-end epoch: {e2e_s:.1f} s (all 19 blocks trainable, {args.size}x{args.size}, {device}); {mem_txt}")
        print(f"ratio end-to-end / cached: {e2e_s / cached:.0f}x")
        record("finetune", device=str(device), epoch_s=e2e_s, cached_epoch_s=cached, ratio=e2e_s / cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
