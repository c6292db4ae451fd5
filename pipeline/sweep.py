"""The sweep: many temporal heads trained at once on one cache, poor ones stopped early.

A grid over head, hidden size, layers, bidirectional, dropout, lr, weight decay, seq-len, sampler
and eval clips becomes a list of trials (each a full ``TemporalConfig``; axes a head does not use
are ignored, so duplicates collapse). All trials train in one process on the splits of
``train.load_stage_two`` (picked on validation, never on test):

* each step samples and gathers one batch of clips and feeds it to every trial that shares its
  seq-len and sampler, with one backward pass for all (``engine.train_heads_one_epoch``);
  validation clips are gathered once for every trial too; trials that differ only in their
  eval clips share one training and are evaluated each their own way;
* successive halving: at the end of each rung (``min_epochs``, ×``eta``, ... up to ``epochs``)
  only the best 1/``eta`` of the running trials (val top-1, then val loss) go on;
* at every rung end, and at least a minute apart, the whole sweep is saved atomically
  (``sweep_state.pt``): rerunning the same command after a kill resumes from there, replays the
  epochs since exactly, and ends with the same leaderboard; each trial's best model is kept in
  ``trials/<id>/best.pt``, written with the snapshot that covers its epoch (the snapshot first,
  holding it too), so a trial's file never holds an epoch that a resume replays: a replay on a
  GPU need not repeat the killed run bit for bit;
* at the end: a leaderboard (returned, and as ``leaderboard.csv`` and ``leaderboard.png``), the
  winner's ``best.pt`` in the usual format (for predict, evaluate, ``finetune --init``), and the
  winner evaluated once on the test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TRAIN_SAMPLERS, Provenance, TemporalConfig
from .engine import HeadTrainer, evaluate_heads, train_heads_one_epoch
from .errors import ConfigError
from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text, ensure_dir, exclusive
from .heads import HEADS, build_head, unused_fields
from .metrics import classification_metrics
from .report import write_csv
from .run import check_resume_compute, check_resume_data, compute_identity, remove_run_files, summary
from .runtime import resolve_device, training_precision
from .train import StageTwoData, cosine_schedule, head_config, load_stage_two, say_positions_untrained

log = logging.getLogger(__name__)

AXES = ("head", "hidden", "layers", "bidirectional", "num_heads", "dropout", "lr", "weight_decay", "seq_len",
        "sampler", "eval_clips")
DEFAULT_GRID: dict[str, tuple] = {"head": tuple(HEADS), "hidden": (256, 512), "bidirectional": (False, True),
                                  "lr": (1e-3, 3e-3)}
STATE_VERSION = 2  # 2: trainings shared by trials saved once
SNAPSHOT_SECONDS = 60.0


Grid = tuple[tuple[str, tuple], ...]  # (axis, values) pairs: their cartesian product


@dataclass(frozen=True)
class SweepConfig:
    """``base``: every trial's options (its ``out`` is the sweep folder); ``grids``: one or more
    grids of axes, whose trials are swept together (their union)."""

    base: TemporalConfig
    grids: tuple[Grid, ...] = (tuple(DEFAULT_GRID.items()),)
    eta: int = 3
    min_epochs: int = 2
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.grids:
            raise ConfigError("the sweep has no grid")
        for grid in self.grids:
            for axis, values in grid:
                if axis not in AXES:
                    raise ConfigError(f"cannot sweep over {axis!r}: the axes are {', '.join(AXES)}")
                if not values:
                    raise ConfigError(f"the sweep axis {axis!r} has no values")
        if self.eta < 2:
            raise ConfigError(f"--eta must be at least 2, got {self.eta}")
        if self.min_epochs < 1:
            raise ConfigError(f"--min-epochs must be at least 1, got {self.min_epochs}")

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "grids": [{a: list(v) for a, v in g} for g in self.grids],
                "eta": self.eta, "min_epochs": self.min_epochs}



@dataclass
class Trial:
    id: str
    cfg: TemporalConfig
    label: str
    status: str = "running"  # running | finished | stopped | failed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stopped_at: int | None = None
    failed: str | None = None
    key: str = ""  # the trial's own settings: its seed derives from them, not from its place in the grid
    train_key: str = ""  # the same without eval clips: trials that differ only there share one training
    trainer: HeadTrainer | None = None
    head_cfg: Any = None
    pending: dict[str, Any] | None = None  # best.pt of an epoch no snapshot covers yet (``_record``)


@dataclass
class SweepResult:
    out: Path
    leaderboard: list[dict[str, Any]]  # best first
    winner: dict[str, Any]
    test: dict[str, Any] | None
    test_split: str | None
    val_split: str
    classes: list[str]
    seconds: float
    trial_epochs: int  # epochs trained, summed over trials
    varying: list[str]  # the axes that differ between trials


def varying_axes(trials: Sequence[Trial]) -> list[str]:
    """The axes whose value differs between the trials that use them."""
    return [a for a in AXES if len({getattr(t.cfg, a) for t in trials if a not in unused_fields(t.cfg.head)}) > 1]


def expand_grid(cfg: SweepConfig) -> list[Trial]:
    """The trials of the grids: every combination, fields a head does not use reset, duplicates
    dropped, in grid order."""
    base = dataclasses.replace(cfg.base, resume=False, overwrite=False)
    seen: dict[str, Trial] = {}
    defaults = TemporalConfig(cache="", out="")
    points = [dict(zip([a for a, _ in g], values)) for g in cfg.grids for values in itertools.product(*(v for _, v in g))]
    for point in points:
        t = dataclasses.replace(base, **point)
        t = dataclasses.replace(t, **{f: getattr(defaults, f) for f in unused_fields(t.head)})
        settings = {a: getattr(t, a) for a in (*AXES, "pool")}
        key = json.dumps(settings, sort_keys=True)
        if key not in seen:
            train_key = json.dumps({**settings, "eval_clips": None}, sort_keys=True)
            seen[key] = Trial(id="", cfg=t, label="", key=key, train_key=train_key)
    trials = list(seen.values())
    varying = varying_axes(trials)
    width = len(str(len(trials) - 1))
    for i, t in enumerate(trials):
        t.id, t.label = f"t{i:0{width}d}", _label(t.cfg, varying)
        t.cfg = dataclasses.replace(t.cfg, out=str(Path(cfg.base.out) / "trials" / t.id))
    return trials


def _label(t: TemporalConfig, axes: Sequence[str]) -> str:
    parts = [t.head]
    for a in axes:
        if a == "head" or a in unused_fields(t.head):
            continue
        v = getattr(t, a)
        parts.append({"bidirectional": "bi" if v else "uni"}.get(a, f"{a.replace('_', '-')} {v:g}"
                     if isinstance(v, float) else f"{a.replace('_', '-')} {v}"))
    return " ".join(parts)


def rung_ends(epochs: int, min_epochs: int, eta: int) -> list[int]:
    """Epochs after which successive halving keeps the best 1/eta: min, min·eta, ... and the last."""
    ends, e = [], min_epochs
    while e < epochs:
        ends.append(e)
        e *= eta
    return ends + [epochs]


def planned_trial_epochs(n: int, ends: list[int], eta: int) -> int:
    total, prev = 0, 0
    for end in ends:
        total += n * (end - prev)
        prev, n = end, max(1, math.ceil(n / eta))
    return total


def _spec_hashes(cfg: SweepConfig, data_validation: dict[str, Any]) -> tuple[str, str]:
    """The hash of what a sweep's results depend on, and the one sweeps before 1 Dec 2026 saved
    (which also hashed the --out path, so a copied sweep folder could not resume)."""
    spec = {**cfg.to_dict(), "validation": data_validation}
    # Where the splits live (memory or lazy), on which device and in which folder do not change a
    # trial's result. What the cache holds is checked on its own (``_load_state``).
    base = {k: v for k, v in spec["base"].items() if k not in ("resume", "overwrite", "device", "load", "memory_budget")}
    digest = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]  # noqa: E731
    return (digest({**spec, "base": {k: v for k, v in base.items() if k != "out"}}),
            digest({**spec, "base": base}))


STATE_FILE = "sweep_state.pt"


def sweep_hint(out: Path, overwrite: bool) -> Callable[[], str]:
    """Taken before a sweep into ``out`` starts: after an interrupt, it says what the sweep kept
    and how to go on. With ``--overwrite`` a state file counts only if this sweep wrote it (saved
    atomically, so a new one is another inode), as the earlier sweep's is removed at its first write."""
    state = out / STATE_FILE

    def written() -> tuple[int, int] | None:
        try:
            st = state.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    before = written()

    def hint() -> str:
        if state.exists() and (written() != before or not overwrite):
            return (f"the sweep's progress is kept in {state}; rerun the command"
                    f"{' without --overwrite' if overwrite else ''} to resume it")
        return "no progress of this sweep was saved yet; rerun the same command to start " + ("over" if overwrite else "it")

    return hint


def sweep(cfg: SweepConfig, *, progress: bool = True,
          on_epoch: Callable[[int, list[Trial]], None] | None = None) -> SweepResult:
    """Run the sweep in ``cfg.base.out``; resumes a killed sweep of the same spec there."""
    t_start = time.perf_counter()
    base = cfg.base
    trials = check_grid(cfg)
    ensure_dir(base.out, "--out")
    with exclusive(base.out, "--out"):  # one sweep writes here at a time
        return _locked_sweep(cfg, trials, progress, on_epoch, t_start)


def check_grid(cfg: SweepConfig) -> list[Trial]:
    """The grid's trials (``expand_grid``), checked before anything is read or written: a trial
    whose head cannot be built (hidden 8 with 3 attention heads) is refused by name, and an axis of
    several values that no head of its grid reads (--num-heads for an LSTM) is warned about, as it
    changes no trial."""
    trials = expand_grid(cfg)
    paired = {"hidden", "num_heads"} & set(varying_axes(trials))
    for t in trials:
        try:
            head_config(t.cfg, num_classes=1, input_dim=1)
        except ConfigError as e:
            hint = "; a --spec list of grids pairs only the values that fit" if paired else ""
            raise ConfigError(f"sweep trial '{t.label}': {e}{hint}") from None
    for grid in cfg.grids:
        heads = dict(grid).get("head", (cfg.base.head,))
        for axis, values in grid:
            if len(values) > 1 and all(axis in unused_fields(h) for h in heads):
                log.warning("--%s %s changes no trial of the sweep: the %s head%s not use it", axis.replace("_", "-"),
                            ",".join(map(str, values)), ", ".join(heads), "s do" if len(heads) > 1 else " does")
    return trials


def _locked_sweep(cfg: SweepConfig, trials: list[Trial], progress: bool,
                  on_epoch: Callable[[int, list[Trial]], None] | None, t_start: float) -> SweepResult:
    base = cfg.base
    device = resolve_device(base.device)
    amp = training_precision(base.precision, device)
    if amp == torch.float16 and base.precision == "fp16":
        raise ConfigError("the sweep trains in fp32 or bf16 (fp16 would need a loss scaler per head); "
                          "use --precision bf16 or fp32")
    if amp == torch.float16:  # auto on a GPU without bf16 tensor cores
        log.info("training in fp32: this GPU has no bf16 tensor cores, and the sweep does not train in fp16 "
                 "(it would need a loss scaler per head)")
        amp = None
    data = load_stage_two(base.cache, train_split=base.train_split, val_split=base.val_split,
                          val_fraction=base.val_fraction, group_pattern=base.group_pattern,
                          test_split=base.test_split, seed=base.seed, device=device, load=base.load,
                          memory_budget=base.memory_budget)
    try:
        longest = int(data.train.lengths.max())
        for arch, seq_len in sorted({(t.cfg.head, t.cfg.seq_len) for t in trials}):
            say_positions_untrained(arch, seq_len, longest)
        return _sweep(cfg, trials, data, device, amp, progress=progress, on_epoch=on_epoch, t_start=t_start)
    finally:
        data.close()


def _sweep(cfg: SweepConfig, trials: list[Trial], data: StageTwoData, device: torch.device, amp: torch.dtype | None,
           *, progress: bool, on_epoch: Callable[[int, list[Trial]], None] | None, t_start: float) -> SweepResult:
    base = cfg.base
    out = Path(base.out)
    ends = rung_ends(base.epochs, cfg.min_epochs, cfg.eta)
    spec, legacy_spec = _spec_hashes(cfg, data.validation)
    state_path = out / STATE_FILE
    for t in trials:  # every trial's head is built before --overwrite removes anything (checked by check_grid)
        t.head_cfg = head_config(t.cfg, num_classes=len(data.classes), input_dim=data.provenance.feature_dim)
    if cfg.overwrite:  # every file of the earlier sweep or run: none may outlive the trials it describes
        remove_run_files(out)
    state = _load_state(state_path, (spec, legacy_spec), data, _options(cfg)) if state_path.exists() else None
    if state is None and (out / "best.pt").exists():
        raise ConfigError(f"{out} already holds a finished sweep or run; use --overwrite to start over, "
                          "or another --out")
    varying = varying_axes(trials)
    log.info("sweep of %d trials (%s), rungs at epochs %s, validation: %s", len(trials),
             "; ".join(", ".join(f"{a} {list(v)}" for a, v in g) for g in cfg.grids), ends, data.val_name)

    trainers: dict[str, HeadTrainer] = {}
    for t in trials:  # trials that differ only in eval clips train once, together
        if t.train_key not in trainers:
            trainers[t.train_key] = _build_trainer(t, data, device)
        t.trainer = trainers[t.train_key]
    start = 1
    if state is not None:
        start = state["epoch"] + 1
        for t in trials:
            s = state["trials"][t.id]
            t.status, t.history, t.best = s["status"], list(s["history"]), s["best"]
            t.stopped_at, t.failed = s["stopped_at"], s["failed"]
            if t.status == "running":
                tr = state["trainers"][t.train_key]
                t.trainer.model.load_state_dict(tr["model_state"])
                t.trainer.optimizer.load_state_dict(tr["optimizer_state"])
                t.trainer.scheduler.load_state_dict(tr["scheduler_state"])
            t.pending = s.get("best_ckpt")  # killed between the snapshot and its best.pt files
        _write_best(trials)
        check_resume_compute(state_path, state.get("compute"), compute_identity(device, amp), state["epoch"])
        log.info("resuming the sweep in %s after epoch %d", out, state["epoch"])

    total = planned_trial_epochs(len(trials), ends, cfg.eta)
    done = sum(len(t.history) for t in trials if t.status != "failed") + sum(
        (t.stopped_at or 0) for t in trials if t.status == "failed")
    bar = tqdm(total=total, initial=min(done, total), unit="trial-epoch", desc="sweep", disable=not progress or None,
               dynamic_ncols=True)
    val_labels = data.val.labels.cpu().numpy()
    last_save = time.perf_counter()
    try:
        for epoch in range(start, base.epochs + 1):
            running = [t for t in trials if t.status == "running"]
            if not running:
                break
            t0 = time.perf_counter()
            for (seq_len, sampler), group in _groups(running, lambda c: (c.seq_len, c.sampler)).items():
                rng = np.random.default_rng([base.seed, epoch, seq_len, TRAIN_SAMPLERS.index(sampler)])
                shared = list({id(t.trainer): t.trainer for t in group}.values())
                stats = dict(zip(map(id, shared), train_heads_one_epoch(
                    shared, data.train, seq_len=seq_len, sampler=sampler, batch_size=base.batch_size, rng=rng,
                    epoch=epoch, amp_dtype=amp)))
                for t in group:
                    st = stats[id(t.trainer)]
                    t.history.append({"epoch": epoch, "train_loss": st["loss"], "train_top1": st["top1"]})
            train_s = time.perf_counter() - t0
            for (seq_len, clips), group in _groups([t for t in running if t.trainer.failed is None],
                                                   lambda c: (c.seq_len, c.eval_clips)).items():
                # float32 whatever --precision trains with, as train-temporal validates (see there)
                results = evaluate_heads([t.trainer.model for t in group], data.val, seq_len=seq_len, num_clips=clips)
                for t, (probs, loss) in zip(group, results):
                    if not math.isfinite(loss):  # weights gone non-finite in the last step: not a model to pick
                        t.trainer.failed = t.trainer.failed or f"validation loss became {loss} in epoch {epoch}"
                        continue
                    _record(t, epoch, classification_metrics(probs, val_labels, loss), data, train_s / len(running))
            for t in running:
                if t.trainer.failed is not None and t.status == "running":
                    t.status, t.failed, t.stopped_at = "failed", t.trainer.failed, epoch
                    log.warning("trial %s (%s) failed: %s", t.id, t.label, t.failed)
            if epoch in ends:
                _halve(trials, epoch, cfg.eta, last=epoch == base.epochs)
            # A snapshot at every rung end and at least a minute apart: it can weigh hundreds of MB
            # (every running head with its optimiser), and a resumed sweep replays the epochs since
            # the last one exactly (batches and dropout are seeded per epoch).
            if epoch in ends or time.perf_counter() - last_save >= SNAPSHOT_SECONDS:
                _save_state(state_path, spec, data, epoch, trials, _options(cfg), compute_identity(device, amp))
                last_save = time.perf_counter()
            bar.update(len(running))
            if on_epoch is not None:
                on_epoch(epoch, trials)
    finally:
        bar.close()
    for t in trials:
        if t.status == "running":  # the schedule ended
            t.status = "finished"
    _write_best(trials)  # the last epoch is a rung end, snapshotted; this covers a sweep stopped otherwise

    board = leaderboard(trials, varying)
    if not board or board[0]["best_val_top1"] is None:
        raise ConfigError("every trial of the sweep failed (loss not finite); lower the learning rates")
    winner = next(t for t in trials if t.id == board[0]["id"])
    # The winner's checkpoint is checked before it replaces OUT/best.pt, which a rerun of a finished
    # sweep would otherwise overwrite with a trial file damaged or deleted since.
    src = Path(winner.cfg.out) / "best.pt"
    redo = f"{out / 'best.pt'} is kept as it was; rerun the sweep with --overwrite to train it again"
    if not src.is_file():
        raise CheckpointError(f"{src}, the checkpoint of the winning trial {winner.id}, is missing; {redo}")
    ck = load_checkpoint(src, damaged=f"it is the winning trial's; {redo}")
    atomic_write_bytes(out / "best.pt", src.read_bytes())
    test = None
    if data.test is not None:  # once, the winner only
        head = build_head(winner.head_cfg).to(device)
        head.load_state_dict(ck["model_state"])
        ((probs, loss),) = evaluate_heads([head], data.test, seq_len=winner.cfg.seq_len,
                                          num_clips=winner.cfg.eval_clips)
        m = classification_metrics(probs, data.test.labels.cpu().numpy(), loss)
        test = {"split": data.test_split, "trial": winner.id, "epoch": ck["epoch"], **summary(m)}
        atomic_write_text(out / "test.json", json.dumps({**test, "picked_on": data.val_name,
                                                         "per_class_acc": m["per_class_acc"]}, indent=2))
    _write_outputs(out, cfg, board, varying, data, test)
    return SweepResult(out=out, leaderboard=board, winner=board[0], test=test, test_split=data.test_split,
                       val_split=data.val_name, classes=data.classes, seconds=time.perf_counter() - t_start,
                       trial_epochs=sum(len(t.history) for t in trials), varying=varying)


def _groups(trials: list[Trial], key: Callable[[TemporalConfig], Any]) -> dict[Any, list[Trial]]:
    out: dict[Any, list[Trial]] = {}
    for t in trials:
        out.setdefault(key(t.cfg), []).append(t)
    return out


def _build_trainer(t: Trial, data: StageTwoData, device: torch.device) -> HeadTrainer:
    c = t.cfg
    seed = (c.seed * 1_000_003 + int(hashlib.sha256(t.train_key.encode()).hexdigest()[:8], 16)) % 2**31
    torch.manual_seed(seed)
    model = build_head(head_config(c, num_classes=len(data.classes), input_dim=data.provenance.feature_dim)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = cosine_schedule(opt, c.epochs, math.ceil(len(data.train) / c.batch_size), c.warmup_epochs)
    return HeadTrainer(model=model, optimizer=opt, scheduler=sched, seed=seed, clip_grad=c.clip_grad,
                       label_smoothing=c.label_smoothing)


def _record(t: Trial, epoch: int, m: dict[str, Any], data: StageTwoData, seconds: float) -> None:
    """The trial's epoch record; on a better val top-1 (ties: lower loss) its best.pt, in the usual
    format of a train-temporal checkpoint, held until the next snapshot writes it (``_save_state``)."""
    rec = t.history[-1]
    rec.update({f"val_{k}": v for k, v in summary(m).items()})
    rec["epoch_seconds"] = seconds
    if t.best is None or (m["top1"], -m["loss"]) > (t.best["top1"], -t.best["loss"]):
        t.best = {"epoch": epoch, **summary(m)}
        t.pending = {
            "kind": "temporal", "model_config": t.head_cfg.to_dict(), "train_config": t.cfg.to_dict(),
            "frame_spec": data.provenance.frame_spec.to_dict(), "classes": data.classes,
            "cache": data.provenance.to_dict(), "val_split": data.val_name, "validation": data.validation,
            "data": data.data, "seen_videos": data.seen_videos, "epoch": epoch, "metrics": m, "sweep_trial": t.id,
            "sweep_seed": t.trainer.seed,
            "model_state": {k: v.detach().to("cpu", copy=True) for k, v in t.trainer.model.state_dict().items()}}


def _write_best(trials: list[Trial]) -> None:
    """The best.pt of each trial that improved since the last time, from what it holds."""
    for t in trials:
        if t.pending is not None:
            Path(t.cfg.out).mkdir(parents=True, exist_ok=True)
            save_checkpoint(Path(t.cfg.out) / "best.pt", t.pending)
            t.pending = None


def _rank_key(t: Trial) -> tuple:
    b = t.best
    return (-(b["top1"]), b["loss"], t.id) if b is not None else (1.0, math.inf, t.id)


def _halve(trials: list[Trial], epoch: int, eta: int, *, last: bool) -> None:
    running = sorted((t for t in trials if t.status == "running"), key=_rank_key)
    keep = len(running) if last else max(1, math.ceil(len(running) / eta))
    for t in running[keep:]:
        t.status, t.stopped_at = "stopped", epoch
    if not last and running[keep:]:
        log.info("epoch %d: %d trial(s) go on, %d stopped", epoch, keep, len(running) - keep)


def leaderboard(trials: list[Trial], varying: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for rank, t in enumerate(sorted(trials, key=_rank_key), 1):
        b = t.best or {}
        rows.append({"rank": rank, "id": t.id, "config": t.label, **{a: getattr(t.cfg, a) for a in varying},
                     "best_val_top1": b.get("top1"), "best_val_loss": b.get("loss"),
                     "best_val_mean_class_acc": b.get("mean_class_acc"), "best_epoch": b.get("epoch"),
                     "epochs": len(t.history), "status": t.status if t.status != "stopped" else
                     f"stopped at {t.stopped_at}", "failed": t.failed})
    return rows


def _options(cfg: SweepConfig) -> dict[str, Any]:
    """The options that decide which videos a sweep trains and validates on, as given: a rerun that
    changed one of them is told so by name."""
    return {k: getattr(cfg.base, k) for k in ("train_split", "val_split", "val_fraction", "group_pattern", "seed")}


def _save_state(path: Path, spec: str, data: StageTwoData, epoch: int, trials: list[Trial],
                options: dict[str, Any], compute: str) -> None:
    """One atomic snapshot of the sweep after ``epoch``: running trials with their optimiser and
    schedule, the others with their records only; the best.pt of each trial that improved since
    the last snapshot, then written to its file; what the cache held, ``options`` and the
    arithmetic (``run.compute_identity``)."""
    state: dict[str, Any] = {"version": STATE_VERSION, "spec": spec, "cache": data.provenance.to_dict(),
                             "data": data.data, "options": options, "compute": compute, "epoch": epoch, "trials": {},
                             "trainers": {}}
    for t in trials:
        state["trials"][t.id] = {"status": t.status, "history": t.history, "best": t.best,
                                 "stopped_at": t.stopped_at, "failed": t.failed, "best_ckpt": t.pending}
        if t.status == "running" and t.train_key not in state["trainers"]:  # a shared training is saved once
            state["trainers"][t.train_key] = {"model_state": t.trainer.model.state_dict(),
                                              "optimizer_state": t.trainer.optimizer.state_dict(),
                                              "scheduler_state": t.trainer.scheduler.state_dict()}
    atomic_torch_save(path, state, hint="the sweep's last completed epoch is kept")
    _write_best(trials)  # after the snapshot, which holds them: a kill in between is mended on resume


def _load_state(path: Path, specs: tuple[str, ...], data: StageTwoData, options: dict[str, Any]) -> dict[str, Any] | None:
    """The saved sweep, if it is this one: the same spec, run on a cache that holds the same
    features (a cache file replaced under the same name would mix two kinds of features) of the
    same videos (``run.data_identity``; a split changed since would mix two datasets)."""
    from .checkpoint import safe_load

    state = safe_load(path, ConfigError, "sweep state")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ConfigError(f"{path} is not a sweep state this version can resume; use --overwrite to start over")
    diff = Provenance.from_dict(state["cache"]).mismatch(data.provenance) if "cache" in state else None
    if diff:
        raise ConfigError(f"{path.parent} holds a sweep on other features than the cache has now ({diff}); "
                          "resume it on the cache it ran on, or use --overwrite to start over")
    was = state.get("options") or {}  # not recorded by older sweeps
    if diff := [k for k in was if options.get(k) != was[k]]:
        def said(values: dict[str, Any]) -> str:
            return ", ".join(f"--{k.replace('_', '-')} {values[k]}" for k in diff)

        raise ConfigError(f"{path.parent} holds a sweep run with {said(was)} (here {said(options)}); rerun with "
                          "those to resume it, or --overwrite to start over")
    check_resume_data(f"the sweep in {path.parent}", state.get("data"), data.data, ConfigError)  # before the spec,
    if state["spec"] not in specs:  # which holds a carve's videos: the more precise reason first
        raise ConfigError(f"{path.parent} holds a sweep of another grid, cache or options; rerun with the same "
                          "options to resume it, or --overwrite to start over")
    return state


def _write_outputs(out: Path, cfg: SweepConfig, board: list[dict[str, Any]], varying: list[str],
                   data: StageTwoData, test: dict[str, Any] | None) -> None:
    cols = ["rank", "id", "config", *varying, "best_val_top1", "best_val_loss", "best_val_mean_class_acc",
            "best_epoch", "epochs", "status"]
    write_csv(out / "leaderboard.csv", cols, [[r[c] for c in cols] for r in board])
    atomic_write_text(out / "sweep.json", json.dumps({**cfg.to_dict(), "validation": data.val_name,
                                                      "winner": board[0], "test": test}, indent=2, default=str))
    plot_leaderboard(board, out / "leaderboard.png", title=f"sweep: val top-1 ({data.val_name})")


def plot_leaderboard(board: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Best val top-1 per trial, best first; colour by head, hatched where stopped early."""
    from .report import _plt, save_figure

    plt = _plt()
    rows = [r for r in board if r["best_val_top1"] is not None]
    colours = {"lstm": "tab:blue", "gru": "tab:cyan", "transformer": "tab:purple", "attention": "tab:orange",
               "mean": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(rows) + 1)))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        head = r["config"].split()[0]
        ax.barh(yi, r["best_val_top1"], color=colours.get(head, "tab:green"),
                hatch="//" if r["status"].startswith("stopped") else None, edgecolor="white")
        ax.text(r["best_val_top1"], yi, f" {r['best_val_top1']:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [f"{r['id']} {r['config']}" for r in rows], fontsize=7)
    ax.set(xlabel="best val top-1", xlim=(0, 1.08), title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
