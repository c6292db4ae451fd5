"""``train_one_epoch`` and ``evaluate`` over a split held in memory; every dependency is an argument.

The whole split lives in one (ΣT, D) tensor (CPU RAM, or GPU memory on CUDA); a batch of clips is
gathered by index with one ``index_select``: no per-sample DataLoader, no Python loop per clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
