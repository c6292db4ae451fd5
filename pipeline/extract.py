"""Stage one: backbone features of every kept frame of every video, cached in HDF5.

Throughput design: frames are decoded and resized (uint8) by DataLoader workers while a GPU
computes, or, for a CPU model, by threads between batches (see ``InlineFrameLoader``); frames of
several videos are packed into fixed-size batches (the last one padded), so the device always sees
the same batch shape. On CPU that also makes features bit-identical however videos fall into
batches, which is what lets a resumed run equal an uninterrupted one: at the default batch of 64
a frame's features do not depend on its place in the batch (tested per backbone family). At
small ``--batch-size`` (3-8) some kernels do (EfficientNet's and RegNet's squeeze-excitation, at
1e-7 relative), and a resumed run then equals an uninterrupted one to float rounding. Videos
stream through in chunks, so a long video never has to fit in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import inspect
import io
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from . import distributed as D
from .backbones import (Backbone, FrozenBackbone, check_input_size, create_backbone, default_frame_spec,
                        recalibrate_batchnorm)
from .cache import (INDEX_FAILURES, CacheWriter, FeatureCache, VideoRecord, is_hdf5, read_partial, read_provenance,
                    remove_leftovers)
from .config import DatasetSpec, ExtractConfig, FrameSelection, FrameSpec, Provenance, WeightsIdentity
from .data import (DatasetIndex, Video, VideoDecodeError, index_dataset, iter_frame_batches, natural_key, source_fps,
                   read_as_recorded, recorded_before_upright, source_signature)
from .runtime import autocast_ctx, default_workers, resolve_device, resolve_precision, threads_per_thread
from .errors import ConfigError, DataError, PipelineError, WeightsError
from .files import atomic_write_bytes, ensure_dir, exclusive, not_regular, sha256_file
from .preprocess import normalize_frames, resize_frames, stack_frames

log = logging.getLogger(__name__)

BACKBONE_FILE_SCHEMA = 2  # 2: records the backbone name
GENERATED = ("recalibrated", "random_init")  # weights sources of backbone files saved by --weights none
# Frames per BatchNorm calibration batch. Fixed, not --batch-size: the averaged running variance is
# the mean of per-batch variances, so it (and with it every feature) would change with the batch size.
CALIBRATION_BATCH = 64


# ----------------------------------------------------------------------------- decode workers


class Chunk(NamedTuple):
    """Up to ``chunk_frames`` decoded, resized frames of one video, or an error report."""

    pos: int  # position of the video in the job list
    frames: torch.Tensor  # (k, 3, S, S) uint8, channels_last memory when k > 0
    indices: torch.Tensor  # (k,) int64 source frame numbers
    fps: float  # source frame rate (NaN if unknown)
    last: bool  # no more chunks for this video
    error: str | None  # a frame (fatal=False) or the whole video (fatal=True) failed
    fatal: bool
    skipped: str = "frame"  # with fatal=False: "frame", or "frames" for the end of a truncated video


class VideoFrameStream(IterableDataset):
    """Decode the videos of ``jobs`` into chunks; each DataLoader worker takes every n-th video."""

    def __init__(self, jobs: Sequence[tuple[int, Path, str]], spec: FrameSpec, sel: FrameSelection,
                 chunk_frames: int) -> None:
        self.jobs, self.spec, self.sel, self.chunk_frames = list(jobs), spec, sel, chunk_frames

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for pos, path, kind in jobs:
            yield from self.video(pos, path, kind)

    def video(self, pos: int, path: Path, kind: str) -> Iterator[Chunk]:
        s = self.spec.size
        empty = (torch.empty(0, 3, s, s, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
        parts: list[torch.Tensor] = []  # resized frames not yet in a chunk (views)
        indices: list[int] = []
        try:
            fps = source_fps(path, kind, self.sel)
            fps = float("nan") if fps is None else fps
            for b in iter_frame_batches(path, kind, self.sel, self.chunk_frames):
                if b.frames is None:
                    yield Chunk(pos, *empty, fps, False, b.error, False, b.skipped)
                    continue
                frames, at = resize_frames(b.frames, self.spec), 0
                while at < len(b.indices):  # a batch may straddle two chunks
                    take = min(self.chunk_frames - len(indices), len(b.indices) - at)
                    parts.append(frames[at:at + take])
                    indices += b.indices[at:at + take]
                    at += take
                    if len(indices) == self.chunk_frames:
                        yield Chunk(pos, stack_frames(parts), torch.tensor(indices), fps, False, None, False)
                        parts, indices = [], []
            last = (stack_frames(parts), torch.tensor(indices)) if parts else empty
        except VideoDecodeError as e:
            yield Chunk(pos, *empty, float("nan"), True, str(e), True)
            return
        except PipelineError:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder can fail in many ways; bound it to this video
            yield Chunk(pos, *empty, float("nan"), True, f"{path}: {type(e).__name__}: {e}", True)
            return
        yield Chunk(pos, *last, fps, True, None, False)


class InlineFrameLoader:
    """Decodes in ``threads`` threads of this process while the caller waits, a round at a time.

    This is the CPU path. The forward pass already keeps every core busy, so decoding *during* it
    (DataLoader workers) only time-slices the same cores, and every preempted OpenMP thread stalls
    its whole team at the next barrier. Measured on a 2-core machine, that overlap cost about twice
    the decoding work itself; decoding between batches on every core costs the work divided by the
    cores. Each round decodes at least ``round_frames`` frames: every thread works through its own
    video and takes the next one from a shared list when it is done. Chunks of one video keep their
    order. The decoders (libjpeg, FFmpeg, the uint8 resize) release the GIL. ``threads=0`` decodes
    in the calling thread.
    """

    def __init__(self, stream: VideoFrameStream, threads: int, round_frames: int) -> None:
        self.stream, self.threads, self.round_frames = stream, threads, round_frames

    def __iter__(self) -> Iterator[Chunk]:
        jobs = iter(self.stream.jobs)
        if self.threads == 0:
            for job in jobs:
                yield from self.stream.video(*job)
            return
        lock, stop = threading.Lock(), threading.Event()
        current: list[Iterator[Chunk] | None] = [None] * self.threads  # each thread's video

        def decode(slot: int, out: list[Chunk], made: list[int]) -> None:
            while not stop.is_set():
                with lock:
                    if made[0] >= self.round_frames:
                        return
                    if current[slot] is None:
                        job = next(jobs, None)
                        if job is None:
                            return
                        current[slot] = self.stream.video(*job)
                chunk = next(current[slot], None)
                if chunk is None:
                    current[slot] = None
                    continue
                with lock:
                    out.append(chunk)
                    made[0] += chunk.frames.shape[0]

        # One intra-op thread per decoder: the threads already use every core, and an OpenMP team
        # per decoder would only spin-wait between frames on the cores the other decoders need.
        # (``runtime.threads_per_thread``: with OpenMP only, and the caller's count is restored.)
        model_threads = torch.get_num_threads()
        own_pool = threads_per_thread()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode",
                                  initializer=torch.set_num_threads if own_pool else None,
                                  initargs=(1,) if own_pool else ())
        try:
            while True:
                out: list[Chunk] = []
                made = [0]
                for f in [pool.submit(decode, i, out, made) for i in range(self.threads)]:
                    f.result()  # re-raises a decoder's PipelineError here
                if not out:
                    return
                yield from out
        finally:  # also on an error, Ctrl-C or a consumer that stops early: decoders stop at their next chunk
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if own_pool:
                torch.set_num_threads(model_threads)


def frame_loader(jobs: Sequence[tuple[int, Path, str]], spec: FrameSpec, sel: FrameSelection, *,
                 chunk_frames: int, workers: int, device: torch.device, batch_size: int,
                 inline: bool | None = None) -> Iterable[Chunk]:
    """Decoded, resized frames of ``jobs`` as chunks: decoded between batches by threads for a CPU
    model (``InlineFrameLoader``), by DataLoader worker processes alongside the GPU for CUDA.
    ``inline`` overrides that choice."""
    if inline is None:
        inline = device.type == "cpu"
    if inline:
        # Rounds of up to eight batches (fewer where that passes 128 MiB of frames, never less
        # than one batch): after each forward pass libgomp's threads spin-wait for about 10 ms
        # (measured) before they sleep, on the cores the decoders need, so fewer rounds pay that
        # less often (decode wait per 2,048 frames, 1 → 2 → 4 batches a round: 0.95 → 0.82 →
        # 0.77 s; 4 → 8 batches, MobileNetV3-Large, 4 runs each: 0.307 → 0.286 ms a frame).
        # Chunks of at most 8 frames, so the threads of a round finish close together.
        small = max(1, min(chunk_frames, 8))
        round_frames = max(batch_size, min(8 * batch_size, (128 << 20) // (3 * spec.size ** 2)))
        return InlineFrameLoader(VideoFrameStream(jobs, spec, sel, small), workers, round_frames)
    kw: dict[str, Any] = {}
    if workers > 1 and "in_order" in inspect.signature(DataLoader).parameters:
        kw["in_order"] = False  # chunks carry their video's position: a slow video must not stall others
    return DataLoader(
        VideoFrameStream(jobs, spec, sel, chunk_frames), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, **kw,
    )


# ------------------------------------------------------------------------- batched feature runner


@dataclass
class _Video:
    rows: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    queued: int = 0
    fps: float = float("nan")
    last: bool = False
    error: str | None = None
    frame_errors: list[tuple[str, str]] = field(default_factory=list)  # (what was skipped, why)


class FeatureRunner:
    """Packs frames of many videos into fixed-size batches and routes features back per video."""

    def __init__(self, model: FrozenBackbone | Future, device: torch.device, amp_dtype: torch.dtype | None,
                 batch_size: int) -> None:
        """``model`` may be a Future: it is waited for at the first full batch, so the frames of the
        first round decode while it is built."""
        self._model, self.device, self.amp_dtype, self.batch_size = model, device, amp_dtype, batch_size
        self.queue: deque[tuple[int, torch.Tensor]] = deque()
        self.queued = 0
        self.videos: dict[int, _Video] = {}
        self.frames_done = 0

    @property
    def model(self) -> FrozenBackbone:
        if isinstance(self._model, Future):
            self._model = self._model.result()
        return self._model

    def feed(self, chunk: Chunk) -> list[int]:
        """Take one chunk; run every full batch; return positions of videos now complete."""
        v = self.videos.setdefault(chunk.pos, _Video())
        v.fps = chunk.fps
        if chunk.error is not None:
            if chunk.fatal:
                v.error = chunk.error
            else:
                v.frame_errors.append((chunk.skipped, chunk.error))
        if chunk.frames.shape[0]:
            v.indices.append(chunk.indices)
            v.queued += chunk.frames.shape[0]
            self.queue.append((chunk.pos, chunk.frames.to(self.device, non_blocking=True)))
            self.queued += chunk.frames.shape[0]
        v.last = v.last or chunk.last
        done = set()
        while self.queued >= self.batch_size:
            done |= self._run_batch()
        if v.last and v.queued == 0:
            done.add(chunk.pos)
        return sorted(done)

    def flush(self) -> list[int]:
        done: set[int] = set()
        while self.queued:
            done |= self._run_batch()
        return sorted(done | {p for p, v in self.videos.items() if v.last and v.queued == 0})

    @torch.inference_mode()
    def _run_batch(self) -> set[int]:
        parts, owners, n = [], [], 0
        while self.queue and n < self.batch_size:
            pos, frames = self.queue.popleft()
            take = min(frames.shape[0], self.batch_size - n)
            if take < frames.shape[0]:
                self.queue.appendleft((pos, frames[take:]))
                frames = frames[:take]
            parts.append(frames)
            owners.append((pos, take))
            n += take
        self.queued -= n
        if n < self.batch_size:  # pad: a fixed batch shape keeps results independent of packing
            pad = torch.zeros_like(parts[0][:1]).expand(self.batch_size - n, -1, -1, -1)
            parts.append(pad.to(memory_format=torch.channels_last))
        with autocast_ctx(self.device, self.amp_dtype):
            out = self.model(torch.cat(parts)).float()  # (B, 3, S, S) uint8 → (B, D)
        done, start = set(), 0
        for pos, take in owners:
            v = self.videos[pos]
            v.rows.append(out[start:start + take])
            v.queued -= take
            start += take
            if v.last and v.queued == 0:
                done.add(pos)
        self.frames_done += n
        return done

    def pop(self, pos: int) -> _Video:
        return self.videos.pop(pos)


class HostCopies:
    """Finished videos' features, copied to the host without waiting for the device.

    On CUDA ``cat(rows).to("cpu")`` blocks until the GPU has run every batch queued so far, so
    the host, which decodes and packs the next batches, would sit idle for a forward pass at each
    finished video. Instead each copy goes into pinned memory behind a CUDA event, and ``ready``
    hands the videos on in the order they were ``put``, as their copies complete. On CPU the
    features already are on the host and pass straight through. Holds at most ``limit`` videos:
    the oldest is waited for past that.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.pending: deque[tuple[Any, torch.Tensor, Any]] = deque()

    def put(self, item: Any, rows: list[torch.Tensor]) -> None:
        feats = torch.cat(rows)
        event = None
        if feats.device.type == "cuda":
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(feats.device))  # the copy runs on its source's stream
            feats = host
        else:
            feats = feats.cpu()
        self.pending.append((item, feats, event))

    def ready(self, *, wait: bool = False) -> Iterator[tuple[Any, torch.Tensor]]:
        """(item, (T, D) host features) of every video whose copy is done, oldest first; ``wait``:
        of every video, waiting for the device."""
        while self.pending:
            item, feats, event = self.pending[0]
            if event is not None and not event.query():
                if not wait and len(self.pending) <= self.limit:
                    return
                event.synchronize()
            self.pending.popleft()
            yield item, feats


# ------------------------------------------------------------------------------------ the stage


@dataclass
class ExtractResult:
    output: Path
    videos: dict[str, int]  # per split, in the finished cache
    extracted: int  # videos extracted by this run
    reused: int  # videos already in the cache or in finished parts
    frames: int  # frames run through the backbone by this run
    seconds: float
    failures: list[dict[str, Any]]
    weights: WeightsIdentity
    weights_file: Path | None
    warnings: list[str]
    backbone: str = ""
    feature_dim: int = 0
    frame_spec: FrameSpec | None = None
    unchanged: bool = False  # everything was cached already: the file was left as it was


def _save_backbone(bb: Backbone, output: Path, meta: dict[str, Any]) -> tuple[Path, str]:
    """Save a recalibrated backbone next to the cache, named by its content hash, so replacing a
    cache never overwrites the backbone that checkpoints trained on the old one still need.
    → (path, the file's sha256)."""
    buf = io.BytesIO()
    torch.save({"schema_version": BACKBONE_FILE_SCHEMA, "kind": "backbone", "backbone": bb.name,
                "backbone_state": bb.net.state_dict(), "meta": meta}, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = output.with_name(f"{output.stem}.backbone-{digest[:12]}.pt")
    atomic_write_bytes(path, data, hint="nothing was extracted yet")
    return path, digest


def _recorded_backbone(output: Path, overwrite: bool, backbone: str, spec: FrameSpec) -> WeightsIdentity | None:
    """The backbone file that ``--weights none`` saved for an unfinished run or (unless replacing)
    the existing cache of this backbone at this FrameSpec (calibrated on such frames), if it is
    still there unchanged; a ConfigError if it is missing or changed and the run would extend them."""
    provs = []
    partial = read_partial(output)
    if partial is not None:
        provs.append((partial["provenance"], f"unfinished run {output}.partial"))
    if output.is_file() and not overwrite:
        provs.append((read_provenance(output), f"cache {output}"))
    for prov, where in provs:
        ident = prov.weights
        if not (prov.backbone == backbone and prov.frame_spec == spec and ident.source in GENERATED and ident.path):
            continue
        if Path(ident.path).is_file() and sha256_file(ident.path) == ident.sha256:
            return ident
        if not overwrite:  # a new calibration's features cannot join these: say why now, before calibrating
            state = "changed (another sha256)" if Path(ident.path).exists() else "missing"
            raise ConfigError(f"the {where} was made with the {ident.source} backbone {ident.path} (sha256 "
                              f"{ident.sha256[:12]}), which is {state}: restore that file to extend it, or use "
                              "--overwrite to start over")
    return None


def _dataset_order(index: DatasetIndex, stored: Callable[[], dict[str, list[str]]]) -> dict[str, list[str]]:
    """Each split's videos as the cache is to hold them, in dataset order (class, then natural order
    of the path): the videos indexed now and, in their place, the ones ``stored()`` (by an earlier
    run: the cache file and finished parts) under a class folder that could not be read this time. Those
    are kept as they are, with a warning, where dropping them would lose finished work for a
    permission that may be put right; a later run checks them again."""
    order = {}
    held: dict[str, list[str]] | None = None  # read only where a folder could not be
    for split, videos in index.splits.items():
        listed = [((v.label, natural_key(v.rel)), v.rel) for v in videos]
        now = {v.rel for v in videos}
        kept = []
        for folder in (s.path for s in index.skipped if s.kind == "folder" and s.split in (split, None)):
            name = folder.rsplit("/", 1)[-1]
            if name not in index.classes:  # not a class folder (a split folder is never in index.splits)
                continue
            held = stored() if held is None else held
            under = [r for r in held.get(split, []) if r.startswith(folder + "/") and r not in now]
            if under:
                log.warning("kept the %d cached video(s) under %s, which could not be read this run, as they were",
                            len(under), folder)
                kept += [((index.classes.index(name), natural_key(r)), r) for r in under]
        order[split] = [rel for _, rel in heapq.merge(listed, sorted(kept))] if kept else [r for _, r in listed]
    return order


_HELD_OUT = re.compile(r"^(test|val|valid|validation|eval|evaluation|holdout|dev)", re.IGNORECASE)


def _calibration_split(splits: Iterable[str], *, train_only: bool = False) -> str | None:
    """The split to calibrate BatchNorm on: ``train`` in any case, else (unless ``train_only``) a
    split not named as a held-out one (test*, val*, eval*, dev*); None if there is none."""
    names = list(splits)
    train = [n for n in names if n.lower() in ("train", "training")]
    return (train or ([] if train_only else [n for n in names if not _HELD_OUT.match(n)]) or [None])[0]


def _calibrate(net: torch.nn.Module, index: DatasetIndex, cfg: ExtractConfig, spec: FrameSpec,
               device: torch.device, workers: int) -> int:
    """Recalibrate BatchNorm on up to ``cfg.calibration_frames`` frames spread over the train split.

    The frames are shuffled across videos and split into near-equal batches of at most
    ``CALIBRATION_BATCH`` (and at least 2), so every batch is a fair sample of the dataset and the
    averaged statistics are not skewed; ``--batch-size`` only sets the decoding.
    """
    split = _calibration_split(index.splits, train_only=True)
    if split is None and cfg.dataset.splits is not None:  # --splits chose others: still calibrate on train
        full = index_dataset(DatasetSpec(**{**cfg.dataset.__dict__, "splits": None}))
        if (split := _calibration_split(full.splits, train_only=True)) is not None:
            index = full
    split = split or _calibration_split(index.splits)
    if split is None:
        split = next(iter(index.splits))
        log.warning("no training split (%s): calibrating BatchNorm on split %r, so the features are fit to its "
                    "videos; extract a training split with it to calibrate on that", ", ".join(index.splits), split)
    videos = index.videos(split)
    n_videos = min(len(videos), 256)
    pick = [videos[int(i)] for i in np.linspace(0, len(videos) - 1, n_videos).round().astype(int)]
    per_video = max(1, math.ceil(cfg.calibration_frames / n_videos))
    sel = FrameSelection(max_frames=per_video, fps=cfg.selection.fps, folder_fps=cfg.selection.folder_fps)
    jobs = [(i, v.path, v.kind) for i, v in enumerate(pick)]
    loader = frame_loader(jobs, spec, sel, chunk_frames=cfg.batch_size, workers=workers,
                          device=device, batch_size=cfg.batch_size)

    # In job order: decoder threads deliver the chunks of different videos in whatever order they
    # finish, and the cut below must keep the same frames every time (a sort by position is
    # stable, so each video's chunks keep their own order).
    chunks = sorted((c for c in loader if c.frames.shape[0]), key=lambda c: c.pos)
    frames = [c.frames for c in chunks]
    pool = torch.cat(frames)[: max(2, cfg.calibration_frames)] if frames else None  # (n, 3, S, S) uint8
    if pool is None or len(pool) < 2:
        return 0  # BatchNorm statistics need at least two frames
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))]
    n_batches = -(-len(pool) // CALIBRATION_BATCH)  # near-equal batches of at most CALIBRATION_BATCH
    batches = (normalize_frames(b.to(device), spec) for b in torch.tensor_split(pool, n_batches))
    return recalibrate_batchnorm(net, batches, device=device)


def resolve_frame_spec(cfg: ExtractConfig) -> FrameSpec:
    """The config's FrameSpec, or the backbone's default (its weights' eval transform) with the
    options the user gave."""
    return cfg.frame_spec or default_frame_spec(cfg.backbone, cfg.weights).override(cfg.frame_overrides)


def _resolve_backbone(cfg: ExtractConfig, spec: FrameSpec, index: DatasetIndex, device: torch.device,
                      workers: int) -> tuple[Backbone, Path | None]:
    """The backbone with its weights. For ``--weights none`` the random init, with its BatchNorm
    recalibrated on the dataset's frames where it has any, is saved next to the cache so that
    later stages reproduce the features (or the one an earlier run of this cache saved is reused)."""
    if cfg.weights.lower() != "none":
        bb = create_backbone(cfg.backbone, cfg.weights, input_size=spec.size)
        check_input_size(bb, spec.size)
        return bb, None
    recorded = _recorded_backbone(Path(cfg.output), cfg.overwrite, cfg.backbone, spec)
    if recorded is not None and (diff := _generated_otherwise(Path(str(recorded.path)), cfg, recorded.source)):
        if not cfg.overwrite:  # (with it, only an unfinished run's is recorded: it is replaced, backbone and all)
            raise ConfigError(f"--output {cfg.output} was extracted with the {recorded.source} backbone "
                              f"{recorded.path}, made with {diff}: rerun with those to extend it, or use --overwrite "
                              "(or another --output) for a new backbone")
        recorded = None
    if recorded is not None:  # a resumed or extended run keeps the features reproducible
        log.info("reusing the backbone %s", recorded.path)
        path, source, digest = Path(str(recorded.path)), recorded.source, recorded.sha256  # hash just checked
        bb = create_backbone(cfg.backbone, str(path), input_size=spec.size)
    else:
        torch.manual_seed(cfg.seed)
        bb = create_backbone(cfg.backbone, "none", input_size=spec.size)
        check_input_size(bb, spec.size)  # before calibrating on it and saving it
        meta: dict[str, Any] = {"seed": cfg.seed, "dataset": str(index.root), "frame_spec": spec.to_dict(),
                                "calibration_frames_asked": cfg.calibration_frames}
        if bb.has_batchnorm:
            bb.net.to(device)
            log.warning(
                "--weights none: random-init %s; recalibrating its BatchNorm statistics on up to %d frames of "
                "this dataset (use --weights imagenet for pretrained features)", bb.name, cfg.calibration_frames)
            n = _calibrate(bb.net, index, cfg, spec, device, workers)
            if n == 0:
                raise DataError(f"fewer than 2 decodable frames under {index.root} to calibrate the backbone on")
            if n < cfg.calibration_frames // 2:
                log.warning("calibrated on only %d frames of the %d asked (the videos are few or short): statistics "
                            "from few frames make noisier features", n, cfg.calibration_frames)
            bb.net.cpu()
            meta["calibration_frames"] = n
            source = "recalibrated"
        else:
            log.warning("--weights none: %s is randomly initialised and has no BatchNorm to calibrate; its "
                        "features are only good for testing (use --weights imagenet)", bb.name)
            source = "random_init"
        path, digest = _save_backbone(bb, Path(cfg.output), meta)
    bb.weights = WeightsIdentity(source=source, sha256=digest, path=str(path.resolve()))
    return bb, path


def _generated_otherwise(path: Path, cfg: ExtractConfig, source: str) -> str:
    """How the --weights none backbone at ``path`` was made otherwise than this run asks ('' if it
    was not): its --seed, and --calibration-frames for a recalibrated one (recorded since this
    check). A cache is extended with the backbone it was made with, so other values would be
    silently ignored. (``path`` is the recorded file, its sha256 just checked.)"""
    meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta") or {}
    was = {"--seed": meta.get("seed")}
    now = {"--seed": cfg.seed}
    if source == "recalibrated" and "calibration_frames_asked" in meta:
        was["--calibration-frames"] = meta["calibration_frames_asked"]
        now["--calibration-frames"] = cfg.calibration_frames
    diff = [k for k in was if was[k] is not None and was[k] != now[k]]
    return (f"{' '.join(f'{k} {was[k]}' for k in diff)} (here {' '.join(f'{k} {now[k]}' for k in diff)})"
            if diff else "")


def extract_features(cfg: ExtractConfig, *, progress: bool = True) -> ExtractResult:
    """Run stage one; resumes from whatever an interrupted run with the same settings left."""
    with contextlib.ExitStack() as held:  # the output, for as long as this run writes it
        return _extract_features(cfg, progress, held)


def _extract_features(cfg: ExtractConfig, progress: bool, held: contextlib.ExitStack) -> ExtractResult:
    t0 = time.perf_counter()
    index = index_dataset(cfg.dataset)
    for w in index.warnings:
        log.warning(w)
    if cfg.selection.fps is not None and cfg.selection.folder_fps is None:
        folder = next((v for vs in index.splits.values() for v in vs if v.kind == "frames"), None)
        if folder is not None:
            raise ConfigError(
                f"--fps needs the frame rate of frame folders such as {folder.path}: add --folder-fps "
                "(the rate the frames were extracted at, e.g. 30 for HMDB51, 25 for UCF101)"
            )
    info = D.init(resolve_device(cfg.device))
    device = D.local_device(resolve_device(cfg.device), info)
    amp_dtype = resolve_precision(cfg.precision, device)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    output = Path(cfg.output)
    if output.exists() and output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name such as {output}/features.h5")
    if what := not_regular(output):  # not even --overwrite replaces it (and reading a FIFO would block)
        raise ConfigError(f"--output {output} is {what}, not a file; give a file name such as features/x.h5")
    if output.is_file() and not is_hdf5(output):  # not even --overwrite replaces a checkpoint given by mistake
        raise ConfigError(f"--output {output} exists and is not an HDF5 feature cache; choose another --output "
                          "(or delete it first if it is a damaged cache)")
    if output.resolve().is_relative_to(index.root.resolve()):
        raise ConfigError(f"--output {output} is inside the dataset folder {index.root}; write the cache elsewhere "
                          "(e.g. features/)")
    ensure_dir(output.parent, "--output folder")
    if info.is_main:  # one job per cache: the other ranks of this one write their parts under its lock
        held.enter_context(exclusive(output, "--output"))
        remove_leftovers(output)

    amp_dtype = _as_recorded(cfg, output, device, amp_dtype)
    # Under torchrun, rank 0 resolves the backbone (calibrating it if needed) and opens the work
    # folder; the other ranks then load the same weights and join. The job list is fixed between
    # two barriers, before anyone writes, so every rank sees the same one.
    spec = resolve_frame_spec(cfg)
    # Settings that clash with the existing cache or unfinished run are refused now, not after the
    # backbone is built and calibrated; its weights and feature size are checked once known.
    planned = Provenance(backbone=cfg.backbone, weights=WeightsIdentity(source="random"), frame_spec=spec,
                         selection=cfg.selection, feature_dim=0, classes=tuple(index.classes),
                         precision=str(amp_dtype or torch.float32).removeprefix("torch."), dtype=cfg.dtype)
    # The splits this run leaves as they are: those --splits leaves out, and one whose folder could
    # not be read this time (its cached videos are not dropped for that).
    unreadable = {s.split for s in index.skipped if s.kind == "folder" and s.split is not None} - set(index.splits)
    keep = set(index.unselected) | unreadable
    if info.is_main:
        CacheWriter.check(output, planned, replace=cfg.overwrite, ignore=("weights", "feature_dim"))
        if cfg.dataset.splits is not None:
            CacheWriter.check_kept(output, set(index.splits) | unreadable,
                                   {s: {v.rel for v in vs} for s, vs in index.unselected.items()},
                                   replace=cfg.overwrite)
        bb, weights_file = _resolve_backbone(cfg, spec, index, device, workers)
    shared = D.broadcast_object(str(weights_file or "") if info.is_main else None, info)
    if not info.is_main:  # the same weights as rank 0 (the seed makes a random init the same too)
        weights_file = Path(shared) if shared else None
        torch.manual_seed(cfg.seed)
        bb = create_backbone(cfg.backbone, str(weights_file) if weights_file else cfg.weights, input_size=spec.size)
    identity = bb.weights
    provenance = planned.replace(backbone=bb.name, weights=identity, feature_dim=bb.num_features)
    writer = CacheWriter(output, provenance, replace=cfg.overwrite) if info.is_main else None
    D.barrier(info)
    if writer is None:
        writer = CacheWriter(output, provenance, replace=cfg.overwrite)

    jobs: list[tuple[str, Video]] = []
    reused = 0
    sources: dict[tuple[str, str], str] = {}  # (split, rel) → what the video's files are now
    changed: list[tuple[str, str]] = []  # (split, rel)
    earlier: list[tuple[str, Video]] = []  # video files cached before frames were numbered as shown, read upright
    for split, videos in index.splits.items():
        done = writer.done(split)
        for v in videos:
            sources[split, v.rel] = now = source_signature(v.path, v.kind)
            was = done.get(v.rel)  # None: not cached; '': cached by a version that did not record it
            if was is not None and v.kind == "file" and recorded_before_upright(was, now):
                earlier.append((split, v))
                continue
            if was and now and was != now:
                changed.append((split, v.rel))  # cached from other frames, or another file, under the same name
            elif was is not None:
                reused += 1
                continue
            jobs.append((split, v))
    if changed and info.is_main:
        log.warning("%d cached video(s) changed on disk since they were extracted (frames added, removed or replaced; "
                    "another file of the same name), e.g. %s: extracting them again", len(changed), changed[0][1])
    if earlier:  # once: what is kept is stored with this version's signature
        # Rank 0 checks (and re-signs what it keeps); every rank takes its list: one job list for all.
        redo = _check_earlier(earlier, writer, cfg.selection, sources, progress) if info.is_main else None
        again = set(D.broadcast_object(None if redo is None else [(s, v.rel) for s, v in redo], info))
        redo = [(s, v) for s, v in earlier if (s, v.rel) in again]
        reused += len(earlier) - len(redo)
        jobs += redo
        if redo and info.is_main:
            log.warning("%d of %d video file(s) cached by an earlier version come out otherwise now (a phone "
                        "video's display rotation, which frames are read upright; a clip cut with `ffmpeg -c copy`, "
                        "numbered from its first shown frame; --fps on millisecond timestamps), e.g. %s: extracting "
                        "them again", len(redo), len(earlier), redo[0][1].rel)
    D.barrier(info)
    all_jobs, jobs = jobs, jobs[info.rank::info.world]  # this rank's disjoint share

    # On CPU the inference form is built (BatchNorm folded: ~0.1-0.2 s) while the first frames
    # decode in threads. Not on CUDA: DataLoader workers fork, and a fork while another thread is
    # inside torch can leave a lock held in the child.
    net = bb.net.to(device).eval()
    if device.type == "cpu":
        builder = ThreadPoolExecutor(1, thread_name_prefix="fold")
        frozen: FrozenBackbone | Future = builder.submit(FrozenBackbone, net, spec, channels_last=cfg.channels_last,
                                                        copy=False)
        builder.shutdown(wait=False)
    else:
        frozen = FrozenBackbone(net, spec, channels_last=cfg.channels_last, copy=False)
    del bb
    runner = FeatureRunner(frozen, device, amp_dtype, cfg.batch_size)
    loader = frame_loader([(i, v.path, v.kind) for i, (_, v) in enumerate(jobs)], spec,
                          cfg.selection, chunk_frames=cfg.chunk_frames, workers=workers,
                          device=device, batch_size=cfg.batch_size)
    failures: list[dict[str, Any]] = []
    extracted = 0
    checked = False
    bar = tqdm(total=len(jobs), unit="video", desc="extract" if not info.enabled else f"extract (rank 0 of {info.world})",
               disable=not progress or not info.is_main or None, dynamic_ncols=True)
    t_run = time.perf_counter()

    copies = HostCopies()

    def finish(pos: int) -> None:
        split, video = jobs[pos]
        v = runner.pop(pos)
        for skipped, err in v.frame_errors:
            _fail(failures, split, video, err, cfg.strict, skipped)
        if v.error is not None or not v.rows:
            _fail(failures, split, video, v.error or f"{video.path}: no decodable frames", cfg.strict)
            bar.update(1)
            return
        copies.put((split, video, v.indices, v.fps, len(v.frame_errors)), v.rows)

    def store(wait: bool = False) -> None:
        nonlocal extracted, checked
        for (split, video, indices, fps, broken), feats in copies.ready(wait=wait):  # feats: (T, D) on the host
            if not checked:
                _check_not_degenerate(feats, identity)
                checked = True
            with np.errstate(over="ignore"):  # past float16's range: inf, refused just below
                stored = feats.numpy().astype(cfg.dtype, copy=False)
            _check_finite(stored, video, identity, cfg.dtype)
            writer.add(split, VideoRecord(video.rel, video.label, stored, torch.cat(indices).numpy(), fps,
                                          broken_frames=broken, source=sources[split, video.rel]))
            extracted += 1
            bar.update(1)
            bar.set_postfix_str(f"{runner.frames_done / max(time.perf_counter() - t_run, 1e-9):.0f} frames/s")

    try:
        for chunk in loader:
            for pos in runner.feed(chunk):
                finish(pos)
            store()
        for pos in runner.flush():
            finish(pos)
        store(wait=True)
    except NonFiniteFeatures:
        if not info.enabled and not writer.pending():  # the unfinished run holds nothing: it must not
            writer.close_unchanged()  # refuse the rerun with other weights, precision or dtype
        raise
    finally:
        bar.close()

    # Gather every rank's outcome; failures in dataset order, whatever rank or worker met them, and
    # whichever videos an earlier, interrupted run already did.
    gathered = D.all_gather_objects((failures, extracted, runner.frames_done), info)
    failures = [{"split": s.split, "video": s.path, "reason": s.reason, "skipped": s.kind} for s in index.skipped]
    failures += [f for part, _, _ in gathered for f in part]
    extracted, frames_done = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
    rank_of = {(s, v.rel): i for i, (s, v) in enumerate((s, v) for s, vs in index.splits.items() for v in vs)}
    failures.sort(key=lambda f: (rank_of.get((f["split"], f["video"]), -1), f["reason"]))
    if extracted == 0 and reused == 0:
        D.barrier(info)
        if info.is_main:
            writer.close_unchanged(keep)
        first = next((f["reason"] for f in failures if f["skipped"] not in INDEX_FAILURES), "no videos")
        raise DataError(f"no decodable frames in any of the {len(all_jobs)} videos under {index.root} "
                        f"(first problem: {first}); nothing was written")
    D.barrier(info)  # every rank's parts are on disk
    unchanged = False
    if info.is_main:
        order = _dataset_order(index, writer.stored)
        # A cached video whose source changed since and that failed as a whole here: its stored rows are
        # of what is no longer there, and go, rather than stand in the cache as its features. (Rows of
        # an unchanged video retried for a broken frame stay, whatever this try met: a read error may
        # pass, as for a class folder that cannot be read this time.)
        failed = {(f["split"], f["video"]) for f in failures if f["skipped"] == "video"} & set(changed)
        stale = [(s, rel) for s, rels in writer.stored().items() for rel in rels if (s, rel) in failed] if failed else []
        if stale:
            log.warning("dropped the cached features of %d video(s) that changed on disk and could not be extracted "
                        "again, e.g. %s (listed in the cache's failures; a rerun tries them again)", len(stale),
                        stale[0][1])
            order = {s: [rel for rel in rels if (s, rel) not in failed] for s, rels in order.items()}
        if unchanged := writer.unchanged(failures, order, keep):
            writer.close_unchanged(keep)  # everything was cached already: leave the file untouched
        else:
            writer.finalize(order, {"config": json.dumps(cfg.to_dict(), sort_keys=True), "failures": failures}, keep)
    D.barrier(info)
    D.cleanup(info)
    with FeatureCache(output) as c:
        counts = {s: c.num_videos(s) for s in c.splits}
    return ExtractResult(output=output, videos=counts, extracted=extracted, reused=reused,
                         frames=frames_done, seconds=time.perf_counter() - t0,
                         failures=failures, weights=identity, weights_file=weights_file,
                         warnings=index.warnings, backbone=provenance.backbone, feature_dim=provenance.feature_dim,
                         frame_spec=spec, unchanged=unchanged)


def _as_recorded(cfg: ExtractConfig, output: Path, device: torch.device, amp: torch.dtype | None) -> torch.dtype | None:
    """``--precision auto`` on a GPU goes on in the autocast dtype the cache (or the unfinished run
    it resumes) was made in, where that is the other one: auto chose bf16 on a V100 or T4 until it
    chose fp16 there, and one cache holds features of one precision."""
    if cfg.precision != "auto" or device.type != "cuda" or amp is None:
        return amp
    recorded = None
    with contextlib.suppress(PipelineError, OSError, ValueError, KeyError):
        partial = read_partial(output)
        if partial is not None and (partial["replace"] or not cfg.overwrite):
            recorded = partial["provenance"].precision
        elif partial is None and not cfg.overwrite and output.is_file():
            recorded = read_provenance(output).precision
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(recorded or "")
    if want is None or want == amp:
        return amp
    log.info("--precision auto: %s was made under %s autocast, and goes on so (--overwrite to start over in %s)",
             output, recorded, str(amp).removeprefix("torch."))
    return want


def _check_earlier(earlier: list[tuple[str, Video]], writer: CacheWriter, sel: FrameSelection,
                   sources: dict[tuple[str, str], str], progress: bool) -> list[tuple[str, Video]]:
    """The video files among ``earlier`` (cached by a version that numbered a cut clip's frames
    from its first packet and read a phone video sideways) whose stored rows differ from what
    this version extracts (``data.read_as_recorded``: a demux and one decoded frame each). The
    others are kept, re-signed so that no later run checks them again."""
    stored = {split: writer.stored_indices(split) for split in {s for s, _ in earlier}}
    redo = []
    for split, v in tqdm(earlier, unit="video", desc="check earlier cache", disable=not progress or None,
                         dynamic_ncols=True):
        if read_as_recorded(v.path, sel, stored[split].get(v.rel)):
            writer.resign[split, v.rel] = sources[split, v.rel]
        else:
            redo.append((split, v))
    return redo


def _fail(failures: list[dict[str, Any]], split: str, video: Video, reason: str, strict: bool,
          skipped: str = "video") -> None:
    """Record a broken video, frame, or truncated end of a video ("frames": its other frames are kept)."""
    if strict:
        instead = {"video": "skip broken videos", "frame": "skip broken frames",
                   "frames": "keep the frames a truncated video has"}[skipped]
        raise DataError(f"{reason} (--strict; drop --strict to {instead})")
    log.warning("skipped %s: %s", skipped, reason)
    failures.append({"split": split, "video": video.rel, "reason": reason, "skipped": skipped})


class NonFiniteFeatures(WeightsError):
    """A video's features hold NaN or inf."""


def _check_finite(stored: np.ndarray, video: Video, identity: WeightsIdentity, dtype: str) -> None:
    """Every video's features as they would be stored: NaN/inf never reach the cache."""
    bad = int((~np.isfinite(stored)).sum())
    if bad:
        raise NonFiniteFeatures(
            f"features of {video.path} are not finite ({bad} of {stored.size} values NaN or inf, stored as {dtype}) "
            f"with weights {identity.describe()}: the weights hold NaN/inf, the compute overflows (--precision fp32), "
            "or the values pass float16's range (--dtype float32); nothing of it was cached")


def _check_not_degenerate(feats: torch.Tensor, identity: WeightsIdentity) -> None:
    """Warn when features carry no signal (e.g. a state dict with untrained BatchNorm statistics)."""
    if feats.abs().max() < 1e-4 or (feats == 0).float().mean() > 0.99:
        log.warning(
            "features of the first video are degenerate (max |x| %.2g, %.1f%% zeros) with weights %s: "
            "the backbone's BatchNorm statistics look untrained; use --weights imagenet or --weights none "
            "(which recalibrates them)", float(feats.abs().max()), 100 * float((feats == 0).float().mean()),
            identity.describe())
