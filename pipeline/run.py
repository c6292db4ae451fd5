"""A training run's output folder, shared by stage two, the sweep and stage three.

One place for the out-folder check, resume, and the end of every epoch. Files of a run:
``best.pt`` (best validation top-1), ``last.pt`` (everything ``--resume`` needs, with the history),
``metrics.jsonl`` (one line per epoch), ``config.json``, ``curves.png``, ``confusion.png``,
``per_class.csv``. Every one is written atomically.

Write order at the end of an epoch: ``metrics.jsonl``, then ``best.pt`` and ``per_class.csv``, then
``last.pt``. A kill at any point leaves ``last.pt`` at the previous epoch; a resumed run redoes
the epoch (identically: seeds derive from the epoch) and rewrites ``metrics.jsonl`` from
``last.pt``'s history, so no row is ever lost or doubled.

The two plots are views of those files, redrawn while the run trains at most every
``PLOT_EVERY_S`` seconds (every epoch when epochs are slower), and always at its end
(``finish_plots``). Drawing one costs 0.15-0.3 s of matplotlib, more than a sub-second epoch of a
small head: redrawn on every improvement, they took a third of a short run. A plot left by a
killed run can be up to that old; its title names the epoch it shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .errors import ConfigError
from .files import atomic_write_text, ensure_dir, exclusive
from .heads import head_option, unused_fields
from .report import plot_confusion, plot_curves, write_per_class

log = logging.getLogger(__name__)

PLOT_EVERY_S = 5.0  # while a run trains; see the module's docstring


def summary(m: dict[str, Any]) -> dict[str, float]:
    return {k: m[k] for k in ("loss", "top1", "top5", "mean_class_acc")}


def check_resume_options(last: Path, recorded: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> None:
    """The options the epochs in ``last`` were trained with (``recorded``) must be this run's."""
    for key in keys:
        if recorded.get(key) != now[key]:
            raise CheckpointError(f"{last} was trained with --{key.replace('_', '-')} {recorded.get(key)}, this run "
                                  f"asks for {now[key]}; resume with the same options")


def check_resume_head(last: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """The head the epochs in ``last`` trained (``recorded``, a ``HeadConfig.to_dict()``) must be
    this run's, told by the options that differ (not two whole configs to compare by eye)."""
    same_arch = recorded.get("arch") == now.get("arch")
    unread = set(unused_fields(now.get("arch", ""))) if same_arch else set()  # --num-heads for an LSTM: no change
    diff = [k for k in dict.fromkeys([*recorded, *now]) if k not in unread and recorded.get(k) != now.get(k)]
    if not diff:
        return
    parts = [f"{head_option(k, recorded.get(k))} (this run: {head_option(k, now.get(k))})" for k in diff]
    raise CheckpointError(f"{last} was trained with {', '.join(parts)}; resume with the same options, or "
                          "--overwrite to start over")


def check_resume_epochs(last: Path, done: int, epochs: int, planned: int | None = None) -> None:
    """A resumed run continues up to ``epochs``; one already past it would only rewrite its record.
    ``planned``: the --epochs the run started with, whose learning-rate schedule it followed."""
    if done > epochs:
        raise CheckpointError(f"{last} is at epoch {done}, past --epochs {epochs}: give --epochs {done} or more to "
                              "continue, or --overwrite to start over")
    if planned is not None and planned != epochs and done < epochs:
        log.warning("%s was started for %d epochs: from epoch %d on, its learning-rate schedule is that of a "
                    "%d-epoch run, so the result is neither run's as it would be uninterrupted", last, planned,
                    done + 1, epochs)


def compute_identity(device: torch.device, amp: torch.dtype | None) -> str:
    """The arithmetic a run trains in, e.g. ``cpu float32`` or ``cuda bfloat16``: saved with its
    state so that a resume in another one is told apart (``check_resume_compute``)."""
    return f"{device.type} {str(amp or torch.float32).removeprefix('torch.')}"


def check_resume_compute(last: Path, recorded: str | None, now: str, done: int) -> None:
    """A resume may change the device or ``--precision`` (a GPU run continued on another machine),
    but its epochs from then on are computed otherwise than the uninterrupted run's: said, not
    refused. Not recorded by older runs: not compared."""
    if recorded is not None and recorded != now:
        log.warning("%s trained its %d epoch(s) in %s, this run continues in %s (another device or --precision): "
                    "the result will differ from the uninterrupted run's by more than rounding", last, done,
                    recorded, now)


def check_resume_validation(last: Path, recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed run validates on the videos it validated on so far (``validation`` of its
    last.pt; not recorded by older ones): otherwise its earlier epochs' best would be another set's."""
    if recorded is not None and recorded != now:
        raise CheckpointError(f"{last} was validated on other videos (the training split, --val-fraction, "
                              "--group-pattern or the --seed of the carve changed); resume with the same data and "
                              "options")


def data_identity(train: Sequence[str], val: Sequence[str],
                  features: tuple[Sequence[int], Sequence[int]] | None = None,
                  sources: tuple[Sequence[str], Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """What a run trains and validates on, as the number and a hash of the videos of each (in
    order): saved with its state, so that a resume on data changed since (a video added to or
    dropped from a split, and the cache re-extracted) is told apart. ``features``: the cache's
    checksums of those videos' rows, in the same order (caches that hold them), so that videos
    extracted again under the same names (their files changed on disk) are told apart too.
    ``sources``: the videos' ``data.source_signature`` (a run that decodes them itself, as
    finetune-end-to-end does), for the same check without a cache between."""
    def digest(items: Sequence[Any]) -> str:
        return hashlib.sha256("\n".join(map(str, items)).encode("utf-8", "surrogateescape")).hexdigest()[:16]

    out = {name: {"videos": len(videos), "sha256": digest(videos)} for name, videos in (("train", train), ("val", val))}
    for key, parts in (("features", features), ("sources", sources)):
        for name, items in zip(("train", "val"), parts or ()):
            out[name][key] = digest(items)
    return out


def video_fingerprints(train: Sequence[str], val: Sequence[str]) -> dict[str, torch.Tensor]:
    """The names of the videos a run trains and validates on, each as a sorted 63-bit hash (8 bytes
    a video): saved in its checkpoints, so that ``evaluate`` can say how many of a split's videos
    the model has seen also where the split holds only some of them (HMDB51's and UCF101's three
    splits share videos: a model of split 1 tested on split 2's test list has trained on most)."""
    return {name: torch.tensor(sorted({_fingerprint(v) for v in videos}), dtype=torch.int64)
            for name, videos in (("train", train), ("val", val))}


def with_earlier(fingerprints: dict[str, torch.Tensor], earlier: dict[str, torch.Tensor] | None,
                 names: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``fingerprints`` with what an earlier run (an ``--init``) saw added, each to its part: what it
    was trained on (its ``video_fingerprints``' train, and the ``names`` known) to train, what it
    picked its best epoch on to val (a fine-tune from a carved --init holds out the same videos:
    trained on by neither)."""
    earlier = earlier or {}
    train = [fingerprints["train"], torch.tensor([_fingerprint(v) for v in names], dtype=torch.int64)]
    val = [fingerprints["val"]]
    if "train" in earlier:
        train.append(earlier["train"])
    if "val" in earlier:
        val.append(earlier["val"])
    return {"train": torch.unique(torch.cat(train)), "val": torch.unique(torch.cat(val))}


def _fingerprint(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little") >> 1


def seen_among(fingerprints: dict[str, torch.Tensor] | None, videos: Sequence[str]) -> tuple[int, int]:
    """How many of ``videos`` are among the ``video_fingerprints`` of a run's train and val videos."""
    if not fingerprints:
        return 0, 0
    mine = {_fingerprint(v) for v in videos}
    return tuple(len(mine.intersection(fingerprints[k].tolist())) if k in fingerprints else 0  # type: ignore[return-value]
                 for k in ("train", "val"))


def same_videos(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two parts of ``data_identity`` name the same videos, whatever their features."""
    return a is not None and b is not None and (a["videos"], a["sha256"]) == (b["videos"], b["sha256"])


def check_resume_data(where: str | Path, recorded: dict[str, Any] | None, now: dict[str, Any],
                      error: type = CheckpointError,
                      action: str = "resume it on the data it ran on, or use --overwrite to start over") -> None:
    """A resume trains and validates on the videos the run did so far (``data_identity``; not
    recorded by older runs): otherwise its epochs would mix two datasets, and its best epoch be
    picked across two validation sets."""
    for part, what in (("train", "trained"), ("val", "validated")):
        old, new = (recorded or {}).get(part), now.get(part)
        if old is not None and not same_videos(old, new):
            counts = (f"{old['videos']} then, {new['videos']} now" if old["videos"] != new["videos"]
                      else f"{new['videos']}, but other ones")
            raise error(f"{where} was {what} on other videos than the data has now ({counts}: the dataset or its "
                        f"cache changed since); {action}")
        if old is not None and "features" in old and "features" in new and old["features"] != new["features"]:
            raise error(f"{where} was {what} on other features of its {new['videos']} videos than the cache holds now "
                        f"(extracted again since: their files changed on disk); {action}")
        if old is not None and "sources" in old and "sources" in new and old["sources"] != new["sources"]:
            raise error(f"{where} was {what} on {new['videos']} videos of these names, but one or more of them "
                        f"changed on disk since (a frame folder's frame names or sizes, a video file's size); {action}")


# Everything a run (train-temporal, finetune-end-to-end) or a sweep writes in its folder. Starting
# over (--overwrite) removes all of them before the new run's first write, so an interrupted
# --overwrite never leaves the old run's results (test.json, plots, a leaderboard whose trials
# are gone) beside the new run's files. Other files in the folder are never touched.
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "config.json", "curves.png", "confusion.png", "per_class.csv",
             "test.json", "confusion_test.png", "per_class_test.csv", "tensorboard",
             "sweep_state.pt", "trials", "leaderboard.csv", "leaderboard.png", "sweep.json")


def evaluated_splits(folder: Path) -> list[str]:
    """The splits ``evaluate --out FOLDER`` wrote results of: each gives a pair of files,
    ``confusion_<split>.png`` and ``per_class_<split>.csv``; a file of one such name alone is
    someone else's (``confusion_matrix_for_paper.png``)."""
    out = []
    for p in folder.glob("confusion_*.png"):
        split = p.name.removeprefix("confusion_").removesuffix(".png")
        if p.is_file() and (folder / f"per_class_{split}.csv").is_file():
            out.append(split)
    return sorted(out)


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run or sweep (train-temporal, finetune-end-to-end, sweep)."""
    return any((folder / name).exists() for name in ("best.pt", "last.pt", "sweep_state.pt", "metrics.jsonl"))


def remove_run_files(folder: Path) -> None:
    """Remove the files a run or sweep wrote in ``folder``, if it holds one: in ``tensorboard/``
    only the event files, in ``trials/`` only the trials' own files; a folder left empty goes."""
    if not holds_run(folder):
        return
    for name in RUN_FILES:
        p = folder / name
        if name == "tensorboard" and p.is_dir() and not p.is_symlink():
            for events in p.glob("events.out.tfevents.*"):
                events.unlink()
            _rmdir_if_empty(p)
        elif name == "trials" and p.is_dir() and not p.is_symlink():
            for trial in p.iterdir():
                if trial.is_dir() and not trial.is_symlink():
                    for f in RUN_FILES:
                        if (trial / f).is_file():
                            (trial / f).unlink()
                    _rmdir_if_empty(trial)
            _rmdir_if_empty(p)
        elif not p.is_dir():
            p.unlink(missing_ok=True)
    for split in evaluated_splits(folder):  # `evaluate --out` into the run: about the old model too
        for p in (folder / f"confusion_{split}.png", folder / f"per_class_{split}.csv"):
            p.unlink(missing_ok=True)


def _rmdir_if_empty(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.rmdir()


class RunDir:
    """The folder ``path`` of one run. ``resume``: continue from ``last.pt`` (a folder without one
    starts at epoch 1: an interrupt before the first epoch ended leaves nothing to resume, and
    ``--resume`` must still work); ``overwrite``: start over where a run already is. Without either,
    a folder that holds a run is refused, so a new run never replaces an earlier ``best.pt``.
    ``main=False`` (other torchrun ranks) only reads."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 main: bool = True, kind: str | None = None) -> None:
        self.path = Path(path)
        self.main = main
        self.kind = kind  # of checkpoint this run writes: "temporal" or "end_to_end"
        self.overwrite = overwrite
        self.started = False
        self._held = contextlib.ExitStack()
        self._curves_at, self._curves_of = -math.inf, 0  # when each plot was drawn, and of which epochs
        self._confusion_of: int | None = None
        self._confusion_at = -math.inf
        self._best_metrics: tuple[int, dict[str, Any], list[str], str] | None = None
        if main:
            ensure_dir(self.path, "--out")
            self._held.enter_context(exclusive(self.path, "--out"))  # until close(): one run writes here
        try:
            self._check(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let other runs use the folder."""
        self._held.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, resume: bool, overwrite: bool) -> None:
        main = self.main
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts it over: give one of them")
        if main and not overwrite and (self.path / "sweep_state.pt").exists():
            # also a sweep interrupted before its first best.pt: rerun, it would replace this run's
            raise ConfigError(f"{self.path} holds a sweep; use --overwrite to replace it, or another --out")
        if main and not resume and not overwrite and (self.best.exists() or self.last.exists()):
            held = self._other_holder()
            if held is not None:  # another kind of run: --resume could not continue it
                raise ConfigError(f"{self.path} holds {held}; use --overwrite to replace it, or another --out")
            # --resume works where a last.pt is, or where only epoch 1's best.pt is (see below)
            resumable = self.last.exists() or not self._past_first_epoch()
            raise ConfigError(f"{self.path} already holds a run; use {'--resume to continue it, ' if resumable else ''}"
                              "--overwrite to start over, or another --out")
        self.resume = resume and self.last.exists()
        if main and resume and not self.resume and self.best.exists() and self._past_first_epoch():
            # last.pt was deleted (a kill between epoch 1's best.pt and last.pt is the one way to
            # lack it): never start over on top of a run that got further
            raise ConfigError(f"{self.path} holds a run (best.pt) but no last.pt to resume from; use --overwrite to "
                              "start over, or another --out")
        if resume and not self.resume:
            log.warning("%s has no last.pt (no epoch of a run there finished): starting at epoch 1", self.path)

    def _other_holder(self) -> str | None:
        """What the folder holds where it is not a run of this kind (a sweep, the other command's
        run), for a message; None if it is one (or cannot be told)."""
        if (self.path / "sweep_state.pt").exists():
            return "a sweep"
        try:
            kind = load_checkpoint(self.last if self.last.exists() else self.best).get("kind")
        except Exception:  # noqa: BLE001 - only for a message
            return None
        names = {"temporal": "train-temporal", "end_to_end": "finetune-end-to-end"}
        return f"a {names[kind]} run" if self.kind is not None and kind != self.kind and kind in names else None

    def start(self) -> None:
        """The run's first write comes next, every check has passed: starting over, the earlier
        run's files go now (not sooner: a run refused on a bad option keeps the old one whole)."""
        if self.main and self.overwrite and not self.started:
            remove_run_files(self.path)
        self.started = True

    def _past_first_epoch(self) -> bool:
        try:
            epochs = sum(1 for line in (self.path / "metrics.jsonl").read_text().splitlines() if line.strip())
        except OSError:
            epochs = 0
        return epochs > 1 or (self.path / "test.json").exists()

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def resume_hint(self) -> str:
        """What to do after an interrupt, true at the moment it is asked."""
        if self.overwrite and not self.started:
            return f"the run in {self.path} was left as it was; rerun the same command to start over"
        try:
            epoch = load_checkpoint(self.last)["epoch"] if self.last.exists() else None
        except Exception:  # noqa: BLE001 - a hint must never raise
            epoch = None
        resume = "rerun with --resume instead of --overwrite" if self.overwrite else "rerun with --resume"
        if epoch is None:
            return f"no epoch finished yet; {resume} to start again in {self.path}"
        return f"{self.last} holds epoch {epoch}; {resume if self.overwrite else 'add --resume'} to continue"

    def load_last(self, kind: str) -> dict[str, Any] | None:
        """``last.pt`` when resuming (its history also rewrites ``metrics.jsonl``), else None."""
        if not self.resume:
            return None
        ckpt = load_checkpoint(self.last, kind=kind, damaged="--resume cannot continue from it: use --overwrite to "
                               f"start over (move {self.best.name} away first to keep it), or another --out")
        missing = [k for k in ("history", "best", "optimizer_state", "scheduler_state") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{self.last} is not a last.pt that --resume can continue (no {', '.join(missing)}; "
                                  "a copy of best.pt?); use --overwrite to start over, or another --out")
        if self.main:
            self.write_metrics(ckpt["history"])
            self._mend_best(ckpt)
        log.info("resuming %s after epoch %d", self.last, ckpt["epoch"])
        return ckpt

    def _mend_best(self, last: dict[str, Any]) -> None:
        """A run killed between an epoch's last.pt and its best.pt left best.pt one improvement
        behind (or missing): written again from last.pt, which holds that epoch's model."""
        want = last["best"]["epoch"]
        try:
            have = load_checkpoint(self.best)["epoch"] if self.best.is_file() else None
        except (CheckpointError, KeyError):
            have = None
        if have == want:
            return
        if want != last["epoch"]:  # not from this order of writes (a run before 2 Dec 2026): not ours to mend
            held = "is missing or unreadable" if have is None else f"holds epoch {have}"
            log.warning("%s %s, but %s names epoch %s the best: it is written at the next better epoch; if none "
                        "comes, retrain with --overwrite to be sure of it", self.best, held, self.last, want)
            return
        log.info("writing %s again from %s: the run was stopped before it saved epoch %d", self.best.name,
                 self.last.name, want)
        resume_only = ("optimizer_state", "scheduler_state", "scaler_state", "history", "best")
        self._save_best({k: v for k, v in last.items() if k not in resume_only}, "val")

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=str))

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def record_epoch(self, common: dict[str, Any], *, epoch: int, metrics: dict[str, Any], train_loss: float,
                     train_top1: float, clips: int, seconds: float, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                     history: list[dict[str, Any]], best: dict[str, Any] | None, states: dict[str, Any],
                     val_split: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """The end of an epoch: append its record to ``history``; write ``metrics.jsonl``; save
        last.pt (with what --resume needs); on a better val top-1 (ties: lower loss) then save
        best.pt and the per-class CSV (the confusion plot at most every ``PLOT_EVERY_S``). last.pt
        goes first: killed between the two, it holds the epoch best.pt should, and --resume writes
        best.pt from it (``load_last``); the other way round, the resume's replay of the epoch
        would have to match the killed one bit for bit, which a GPU need not do.
        → (record, best, improved)."""
        record = {"epoch": epoch, "train_loss": train_loss, "train_top1": train_top1,
                  **{f"val_{k}": v for k, v in summary(metrics).items()}, "lr": optimizer.param_groups[0]["lr"],
                  "epoch_seconds": seconds, "clips_per_second": clips / max(seconds, 1e-9)}
        history.append(record)
        self.write_metrics(history)
        improved = best is None or (metrics["top1"], -metrics["loss"]) > (best["top1"], -best["loss"])
        if improved:
            best = {"epoch": epoch, **summary(metrics)}
        model = {**common, "epoch": epoch, "metrics": metrics, **states}
        save_checkpoint(self.last, {**model, "optimizer_state": optimizer.state_dict(),
                                    "scheduler_state": scheduler.state_dict(),
                                    "scaler_state": scaler.state_dict() if scaler else None,
                                    "history": history, "best": best})
        if improved:
            self._save_best(model, val_split)
        assert best is not None
        return record, best, improved

    def _save_best(self, model: dict[str, Any], val_split: str) -> None:
        """best.pt (``model``: last.pt less what only --resume needs) and the per-class CSV."""
        save_checkpoint(self.best, model)
        write_per_class(model["metrics"], model["classes"], self.path / "per_class.csv")
        self._best_metrics = (model["epoch"], model["metrics"], model["classes"], val_split)
        if time.monotonic() - self._confusion_at >= PLOT_EVERY_S:
            self._plot_best_confusion()

    def _plot_best_confusion(self) -> None:
        assert self._best_metrics is not None
        epoch, metrics, classes, val_split = self._best_metrics
        plot_confusion(np.array(metrics["confusion"]), classes, self.path / "confusion.png",
                       title=f"{val_split}, epoch {epoch}: top-1 {metrics['top1']:.3f}")
        self._confusion_of, self._confusion_at = epoch, time.monotonic()

    def plot_curves(self, history: list[dict[str, Any]]) -> None:
        """Redraw curves.png if ``PLOT_EVERY_S`` has passed since it was last drawn."""
        if time.monotonic() - self._curves_at >= PLOT_EVERY_S:
            self._plot_curves(history)

    def _plot_curves(self, history: list[dict[str, Any]]) -> None:
        plot_curves(history, self.path / "curves.png")
        self._curves_at, self._curves_of = time.monotonic(), len(history)

    def finish_plots(self, history: list[dict[str, Any]]) -> None:
        """The end of training: both plots show the whole run and the picked epoch. After a resume
        that improved on nothing, confusion.png is redrawn from best.pt (a killed run may have
        left an older one)."""
        if not self.main or not history:
            return
        if self._curves_of != len(history):
            self._plot_curves(history)
        if self._best_metrics is None and self.best.is_file():
            ckpt = load_checkpoint(self.best)
            self._best_metrics = (ckpt["epoch"], ckpt["metrics"], ckpt["classes"], "val")
        if self._best_metrics is not None and self._confusion_of != self._best_metrics[0]:
            self._plot_best_confusion()

    def report_test(self, head: torch.nn.Module, source: Any, split: str, classes: list[str], *, seq_len: int,
                    eval_clips: int) -> dict[str, Any]:
        """Evaluate the picked model (``best.pt``'s weights loaded into ``head``) on the test split,
        once; writes ``test.json``, ``confusion_test.png`` and ``per_class_test.csv``."""
        from .engine import evaluate
        from .metrics import classification_metrics

        ckpt = load_checkpoint(self.best)
        head.load_state_dict(ckpt["model_state"])
        probs, loss = evaluate(head, source, seq_len=seq_len, num_clips=eval_clips)  # float32, as evaluate
        m = classification_metrics(probs, source.labels.cpu().numpy(), loss)
        return self.write_test(m, split, ckpt["epoch"], classes, picked_on=ckpt.get("val_split"))

    def write_test(self, m: dict[str, Any], split: str, epoch: int, classes: list[str], *,
                   picked_on: str | None, seen: str = "") -> dict[str, Any]:
        """The test pass's files (``test.json``, ``confusion_test.png``, ``per_class_test.csv``) from its
        metrics ``m``, written by the main process; returns the summary. ``seen``: how the model had
        seen test videos before this run (an --init trained on some), recorded in test.json."""
        result = {"split": split, "epoch": epoch, **summary(m)}
        if self.main:
            atomic_write_text(self.path / "test.json", json.dumps({**result, "picked_on": picked_on,
                                                                   **({"seen": seen} if seen else {}),
                                                                   "per_class_acc": m["per_class_acc"]}, indent=2))
            plot_confusion(np.array(m["confusion"]), classes, self.path / "confusion_test.png",
                           title=f"{split} (picked at epoch {epoch}): top-1 {m['top1']:.3f}")
            write_per_class(m, classes, self.path / "per_class_test.csv")
        return result
