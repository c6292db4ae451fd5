"""How train-temporal's defaults were chosen: the same sweep on generated caches of several kinds.

    python bench/defaults.py [--epochs 12] [--out bench/out/defaults] [--kinds appearance,order,mixed,demo]

Each kind asks something else of a temporal head (256-d float16 features, 12 classes, 24-56
frames a video, 30 train / 10 test videos a class, a validation set carved from train; every
video also carries an offset of its own, so that no kind is solved by averaging frames alone):

* appearance: a class is a faint mean feature vector; order is irrelevant;
* order: pairs of classes whose videos are exact time reversals of each other (a trajectory
  from A to B, or from B to A): only frame order tells them apart;
* mixed: 4 appearances x 3 motions (forward, backward, there-and-back): both matter;
* demo: the built-in demo's real MobileNetV2 features (``features/demo.h5``, made by
  ``python cli.py demo``), if present.

On each, every config of one grid trains the full schedule (no early stopping, so every config
is scored alike) and is scored on validation; the table shows val top-1 per kind, the mean over
kinds, and the test top-1 of each kind's winner. The config with the best mean val top-1 is the
one to make the default.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import VideoRecord, write_cache  # noqa: E402
from pipeline.config import FrameSelection, FrameSpec, Provenance, TemporalConfig, WeightsIdentity  # noqa: E402
from pipeline.runtime import tune_cpu_allocator  # noqa: E402
from pipeline.sweep import SweepConfig, sweep  # noqa: E402

GRID = ((("head", ("lstm", "gru", "transformer", "attention", "mean")), ("bidirectional", (False, True)),
         ("eval_clips", (1, 4)), ("lr", (1e-3, 3e-3))),)
DIM, CLASSES, TRAIN, TEST = 256, 12, 30, 10


def _write(path: Path, make, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", TRAIN), ("test", TEST)):
        recs = []
        for c in range(CLASSES):
            for k in range(n):
                f = make(c, rng)
                recs.append(VideoRecord(f"{split}/c{c}/{split}_c{c}_v{k}", c, f.astype(np.float16),
                                        np.arange(len(f)), 30.0))
        splits[split] = iter(recs)
    prov = Provenance(backbone="mobilenet_v2", weights=WeightsIdentity(source="file", sha256="0" * 64),
                      frame_spec=FrameSpec(), selection=FrameSelection(), feature_dim=DIM,
                      classes=tuple(f"c{c}" for c in range(CLASSES)))
    return write_cache(path, prov, splits)


def make_caches(work: Path, kinds: list[str]) -> dict[str, Path]:
    g = np.random.default_rng(0)
    centres = g.standard_normal((CLASSES, DIM)).astype(np.float32)
    ends = g.standard_normal((CLASSES, 2, DIM)).astype(np.float32)
    looks = g.standard_normal((8, DIM)).astype(np.float32)
    paths: dict[str, Path] = {}

    def length(rng):
        return int(rng.integers(24, 57))

    def noisy(f, rng):  # a video's own offset, and every frame's noise
        return f + rng.standard_normal(DIM).astype(np.float32) + rng.standard_normal(f.shape).astype(np.float32)

    def appearance(c, rng):
        return noisy(np.repeat(0.12 * centres[c][None], length(rng), 0), rng)

    def order(c, rng):
        pair, backward = divmod(c, 2)
        a, b = 0.25 * ends[pair]
        w = np.linspace(0, 1, length(rng))[:, None]
        f = (1 - w) * a + w * b
        return noisy(f[::-1] if backward else f, rng)

    def mixed(c, rng):
        look, motion = divmod(c, 3)
        w = np.linspace(0, 1, length(rng))[:, None]
        w = {0: w, 1: 1 - w, 2: 1 - np.abs(2 * w - 1)}[motion]
        return noisy(0.12 * looks[look] + 0.5 * (w - 0.5) * ends[0, 0], rng)

    for kind, make in (("appearance", appearance), ("order", order), ("mixed", mixed)):
        if kind in kinds:
            paths[kind] = _write(work / f"{kind}.h5", make, seed=1)
    demo = Path(__file__).resolve().parents[1] / "features" / "demo.h5"
    if "demo" in kinds:
        if demo.exists():
            paths["demo"] = demo
        else:
            print("demo: skipped (features/demo.h5 not found; run `python cli.py demo` first)")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("bench/out/defaults"))
    ap.add_argument("--kinds", default="appearance,order,mixed,demo")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_cpu_allocator()
    args.out.mkdir(parents=True, exist_ok=True)
    caches = make_caches(args.out, args.kinds.split(","))
    scores: dict[str, dict[str, float]] = {}
    winners = {}
    for kind, cache in caches.items():
        t = time.perf_counter()
        base = TemporalConfig(cache=str(cache), out=str(args.out / f"sweep_{kind}"), epochs=args.epochs,
                              device=args.device, val_fraction=0.2 if kind == "demo" else 0.1)
        r = sweep(SweepConfig(base=base, grids=GRID, min_epochs=args.epochs, overwrite=True), progress=False)
        for row in r.leaderboard:
            scores.setdefault(row["config"], {})[kind] = row["best_val_top1"]
        winners[kind] = (r.winner["config"], r.test["top1"] if r.test else float("nan"))
        print(f"{kind}: {len(r.leaderboard)} configs in {time.perf_counter() - t:.0f} s; winner {r.winner['config']} "
              f"(val {r.winner['best_val_top1']:.3f}, test {winners[kind][1]:.3f})", flush=True)
    kinds = list(caches)
    rows = sorted(scores.items(), key=lambda kv: -np.mean([kv[1].get(k, 0) for k in kinds]))
    width = max(len(c) for c in scores)
    print(f"\n{'config':<{width}}  " + "  ".join(f"{k:>10}" for k in kinds) + "  mean val top-1")
    for config, s in rows:
        print(f"{config:<{width}}  " + "  ".join(f"{s.get(k, float('nan')):>10.3f}" for k in kinds)
              + f"  {np.mean([s.get(k, 0) for k in kinds]):.3f}")
    print(f"\nbest on average: {rows[0][0]}")


if __name__ == "__main__":
    main()
