"""Clip samplers over cached sequences: which frames of each video form a clip of ``seq_len``.

All samplers work on the lengths of many videos at once (numpy) and return an (N, S) array of
frame positions within each video plus the clip lengths, S = min(seq_len, the longest video). A video shorter than ``seq_len`` keeps
all its frames, in order, and the clip is padded (its length says how many steps are real).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Sampler = Literal["segment", "random", "uniform"]


def _short(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of clips as wide as the longest of them (at most ``seq_len``): a --seq-len far past
    the videos' length cost an (N, seq_len) array per epoch and per evaluation clip, all padding."""
    width = min(seq_len, max(int(lengths.max()), 1)) if len(lengths) else seq_len
    pos = np.broadcast_to(np.arange(width), (len(lengths), width))
    clip_len = np.minimum(lengths, seq_len)
    return np.where(pos < clip_len[:, None], pos, 0), clip_len


def segment_clips(lengths: np.ndarray, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """TSN: ``seq_len`` equal segments per video, one random frame from each."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pos, clip_len = _short(lengths, seq_len)
    long = lengths >= seq_len
    if long.any():
        # Segment i is frames [floor(i T / L), floor((i + 1) T / L)), in integers: T / L in floats
        # put a boundary one frame early in 210 (T, L) pairs of T < 400, L <= 32 (e.g. T 122, L 14;
        # where it was the video's end, its last frame was never drawn).
        n, i = lengths[long, None], np.arange(seq_len)
        start, end = i * n // seq_len, (i + 1) * n // seq_len  # end exclusive, > start as T >= L
        pos = pos.copy()
        pos[long] = start + np.floor(rng.random(start.shape) * (end - start)).astype(np.int64)
    return pos, clip_len


def random_clips(lengths: np.ndarray, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random contiguous window of ``seq_len`` frames per video."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pos, clip_len = _short(lengths, seq_len)
    long = lengths >= seq_len
    if long.any():
        start = np.floor(rng.random(long.sum()) * (lengths[long] - seq_len + 1)).astype(np.int64)
        pos = pos.copy()
        pos[long] = start[:, None] + np.arange(seq_len)
    return pos, clip_len


def uniform_clips(lengths: np.ndarray, seq_len: int, clip: int = 0, num_clips: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic evaluation clips: clip ``k`` of ``K`` takes the frame at fraction (k + ½)/K of
    each of ``seq_len`` equal segments (K = 1: segment centres), in integers: frame
    ⌊(2K·i + 2k + 1)·T / (2K·L)⌋, exact where the fraction lands on a frame boundary (floats put
    52 such clips one frame early over T < 200, L ≤ 32, K ≤ 10)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pos, clip_len = _short(lengths, seq_len)
    long = lengths >= seq_len
    if long.any():
        num = (2 * num_clips * np.arange(seq_len, dtype=np.int64) + 2 * clip + 1) * lengths[long, None]
        pos = pos.copy()
        pos[long] = num // (2 * num_clips * seq_len)
    return pos, clip_len


def sample(kind: Sampler, lengths: np.ndarray, seq_len: int, rng: np.random.Generator | None = None,
           clip: int = 0, num_clips: int = 1) -> tuple[np.ndarray, np.ndarray]:
    if kind == "segment":
        return segment_clips(lengths, seq_len, rng or np.random.default_rng())
    if kind == "random":
        return random_clips(lengths, seq_len, rng or np.random.default_rng())
    if kind == "uniform":
        return uniform_clips(lengths, seq_len, clip, num_clips)
    raise ValueError(f"unknown sampler {kind!r}")
