"""The sweep's cost: 24 configs trained at once against one config trained alone, one run.

    python bench/sweep.py [--train 3570] [--val 1530] [--frames 90] [--epochs 10] [--device auto]

Writes the HMDB51-sized synthetic cache of bench/temporal.py (3,570 train + 1,530 val videos, ~90
frames, 1280-d float16), then times, in this one process:

* alone: ``train-temporal``'s default config (LSTM, hidden 512, seq-len 16, batch 64) for
  ``--epochs`` epochs, end to end (cache load, every epoch's validation and checkpoints);
* the sweep: 24 configs (lstm and gru: hidden 256/512 x uni/bidirectional x lr 1e-3/3e-3;
  transformer and attention pooling: hidden 256/512 x lr 1e-3/3e-3) for the same ``--epochs``,
  with successive halving (``--eta`` 3 from ``--min-epochs`` 1), end to end.

It prints both times and their ratio (sweep / alone), and the trial-epochs the sweep trained.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.config import TemporalConfig  # noqa: E402
from pipeline.runtime import resolve_device, tune_cpu_allocator  # noqa: E402
from pipeline.sweep import SweepConfig, sweep  # noqa: E402
from pipeline.train import train_temporal  # noqa: E402

from _report import record  # noqa: E402
from temporal import synthetic_cache  # noqa: E402

GRIDS = (  # 24 configs: 8 + 8 + 4 + 4
    (("head", ("lstm", "gru")), ("hidden", (256, 512)), ("bidirectional", (False, True)), ("lr", (1e-3, 3e-3))),
    (("head", ("transformer", "attention")), ("hidden", (256, 512)), ("lr", (1e-3, 3e-3))),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3570)
    ap.add_argument("--val", type=int, default=1530)
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--min-epochs", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_cpu_allocator()  # as the CLI does
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        cache = work / "hmdb_sized.h5"
        synthetic_cache(cache, args.train, args.val, args.frames)
        print(f"cache: {args.train} train + {args.val} val videos, ~{args.frames} frames, 1280-d float16, "
              f"{cache.stat().st_size / 1e6:.0f} MB")
        base = dict(cache=str(cache), epochs=args.epochs, device=args.device, val_split="val")

        t = time.perf_counter()
        alone = train_temporal(TemporalConfig(out=str(work / "alone"), **base), progress=False)
        alone_s = time.perf_counter() - t
        print(f"alone : {alone_s:.1f} s for {args.epochs} epochs of the default config (LSTM, hidden 512), "
              f"best val top-1 {alone.best['top1']:.3f}")

        t = time.perf_counter()
        r = sweep(SweepConfig(base=TemporalConfig(out=str(work / "sweep"), **base), grids=GRIDS, eta=args.eta,
                              min_epochs=args.min_epochs), progress=False)
        sweep_s = time.perf_counter() - t
        n, trial_epochs, best = len(r.leaderboard), r.trial_epochs, r.winner
        print(f"sweep : {sweep_s:.1f} s for {n} configs, {trial_epochs} trial-epochs (successive halving, eta "
              f"{args.eta}, rungs from {args.min_epochs} epoch(s)); winner {best['config']} val top-1 "
              f"{best['best_val_top1']:.3f}")
        print(f"ratio sweep / one config alone: {sweep_s / alone_s:.2f}x for {n} configs "
              f"({sweep_s / alone_s / n:.3f} of a run per config) on {device}")
        record("sweep", device=str(device), configs=n, sweep_s=sweep_s, alone_s=alone_s, ratio=sweep_s / alone_s,
               trial_epochs=trial_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
