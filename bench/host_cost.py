"""What the CUDA path's main process pays per frame before the GPU sees it, measured on any machine.

    python bench/host_cost.py [--frames 2048] [--repeats 2]

On CUDA, extract-features decodes in DataLoader worker processes; each chunk of decoded uint8
frames reaches the main process through shared memory, and the pin-memory thread copies it once
more into page-locked memory. This times, in the main thread, receiving the chunks (and touching
every page, as the copy does) and receiving plus one copy into a reused buffer (what pinning costs
in CPU, without CUDA), with one decoding worker. It prints ms of main-thread CPU per frame and the
frames/s that cost alone would allow: the ceiling of GPU extraction from the host side, which the
H200's ~6,000 frames/s (README) sits under.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import record  # noqa: E402
from extract import make_jpeg_dataset  # noqa: E402

from pipeline.backbones import default_frame_spec  # noqa: E402
from pipeline.config import DatasetSpec, FrameSelection  # noqa: E402
from pipeline.data import index_dataset  # noqa: E402
from pipeline.extract import frame_loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_host_"))
    try:
        make_jpeg_dataset(work / "data", args.frames)
        spec = default_frame_spec("mobilenet_v2")
        index = index_dataset(DatasetSpec(str(work / "data")))
        jobs = [(i, v.path, v.kind) for i, v in enumerate(v for vs in index.splits.values() for v in vs)]
        buf = torch.empty(args.batch_size, 3, spec.size, spec.size, dtype=torch.uint8,
                          memory_format=torch.channels_last)
        cost: dict[str, list[float]] = {"receive": [], "receive + one copy": []}
        for _ in range(args.repeats):
            for mode in cost:
                loader = frame_loader(jobs, spec, FrameSelection(), chunk_frames=64, workers=1,
                                      device=torch.device("cpu"), batch_size=args.batch_size, inline=False)
                n, busy, it = 0, 0.0, iter(loader)
                while True:
                    t = time.thread_time()
                    chunk = next(it, None)
                    if chunk is None:
                        break
                    k = chunk.frames.shape[0]
                    if k and mode == "receive":
                        chunk.frames.permute(0, 2, 3, 1).reshape(-1)[::4096].sum()  # every page
                    elif k:
                        buf[:k].copy_(chunk.frames)
                    busy += time.thread_time() - t
                    n += k
                cost[mode].append(busy / n)
        for mode, c in cost.items():
            ms = min(c) * 1e3
            print(f"{mode:20s}: {ms:.3f} ms of main-thread CPU a frame ({spec.size}x{spec.size} uint8) "
                  f"-> at most {1 / min(c):,.0f} frames/s from the host")
        rec, cp = min(cost["receive"]), min(cost["receive + one copy"])
        record("host_cost", receive_ms=rec * 1e3, receive_copy_ms=cp * 1e3, ceiling_fps=1 / cp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
