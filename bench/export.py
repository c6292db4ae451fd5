"""The exported ONNX graph in onnxruntime against eager torch on the CPU, and live latency, in one run.

    python bench/export.py [--backbone mobilenet_v2] [--size 224] [--clips 4] [--seq-len 16]
                           [--repeats 5] [--live-seconds 10] [--exporter auto] [--threads N]

Builds a model as train-temporal would leave it (random-init backbone with BatchNorm recalibrated
on noise, an LSTM head of 512 over 51 classes), exports it with ``export``, then measures:

* throughput: the same uint8 clips (``--clips`` × ``--seq-len`` frames at the crop size) through
  onnxruntime (the whole graph: normalisation, backbone, feature rounding, head, softmax) and
  through eager torch exactly as ``predict`` runs it (``FrozenBackbone`` on channels_last frames,
  features rounded to float16, the head, softmax); clips/s of each, alternating runs (each
  onnxruntime run against the torch runs before and after it), ratio onnxruntime ÷ torch as the
  median; and the largest probability difference between them;
* live latency: ``predict --live`` on a 30 fps file played in real time (``--realtime``), windows
  of seq-len frames every seq-len/2, with the CLI's threads (one per core but one, for the reader
  thread; or ``--threads``); per-window latency p50/p95 (from the source delivering a window's
  last frame to its label), dropped frames, for onnxruntime and torch.

This machine's speed drifts (shared CPUs; other jobs): the load average is printed before and
after. Torch's OpenMP threads suffer most from other processes on the same cores (they spin-wait
at barriers), so a loaded machine inflates the ratio; trust runs with a load near zero.
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

from pipeline.backbones import create_backbone, default_frame_spec, recalibrate_batchnorm  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import ExportConfig, FrameOverrides, FrameSelection, Provenance, TemporalConfig  # noqa: E402
from pipeline.config import WeightsIdentity  # noqa: E402
from pipeline.export import export_model, ort_session  # noqa: E402
from pipeline.files import sha256_file  # noqa: E402
from pipeline.heads import HeadConfig, build_head  # noqa: E402
from pipeline.predict import Predictor, TorchClassifier  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402

from _report import record  # noqa: E402


def make_model(work: Path, backbone: str, size: int, seq_len: int, classes: int = 51) -> Path:
    torch.manual_seed(0)
    spec = default_frame_spec(backbone).override(FrameOverrides(size=size))
    net = create_backbone(backbone, "none", input_size=spec.size).net
    recalibrate_batchnorm(net, [torch.randn(16, 3, spec.size, spec.size) for _ in range(2)])
    torch.save(net.state_dict(), work / "backbone.pt")
    bb = create_backbone(backbone, str(work / "backbone.pt"), input_size=spec.size)
    head_cfg = HeadConfig(num_classes=classes, input_dim=bb.num_features)
    prov = Provenance(backbone=backbone, weights=WeightsIdentity(source="file", sha256=sha256_file(work / "backbone.pt"),
                                                                 path=str(work / "backbone.pt")),
                      frame_spec=spec, selection=FrameSelection(), feature_dim=bb.num_features,
                      classes=tuple(f"c{i}" for i in range(classes)))
    save_checkpoint(work / "model.pt", {
        "kind": "temporal", "model_config": head_cfg.to_dict(),
        "train_config": TemporalConfig("", "", seq_len=seq_len).to_dict(), "frame_spec": spec.to_dict(),
        "classes": list(prov.classes), "cache": prov.to_dict(), "epoch": 0,
        "model_state": build_head(head_cfg).state_dict(), "metrics": {}})
    return work / "model.pt"


def smooth_clips(b: int, t: int, s: int, seed: int = 0) -> torch.Tensor:
    """(B, T, S, S, 3) uint8 clips of a panning smooth texture, as decoded and resized video looks."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, s // 8 + 2, s // 8 + 2 + t, generator=g) * 255
    wide = torch.nn.functional.interpolate(coarse, size=(s, s + 8 * t), mode="bilinear", align_corners=False)
    frames = torch.stack([wide[:, :, :, 8 * i:8 * i + s] for i in range(t)], 1)  # (B, T, 3, S, S)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()


def torch_probs(clf: TorchClassifier, clips: torch.Tensor) -> np.ndarray:
    """predict's torch path on (B, T, S, S, 3) clips: FrozenBackbone, float16 features, head, softmax."""
    b, t = clips.shape[:2]
    with torch.inference_mode():
        frames = clips.flatten(0, 1).permute(0, 3, 1, 2).to(clf.device)  # channels_last frames
        f = clf.features(frames).float()  # (B·T, D)
        f = f.to(torch.float16).float().view(b, t, -1)
        return clf.clip_probs(f, torch.full((b,), t)).cpu().numpy()


def rate(fn, clips: torch.Tensor, batches: int) -> float:
    t = time.perf_counter()
    for _ in range(batches):
        fn(clips)
    return batches * clips.shape[0] / (time.perf_counter() - t)


def live_latency(model: Path, video: Path, seq_len: int, runtime: str, threads: int) -> dict:
    """``predict --live`` as the CLI runs it, with ``threads`` intra-op threads for the model."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = Predictor(model, runtime=runtime, device="cpu", threads=threads).live(
            str(video), realtime=True, stride=max(1, seq_len // 2))
        try:
            for _ in run:
                pass
        finally:
            run.close()
    finally:
        torch.set_num_threads(saved)
    s = run.summary()
    ms = lambda v: float("nan") if v is None else 1000 * v  # noqa: E731 - no window: fewer kept frames than one
    return {"windows": s.windows, "p50_ms": ms(s.latency_p50), "p95_ms": ms(s.latency_p95),
            "mean_ms": ms(s.latency_mean), "dropped": s.dropped, "frames": s.frames_read}


def write_live_video(path: Path, seconds: float, fps: int = 30) -> None:
    """A panning 320×240 texture as MPEG-TS (mpeg4): what a camera or stream delivers."""
    from fractions import Fraction

    import av

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 25, 80), dtype=np.uint8))[None].float()
    wide = torch.nn.functional.interpolate(coarse, size=(240, 960), mode="bilinear")[0]
    with av.open(str(path), "w", format="mpegts") as c:
        st = c.add_stream("mpeg4", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt, st.bit_rate = 320, 240, "yuv420p", 2_000_000
        for i in range(int(seconds * fps)):
            img = wide[:, :, (2 * i) % 640:(2 * i) % 640 + 320].clamp(0, 255).byte().permute(1, 2, 0).numpy()
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: torch on the GPU against onnxruntime's CUDA provider (onnxruntime-gpu)")
    ap.add_argument("--size", type=int, default=None, help="crop size  [default: the backbone weights' own]")
    ap.add_argument("--clips", type=int, default=4, help="clips per batch (both runtimes)")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--batches", type=int, default=3, help="batches per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="onnxruntime runs, each between two torch runs")
    ap.add_argument("--live-seconds", type=float, default=10.0, help="length of the 30 fps live source (0: skip)")
    ap.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of both runtimes  [default: torch's, one per core]")
    args = ap.parse_args()
    tune_cpu_allocator()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime sessions here take torch's count
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        ckpt = make_model(work, args.backbone, args.size or default_frame_spec(args.backbone).size, args.seq_len)
        t = time.perf_counter()
        r = export_model(ExportConfig(checkpoint=str(ckpt), out=str(work / "model.onnx"), exporter=args.exporter))
        s = r.meta.frame_spec.size
        print(f"export: {time.perf_counter() - t:.1f} s, {r.bytes / 1e6:.1f} MB, exporters "
              f"{', '.join(f'{k} {v}' for k, v in r.exporters.items())}")

        clf = TorchClassifier(ckpt, device=args.device)
        sess = ort_session(r.out, device=args.device)
        clips = smooth_clips(args.clips, args.seq_len, s)
        run_ort = lambda c: sess.run(None, {"frames": c.numpy()})[0]  # noqa: E731
        run_torch = lambda c: torch_probs(clf, c)  # noqa: E731
        diff = float(np.abs(run_ort(clips) - run_torch(clips)).max())  # also the warm-up of both
        print(f"{args.backbone} {s}x{s}, LSTM 512, {args.clips} clips x {args.seq_len} frames per batch, "
              f"{args.batches} batches per run; torch threads {torch.get_num_threads()}, onnxruntime intra-op "
              f"threads {torch.get_num_threads()}; load average {load0[0]:.2f}")
        torches = [rate(run_torch, clips, args.batches)]
        orts = []
        for _ in range(args.repeats):
            orts.append(rate(run_ort, clips, args.batches))
            torches.append(rate(run_torch, clips, args.batches))
        ratios = [o / ((a + b) / 2) for o, a, b in zip(orts, torches, torches[1:])]
        ratio = float(np.median(ratios))
        print(f"torch eager : {np.mean(torches):7.2f} clips/s  (runs: {', '.join(f'{x:.2f}' for x in torches)})")
        print(f"onnxruntime : {np.mean(orts):7.2f} clips/s  (runs: {', '.join(f'{x:.2f}' for x in orts)})")
        print(f"ratio onnxruntime/torch: {ratio:.3f}  (per run: {', '.join(f'{x:.3f}' for x in ratios)}); "
              f"max |prob difference| {diff:.2g}")

        live: dict[str, dict] = {}
        if args.live_seconds > 0 and args.device == "cpu":
            video = work / "live.ts"
            write_live_video(video, args.live_seconds)
            threads = args.threads or max(1, torch.get_num_threads() - 1)  # the CLI's default with --live
            for runtime, model in (("onnx", r.out), ("torch", ckpt)):
                live[runtime] = m = live_latency(model, video, args.seq_len, runtime, threads)
                print(f"live {runtime:<5} ({threads} thread{'s' if threads > 1 else ''}): {m['windows']} windows on a "
                      f"{args.live_seconds:.0f} s 30 fps source in "
                      f"real time, latency p50 {m['p50_ms']:.1f} ms, p95 {m['p95_ms']:.1f} ms (mean "
                      f"{m['mean_ms']:.1f}), {m['dropped']} of {m['frames']} frames dropped")
        load1 = os.getloadavg()
        print(f"load average before/after: {load0[0]:.2f} / {load1[0]:.2f} on {os.cpu_count()} CPUs")
        record("export", device=args.device, backbone=args.backbone, size=s, clips=args.clips, seq_len=args.seq_len,
               torch_clips_per_s=float(np.mean(torches)), ort_clips_per_s=float(np.mean(orts)), ratio=ratio,
               max_prob_diff=diff, **{f"live_{k}_{q}": v[q] for k, v in live.items() for q in ("p50_ms", "p95_ms",
                                                                                              "dropped")})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
