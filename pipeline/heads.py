"""Temporal heads over per-frame features, through one registry. No I/O.

Contract for every head: ``(B, T, D)`` features and ``(B,)`` lengths (``None``: all ``T`` real)
→ ``(B, C)`` logits; steps past a clip's length (padding) never change its output.
``build_head(HeadConfig)`` builds one; a checkpoint stores ``HeadConfig.to_dict()`` and rebuilds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of a temporal head; ``arch`` names a registry entry (``HEADS``)."""

    num_classes: int
    input_dim: int
    arch: str = "lstm"
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.5
    pool: Literal["last", "mean"] = "last"

    def __post_init__(self) -> None:
        if self.arch not in HEADS:
            raise ValueError(f"unknown head {self.arch!r}: use one of {', '.join(HEADS)}")
        for name in ("num_classes", "input_dim", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        """Missing fields get their defaults: schema-1 checkpoints (no ``arch``) load as the LSTM."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


HEADS: dict[str, Callable[[HeadConfig], nn.Module]] = {}


def register(arch: str):
    def add(cls):
        HEADS[arch] = cls
        return cls
    return add


def build_head(cfg: HeadConfig) -> nn.Module:
    return HEADS[cfg.arch](cfg)


@register("lstm")
class LSTMHead(nn.Module):
    """LSTM over a clip of frame features → class logits.

    ``pool="last"`` classifies the final hidden state of each direction (``h_n``): for the forward
    direction the state after the last real frame, for the backward direction the state after
    reading the whole clip backwards to the first frame. (The last *output step* would give the
    backward direction after only one frame.) ``pool="mean"`` averages the outputs over real steps.
    Padded steps never change the result: sequences are packed when lengths differ.
    """

    rnn_type: type[nn.RNNBase] = nn.LSTM

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rnn = self.rnn_type(cfg.input_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                                 bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), cfg.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) features, (B,) valid lengths (None = all T) → (B, C) logits."""
        b, t, _ = x.shape
        packed = lengths is not None and bool((lengths != t).any())
        if packed:
            inp = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, h_n = self.rnn(inp)
        else:
            out, h_n = self.rnn(x)  # (B, T, H·dirs)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        if self.cfg.pool == "last":
            dirs = 2 if self.cfg.bidirectional else 1
            z = h_n.view(self.cfg.layers, dirs, b, self.cfg.hidden)[-1]  # (dirs, B, H), top layer
            z = z.permute(1, 0, 2).reshape(b, dirs * self.cfg.hidden)  # (B, H·dirs)
        else:
            if packed:
                out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)  # zeros past length
                z = out.sum(1) / lengths.to(out.device, out.dtype).unsqueeze(1)
            else:
                z = out.mean(1)  # (B, H·dirs)
        return self.classifier(self.dropout(z))
