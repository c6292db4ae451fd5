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

It prints the ratio end-to-end / cached. Then, for caches larger than RAM (``--load lazy``):

* lazy ÷ in-memory epoch speed on the same cache: epochs with the same seed, alternating between a
  ``FeatureBank`` and a ``LazyBank`` (median of ``--lazy-pairs`` pairs, warm page cache; the two
  give identical losses; the ratio is the median over pairs, and the time the training thread waited
  for reads is printed too); then ``--lockstep`` epochs that train a memory-fed and a lazy-fed
  model step by step in turn (each step timed: robust to the VM's speed drifting within seconds);
  then a pair after dropping the page cache (cold);
* peak resident memory of ``train-temporal --load lazy`` (a subprocess, which reports its own
  VmHWM) on a generated cache of ``--big-gb`` GB (Kinetics-like: ~300
  frames per video), written through the real writer into a temporary folder on a disk with room
  (``--big-dir``) and removed afterwards; ``--big-gb 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
from pipeline.engine import FeatureBank, LazyBank, train_one_epoch  # noqa: E402
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


def drop_page_cache(path: Path) -> str:
    """Evict ``path`` (and, as root, everything) from the page cache: the next read is from disk."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file: no root needed
    finally:
        os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache dropped"
    except OSError:
        return "file evicted from the page cache (posix_fadvise)"


def timed_epoch(bank, args, device: torch.device, seed: int) -> tuple[float, float]:
    """One epoch from the same initial weights and clip draws for every ``seed``: (seconds, loss)."""
    torch.manual_seed(0)
    model = build_head(HeadConfig(num_classes=51, input_dim=1280, hidden=args.hidden)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    r = train_one_epoch(model, bank, opt, None, seq_len=args.seq_len, sampler="segment", batch_size=args.batch_size,
                        rng=np.random.default_rng(seed), progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, r["loss"]


def lockstep_ratio(banks: list, args, device: torch.device, seed: int) -> tuple[list[float], list[float]]:
    """One epoch of the same clips for each bank, step by step in turn (memory step k, lazy step k,
    ...), each step timed with its gather: neighbouring steps see the same machine load, so the
    sums compare the sources even while the VM's speed drifts. (The lazy reader's thread also runs
    during the other bank's steps: at most half its CPU, printed separately, lands there.)"""
    import torch.nn.functional as F

    from pipeline.sampling import sample

    n = len(banks[0])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    pos, clip_len = sample("segment", banks[0].lengths[order], args.seq_len, rng)
    starts = range(0, n, args.batch_size)
    requests = [(order[s:s + args.batch_size], pos[s:s + args.batch_size]) for s in starts]
    models, opts, streams = [], [], []
    for bank in banks:
        torch.manual_seed(0)
        models.append(build_head(HeadConfig(num_classes=51, input_dim=1280, hidden=args.hidden)).to(device).train())
        opts.append(torch.optim.AdamW(models[-1].parameters(), lr=1e-3))
        streams.append(bank.gather_batches(requests))
    seconds, losses = [0.0] * len(banks), [0.0] * len(banks)
    for s, (vids, _) in zip(starts, requests):
        lengths = torch.from_numpy(clip_len[s:s + args.batch_size])
        for j, bank in enumerate(banks):
            t = time.perf_counter()
            x = next(streams[j])  # (B, S, D)
            loss = F.cross_entropy(models[j](x, lengths), bank.labels[torch.from_numpy(vids)])
            opts[j].zero_grad(set_to_none=True)
            loss.backward()
            opts[j].step()
            losses[j] += loss.item()
            seconds[j] += time.perf_counter() - t
    return seconds, losses


def big_cache(path: Path, gb: float, frames: int, n_val: int, classes: int = 51, seed: int = 0) -> tuple[int, int]:
    """A cache of about ``gb`` GB (train) plus a small val split, streamed through ``write_cache``
    (the writer spools it, so it never sits in memory). Frames are a class centre plus a slice of a
    fixed noise bank: cheap to make, the same bytes on disk as real features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 1280), dtype=np.float32).astype(np.float16)
    noise = rng.standard_normal((8192, 1280), dtype=np.float32).astype(np.float16)
    n_train = max(1, int(gb * 1e9 / (frames * 1280 * 2)))

    def records(split: str, n: int):
        for i in range(n):
            c = i % classes
            t = int(rng.integers(frames * 2 // 3, frames * 4 // 3 + 1))
            s = int(rng.integers(0, len(noise) - t))
            yield VideoRecord(f"{split}/c{c}/v{i}", c, noise[s:s + t] + centres[c], np.arange(t), 30.0)

    prov = Provenance(backbone="mobilenet_v2", weights=WeightsIdentity(source="file", sha256="0" * 64),
                      frame_spec=FrameSpec(), selection=FrameSelection(), feature_dim=1280,
                      classes=tuple(f"c{i}" for i in range(classes)))
    write_cache(path, prov, {"train": records("train", n_train), "val": records("val", n_val)})
    return n_train, n_val


def big_run(args, device: torch.device) -> dict:
    """Peak resident memory of train-temporal --load lazy on a cache larger than --big-gb."""
    root = Path(args.big_dir or tempfile.gettempdir())
    need = 2 * args.big_gb * 1e9 + 2e9  # the writer's spool and the cache side by side, plus room
    free = shutil.disk_usage(root).free
    if free < need:
        print(f"big    : skipped: a {args.big_gb:g} GB cache needs {need / 1e9:.0f} GB free in {root} (spool + "
              f"cache), there are {free / 1e9:.0f} GB; pass --big-dir on a larger disk")
        return {}
    work = Path(tempfile.mkdtemp(prefix="bench_temporal_big_", dir=root))
    try:
        path = work / "big.h5"
        t = time.perf_counter()
        n_train, n_val = big_cache(path, args.big_gb, args.big_frames, args.big_val)
        size = path.stat().st_size
        print(f"big    : {size / 1e9:.2f} GB cache ({n_train} train videos x ~{args.big_frames} frames + {n_val} val, "
              f"1280-d float16) written in {time.perf_counter() - t:.0f} s to {work} ({free / 1e9:.0f} GB were free)")
        how = drop_page_cache(path)
        # The child reports its own VmHWM at exit: getrusage(RUSAGE_CHILDREN) would count this
        # process's pages too (a forked child shares them until it execs, and Linux keeps that peak).
        status = work / "status.txt"
        cli = Path(__file__).resolve().parents[1] / "cli.py"
        args_ = ["train-temporal", "--cache", str(path), "--out", str(work / "run"), "--load", "lazy", "--epochs", "1",
                 "--no-progress", "--hidden", str(args.hidden), "--seq-len", str(args.seq_len),
                 "--batch-size", str(args.batch_size), "--device", args.device]
        code = ("import atexit, runpy, sys; out = sys.argv[1]; atexit.register(lambda: open(out, 'w').write("
                "open('/proc/self/status').read())); sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], "
                "run_name='__main__')")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, str(status), str(cli), *args_], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"train-temporal failed:\n{r.stderr[-3000:]}")
        peak_gb = next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith("VmHWM")) * 1024 / 1e9
        rec = [json.loads(ln) for ln in (work / "run" / "metrics.jsonl").read_text().splitlines()][0]
        load = next((ln.split("cache load", 1)[1].strip(" |") for ln in r.stdout.splitlines() if "cache load" in ln), "?")
        print(f"big    : train-temporal --load lazy, 1 epoch from a cold page cache ({how}): peak resident memory "
              f"{peak_gb:.2f} GB (VmHWM) for a {size / 1e9:.2f} GB cache; epoch {rec['epoch_seconds']:.1f} s = "
              f"{rec['clips_per_second']:.0f} clips/s, {wall:.0f} s in all with start-up and validation; {load}")
        return {"big_cache_gb": size / 1e9, "big_peak_rss_gb": peak_gb, "big_epoch_s": rec["epoch_seconds"],
                "big_clips_per_s": rec["clips_per_second"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    ap.add_argument("--lazy-pairs", type=int, default=5, help="alternating in-memory/lazy epochs (median of each)")
    ap.add_argument("--lockstep", type=int, default=3, help="epochs of memory/lazy steps in turn (median ratio)")
    ap.add_argument("--big-gb", type=float, default=8.5, help="size of the lazy-RSS cache (0: skip)")
    ap.add_argument("--big-frames", type=int, default=300, help="frames per video of that cache")
    ap.add_argument("--big-val", type=int, default=500, help="val videos of that cache")
    ap.add_argument("--big-dir", default=None, help="where to write it  [default: the temp folder]")
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

        # Lazy vs in memory: the same epochs (weights, clips) alternately from each source.
        with FeatureCache(path) as cache:
            lazy = LazyBank(cache.open_lazy("train"), device)
        # The speed of this shared 2-core VM swings within seconds, so the ratio is taken per pair of
        # neighbouring epochs, and the time the training thread waited for reads is reported too:
        # that is the lazy reader's own cost, whatever the machine's load does to the epochs.
        mem_t, lazy_t, waits, cpu, same = [], [], [], [], True
        for i in range(args.lazy_pairs):
            a, la = timed_epoch(bank, args, device, i)
            w, c = lazy.wait_seconds, lazy.read_cpu_seconds
            b, lb = timed_epoch(lazy, args, device, i)
            mem_t.append(a)
            lazy_t.append(b)
            waits.append(lazy.wait_seconds - w)
            cpu.append(lazy.read_cpu_seconds - c)
            same &= la == lb
        ratios = [a / b for a, b in zip(mem_t, lazy_t)]
        ratio, mem_s, lazy_s = float(np.median(ratios)), float(np.median(mem_t)), float(np.median(lazy_t))
        print(f"lazy   : warm page cache: speed ratio lazy / in-memory {ratio:.2f} (median of {args.lazy_pairs} "
              f"alternating pairs [{', '.join(f'{r:.2f}' for r in ratios)}]; epochs lazy "
              f"[{', '.join(f'{x:.2f}' for x in lazy_t)}] s, memory [{', '.join(f'{x:.2f}' for x in mem_t)}] s); "
              f"per lazy epoch: training waited {np.median(waits):.2f} s for reads, the reads took "
              f"{np.median(cpu):.2f} s of CPU; identical losses: {'yes' if same else 'NO'}")
        print(f"lazy   : its first epoch {lazy_t[0]:.2f} s against {np.median(lazy_t[1:]) if len(lazy_t) > 1 else float('nan'):.2f} "
              "s for the later ones: the first checks each video against its checksum, reading all its rows once")
        lock = [lockstep_ratio([bank, lazy], args, device, 100 + i) for i in range(args.lockstep)]
        lock_ratios = [m / lz for (m, lz), _ in lock]
        lock_ratio = float(np.median(lock_ratios))
        print(f"lazy   : warm, step by step in turn (robust to the VM's drift): speed ratio lazy / in-memory "
              f"{lock_ratio:.2f} (median of {args.lockstep} epochs [{', '.join(f'{r:.2f}' for r in lock_ratios)}]; "
              f"summed steps lazy [{', '.join(f'{t[1]:.2f}' for t, _ in lock)}] s, memory "
              f"[{', '.join(f'{t[0]:.2f}' for t, _ in lock)}] s)")
        how = drop_page_cache(path)
        a, _ = timed_epoch(bank, args, device, 0)
        w, c = lazy.wait_seconds, lazy.read_cpu_seconds
        cold_s, _ = timed_epoch(lazy, args, device, 0)
        cold_ratio = a / cold_s
        cold_wait = lazy.wait_seconds - w
        print(f"lazy   : cold page cache ({how}): epoch {cold_s:.2f} s vs in-memory {a:.2f} s just before: speed ratio "
              f"{cold_ratio:.2f}; training waited {cold_wait:.2f} s for reads, which took "
              f"{lazy.read_cpu_seconds - c:.2f} s of CPU")
        lazy.close()
        big = big_run(args, device) if args.big_gb > 0 else {}
        record("temporal", device=str(device), epoch_s=epoch_s, clips_per_s=clips / epoch_s,
               e2e_epoch_s=e2e_epoch, ratio=e2e_epoch / epoch_s, lazy_epoch_s=lazy_s, memory_epoch_s=mem_s,
               lazy_ratio_warm=ratio, lazy_ratio_lockstep=lock_ratio, lazy_wait_s=float(np.median(waits)), lazy_read_cpu_s=float(np.median(cpu)),
               lazy_epoch_cold_s=cold_s, lazy_ratio_cold=cold_ratio, lazy_wait_cold_s=cold_wait,
               lazy_first_epoch_s=lazy_t[0], lazy_identical=same, **big)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
