"""Stage-one throughput: the full extract-features pipeline against the bare backbone, one run.

    python bench/extract.py [--backbone mobilenet_v2] [--seconds 20 | --frames N] [--repeats 9]
                            [--device auto] [--precision auto] [--batch-size 64] [--size S]

Generates a set of 320×240 JPEG frame folders (smooth random texture, like real video), as many
frames as the bare backbone runs in ``--seconds`` (so a fast and a slow backbone are measured over
runs of the same length, where start-up weighs the same), then measures in this one process:

* bare:     the pipeline's own network (``FrozenBackbone``: the backbone with BatchNorm and the whole
            input normalisation folded into the convs, as extract-features runs it) on one batch of
            the dataset's frames, pre-decoded, as float and already on the device, at the same batch size, precision and memory format; the
            unfused torchvision model is timed too, to show what the folding gains;
* pipeline: ``extract_features`` end to end: indexing, JPEG decoding and resizing (threads between
            batches on CPU, DataLoader workers on CUDA), device transfer, the uint8 → float input,
            the forward pass, and writing the HDF5 cache.

Both run with glibc's malloc thresholds tuned as the CLI tunes them (``pipeline/runtime.py``);
``--no-tune-allocator`` shows the difference.

It prints frames/s of each and their ratio (pipeline / bare; 1.0 = decoding and writing fully
hidden): the median over the runs, with a 95 % interval for it from order statistics (with 9 runs
the 2nd and 8th smallest ratios), so a margin can be read as robust or not. The interval is
approximate: it takes the runs as independent, and neighbouring ratios share a bare run. On CPU
it also prints the ceiling that decoding alone puts on that ratio: the model and the decoders
share the cores there, so a frame costs at least the forward plus its decoding split
over the decoder threads, F / (F + D / threads), with D the decode time of a frame on one core
(the pipeline's own decoder, measured here on the dataset's first frames) and F the bare model's.
It also prints the two other readings of the ratio: the share of that ceiling the pipeline
reaches, and the whole pipeline against the unfused torchvision module on pre-decoded frames.
The bare rate is measured before and after the pipeline and averaged, so drift in machine speed
does not bias the ratio. On a CUDA machine the same script reports the GPU figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.backbones import FrozenBackbone, create_backbone, default_frame_spec, recalibrate_batchnorm  # noqa: E402
from pipeline.config import DatasetSpec, ExtractConfig, FrameOverrides, FrameSelection, FrameSpec  # noqa: E402
from pipeline.extract import VideoFrameStream, extract_features  # noqa: E402
from pipeline.runtime import autocast_ctx, default_workers, resolve_device, resolve_precision  # noqa: E402
from pipeline.data import decode_image_file, index_dataset  # noqa: E402
from pipeline.preprocess import normalize_frames, resize_frames  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402

from _report import median_interval, record  # noqa: E402


def _write_video(d: Path, coarse: np.ndarray, n: int) -> None:
    d.mkdir(parents=True)
    base = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None].float(), size=(240 + 40, 320 + 40),
                                           mode="bilinear", align_corners=False)[0]
    for i in range(n):
        dy, dx = i % 40, (2 * i) % 40  # the camera pans: every frame differs
        img = base[:, dy:dy + 240, dx:dx + 320].clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(img).save(d / f"frame_{i + 1}.jpg", quality=90)


def make_jpeg_dataset(root: Path, frames: int, per_video: int = 100, seed: int = 0) -> int:
    """``frames`` 320x240 JPEGs in videos of ``per_video``. The textures are drawn here, in order, so
    the videos are the same whatever the number of processes that write them (a pixel can differ
    by one: the float upsampling rounds differently with another thread count)."""
    rng = np.random.default_rng(seed)
    n_videos = -(-frames // per_video)
    jobs = [(root / "train" / f"class{v % 4}" / f"video{v}", rng.integers(0, 256, (3, 24 + 1, 32 + 1), dtype=np.uint8),
             min(per_video, frames - v * per_video)) for v in range(n_videos)]
    procs = min(len(jobs), len(os.sched_getaffinity(0)), 16)  # the cores this process may use
    if procs <= 2:
        for job in jobs:
            _write_video(*job)
    else:  # a GPU box's many cores: 30k frames in seconds instead of a minute
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(_write_video, *zip(*jobs)))
    return n_videos


def decoded_batch(data: Path, batch: int, spec: FrameSpec) -> torch.Tensor:
    """The dataset's first ``batch`` frames, decoded and resized as the pipeline does: (B, 3, S, S) uint8."""
    files = sorted(data.rglob("*.jpg"), key=lambda f: (f.parent, int(f.stem.split("_")[1])))[:batch]
    return torch.stack([resize_frames(decode_image_file(f), spec) for f in files])


def decode_ms(data: Path, spec: FrameSpec, frames: int) -> float:
    """Milliseconds of one core per frame to read, decode and resize the dataset's first videos
    (about ``frames`` frames) with the pipeline's own decoder, in this thread with one intra-op
    thread: what decoding costs, whatever the pipeline overlaps it with."""
    videos = [v for vs in index_dataset(DatasetSpec(str(data))).splits.values() for v in vs]  # as extract-features
    jobs = [(i, v.path, v.kind) for i, v in enumerate(videos)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in VideoFrameStream(jobs[:1], spec, FrameSelection(), 8):
            pass  # warm-up: first calls, page cache
        n, t = 0, time.perf_counter()
        for chunk in VideoFrameStream(jobs, spec, FrameSelection(), 8):
            n += chunk.frames.shape[0]
            if n >= frames and chunk.last:
                break
        return (time.perf_counter() - t) / n * 1e3
    finally:
        torch.set_num_threads(threads)


def bare_rate(model: torch.nn.Module, frames: int, batch: int, spec: FrameSpec, device: torch.device,
              amp: torch.dtype | None, x8: torch.Tensor | None = None) -> float:
    """Frames/s of ``model`` alone on a ready batch of ``x8`` (uint8 frames, pre-decoded; random
    pixels where None): a FrozenBackbone's network gets the input it expects, the plain network
    the normalised one. The bench passes the dataset's own decoded frames, as the pipeline sees
    them: on random pixels EfficientNet-B0 ran 0-8 % slower here (3 paired runs), the others the same."""
    if x8 is None:
        g = torch.Generator().manual_seed(0)
        x8 = torch.randint(0, 256, (batch, 3, spec.size, spec.size), dtype=torch.uint8, generator=g)
    x8 = x8[:batch].to(device).contiguous(memory_format=torch.channels_last)
    if isinstance(model, FrozenBackbone):  # pre-decoded and preprocessed, on the device
        x, model = model.center(x8), model.net
    else:
        x = normalize_frames(x8, spec, channels_last=True)
    n_batches = -(-frames // batch)
    with torch.inference_mode(), autocast_ctx(device, amp):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_batches):
            out = model(x).float()
        out.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n_batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=None,
                    help="frames per run, a multiple of --batch-size  [default: what the bare backbone does in "
                         "--seconds]")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="length of a run when --frames is not given: long enough that start-up (model build, "
                         "first-batch warm-up) weighs as in a real extraction, short enough for 9 pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbone", default="mobilenet_v2", help="any name extract-features takes")
    ap.add_argument("--size", type=int, default=None, help="crop size  [default: the backbone weights' own]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=9, help="pipeline runs, each between two bare runs")
    ap.add_argument("--keep", type=Path, default=None, help="write the data here and keep it")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="leave glibc's malloc thresholds alone (the CLI tunes them; see pipeline/runtime.py)")
    args = ap.parse_args()
    tuned = False if args.no_tune_allocator else tune_cpu_allocator()
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    spec = default_frame_spec(args.backbone).override(FrameOverrides(size=args.size))
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)  # random init + BatchNorm recalibrated on noise: realistic activations
        model = create_backbone(args.backbone, "none", input_size=spec.size).net
        recalibrate_batchnorm(model, [torch.randn(16, 3, spec.size, spec.size) for _ in range(2)])
        weights = work / "backbone.pt"
        torch.save(model.state_dict(), weights)
        unfused = model.to(device).to(memory_format=torch.channels_last).eval()
        model = FrozenBackbone(unfused, spec)  # what extract-features runs
        if args.frames is None:
            # A short estimate, then one of about two seconds: a fresh process's first batches run
            # slower (83 frames/s against 128 steady for MobileNetV2 on one machine here), which
            # made the runs 13 s long instead of --seconds, and start-up weigh half as much again.
            rate = bare_rate(model, 4 * args.batch_size, args.batch_size, spec, device, amp)
            rate = bare_rate(model, max(args.batch_size, round(2 * rate)), args.batch_size, spec, device, amp)
            args.frames = max(1, round(rate * args.seconds / args.batch_size)) * args.batch_size
        if args.frames % args.batch_size:
            print(f"note: {args.frames} frames is not a multiple of the batch size {args.batch_size}: the pipeline "
                  "pads its last batch, the bare rate counts every frame it computes")
        t = time.perf_counter()
        marker = work / "data" / f".frames_{args.frames}"
        if not marker.exists():
            shutil.rmtree(work / "data", ignore_errors=True)
            n_videos = make_jpeg_dataset(work / "data", args.frames)
            marker.touch()
        else:
            n_videos = None
        print(f"data: {args.frames} JPEG frames 320x240 in {n_videos or 'existing'} videos "
              f"({time.perf_counter() - t:.1f} s to generate)")

        cfg = ExtractConfig(dataset=DatasetSpec(str(work / "data")), output=str(work / "bench.h5"),
                            backbone=args.backbone, weights=str(weights), frame_spec=spec, batch_size=args.batch_size,
                            workers=args.workers, device=args.device, precision=args.precision,
                            overwrite=True)
        print(f"{args.backbone} on {device}, precision {amp or torch.float32}, batch {args.batch_size}, "
              f"short side {spec.resize_size} -> crop {spec.size}x{spec.size} {spec.interpolation}, channels_last, torch threads {torch.get_num_threads()}, "
              f"malloc thresholds tuned: {'yes' if tuned else 'no'}")
        # Machine speed drifts (shared CPUs): alternate bare and pipeline runs, each pipeline run is
        # compared with the mean of the bare runs just before and after it, and the median is reported.
        x8 = decoded_batch(work / "data", args.batch_size, spec)
        bares = [bare_rate(model, args.frames, args.batch_size, spec, device, amp, x8)]
        pipes, frames = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = extract_features(cfg, progress=False)
            pipes.append(r.frames / (time.perf_counter() - t))
            frames = r.frames
            bares.append(bare_rate(model, args.frames, args.batch_size, spec, device, amp, x8))
        ratios = [p / ((a + b) / 2) for p, a, b in zip(pipes, bares, bares[1:])]
        ceiling = None
        if device.type == "cpu":  # decoders take turns with the model on the same cores
            decoders = default_workers(device) if args.workers is None else args.workers
            dec = decode_ms(work / "data", spec, 8 * args.batch_size)
            fwd = 1e3 / float(np.mean(bares))
            ceiling = fwd / (fwd + dec / max(1, decoders))
        unfused_rate = bare_rate(unfused, args.frames // 2, args.batch_size, spec, device, amp, x8)
        print(f"bare backbone : {np.mean(bares):8.1f} frames/s  (runs: {', '.join(f'{b:.1f}' for b in bares)})")
        print(f"full pipeline : {np.mean(pipes):8.1f} frames/s  (runs: {', '.join(f'{p:.1f}' for p in pipes)}; "
              f"{frames} frames each, decode + model + write)")
        print(f"unfused {args.backbone}: {unfused_rate:.1f} frames/s "
              f"(BatchNorm folding: {np.mean(bares) / unfused_rate:.2f}x)")
        ci = median_interval(ratios)
        print(f"ratio pipeline/bare: {float(np.median(ratios)):.3f}  (per run: {', '.join(f'{x:.3f}' for x in ratios)})")
        if ci is not None:  # what the median of these runs can be trusted to: a margin is robust if `low` clears it
            print(f"  the median lies in {ci[0]:.3f}-{ci[1]:.3f} with about {ci[2]:.0%} confidence "
                  "(order statistics of the runs, taken as independent)")
        if ceiling is not None:
            print(f"decoding alone caps it at {ceiling:.3f}: {dec:.3f} ms of one core per frame to read, decode and "
                  f"resize, over {decoders} decoder threads, against {fwd:.2f} ms per frame for the model")
            print(f"  the pipeline reaches {float(np.median(ratios)) / ceiling:.3f} of that cap")
        print(f"ratio pipeline/unfused {args.backbone}: {np.mean(pipes) / unfused_rate:.3f}  "
              "(the whole pipeline against the torchvision module on pre-decoded frames)")
        record("extract", backbone=args.backbone, device=str(device), precision=str(amp or torch.float32).removeprefix("torch."),
               pipeline_fps=float(np.mean(pipes)), bare_fps=float(np.mean(bares)),
               ratio=float(np.median(ratios)), **({} if ci is None else {"ratio_low": ci[0], "ratio_high": ci[1]}),
               unfused_fps=unfused_rate, **({} if ceiling is None else {"decode_ceiling": ceiling}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
