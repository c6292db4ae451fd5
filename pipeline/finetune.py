"""Stage three: fine-tune the backbone and the temporal head jointly from frames (DDP under torchrun).

Clips are sampled exactly as in stage two (over the frames a cache with the same frame selection
would hold: TSN segments or random windows for training, uniform for evaluation), decoded by
DataLoader workers, and augmented consistently across the clip (one random resized crop and one
flip per clip). Frozen backbone blocks get no gradient and keep BatchNorm in eval mode; padded
steps of short clips never go through the backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from .backbones import (DEFAULT_BACKBONE, Backbone, check_input_size, create_backbone, default_frame_spec,
                        to_channels_last)
from .cache import cached_videos, read_provenance
from .checkpoint import CheckpointError, load_checkpoint
from .config import (FINETUNE_HEAD_DEFAULTS, DatasetSpec, FinetuneConfig, FrameOverrides, FrameSelection, FrameSpec,
                     Provenance, WeightsIdentity)
from .data import (Video, carve_validation, folder_times, index_dataset, read_frames, selected_positions, some,
                   source_signature, uncarvable)
from .engine import train_steps
from .errors import ConfigError, DataError, PipelineError
from .runtime import default_worker_processes, resolve_device, training_precision
from .metrics import classification_metrics
from .heads import HeadConfig, build_head, head_option, max_clip_len, unused_fields
from .model import Model, load_model
from .preprocess import normalize_frames, resize_frames
from .sampling import sample
from .run import (RunDir, check_resume_compute, check_resume_data, check_resume_epochs, check_resume_head,
                  check_resume_options, check_resume_validation, compute_identity, data_identity, video_fingerprints,
                  with_earlier)
from .train import (TrainingError, TrainResult, best_kept_note, carve_description, check_classes, cosine_schedule,
                    resolve_splits, say_carve_unused)

log = logging.getLogger(__name__)

class EndToEnd(nn.Module):
    """uint8 clips (B, T, 3, S, S) + lengths → (B, C) logits: the backbone on every real frame, the
    head on the clip. Only the last ``trainable_blocks`` blocks of the backbone train. The others
    get ``requires_grad=False`` (autograd records nothing before the first trainable parameter, so
    they cost one plain forward and keep no activations) and stay in eval mode in training, so
    their BatchNorm statistics and dropout stay as they are. With no block trainable
    (``--freeze-cnn``) that is the whole backbone, its parameterless modules too (MobileNetV2's and
    EfficientNet's classifier dropout, left in front of the removed Linear), so the head trains on
    the features extraction computes. Modules after a trainable block train as usual (that dropout
    then regularises the fine-tuned features, as in the network's own training). ``grad_checkpoint``
    recomputes each trainable block in the backward pass."""

    def __init__(self, backbone: Backbone, head: nn.Module, spec: FrameSpec, *, trainable_blocks: int | None = None,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.spec = backbone.net, head, spec
        n = len(backbone.blocks) if trainable_blocks is None else trainable_blocks
        self._frozen = backbone.set_trainable(n)  # a plain list: not registered twice
        if n == 0:
            self._frozen = [backbone.net]
        if grad_checkpoint:
            for m in backbone.trainable_modules(n):
                _checkpointed(m)

    def train(self, mode: bool = True) -> EndToEnd:
        super().train(mode)
        for m in self._frozen:
            m.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def forward(self, clips: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips, lengths), lengths)  # (B, C)

    def features(self, clips: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) uint8 clips → (B, T, D) backbone features, zero past each length."""
        b, t = clips.shape[:2]
        valid = torch.arange(t, device=clips.device)[None] < lengths.to(clips.device)[:, None]  # (B, T)
        x = normalize_frames(clips[valid], self.spec, channels_last=True)  # (N_valid, 3, S, S)
        f = self.backbone(x)  # (N_valid, D)
        feats = f.new_zeros(b, t, f.shape[1])
        feats[valid] = f
        return feats


def _checkpointed(module: nn.Module) -> None:
    """Make ``module`` recompute its forward in the backward pass (instance-level, so its
    state-dict keys stay as they are)."""
    inner = module.forward

    def forward(*args: Any, **kw: Any) -> Any:
        if not module.training or not torch.is_grad_enabled():
            return inner(*args, **kw)
        return checkpoint(inner, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(module)), **kw)

    module.forward = forward  # type: ignore[method-assign]


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    """During gradient checkpointing's recomputation, BatchNorm must not update its running
    statistics a second time: momentum 0 keeps them (the forward already updated them)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


class ClipDataset(Dataset):
    """One clip per video per epoch; deterministic given (seed, epoch, video), whatever worker."""

    def __init__(self, videos: list[Video], spec: FrameSpec, sel: FrameSelection, seq_len: int, *,
                 train: bool, sampler: str = "segment", clip: int = 0, num_clips: int = 1, seed: int = 0,
                 augment: bool = True) -> None:
        self.videos, self.spec, self.sel, self.seq_len = videos, spec, sel, seq_len
        self.train, self.sampler, self.clip, self.num_clips = train, sampler, clip, num_clips
        self.seed, self.epoch, self.augment = seed, 0, augment

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | None:
        """A training clip whose video cannot be decoded is replaced by the next video's, so every
        batch is full and every DDP rank takes the same number of steps; evaluation returns None."""
        for attempt in range(min(len(self.videos), 10) if self.train else 1):
            item = self._clip((i + attempt) % len(self.videos))
            if item is not None:
                return item
        if self.train:
            raise DataError(f"10 videos in a row from {self.videos[i].path} on could not be decoded; check the dataset")
        return None

    def _clip(self, i: int) -> tuple[torch.Tensor, int, int] | None:
        v = self.videos[i]
        try:
            kept = selected_positions(v.path, v.kind, self.sel)
            if not kept:
                raise DataError(f"{v.path}: no frames")
            n = np.array([len(kept)])
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                pos, clip_len = sample(self.sampler, n, self.seq_len, rng)  # type: ignore[arg-type]
            else:
                rng = None
                pos, clip_len = sample("uniform", n, self.seq_len, clip=self.clip, num_clips=self.num_clips)
            frames = read_frames(v.path, v.kind, [kept[p] for p in pos[0, : clip_len[0]]])
        except Exception as e:  # noqa: BLE001 - a broken video is skipped, not fatal
            log.warning("skipped %s in %s: %s", v.rel, "training" if self.train else "evaluation", e)
            return None
        h, w = frames[0].shape[-2:]
        clip = torch.stack([f if f.shape[-2:] == (h, w) else TF.resize(f, [h, w], antialias=True) for f in frames])
        if self.train and self.augment:
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))  # type: ignore[union-attr]
            top, left, ch, cw = _crop_params(h, w, g)
            clip = TF.resized_crop(clip, top, left, ch, cw, [self.spec.size, self.spec.size], antialias=True)
            if torch.rand((), generator=g) < 0.5:
                clip = TF.horizontal_flip(clip)  # the same crop and flip for every frame of the clip
        else:
            clip = resize_frames(clip, self.spec)
        return clip.contiguous(), int(clip_len[0]), v.label  # (T, 3, S, S) uint8


def _crop_params(h: int, w: int, g: torch.Generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's parameters from our own generator (reproducible per clip)."""
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        ar = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=g).item())
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def collate_clips(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [x for x in items if x is not None]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    t = max(c.shape[0] for c, _, _ in items)
    clips = torch.zeros(len(items), t, *items[0][0].shape[1:], dtype=torch.uint8)
    for i, (c, _, _) in enumerate(items):
        clips[i, : c.shape[0]] = c
    return clips, torch.tensor([n for _, n, _ in items]), torch.tensor([y for _, _, y in items])


class _ShardSampler(torch.utils.data.Sampler):
    """Training: DistributedSampler semantics (shuffle by epoch, equal shares); ``set_epoch``."""

    def __init__(self, n: int, info: D.DistInfo, seed: int, shuffle: bool) -> None:
        self.sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=info.world, rank=info.rank,
                                                           shuffle=shuffle, seed=seed, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


# ------------------------------------------------------------------------------------ set-up


def _resolve_init(cfg: FinetuneConfig, classes: list[str]) -> tuple[Model | None, str, FrameSpec, FrameSelection]:
    """The --init model (checked against the dataset and the options) with its backbone name,
    FrameSpec and frame selection; without --init, those of the options."""
    if cfg.init is None:
        name = cfg.backbone or DEFAULT_BACKBONE
        spec = cfg.frame_spec or default_frame_spec(name, cfg.weights or "imagenet").override(cfg.frame_overrides)
        return None, name, spec, cfg.selection or FrameSelection()
    init = load_model(cfg.init)
    if init.classes != classes:
        raise ConfigError(f"--init {cfg.init} was trained on other classes ({len(init.classes)}: "
                          f"{', '.join(init.classes[:4])}...) than {cfg.dataset.root} ({len(classes)}: "
                          f"{', '.join(classes[:4])}...)")
    prov = init.provenance
    if cfg.backbone is not None and cfg.backbone != prov.backbone:
        raise ConfigError(f"--init {cfg.init} was trained on {prov.backbone} features, not {cfg.backbone}; "
                          "drop --backbone to use the checkpoint's")
    spec = prov.frame_spec
    asked = cfg.frame_spec or (spec.override(cfg.frame_overrides) if cfg.frame_overrides != FrameOverrides() else spec)
    if asked != spec:
        raise ConfigError(f"--init {cfg.init} uses FrameSpec {spec.to_dict()}, not {asked.to_dict()}; "
                          "drop --size/--resize-size/--interpolation to use the checkpoint's")
    if cfg.selection is not None and cfg.selection.kept_as() != prov.selection.kept_as():
        raise ConfigError(f"--init {cfg.init} uses frame selection {prov.selection.to_dict()}, "
                          f"not {cfg.selection.to_dict()}")
    return init, prov.backbone, spec, prov.selection if cfg.selection is None else cfg.selection


def _init_carve(cfg: FinetuneConfig, init: Model, train_videos: list[Video],
                trained: set[str] | None) -> tuple[int, set[str]]:
    """How this run's validation carve must go when it starts from ``--init``: (its seed, the
    videos the --init run held out where its carve applies here). Where the --init run carved its
    validation set from this same training split (its held-out videos are among ours): its carve
    seed, so both hold out the same videos (this run's --seed still seeds training), and a carve
    with other settings is refused, because it would hold out videos the --init head was trained
    on and pick the best epoch on them. Where it was validated on a split, it was trained on the
    whole training split: where that can be read again (``trained``, from ``_init_seen``), a carve
    here that holds out any of those videos is refused by the caller, as any validation set that
    holds some is; otherwise, a warning. An --init from another dataset leaves the carve free."""
    iv = init.ckpt.get("validation")
    ours = {v.rel for v in train_videos}
    if iv is None:  # not recorded by older checkpoints: nothing to compare
        return cfg.seed, set()
    if iv.get("kind") == "split":
        if trained is None:
            log.warning("--init %s was validated on split %r and trained on its whole training split: if that is this "
                        "dataset's %r, the videos carved from it for validation were seen by its head; name a "
                        "validation split with --val-split to be sure", cfg.init, iv.get("split"), cfg.train_split)
        return cfg.seed, set()
    held_out = set(iv.get("videos", ()))
    if not held_out & ours:  # another dataset: its carve says nothing here
        return cfg.seed, set()
    theirs = {"--train-split": iv.get("from"), "--val-fraction": iv.get("fraction"),
              "--group-pattern": iv.get("group_pattern")}
    now = {"--train-split": cfg.train_split, "--val-fraction": cfg.val_fraction, "--group-pattern": cfg.group_pattern}
    if diff := [k for k in theirs if theirs[k] != now[k]]:
        raise ConfigError(f"--init {cfg.init} was validated on videos carved from this training split with other "
                          f"settings ({'; '.join(f'{k} {theirs[k]!r}, here {now[k]!r}' for k in diff)}): this run's "
                          "carve would hold out videos its head was trained on, and pick the best epoch on them; use "
                          "the --init run's settings, or name a validation split with --val-split")
    return int(iv.get("seed", cfg.seed)), held_out


def _init_seen(init: Model) -> set[str] | None:
    """The videos the --init model was trained on, where its run's record can be read again now: a
    train-temporal run's training split from its cache (still there, with the features it trained
    on), a finetune-end-to-end run's from its dataset indexed again; less the videos it carved out
    for validation. None where that cannot be done (older records, a moved or changed file)."""
    ck = init.ckpt
    tc = ck.get("train_config") or {}
    split = tc.get("train_split")
    if not split:
        return None
    try:
        if init.kind == "temporal":
            path = tc.get("cache")
            if not path or not Path(path).is_file() or \
                    read_provenance(path).mismatch(Provenance.from_dict(ck["cache"])):
                return None  # gone, or re-extracted since with other settings: its list proves nothing
            videos = cached_videos(path, split)
        else:
            if not isinstance(tc.get("dataset"), dict) or not Path(tc["dataset"].get("root", "")).is_dir():
                return None
            videos = [v.rel for v in index_dataset(DatasetSpec.from_dict(tc["dataset"])).videos(split)]
    except (PipelineError, OSError, KeyError, ValueError, TypeError):  # not readable as it was written
        return None
    val = ck.get("validation") or {}
    held = set(val.get("videos", ())) if val.get("kind") == "carved" else set()
    return set(videos) - held


def finetune(cfg: FinetuneConfig, *, progress: bool = True,
             on_epoch: Callable[[dict[str, Any]], None] | None = None,
             on_start: Callable[[RunDir], None] | None = None) -> TrainResult:
    if cfg.freeze_cnn and cfg.trainable_blocks:  # the freeze used to win, silently
        raise ConfigError(f"--freeze-cnn trains no block of the backbone, --trainable-blocks {cfg.trainable_blocks} "
                          "asks for some: give one of the two")
    base_device = resolve_device(cfg.device)
    info = D.init(base_device)
    try:
        with contextlib.ExitStack() as held:  # the run folder, for as long as this run writes it
            return _finetune(cfg, base_device, info, progress, on_epoch, on_start, held)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # the failed run's locals, the DDP wrapper among them
        raise
    finally:
        # The DDP wrapper goes before the process group. Its Reducer holds a reference to the
        # group; as the last one, the group would be destroyed inside the Reducer's deallocation,
        # which holds the GIL while it joins gloo's threads, and a gloo thread still freeing a
        # finished broadcast waits for the GIL: a hang at exit (seen under torch 2.11 on a loaded
        # machine; pytorch#56297). On success the wrapper died with _finetune's frame.
        gc.collect()
        D.cleanup(info)


def _finetune(cfg: FinetuneConfig, base_device: torch.device, info: D.DistInfo, progress: bool,
              on_epoch: Callable[[dict[str, Any]], None] | None,
              on_start: Callable[[RunDir], None] | None, held: contextlib.ExitStack) -> TrainResult:
    t_start = time.perf_counter()
    device = D.local_device(base_device, info)
    amp = training_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    run = held.enter_context(RunDir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, main=True,
                                    kind="end_to_end")) if info.is_main else None
    D.barrier(info)
    if run is None:
        run = RunDir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, main=False)
    out = run.path
    if on_start is not None:
        on_start(run)

    index = index_dataset(cfg.dataset)
    val_split, test_split = resolve_splits(
        index.splits, cfg.train_split, cfg.val_split, cfg.test_split or None,
        lambda s: DataError(f"split {s!r} not found under {cfg.dataset.root} (found: {', '.join(index.splits)}); "
                            "check --train-split/--val-split/--test-split"))
    if val_split == "test":
        log.warning("picking the best epoch on the test split and reporting its score overstates accuracy")
    check_classes(index.classes, cfg.train_split,
                  {s: [v.label for v in index.videos(s)] for s in (cfg.train_split, val_split, test_split) if s},
                  f"{cfg.dataset.root}", DataError)
    train_videos = index.videos(cfg.train_split)
    init, backbone_name, spec, sel = _resolve_init(cfg, index.classes)
    if sel.fps is not None and sel.folder_fps is None:  # frame folders have no timestamps to sample by
        used = [s for s in (cfg.train_split, val_split, test_split) if s]
        if folder := next((v.path for s in used for v in index.videos(s) if v.kind == "frames"), None):
            if cfg.selection is None:  # --init's
                raise ConfigError(f"--init {cfg.init} samples frames at --fps {sel.fps:g}, and {folder} is a frame "
                                  "folder, whose frame rate it does not record (its cache was extracted from video "
                                  "files); start from a train-temporal run on a cache of these folders "
                                  f"(extract-features --fps {sel.fps:g} --folder-fps RATE)")
            folder_times(folder, 0, sel)  # refused, as extract-features and predict refuse it
    init_seen = _init_seen(init) if init is not None else None  # what --init was trained on, where known
    if val_split is None:  # carved from train by whole source videos, as stage two does
        seed, theirs = _init_carve(cfg, init, train_videos, init_seen) if init is not None else (cfg.seed, set())
        if theirs:  # the very videos the --init run held out: carving again from this index (which also
            # holds videos its cache skipped as undecodable, or added since) would draw other ones
            mask = np.array([v.rel in theirs for v in train_videos])
            if gone := theirs - {v.rel for v in train_videos}:
                log.warning("%d of the --init run's %d validation videos are not in this dataset (%s): validating on "
                            "the other %d", len(gone), len(theirs), some(sorted(gone)), len(theirs) - len(gone))
        else:
            mask = carve_validation([v.rel for v in train_videos], [v.label for v in train_videos], cfg.val_fraction,
                                    seed=seed, pattern=cfg.group_pattern)
        if not mask.any():
            raise DataError(uncarvable(f"{cfg.train_split!r} of {cfg.dataset.root} ({len(mask)} videos)"))
        val_videos = [v for v, m in zip(train_videos, mask) if m]
        train_videos = [v for v, m in zip(train_videos, mask) if not m]
        validation = {"kind": "carved", "from": cfg.train_split, "fraction": cfg.val_fraction, "seed": seed,
                      "group_pattern": cfg.group_pattern, "videos": [v.rel for v in val_videos]}
        val_name = carve_description(len(val_videos), cfg.train_split, cfg.val_fraction,
                                     [v.label for v in train_videos + val_videos])
    else:
        say_carve_unused(val_split, cfg.val_fraction, cfg.group_pattern)
        val_videos = index.videos(val_split)
        validation = {"kind": "split", "split": val_split}
        val_name = f"split {val_split!r}"
    # What --init must not have been trained on: the videos the epoch is picked on (a split named,
    # or a carve), and the test videos, whose numbers are reported as held out.
    init_seen = init_seen or set()
    if seen := [v.rel for v in val_videos if v.rel in init_seen]:
        tc = init.ckpt["train_config"]  # init_seen is empty without --init
        if val_split is None and (init.ckpt.get("validation") or {}).get("kind") == "split":
            of = tc.get("cache") or (tc.get("dataset") or {}).get("root")
            raise ConfigError(
                f"--init {cfg.init} was trained on the whole of split {tc['train_split']!r} of {of}, and "
                f"{len(seen)} of the {len(val_videos)} videos carved here for validation are among them ({some(seen)}): "
                "the best epoch would be picked on videos its head has seen; name a validation split with --val-split, "
                "or start from a run that carved its validation set from this split (--val-fraction)")
        raise ConfigError(f"--init {cfg.init} was trained on {len(seen)} of the {len(val_videos)} validation videos "
                          f"({val_name}: {some(seen)}): the best epoch would be picked on videos it has seen; "
                          "validate on videos it was not trained on (--val-split, or a carve with --val-fraction)")
    test_videos = index.videos(test_split) if test_split is not None else []
    test_seen = ""
    if seen := [v.rel for v in test_videos if v.rel in init_seen]:
        test_seen = f"--init {cfg.init} was trained on {len(seen)} of its {len(test_videos)} videos ({some(seen)})"
        if info.is_main:
            log.warning("test split %r: %s, so its numbers will overstate accuracy on new videos; start from a run "
                        "trained on videos this split does not hold (with HMDB51/UCF101 split files, the same "
                        "--split-id)", test_split, test_seen)
    # What each video's files are (a frame folder's frame names and sizes: a stat per frame), for the
    # resume check: read once, by the first process, in threads (a network share answers in parallel).
    sources = None
    if info.is_main:
        with ThreadPoolExecutor(8, thread_name_prefix="stat") as pool:
            sources = tuple(list(pool.map(lambda v: source_signature(v.path, v.kind), vs))
                            for vs in (train_videos, val_videos))
    data = data_identity([v.rel for v in train_videos], [v.rel for v in val_videos],
                         sources=D.broadcast_object(sources, info))
    cfg = dataclasses.replace(cfg, seq_len=cfg.seq_len or (init.seq_len if init else 8),
                              eval_clips=cfg.eval_clips or (init.eval_clips if init else 1))
    if init is not None:
        backbone = init.backbone(cfg.weights)
    else:
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(backbone_name, cfg.weights or "imagenet", input_size=spec.size)
        check_input_size(backbone, spec.size)
    n_blocks = len(backbone.blocks)
    trainable = 0 if cfg.freeze_cnn else (n_blocks if cfg.trainable_blocks is None else cfg.trainable_blocks)
    if not 0 <= trainable <= n_blocks:
        raise ConfigError(f"--trainable-blocks must be between 0 and {n_blocks} for {backbone.name}, got {trainable}")
    if backbone.weights.source == "random" and trainable < n_blocks and backbone.has_batchnorm:
        raise ConfigError("--weights none with frozen blocks: their BatchNorm statistics are untrained; start from "
                          "--init (a stage-two run, whose backbone is recalibrated) or --weights imagenet/PATH")
    if init is not None:  # the head and its weights come from --init: an option asking for another is refused
        head_cfg = init.head_config
        theirs = {k: getattr(head_cfg, "arch" if k == "head" else k) for k in FINETUNE_HEAD_DEFAULTS}
        unread = set(unused_fields(head_cfg.arch))  # e.g. --num-heads for an LSTM: no conflict, nothing asked
        if asked := [k for k in theirs
                     if k not in unread and getattr(cfg, k) is not None and getattr(cfg, k) != theirs[k]]:
            said = ", ".join(head_option(k, getattr(cfg, k)) for k in asked)
            raise ConfigError(f"{said}: the head comes from --init {cfg.init}, with its weights, and is "
                              f"{', '.join(head_option(k, theirs[k]) for k in asked)}; drop "
                              f"{head_option(asked[0], getattr(cfg, asked[0]), with_value=False)}"
                              f"{' etc.' if len(asked) > 1 else ''}, or start without --init")
        if cfg.head is None and info.is_main and (
                ignored := [head_option(k, getattr(cfg, k), with_value=False) for k in FINETUNE_HEAD_DEFAULTS
                            if k in unread and getattr(cfg, k) is not None]):  # with --head given, the CLI says it
            log.warning("%s: the %s head of --init does not use %s", ", ".join(ignored), head_cfg.arch,
                        "them" if len(ignored) > 1 else "it")
        cfg = dataclasses.replace(cfg, **theirs)  # recorded as what runs
        head = init.head
    else:
        cfg = dataclasses.replace(cfg, **{k: v if getattr(cfg, k) is None else getattr(cfg, k)
                                          for k, v in FINETUNE_HEAD_DEFAULTS.items()})
        head_cfg = HeadConfig(num_classes=len(index.classes), input_dim=backbone.num_features, arch=cfg.head,
                              hidden=cfg.hidden, layers=cfg.layers, bidirectional=cfg.bidirectional,
                              dropout=cfg.dropout, pool=cfg.pool, num_heads=cfg.num_heads,
                              max_len=max(cfg.seq_len, 1))
        head = build_head(head_cfg)
    if (longest := max_clip_len(head)) is not None and cfg.seq_len > longest:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the {head_cfg.arch} head of --init {cfg.init} "
                          f"takes ({longest} learned positions): use --seq-len {longest} or less")
    model = EndToEnd(backbone, head, spec, trainable_blocks=trainable, grad_checkpoint=cfg.grad_checkpoint)
    model = to_channels_last(model.to(device))

    head_params = list(model.head.parameters())
    bb_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.lr}]
    if bb_params:
        groups.append({"params": bb_params, "lr": cfg.backbone_lr or cfg.lr / 10})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    workers = default_worker_processes() if cfg.workers is None else cfg.workers
    train_ds = ClipDataset(train_videos, spec, sel, cfg.seq_len, train=True, sampler=cfg.sampler, seed=cfg.seed,
                           augment=cfg.augment)
    train_sampler = _ShardSampler(len(train_ds), info, cfg.seed, shuffle=True)
    loader_kw = {"num_workers": workers, "collate_fn": collate_clips, "pin_memory": device.type == "cuda",
                 "persistent_workers": False}
    scheduler = cosine_schedule(optimizer, cfg.epochs, math.ceil(len(train_sampler) / cfg.batch_size),
                                cfg.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    provenance = Provenance(backbone=backbone.name, weights=WeightsIdentity(source="end_to_end"), frame_spec=spec,
                            selection=sel, feature_dim=backbone.num_features, classes=tuple(index.classes),
                            precision="float32", dtype="float32")
    init_weights = backbone.weights
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start = 1
    ck = run.load_last("end_to_end")
    if ck is not None:
        diff = Provenance.from_dict(ck["cache"]).mismatch(provenance)
        if diff:
            raise CheckpointError(f"{out / 'last.pt'} was trained with other settings ({diff}); resume with those, or "
                                  "--overwrite to start over")
        check_resume_head(out / "last.pt", ck["model_config"], head_cfg.to_dict())
        now = {**cfg.to_dict(), "trainable_blocks": trainable}  # one an older last.pt lacks: not compared
        check_resume_options(out / "last.pt", {**now, **ck["train_config"]}, now,
                             ("trainable_blocks", "seq_len", "sampler", "batch_size", "lr", "backbone_lr",
                              "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad", "seed", "augment",
                              "eval_clips"))
        old = ck.get("validation", validation)
        if (old != validation and init is not None and old.get("kind") == "carved"
                and old.get("seed") == cfg.seed != validation.get("seed")):
            raise CheckpointError(f"{out / 'last.pt'} carved its validation set with its own --seed {cfg.seed}, as runs "
                                  "from --init did before 1 Dec 2026; they now carve as the --init run did (seed "
                                  f"{validation.get('seed')}), so this run cannot be resumed: start it over with "
                                  "--overwrite")
        check_resume_validation(out / "last.pt", old, validation)
        check_resume_data(out / "last.pt", ck.get("data"), data)
        check_resume_epochs(out / "last.pt", ck["epoch"], cfg.epochs, ck["train_config"].get("epochs"))
        check_resume_compute(out / "last.pt", ck.get("compute"), compute_identity(device, amp), ck["epoch"])
        world = ck["train_config"].get("world_size", info.world)  # not recorded before: not compared
        if world != info.world:
            raise CheckpointError(f"{out / 'last.pt'} was trained by {world} process(es), this run has {info.world}: "
                                  "--batch-size is per process, so the batch would change; resume with "
                                  f"{world} process(es) (torchrun --nproc-per-node)")
        if scaler is not None and ck.get("scaler_state"):
            scaler.load_state_dict(ck["scaler_state"])
        model.backbone.load_state_dict(ck["backbone_state"])
        model.head.load_state_dict(ck["model_state"])
        optimizer.load_state_dict(ck["optimizer_state"])
        scheduler.load_state_dict(ck["scheduler_state"])
        history, best, start = list(ck["history"]), ck["best"], ck["epoch"] + 1

    common = {"kind": "end_to_end", "model_config": head_cfg.to_dict(),
              "train_config": {**cfg.to_dict(), "frame_spec": spec.to_dict(), "selection": sel.to_dict(),
                               "trainable_blocks": trainable, "world_size": info.world},
              "frame_spec": spec.to_dict(), "classes": index.classes, "cache": provenance.to_dict(),
              "init_weights": init_weights.to_dict(), "val_split": val_name, "validation": validation, "data": data,
              "seen_videos": with_earlier(video_fingerprints([v.rel for v in train_videos], [v.rel for v in val_videos]),
                                          init.ckpt.get("seen_videos") if init else None, init_seen),
              "compute": compute_identity(device, amp)}
    if test_seen:  # so that evaluate says it too, on these videos
        rels = [v.rel for v in test_videos]
        common["init_seen"] = {"videos": data_identity(rels, rels)["train"], "note": test_seen}
    run.start()
    run.write_json("config.json", common["train_config"])

    for epoch in range(start, cfg.epochs + 1):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        train_ds.epoch = epoch
        train_sampler.set_epoch(epoch)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, **loader_kw)
        t0 = time.perf_counter()

        def batches():
            for clips, lengths, y in loader:
                if len(y):
                    yield (clips.to(device, non_blocking=True), lengths), y.to(device)

        try:
            r = train_steps(ddp, batches(), optimizer, scheduler, label_smoothing=cfg.label_smoothing,
                            clip_grad=cfg.clip_grad, amp_dtype=amp, scaler=scaler, device=device, total=len(loader),
                            desc=f"epoch {epoch}/{cfg.epochs}", progress=progress and info.is_main)
        except FloatingPointError as e:
            raise TrainingError(f"epoch {epoch}: {e}; likely cause: learning rate too high (--lr {cfg.lr}, "
                                f"--backbone-lr {cfg.backbone_lr}); {best_kept_note(out)}") from None
        loss_sum, correct, count = D.all_reduce_sum([r["loss_sum"], r["correct"], r["count"]], info)
        train_s = time.perf_counter() - t0
        D.broadcast_buffers(model, info)  # every rank evaluates (and rank 0 saves) the same BatchNorm statistics
        probs, labels = _evaluate(model, val_videos, spec, sel, cfg, device, info, loader_kw)
        if info.is_main:
            m = classification_metrics(probs, labels, _nll(probs, labels))
            states = {"backbone_state": model.backbone.state_dict(), "model_state": model.head.state_dict()}
            record, best, improved = run.record_epoch(
                common, epoch=epoch, metrics=m, train_loss=loss_sum / max(count, 1),
                train_top1=correct / max(count, 1), clips=int(count), seconds=train_s, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, history=history, best=best, states=states, val_split="val")
            run.plot_curves(history)
            if on_epoch is not None:
                on_epoch({**record, "best": improved})
        D.barrier(info)
    history, best = D.broadcast_object((history, best), info)
    run.finish_plots(history)  # rank 0's RunDir draws; the others' read only
    test = None
    if test_split is not None:  # once, with the picked model (every rank loads best.pt, as rank 0 wrote it)
        ck = load_checkpoint(run.best)
        model.backbone.load_state_dict(ck["backbone_state"])
        model.head.load_state_dict(ck["model_state"])
        probs, labels = _evaluate(model, test_videos, spec, sel, cfg, device, info, loader_kw)
        if info.is_main:
            m = classification_metrics(probs, labels, _nll(probs, labels))
            test = run.write_test(m, test_split, ck["epoch"], index.classes, picked_on=val_name, seen=test_seen)
            if test_seen:
                log.warning("test split %r: %s; these numbers overstate accuracy on new videos", test_split, test_seen)
    assert best is not None
    return TrainResult(out=out, best_epoch=best["epoch"], best=best, history=history, classes=index.classes,
                       val_split=val_name, seconds=time.perf_counter() - t_start, load_seconds=0.0, load_mb=0.0,
                       stopped_early=False, test=test, test_split=test_split)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-likelihood of averaged clip probabilities."""
    return float(torch.nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                              torch.from_numpy(labels)))


@torch.no_grad()
def _evaluate(model: EndToEnd, videos: list[Video], spec: FrameSpec, sel: FrameSelection, cfg: FinetuneConfig,
              device: torch.device, info: D.DistInfo,
              loader_kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Uniform clips, softmax averaged over the ``eval_clips`` of each video that decode (a clip
    over a broken frame is left out, not counted as zeros); each rank takes every world-th video
    and rank 0 gathers them all (no padding duplicates, unlike DistributedSampler).

    In float32 whatever ``--precision`` trains in, as stage two validates: the checkpoint records
    float32 and predict, evaluate and ``extract-features --weights`` run it so, and the model is
    picked, and its test.json reported, on the numbers they give (under bf16 autocast a video near
    the boundary could flip)."""
    model.eval()
    mine = list(range(info.rank, len(videos), info.world))
    probs: dict[int, np.ndarray] = {}
    clips_of: dict[int, int] = {}
    labels = {i: videos[i].label for i in mine}
    for k in range(cfg.eval_clips):
        ds = ClipDataset([videos[i] for i in mine], spec, sel, cfg.seq_len, train=False, clip=k,
                         num_clips=cfg.eval_clips)
        loader = DataLoader(_Indexed(ds), batch_size=cfg.batch_size, **{**loader_kw, "collate_fn": _collate_indexed})
        for (clips, lengths, _), idx in loader:
            if not idx:
                continue
            feats = model.features(clips.to(device), lengths)
            p = torch.softmax(model.head(feats, lengths).float(), 1).cpu().numpy()
            for j, row in zip(idx, p):
                probs[mine[j]] = probs.get(mine[j], 0) + row
                clips_of[mine[j]] = clips_of.get(mine[j], 0) + 1
    parts = D.all_gather_objects(({i: probs[i] / clips_of[i] for i in probs}, {i: labels[i] for i in probs}), info)
    allp = {i: p for part, _ in parts for i, p in part.items()}
    alll = {i: y for _, part in parts for i, y in part.items()}
    order = sorted(allp)
    if not order:
        raise DataError("no validation video could be decoded")
    return np.stack([allp[i] for i in order]), np.array([alll[i] for i in order])


def _collate_indexed(items: list) -> tuple:
    kept = [(j, x) for j, x in items if x is not None]
    return collate_clips([x for _, x in kept]), [j for j, _ in kept]


class _Indexed(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return i, self.ds[i]
