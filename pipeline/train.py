"""Stage two: train a temporal head on cached features; and evaluate a checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import FeatureCache
from .checkpoint import CheckpointError
from .config import DEFAULT_VAL_FRACTION, Provenance, TemporalConfig
from .data import carve_validation, some, uncarvable
from .engine import ClipSource, evaluate, train_one_epoch
from .errors import CacheError, ConfigError, PipelineError
from .runtime import resolve_device, training_precision
from .metrics import classification_metrics
from .heads import HeadConfig, build_head
from .model import load_model
from .files import ensure_dir, exclusive
from .report import plot_confusion, write_per_class
from .run import (RUN_FILES, RunDir, check_resume_compute, check_resume_data, check_resume_epochs, check_resume_head,
                  check_resume_options, check_resume_validation, compute_identity, data_identity, holds_run,
                  same_videos, seen_among, video_fingerprints)
from .sources import OpenSplits, load_bank, open_splits  # noqa: F401 - load_bank: re-exported

log = logging.getLogger(__name__)


class TrainingError(PipelineError):
    """Training diverged (NaN/Inf loss)."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def best_kept_note(out: Path) -> str:
    """The end of a message for a run stopped by a non-finite loss: what it leaves as its model."""
    return "best.pt is kept as it was" if (out / "best.pt").is_file() else "no epoch finished, so there is no best.pt"


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs`` (at least one step), then cosine decay to zero at the
    end of ``epochs``; stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        epochs * steps_per_epoch, max(1, round(warmup_epochs * steps_per_epoch))))


def default_val_split(splits) -> str | None:
    """The validation split of a dataset when none is named: ``val`` if present, else None
    (stage two then carves one from train; stage three, which decodes frames, needs a split)."""
    return "val" if "val" in splits else None


def resolve_splits(splits, train_split: str, val_split: str | None, test_split: str | None,
                   missing: Callable[[str], Exception]) -> tuple[str | None, str | None]:
    """(val, test) split names: the named ones, else ``val`` / ``test`` where present (None: val
    is carved from train, there is no test). ``missing(name)`` is the error for a split that is not
    there; picking on the split that is reported is refused."""
    val_split = val_split or default_val_split(splits)
    if test_split is None and "test" in splits and val_split != "test":
        test_split = "test"
    for s in (train_split, val_split, test_split):
        if s is not None and s not in splits:
            raise missing(s)
    if val_split is not None and val_split == test_split:
        raise ConfigError(f"--val-split and --test-split are both {val_split!r}: the split a model is picked "
                          "on cannot also be the one it is reported on")
    if val_split is not None and val_split == train_split:
        raise ConfigError(f"--val-split and --train-split are both {val_split!r}: a model picked on its own training "
                          "videos is picked on nothing; leave --val-split out to carve one from them")
    if test_split is not None and test_split == train_split:
        raise ConfigError(f"--test-split and --train-split are both {test_split!r}: accuracy on training videos "
                          "says nothing; name a held-out split")
    return val_split, test_split


def check_classes(classes: Sequence[str], train_split: str, labels: dict[str, Sequence[int]], where: str,
                  error: Callable[[str], Exception]) -> None:
    """Refuse to train on fewer than two classes; warn about the videos of the other splits in
    ``labels`` whose class has no training video (a test folder ``walk`` next to a train folder
    ``Walk`` is one): the model cannot get those right."""
    trained = {int(c) for c in np.asarray(labels[train_split])}
    if len(trained) < 2:
        raise error(f"split {train_split!r} of {where} has videos of {len(trained)} class(es) "
                    f"({', '.join(classes[c] for c in sorted(trained)) or 'none'}); a classifier needs two or more: "
                    "check the class folders or the split files")
    for split, got in labels.items():
        unseen = [int(c) for c in np.asarray(got) if int(c) not in trained]
        if unseen:
            names = sorted({classes[c] for c in unseen})
            log.warning("%d video(s) of split %r are of classes with no video in %r (%s): the model cannot get them "
                        "right; check the class folder names of each split", len(unseen), split, train_split,
                        some(names))


@dataclass
class StageTwoData:
    """The splits stage two (and the sweep) train, pick and report on, held as ClipSources (in
    memory or read lazily, see ``sources.open_splits``); ``close()`` when done."""

    train: ClipSource
    val: ClipSource
    test: ClipSource | None
    classes: list[str]
    provenance: Provenance
    val_name: str  # what the best epoch is picked on, as said in reports
    test_split: str | None
    validation: dict[str, Any]  # how val was made; a carve lists its videos (saved in checkpoints)
    data: dict[str, Any]  # the videos trained and validated on (``run.data_identity``), checked on resume
    seen_videos: dict[str, torch.Tensor]  # their names as ``run.video_fingerprints``, for evaluate's warnings
    load_seconds: float
    load_mb: float  # features held in memory
    opened: OpenSplits
    load: str  # which splits are in memory and which read lazily, for the summary

    def close(self) -> None:
        self.opened.close()


def say_carve_unused(val_name: str | None, val_fraction: float, group_pattern: str | None) -> None:
    """--val-fraction / --group-pattern set, where validation is a split (named or the dataset's
    ``val``): they were dropped without a word."""
    given = [o for o, on in (("--val-fraction", val_fraction != DEFAULT_VAL_FRACTION),
                             ("--group-pattern", group_pattern is not None)) if on]
    if val_name is not None and given:
        log.warning("%s: %s for a validation set carved from train; split %r is used instead", ", ".join(given),
                    "are" if len(given) > 1 else "is", val_name)


def say_positions_untrained(arch: str, seq_len: int, longest: int) -> None:
    """A head with learned positions (transformer, attention) asked for over twice the longest
    training video's: those past it never train."""
    if arch in ("transformer", "attention") and seq_len > 2 * longest:
        log.warning("--seq-len %d is over twice the longest training video (%d frames): the %s head learns %d "
                    "positions, of which those past %d never train; lower --seq-len", seq_len, longest, arch, seq_len,
                    longest)


def carve_description(n_carved: int, train_split: str, val_fraction: float, labels: Sequence[int]) -> str:
    """How a carved validation set is said in reports; a warning where it has fewer videos than
    the training split has classes (a best epoch picked on one video was reported as any other)."""
    n_classes = len(set(np.asarray(labels).tolist()))
    if n_carved < n_classes:
        log.warning("the best epoch is picked on %d carved video(s) for %d classes, too few to tell epochs apart: "
                    "give a validation split (--val-split) or more training videos", n_carved, n_classes)
    return (f"{n_carved} videos carved from {train_split!r} ({val_fraction:.0%} of each class, at least one video "
            "and never a class's last; whole source videos)")


def load_stage_two(cache_path: str | Path, *, train_split: str = "train", val_split: str | None = None,
                   val_fraction: float = DEFAULT_VAL_FRACTION, group_pattern: str | None = None,
                   test_split: str | None = None,
                   seed: int = 0, device: torch.device | str = "cpu", load: str = "auto",
                   memory_budget: float | None = None) -> StageTwoData:
    """Open a cache for stage two: the training split; a validation set (``val_split``, else the
    cache's ``val``, else carved from train by whole source videos); the test split, evaluated
    only once at the end. Picking on the test split itself is allowed when named, with a warning.
    ``load``/``memory_budget`` (GB): each split held in memory or read lazily (``sources``)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    with FeatureCache(cache_path) as cache:
        val_name, test_split = resolve_splits(
            cache.splits, train_split, val_split, test_split,
            lambda s: CacheError(f"split {s!r} is not in {cache.path} (has: {', '.join(cache.splits)})"))
        say_carve_unused(val_name, val_fraction, group_pattern)
        opened = open_splits(cache, [s for s in (train_split, val_name, test_split) if s is not None], device,
                             load=load, memory_budget_gb=memory_budget)
        classes, provenance = list(cache.classes), cache.provenance
        sums = {s: cache.checksums(s) for s in (train_split, val_name) if s is not None}
    train_data, train = opened[train_split].data, opened[train_split].source
    try:
        check_classes(classes, train_split, {s: opened[s].data.labels for s in opened}, f"{cache_path}", CacheError)
    except CacheError:
        opened.close()
        raise
    if val_name is None:
        mask = carve_validation(train_data.videos, train_data.labels, val_fraction, seed=seed, pattern=group_pattern)
        if not mask.any() or mask.all():
            opened.close()
            raise CacheError(uncarvable(f"{train_split!r} of {cache_path} ({len(mask)} videos in "
                                        f"{len(set(np.asarray(train_data.labels).tolist()))} classes)"))
        val = train.subset(np.flatnonzero(mask))
        train = train.subset(np.flatnonzero(~mask))
        held_out = [v for v, m in zip(train_data.videos, mask) if m]
        t_sums = sums[train_split]
        kept = [v for v, m in zip(train_data.videos, mask) if not m]
        seen_videos = video_fingerprints(kept, held_out)
        data = data_identity(kept, held_out,
                             None if t_sums is None else ([c for c, m in zip(t_sums, mask) if not m],
                                                          [c for c, m in zip(t_sums, mask) if m]))
        validation = {"kind": "carved", "from": train_split, "fraction": val_fraction, "seed": seed,
                      "group_pattern": group_pattern, "videos": held_out}
        val_desc = carve_description(int(mask.sum()), train_split, val_fraction, train_data.labels)
    else:
        if val_name == "test":
            log.warning("picking the best epoch on the test split and reporting its score overstates "
                        "accuracy; without --val-split, a validation set is carved from train instead")
        val = opened[val_name].source
        both = (sums[train_split], sums[val_name])
        data = data_identity(train_data.videos, opened[val_name].data.videos, None if None in both else both)
        seen_videos = video_fingerprints(train_data.videos, opened[val_name].data.videos)
        validation = {"kind": "split", "split": val_name}
        val_desc = f"split {val_name!r}"
    test = opened[test_split].source if test_split is not None else None
    load_mb = sum(o.data.feature_bytes for o in opened.values() if o.mode == "memory") / 1e6
    return StageTwoData(train=train, val=val, test=test, classes=classes, provenance=provenance, val_name=val_desc,
                        test_split=test_split, validation=validation, data=data, seen_videos=seen_videos,
                        load_seconds=time.perf_counter() - t0, load_mb=load_mb, opened=opened,
                        load=opened.describe())


@dataclass
class TrainResult:
    out: Path
    best_epoch: int
    best: dict[str, Any]
    history: list[dict[str, Any]]
    classes: list[str]
    val_split: str  # what the best epoch was picked on
    seconds: float
    load_seconds: float
    load_mb: float
    stopped_early: bool
    test: dict[str, Any] | None = None  # the picked model on the test split, evaluated once
    test_split: str | None = None
    load: str = ""  # which splits were held in memory and which read lazily, for the summary


def train_temporal(cfg: TemporalConfig, *, progress: bool = True,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   on_start: Callable[[RunDir], None] | None = None) -> TrainResult:
    """Run stage two. ``on_start`` gets the run folder once it is checked (the CLI takes its
    resume hint from it); ``on_epoch`` every epoch's record."""
    with contextlib.ExitStack() as held:  # the run folder, for as long as this run writes it
        return _train_temporal(cfg, progress, on_epoch, on_start, held)


def _train_temporal(cfg: TemporalConfig, progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
                    on_start: Callable[[RunDir], None] | None, held: contextlib.ExitStack) -> TrainResult:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    amp = training_precision(cfg.precision, device)
    seed_everything(cfg.seed, cfg.deterministic)
    run = held.enter_context(RunDir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, kind="temporal"))
    out = run.path
    if on_start is not None:
        on_start(run)
    tb = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from e

    data = load_stage_two(cfg.cache, train_split=cfg.train_split, val_split=cfg.val_split,
                          val_fraction=cfg.val_fraction, group_pattern=cfg.group_pattern, test_split=cfg.test_split,
                          seed=cfg.seed, device=device, load=cfg.load, memory_budget=cfg.memory_budget)
    train_bank, val_bank, classes, provenance = data.train, data.val, data.classes, data.provenance
    val_labels = val_bank.labels.cpu().numpy()
    load_s, load_mb = data.load_seconds, data.load_mb
    log.info("opened %d training videos, validation: %s; %s", len(train_bank), data.val_name, data.load)

    head_cfg = head_config(cfg, num_classes=len(classes), input_dim=provenance.feature_dim)
    say_positions_untrained(head_cfg.arch, cfg.seq_len, int(train_bank.lengths.max()))
    model = build_head(head_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.epochs, math.ceil(len(train_bank) / cfg.batch_size), cfg.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start = 1
    ckpt = run.load_last("temporal")
    if ckpt is not None:
        diff = Provenance.from_dict(ckpt["cache"]).mismatch(provenance)  # first: it changes the model's input too
        if diff:
            raise CheckpointError(f"{out / 'last.pt'} was trained on another cache ({diff}); resume on that cache, or "
                                  "--overwrite to start over")
        check_resume_head(out / "last.pt", ckpt["model_config"], head_cfg.to_dict())
        now = cfg.to_dict()  # an option an older last.pt does not record is not compared
        check_resume_options(out / "last.pt", {**now, **ckpt["train_config"]}, now,
                             ("seq_len", "sampler", "batch_size", "lr", "weight_decay", "warmup_epochs",
                              "label_smoothing", "clip_grad", "seed", "eval_clips"))
        check_resume_validation(out / "last.pt", ckpt.get("validation"), data.validation)
        check_resume_data(out / "last.pt", ckpt.get("data"), data.data)
        check_resume_epochs(out / "last.pt", ckpt["epoch"], cfg.epochs, ckpt["train_config"].get("epochs"))
        check_resume_compute(out / "last.pt", ckpt.get("compute"), compute_identity(device, amp), ckpt["epoch"])
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        if scaler is not None and ckpt.get("scaler_state"):
            scaler.load_state_dict(ckpt["scaler_state"])
        history, best, start = list(ckpt["history"]), ckpt["best"], ckpt["epoch"] + 1

    common = {"kind": "temporal", "model_config": head_cfg.to_dict(), "train_config": cfg.to_dict(),
              "frame_spec": provenance.frame_spec.to_dict(), "classes": classes, "cache": provenance.to_dict(),
              "val_split": data.val_name, "validation": data.validation, "data": data.data,
              "seen_videos": data.seen_videos, "compute": compute_identity(device, amp)}
    run.start()
    run.write_json("config.json", {"train": cfg.to_dict(), "model": head_cfg.to_dict(), "classes": classes,
                                   "cache": provenance.to_dict()})
    if cfg.tensorboard:
        tb = SummaryWriter(str(out / "tensorboard"))
    stopped_early = False
    for epoch in range(start, cfg.epochs + 1):
        if best is not None and cfg.patience and epoch - best["epoch"] > cfg.patience:
            stopped_early = True
            break
        # Seeds derive from (seed, epoch): a resumed run draws the same clips and dropout masks.
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        t0 = time.perf_counter()
        try:
            tr = train_one_epoch(model, train_bank, optimizer, scheduler, seq_len=cfg.seq_len, sampler=cfg.sampler,
                                 batch_size=cfg.batch_size, rng=rng, label_smoothing=cfg.label_smoothing,
                                 clip_grad=cfg.clip_grad, amp_dtype=amp, scaler=scaler,
                                 desc=f"epoch {epoch}/{cfg.epochs}", progress=progress)
        except FloatingPointError as e:
            raise TrainingError(f"epoch {epoch}: {e}; likely cause: learning rate too high (--lr {cfg.lr}); "
                                f"{best_kept_note(out)}") from None
        train_s = time.perf_counter() - t0
        # Validation and test in float32 whatever --precision trains with: the arithmetic evaluate and
        # predict use, so the model is picked, and its test.json reported, on the numbers they give.
        probs, vloss = evaluate(model, val_bank, seq_len=cfg.seq_len, num_clips=cfg.eval_clips)
        m = classification_metrics(probs, val_labels, vloss)
        if not math.isfinite(vloss):
            raise TrainingError(f"epoch {epoch}: validation loss is {vloss}; {best_kept_note(out)}")
        record, best, improved = run.record_epoch(
            common, epoch=epoch, metrics=m, train_loss=tr["loss"], train_top1=tr["top1"], clips=len(train_bank),
            seconds=train_s, optimizer=optimizer, scheduler=scheduler, scaler=scaler, history=history, best=best,
            states={"model_state": model.state_dict()}, val_split="val")
        run.plot_curves(history)  # at most every few seconds; both plots are finished after the loop
        if tb is not None:
            for k, v in record.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch)
        if on_epoch is not None:
            on_epoch({**record, "best": improved})
    run.finish_plots(history)
    if tb is not None:
        tb.close()
    assert best is not None
    test = None
    if data.test is not None:  # once, with the picked model: the number to report
        test = run.report_test(build_head(head_cfg).to(device), data.test, data.test_split, classes,
                               seq_len=cfg.seq_len, eval_clips=cfg.eval_clips)
    data.close()
    return TrainResult(out=out, best_epoch=best["epoch"], best=best, history=history, classes=classes,
                       val_split=data.val_name, seconds=time.perf_counter() - t_start, load_seconds=load_s,
                       load_mb=load_mb, stopped_early=stopped_early, test=test, test_split=data.test_split,
                       load=data.load)


def head_config(cfg: TemporalConfig, *, num_classes: int, input_dim: int) -> HeadConfig:
    """The head a stage-two config asks for (positions cover its clips)."""
    return HeadConfig(num_classes=num_classes, input_dim=input_dim, arch=cfg.head, hidden=cfg.hidden,
                      layers=cfg.layers, bidirectional=cfg.bidirectional, dropout=cfg.dropout, pool=cfg.pool,
                      num_heads=cfg.num_heads, max_len=max(cfg.seq_len, 1))


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    classes: list[str]
    split: str
    videos: list[str]
    probs: np.ndarray
    load: str = ""  # memory or lazy, as for TrainResult
    seen: str = ""  # how the model has seen these videos already ('' if it has not, as far as recorded)


def _seen_by(ckpt: dict[str, Any], split: str, videos: list[str]) -> str:
    """How a checkpoint has seen the videos of an evaluated split, from what its run recorded
    (``data_identity`` of what it trained and validated on; its carve): '' where they are new to it.
    Checkpoints from before that record are judged by the split's name."""
    ident = data_identity(videos, videos)["train"]
    data = ckpt.get("data")
    if data is None:
        tc, val = ckpt.get("train_config") or {}, ckpt.get("validation") or {}
        if val.get("kind") == "split" and val.get("split") == split:
            return f"the best epoch of this model was picked on a split {split!r} (its validation split)"
        if tc.get("train_split") == split:
            return f"this model was trained on a split {split!r}"
        data = {}
    if same_videos(ident, data.get("val")):
        return f"the best epoch of this model was picked on these {len(videos)} videos (its validation set)"
    if same_videos(ident, data.get("train")):
        return f"this model was trained on these {len(videos)} videos"
    if (init := ckpt.get("init_seen")) and same_videos(ident, init.get("videos")):
        return init["note"]  # a finetune-end-to-end run's --init was trained on some of them
    carved = set((ckpt.get("validation") or {}).get("videos", ()))
    if carved and carved <= set(videos):
        return (f"this split holds the {len(carved)} videos this model's best epoch was picked on, and the ones "
                "carved from the same split that it was trained on")
    trained, picked = seen_among(ckpt.get("seen_videos"), videos)
    if trained or picked:  # some of them: another split list of the same videos (HMDB51's, UCF101's three)
        parts = [f"{trained} this model was trained on"] * bool(trained) + \
                [f"{picked} its best epoch was picked on"] * bool(picked)
        return f"{' and '.join(parts)}, of these {len(videos)} videos"
    return ""


def _check_run_results(out: Path, split: str, m: dict[str, Any]) -> None:
    """Refuse to write an evaluation as a run's own test files (``confusion_test.png``,
    ``per_class_test.csv``) where its numbers differ from the run's ``test.json``, which they go
    with: the folder would contradict itself. Also where the run has not written them (a sweep's
    folder: its ``test.json`` is the winner's). The same numbers again (its best.pt, its settings)
    are written as they are."""
    files = [f for f in (f"confusion_{split}.png", f"per_class_{split}.csv") if f in RUN_FILES]
    if not files or not holds_run(out):
        return
    try:
        run = json.loads((out / "test.json").read_text())
    except (OSError, ValueError):
        return  # no results there for these files to contradict
    differ = [k for k in ("top1", "top5", "mean_class_acc", "loss")  # the loss within float rounding (another device)
              if not (isinstance(run.get(k), (int, float))
                      and math.isclose(run[k], m[k], rel_tol=1e-3 if k == "loss" else 1e-9))]
    if run.get("split") != split or differ:
        theirs, ours = ((f"split {run.get('split')}", f"split {split}") if run.get("split") != split else
                        (f"{differ[0]} {run.get(differ[0])}", f"{differ[0]} {m[differ[0]]:.4g}"))
        raise ConfigError(f"--out {out} holds a run whose test results (test.json: {theirs}) are not this "
                          f"evaluation's ({ours}): its {' and '.join(files)} would no longer match them; write this "
                          "evaluation to another --out")


def evaluate_checkpoint(checkpoint: str | Path, cache_path: str | Path, split: str, *,
                        eval_clips: int | None = None, device: str = "auto", out: str | Path | None = None,
                        load: str = "auto", memory_budget: float | None = None) -> EvalResult:
    """Metrics of a trained checkpoint on a cache split; refuses a cache it was not trained for.
    ``load``/``memory_budget`` (GB): as for ``TemporalConfig`` (see ``sources.open_splits``)."""
    model = load_model(checkpoint)
    dev = resolve_device(device)
    with FeatureCache(cache_path) as cache:
        model.check_cache(cache.provenance, cache_path)
        opened = open_splits(cache, [split], dev, load=load, memory_budget_gb=memory_budget)
    data, bank = opened[split].data, opened[split].source
    head = model.head.to(dev)
    with opened:
        probs, loss = evaluate(head, bank, seq_len=model.seq_len, num_clips=eval_clips or model.eval_clips)
    m = classification_metrics(probs, data.labels, loss)
    if seen := _seen_by(model.ckpt, split, data.videos):
        log.warning("%s: %s; these numbers overstate accuracy on new videos (evaluate a held-out split)", split, seen)
    if out is not None:
        out = ensure_dir(out, "--out")
        with exclusive(out, "--out"):  # not into a run folder while its run writes (or --overwrite clears) it
            _check_run_results(out, split, m)
            plot_confusion(np.array(m["confusion"]), model.classes, out / f"confusion_{split}.png",
                           title=f"{split}: top-1 {m['top1']:.3f}")
            write_per_class(m, model.classes, out / f"per_class_{split}.csv")
    return EvalResult(metrics=m, classes=model.classes, split=split, videos=data.videos, probs=probs,
                      load=opened.describe(), seen=seen)
