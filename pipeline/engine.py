"""``train_one_epoch`` and ``evaluate`` over a split held in memory; every dependency is an argument.

The whole split lives in one (ΣT, D) tensor (CPU RAM, or GPU memory on CUDA); a batch of clips is
gathered by index with one ``index_select``: no per-sample DataLoader, no Python loop per clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .runtime import autocast_ctx
from .sampling import Sampler, sample


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


def train_one_epoch(model: nn.Module, bank: FeatureBank, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, seq_len: int, sampler: Sampler,
                    batch_size: int, rng: np.random.Generator, desc: str = "train", progress: bool = True,
                    **kw) -> dict[str, float]:
    """One pass over every training video of ``bank`` (one clip each); mean loss and top-1."""
    n = len(bank)
    order = rng.permutation(n)
    pos, clip_len = sample(sampler, bank.lengths[order], seq_len, rng)
    device = bank.features.device

    def batches():
        for s in range(0, n, batch_size):
            vids = order[s:s + batch_size]
            x = bank.gather(vids, pos[s:s + batch_size])  # (B, S, D)
            yield (x, torch.from_numpy(clip_len[s:s + batch_size])), bank.labels[torch.from_numpy(vids).to(device)]

    r = train_steps(model, batches(), optimizer, scheduler, device=device, total=math.ceil(n / batch_size),
                    desc=desc, progress=progress, **kw)
    return {"loss": r["loss_sum"] / max(r["count"], 1), "top1": r["correct"] / max(r["count"], 1)}


@torch.no_grad()
def evaluate(model: nn.Module, bank: FeatureBank, *, seq_len: int, num_clips: int = 1, batch_size: int = 256,
             amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, float]:
    """Deterministic: softmax averaged over ``num_clips`` uniform clips per video.

    Returns (N, C) probabilities and the mean cross-entropy of the averaged prediction.
    """
    model.eval()
    n = len(bank)
    device = bank.features.device
    probs = None
    for k in range(num_clips):
        pos, clip_len = sample("uniform", bank.lengths, seq_len, clip=k, num_clips=num_clips)
        chunks = []
        for s in range(0, n, batch_size):
            vids = np.arange(s, min(s + batch_size, n))
            with autocast_ctx(device, amp_dtype):
                logits = model(bank.gather(vids, pos[s:s + batch_size]), torch.from_numpy(clip_len[s:s + batch_size]))
            chunks.append(torch.softmax(logits.float(), 1))
        p = torch.cat(chunks)
        probs = p if probs is None else probs + p
    probs = probs / num_clips
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), bank.labels).item()
    return probs.cpu().numpy(), loss


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


def train_heads_one_epoch(heads: list[HeadTrainer], source: FeatureBank, *, seq_len: int, sampler: Sampler,
                          batch_size: int, rng: np.random.Generator, epoch: int, amp_dtype: torch.dtype | None = None,
                          on_batch: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """One pass over every training video for several heads at once: each batch of clips is
    sampled and gathered once and fed to every head; their losses are summed for one backward
    pass (their parameters are disjoint, so each gets exactly its own gradient). Dropout draws
    are seeded per (head, epoch, batch), so a head's result does not depend on which other heads
    share its batches. → per head: mean loss and top-1 (NaN for a head that failed)."""
    n = len(source)
    order = rng.permutation(n)
    pos, clip_len = sample(sampler, source.lengths[order], seq_len, rng)
    device = source.features.device
    live = [h for h in heads if h.failed is None]
    for h in live:
        h.model.train()
    sums = {id(h): [0.0, 0, 0] for h in heads}
    for step, s in enumerate(range(0, n, batch_size)):
        vids = order[s:s + batch_size]
        x = source.gather(vids, pos[s:s + batch_size])  # (B, S, D), once for every head
        lengths = torch.from_numpy(clip_len[s:s + batch_size])
        y = source.labels[torch.from_numpy(vids).to(device)]
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
        if on_batch is not None:
            on_batch()
    return [{"loss": sums[id(h)][0] / max(sums[id(h)][2], 1) if h.failed is None else float("nan"),
             "top1": sums[id(h)][1] / max(sums[id(h)][2], 1) if h.failed is None else float("nan")} for h in heads]


@torch.no_grad()
def evaluate_heads(models: list[nn.Module], source: FeatureBank, *, seq_len: int, num_clips: int = 1,
                   batch_size: int = 256, amp_dtype: torch.dtype | None = None) -> list[tuple[np.ndarray, float]]:
    """``evaluate`` for several heads on the same clips, each clip gathered once."""
    for m in models:
        m.eval()
    n = len(source)
    device = source.features.device
    probs: list[torch.Tensor | None] = [None] * len(models)
    for k in range(num_clips):
        pos, clip_len = sample("uniform", source.lengths, seq_len, clip=k, num_clips=num_clips)
        chunks: list[list[torch.Tensor]] = [[] for _ in models]
        for s in range(0, n, batch_size):
            x = source.gather(np.arange(s, min(s + batch_size, n)), pos[s:s + batch_size])
            lengths = torch.from_numpy(clip_len[s:s + batch_size])
            for i, m in enumerate(models):
                with autocast_ctx(device, amp_dtype):
                    chunks[i].append(torch.softmax(m(x, lengths).float(), 1))
        for i in range(len(models)):
            p = torch.cat(chunks[i])
            probs[i] = p if probs[i] is None else probs[i] + p
    out = []
    for p in probs:
        p = p / num_clips
        loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), source.labels).item()
        out.append((p.cpu().numpy(), loss))
    return out
