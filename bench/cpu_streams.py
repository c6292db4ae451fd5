"""CPU: one model with all cores as intra-op threads, against one single-threaded replica per core.

    python bench/cpu_streams.py [--backbone mobilenet_v2] [--batch-size 64] [--repeats 5]

extract-features runs one network with ``torch.get_num_threads()`` intra-op threads and decodes
between its batches. Some CPU runtimes instead run "throughput streams": one replica per core, one
thread each, each decoding its own batches, so that one replica's decoding overlaps the others'
forward passes. That only pays if the replicas together run the network at least as fast as the
intra-op threads do. This measures exactly that on the bare network (``FrozenBackbone``, as the
pipeline runs it, BatchNorm recalibrated on noise so activations are realistic) on one batch of
random frames: frames/s with N intra-op threads, with one thread, and with N replicas of one
thread each in N Python threads (torch releases the GIL inside each op), alternated ``--repeats``
times. It prints the median ratio replicas ÷ intra-op; under 1, streams lose before any decoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import record  # noqa: E402

from pipeline.backbones import FrozenBackbone, create_backbone, default_frame_spec, recalibrate_batchnorm  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402


def _run(net: torch.nn.Module, x: torch.Tensor, batches: int, threads: int | None = None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread: set it in each replica
    with torch.inference_mode():
        for _ in range(batches):
            net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8, help="batches per timed run and replica")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tune_cpu_allocator()
    cores = torch.get_num_threads()
    spec = default_frame_spec(args.backbone)
    torch.manual_seed(0)
    model = create_backbone(args.backbone, "none", input_size=spec.size).net
    recalibrate_batchnorm(model, [torch.randn(16, 3, spec.size, spec.size) for _ in range(2)])
    frozen = FrozenBackbone(model.to(memory_format=torch.channels_last).eval(), spec)
    x = frozen.center(torch.randint(0, 256, (args.batch_size, 3, spec.size, spec.size), dtype=torch.uint8))
    print(f"{args.backbone}, batch {args.batch_size}, {spec.size}x{spec.size}, {cores} cores; frames/s:")

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    ratios = []
    for _ in range(args.repeats):
        torch.set_num_threads(cores)
        _run(frozen.net, x, 1)
        intra = args.batches * args.batch_size / timed(lambda: _run(frozen.net, x, args.batches))
        torch.set_num_threads(1)
        _run(frozen.net, x, 1)
        one = args.batches * args.batch_size / timed(lambda: _run(frozen.net, x, args.batches))

        def replicas() -> None:
            ts = [threading.Thread(target=_run, args=(frozen.net, x, args.batches, 1)) for _ in range(cores)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        streams = cores * args.batches * args.batch_size / timed(replicas)
        ratios.append(streams / intra)
        print(f"  {cores} intra-op threads {intra:7.1f}   1 thread {one:7.1f} ({intra / one:.2f}x)   "
              f"{cores} replicas x 1 thread {streams:7.1f}   ratio replicas/intra-op {streams / intra:.3f}")
    torch.set_num_threads(cores)
    ratio = statistics.median(ratios)
    print(f"ratio replicas/intra-op: {ratio:.3f} (median of {len(ratios)}; runs {min(ratios):.3f}-{max(ratios):.3f})")
    record("cpu_streams", backbone=args.backbone, ratio=ratio)


if __name__ == "__main__":
    main()
