"""``train_one_epoch`` and ``evaluate`` over a ``ClipSource``; every dependency is an argument.

A ``ClipSource`` is a split as the engine sees it: ``lengths``, ``labels`` and ``gather(videos,
positions) -> (B, T, D)``, plus ``gather_batches`` for a whole epoch's batches in order. Two exist:

* ``FeatureBank``: the whole split in one (ΣT, D) tensor (CPU RAM, or GPU memory on CUDA); a batch
  of clips is gathered by index with one ``index_select``: no per-sample DataLoader, no Python loop
  per clip.
* ``LazyBank``: the split stays on disk (``cache.LazySplit``); each batch reads only the rows its
  clips sample (sorted, one read per run of consecutive rows), and a prefetch thread reads the next
  batches while the current one trains. It returns exactly the values ``FeatureBank`` does.

The random draws (order, clip positions) are made here, before any source is asked for rows, so a
run draws the same clips and gets the same results whichever source it reads from.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .runtime import autocast_ctx
from .sampling import Sampler, sample

Request = tuple[np.ndarray, np.ndarray]  # (n,) video ids, (n, S) positions within them


class ClipSource(Protocol):
    """What the engine (train, sweep, evaluate) reads clips from."""

    lengths: np.ndarray  # (N,) frames per video
    labels: torch.Tensor  # (N,) int64, on ``device``

    @property
    def device(self) -> torch.device: ...

    def __len__(self) -> int: ...

    def gather(self, videos: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        """(n,) video ids and (n, S) positions within them → (n, S, D) float32 on ``device``."""
        ...

    def gather_batches(self, requests: Iterable[Request]) -> Iterator[torch.Tensor]:
        """``gather`` of each request, in order (a lazy source reads ahead)."""
        ...


@dataclass
class FeatureBank:
    features: torch.Tensor  # (ΣT, D), float16 or float32, on the training device
    offsets: torch.Tensor  # (N + 1,) int64, same device
    lengths: np.ndarray  # (N,)
    labels: torch.Tensor  # (N,) int64, same device

    @classmethod
    def from_arrays(cls, features: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                    device: torch.device) -> FeatureBank:
        return cls(torch.from_numpy(features).to(device), torch.from_numpy(offsets).to(device),
                   np.diff(offsets), torch.from_numpy(labels).to(device))

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, idx: np.ndarray) -> FeatureBank:
        """Videos ``idx`` of this bank, sharing its features (``offsets`` then holds their starts)."""
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.offsets.device)
        return FeatureBank(self.features, self.offsets[t], self.lengths[idx], self.labels[t])

    def gather(self, videos: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        """(n,) video ids and (n, S) positions within them → (n, S, D) float32 features."""
        dev = self.features.device
        rows = self.offsets[torch.from_numpy(videos).to(dev)].unsqueeze(1) + torch.from_numpy(pos).to(dev)
        return self.features.index_select(0, rows.reshape(-1)).view(*pos.shape, -1).float()

    def gather_batches(self, requests: Iterable[Request]) -> Iterator[torch.Tensor]:
        for videos, pos in requests:
            yield self.gather(videos, pos)


class LazyBank:
    """A ``ClipSource`` over a split read on demand: ``reader`` is a ``cache.LazySplit`` (or anything
    with ``offsets``, ``labels`` and ``read_rows(sorted unique rows) -> (n, D) array``).

    ``gather_batches`` keeps up to ``prefetch`` batches in flight on one background thread, so
    the model does not wait for the disk where the disk keeps up; memory stays at a few batches."""

    def __init__(self, reader, device: torch.device, *, prefetch: int = 2) -> None:
        self.reader = reader
        self.offsets = np.asarray(reader.offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        self.labels = torch.from_numpy(np.asarray(reader.labels, dtype=np.int64)).to(device)
        self._device = torch.device(device)
        self.prefetch = max(1, prefetch)
        self.wait_seconds = 0.0  # time consumers of gather_batches spent waiting for reads (all calls)
        self.read_cpu_seconds = 0.0  # CPU time the reads took (in whichever thread ran them)

    @property
    def device(self) -> torch.device:
        return self._device

    def subset(self, idx: np.ndarray) -> LazyBank:
        """Videos ``idx`` of this split, reading from the same file (``offsets`` then holds their
        starts only, which is all ``read`` uses)."""
        sub = object.__new__(LazyBank)
        sub.__dict__.update(self.__dict__)
        sub.offsets, sub.lengths = self.offsets[idx], self.lengths[idx]
        sub.labels = self.labels[torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.labels.device)]
        return sub

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, videos: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """(n, S, D) features in the stored dtype: each distinct row read once, in file order."""
        t = time.thread_time()
        rows = (self.offsets[videos][:, None] + pos).reshape(-1)
        uniq, inverse = np.unique(rows, return_inverse=True)
        x = self.reader.read_rows(uniq)[inverse.reshape(-1)].reshape(*pos.shape, -1)
        self.read_cpu_seconds += time.thread_time() - t  # one reader at a time: no lost updates that matter
        return x

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        # float16 travels to the device as it is stored and is widened there, as FeatureBank does.
        return torch.from_numpy(x).to(self._device).float()

    def gather(self, videos: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        return self._tensor(self.read(videos, pos))

    def gather_batches(self, requests: Iterable[Request]) -> Iterator[torch.Tensor]:
        requests = iter(requests)
        with ThreadPoolExecutor(1, thread_name_prefix="clip-prefetch") as pool:
            pending = deque(pool.submit(self.read, *r) for r in _take(requests, self.prefetch))
            try:
                while pending:
                    t = time.perf_counter()
                    x = pending.popleft().result()
                    self.wait_seconds += time.perf_counter() - t
                    nxt = next(requests, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.read, *nxt))
                    yield self._tensor(x)
            finally:  # the consumer stopped early (an error, a break): drop what was not started
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        if hasattr(self.reader, "close"):
            self.reader.close()


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(n):
        x = next(it, None)
        if x is None:
            break
        out.append(x)
    return out


def train_steps(model: nn.Module, batches: Iterable[tuple[tuple, torch.Tensor]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, label_smoothing: float = 0.0,
                clip_grad: float | None = None, amp_dtype: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None, device: torch.device | None = None,
                total: int | None = None, desc: str = "train", progress: bool = True) -> dict[str, float]:
    """The optimisation loop shared by stage two and stage three.

    ``batches`` yields ``(model inputs, labels)``; returns the summed loss, correct count and count
    (sums, so distributed ranks can add them up)."""
    device = device or torch.device("cpu")
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for s, (inputs, y) in enumerate(tqdm(batches, total=total, desc=desc, leave=False,
                                        disable=not progress or None, unit="batch")):
        with autocast_ctx(device, amp_dtype):
            logits = model(*inputs)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {s + 1}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        b = len(y)
        total_loss += loss.item() * b
        correct += int((logits.argmax(1) == y).sum())
        seen += b
    return {"loss_sum": total_loss, "correct": correct, "count": seen}


def _trimmed(pos: np.ndarray, clip_len: np.ndarray) -> np.ndarray:
    """A batch's positions cut to its longest clip: the rest is padding, which no head reads
    (masked, packed), so a --seq-len longer than the videos costs no memory (it cost B x S x D:
    4 GB a batch at --seq-len 100000 for 22-frame videos)."""
    return pos[:, :max(int(clip_len.max()), 1)] if len(clip_len) else pos


def epoch_batches(source: ClipSource, *, seq_len: int, sampler: Sampler, batch_size: int,
                  rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One training epoch's batches, (x (B, S, D), lengths (B,), labels (B,)): every video once in
    a random order, one clip each. ``rng`` is drawn from now, not when iteration starts; close the
    iterator (or exhaust it) to release the source's reads."""
    n = len(source)
    order = rng.permutation(n)
    pos, clip_len = sample(sampler, source.lengths[order], seq_len, rng)
    starts = range(0, n, batch_size)
    xs = source.gather_batches((order[s:s + batch_size], _trimmed(pos[s:s + batch_size], clip_len[s:s + batch_size]))
                               for s in starts)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with contextlib.closing(xs):
            for s, x in zip(starts, xs):
                vids = torch.from_numpy(order[s:s + batch_size]).to(source.device)
                yield x, torch.from_numpy(clip_len[s:s + batch_size]), source.labels[vids]

    return batches()


def train_one_epoch(model: nn.Module, bank: ClipSource, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, seq_len: int, sampler: Sampler,
                    batch_size: int, rng: np.random.Generator, desc: str = "train", progress: bool = True,
                    **kw) -> dict[str, float]:
    """One pass over every training video of ``bank`` (one clip each); mean loss and top-1."""
    batches = epoch_batches(bank, seq_len=seq_len, sampler=sampler, batch_size=batch_size, rng=rng)
    with contextlib.closing(batches):
        r = train_steps(model, (((x, lengths), y) for x, lengths, y in batches), optimizer, scheduler,
                        device=bank.device, total=math.ceil(len(bank) / batch_size), desc=desc, progress=progress,
                        **kw)
    return {"loss": r["loss_sum"] / max(r["count"], 1), "top1": r["correct"] / max(r["count"], 1)}


def evaluate(model: nn.Module, bank: ClipSource, *, seq_len: int, num_clips: int = 1, batch_size: int = 256
             ) -> tuple[np.ndarray, float]:
    """Deterministic: softmax averaged over ``num_clips`` uniform clips per video.

    Returns (N, C) probabilities and the mean cross-entropy of the averaged prediction.
    """
    return evaluate_heads([model], bank, seq_len=seq_len, num_clips=num_clips, batch_size=batch_size)[0]


# ------------------------------------------------------------------ many heads at once (sweep)


@dataclass
class HeadTrainer:
    """One head of a sweep with its own optimiser, schedule and seed; ``failed`` once its loss is
    no longer finite (it stops training; the others go on)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    seed: int
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    failed: str | None = None


def train_heads_one_epoch(heads: list[HeadTrainer], source: ClipSource, *, seq_len: int, sampler: Sampler,
                          batch_size: int, rng: np.random.Generator, epoch: int,
                          amp_dtype: torch.dtype | None = None) -> list[dict[str, float]]:
    """One pass over every training video for several heads at once: each batch of clips is
    sampled and gathered once and fed to every head; their losses are summed for one backward
    pass (their parameters are disjoint, so each gets exactly its own gradient). Dropout draws
    are seeded per (head, epoch, batch), so a head's result does not depend on which other heads
    share its batches. → per head: mean loss and top-1 (NaN for a head that failed)."""
    batches = epoch_batches(source, seq_len=seq_len, sampler=sampler, batch_size=batch_size, rng=rng)
    device = source.device
    live = [h for h in heads if h.failed is None]
    for h in live:
        h.model.train()
    sums = {id(h): [0.0, 0, 0] for h in heads}
    with contextlib.closing(batches):
        for step, (x, lengths, y) in enumerate(batches):  # x: (B, S, D), gathered once for every head
            total = None
            for h in live:
                if h.failed is not None:
                    continue
                torch.manual_seed(h.seed * 1_000_003 + epoch * 10_007 + step)
                with autocast_ctx(device, amp_dtype):
                    logits = h.model(x, lengths)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=h.label_smoothing)
                if not torch.isfinite(loss):
                    h.failed = f"loss became {loss.item()} in epoch {epoch}, step {step + 1}"
                    continue
                total = loss if total is None else total + loss
                acc = sums[id(h)]
                acc[0] += loss.item() * len(y)
                acc[1] += int((logits.argmax(1) == y).sum())
                acc[2] += len(y)
            for h in live:
                h.optimizer.zero_grad(set_to_none=True)
            if total is not None:
                total.backward()
            for h in live:
                if h.failed is not None:
                    continue
                if h.clip_grad:
                    nn.utils.clip_grad_norm_(h.model.parameters(), h.clip_grad)
                h.optimizer.step()
                if h.scheduler is not None:
                    h.scheduler.step()
    return [{"loss": sums[id(h)][0] / max(sums[id(h)][2], 1) if h.failed is None else float("nan"),
             "top1": sums[id(h)][1] / max(sums[id(h)][2], 1) if h.failed is None else float("nan")} for h in heads]


@torch.no_grad()
def averaged_probs(fns: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], source: ClipSource, *,
                   seq_len: int, num_clips: int = 1, batch_size: int = 256) -> list[torch.Tensor]:
    """For each ``fn`` ((B, S, D) clips, (B,) lengths → (B, C) probabilities): its probabilities
    averaged over ``num_clips`` uniform clips of every video of ``source``, each clip gathered
    once for all of them. → (N, C) per fn, on the source's device."""
    n = len(source)
    clips = [sample("uniform", source.lengths, seq_len, clip=k, num_clips=num_clips) for k in range(num_clips)]
    starts = range(0, n, batch_size)
    xs = source.gather_batches((np.arange(s, min(s + batch_size, n)),
                                _trimmed(pos[s:s + batch_size], clip_len[s:s + batch_size]))
                               for pos, clip_len in clips for s in starts)
    probs: list[torch.Tensor | None] = [None] * len(fns)
    with contextlib.closing(xs):
        for _, clip_len in clips:
            chunks: list[list[torch.Tensor]] = [[] for _ in fns]
            for s, x in zip(starts, xs):
                lengths = torch.from_numpy(clip_len[s:s + batch_size])
                for i, fn in enumerate(fns):
                    chunks[i].append(fn(x, lengths))
            for i in range(len(fns)):
                p = torch.cat(chunks[i])
                probs[i] = p if probs[i] is None else probs[i] + p
    return [p / num_clips for p in probs]


@torch.no_grad()
def evaluate_heads(models: list[nn.Module], source: ClipSource, *, seq_len: int, num_clips: int = 1,
                   batch_size: int = 256) -> list[tuple[np.ndarray, float]]:
    """Deterministic evaluation of several heads on the same clips, each clip gathered once: the
    softmax averaged over ``num_clips`` uniform clips per video. → per head: (N, C) probabilities
    and the mean cross-entropy of the averaged prediction. Always in float32, whatever precision
    the heads train in: validation, a run's test.json, ``evaluate`` and ``predict`` give the same
    numbers (bf16 autocast moved a head's probabilities by up to 7e-4 in a CPU simulation: a top-1 can flip)."""
    for m in models:
        m.eval()

    def softmax_of(m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return torch.softmax(m(x, lengths).float(), 1)
        return fn

    probs = averaged_probs([softmax_of(m) for m in models], source, seq_len=seq_len, num_clips=num_clips,
                           batch_size=batch_size)
    out = []
    for p in probs:
        out.append((p.cpu().numpy(), F.nll_loss(torch.log(p.clamp_min(1e-12)), source.labels).item()))
    return out
