"""Stage-two speed on an HMDB51-sized cache, against an end-to-end epoch over the same clips.

    python bench/temporal.py [--train 3570] [--val 1530] [--frames 90] [--device auto]

Writes a synthetic cache (3,570 train + 1,530 val videos, ~90 frames each, 1280-d float16, the size
of HMDB51 split 1), then measures in this one run:

* loading both splits with ``FeatureCache.load_split`` (seconds, MB/s), twice: first from disk
  (after ``sync`` and dropping the page cache, where the OS allows it; otherwise straight after
  writing) and then again from the page cache, as a second training run on the same cache reads it;
* a ``train_one_epoch`` of the LSTM head (seq-len 16, hidden 512, batch 64): seconds and clips/s;
* the end-to-end equivalent: MobileNetV2 forward + backward on every frame of the same clips
  (train mode, 224×224, channels_last), timed on a few small batches and scaled to the epoch.

It prints the ratio end-to-end / cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.backbones import create_backbone  # noqa: E402
from pipeline.cache import FeatureCache, VideoRecord, write_cache  # noqa: E402
from pipeline.engine import FeatureBank, train_one_epoch  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from pipeline.config import FrameSelection, FrameSpec, Provenance, WeightsIdentity  # noqa: E402
from pipeline.heads import HeadConfig, build_head  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402

from _report import record  # noqa: E402


def synthetic_cache(path: Path, n_train: int, n_val: int, frames: int, classes: int = 51, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 1280), dtype=np.float32)

    def records(split: str, n: int):
        for i in range(n):
            c = i % classes
            t = int(rng.integers(frames * 2 // 3, frames * 4 // 3 + 1))
            f = centres[c] + rng.standard_normal((t, 1280), dtype=np.float32)
            yield VideoRecord(f"{split}/c{c}/v{i}", c, f.astype(np.float16), np.arange(t), 30.0)

    prov = Provenance(backbone="mobilenet_v2", weights=WeightsIdentity(source="file", sha256="0" * 64),
                      frame_spec=FrameSpec(), selection=FrameSelection(), feature_dim=1280,
                      classes=tuple(f"c{i}" for i in range(classes)))
    write_cache(path, prov, {"train": records("train", n_train), "val": records("val", n_val)})


def end_to_end_seconds_per_frame(device: torch.device, batch_frames: int, repeats: int = 3) -> float:
    """MobileNetV2 forward + backward (train mode) per frame at 224×224."""
    model = create_backbone("mobilenet_v2", "none").net.to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch_frames, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (repeats * batch_frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3570)
    ap.add_argument("--val", type=int, default=1530)
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (the median is reported)")
    ap.add_argument("--e2e-clips", type=int, default=2, help="clips per end-to-end timing batch")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_cpu_allocator()  # as the CLI does
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_temporal_"))
    try:
        path = work / "hmdb_sized.h5"
        t = time.perf_counter()
        synthetic_cache(path, args.train, args.val, args.frames)
        print(f"cache: {args.train} train + {args.val} val videos, ~{args.frames} frames, 1280-d float16, "
              f"{path.stat().st_size / 1e6:.0f} MB on disk ({time.perf_counter() - t:.0f} s to write)")

        # A VM backs guest memory on first touch (measured here: ~0.7 GB/s the first time, ~8 GB/s
        # after); touch as much as the loads will allocate first, so the loads measure reading.
        t = time.perf_counter()
        warm = np.ones(2 * path.stat().st_size, dtype=np.uint8)
        first_touch = warm.nbytes / 1e6 / (time.perf_counter() - t)
        del warm
        print(f"memory : first touch of {2 * path.stat().st_size / 1e9:.1f} GB at {first_touch:.0f} MB/s "
              "(the machine, not the cache; done before timing the loads)")
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            first = "cold, page cache dropped"
        except OSError:
            first = "right after writing; page cache could not be dropped"
        for label in (first, "warm page cache"):
            train = val = None  # free the previous copy first, as a new training run would not have it
            t = time.perf_counter()
            with FeatureCache(path) as cache:
                train, val = cache.load_split("train"), cache.load_split("val")
            load_s = time.perf_counter() - t
            mb = (train.features.nbytes + val.features.nbytes) / 1e6
            print(f"load   : {load_s:.2f} s for {mb:.0f} MB = {mb / load_s:.0f} MB/s ({label})")

        bank = FeatureBank.from_arrays(train.features, train.offsets, train.labels, device)
        torch.manual_seed(0)
        model = build_head(HeadConfig(num_classes=len(train.classes), input_dim=train.features.shape[1],
                                      hidden=args.hidden)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for epoch in range(args.epochs):
            t = time.perf_counter()
            train_one_epoch(model, bank, opt, None, seq_len=args.seq_len, sampler="segment", batch_size=args.batch_size,
                            rng=np.random.default_rng(epoch), progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        epoch_s = float(np.median(times))
        clips = len(bank)
        print(f"epoch  : {epoch_s:.2f} s ({clips} clips x {args.seq_len} frames, hidden {args.hidden}, batch "
              f"{args.batch_size}) = {clips / epoch_s:.0f} clips/s on {device} [{', '.join(f'{x:.2f}' for x in times)}]")

        per_frame = end_to_end_seconds_per_frame(device, args.e2e_clips * args.seq_len)
        e2e_epoch = per_frame * clips * args.seq_len + epoch_s  # + the same head work
        print(f"e2e    : MobileNetV2 fwd+bwd {1 / per_frame:.1f} frames/s -> {e2e_epoch:.0f} s per epoch over the "
              f"same clips (measured on {args.e2e_clips * args.seq_len} frames, scaled)")
        print(f"ratio end-to-end / cached epoch: {e2e_epoch / epoch_s:.0f}x")
        record("temporal", device=str(device), epoch_s=epoch_s, clips_per_s=clips / epoch_s,
               e2e_epoch_s=e2e_epoch, ratio=e2e_epoch / epoch_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
