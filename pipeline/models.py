"""Temporal models over per-frame features. No I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass(frozen=True)
class TemporalHeadConfig:
    num_classes: int
    input_dim: int = 1280
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.5
    pool: Literal["last", "mean"] = "last"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemporalHeadConfig:
        return cls(**d)


class TemporalHead(nn.Module):
    """LSTM over a clip of frame features → class logits.

    ``pool="last"`` classifies the final hidden state of each direction (``h_n``): for the forward
    direction the state after the last real frame, for the backward direction the state after
    reading the whole clip backwards to the first frame. (The last *output step* would give the
    backward direction after only one frame.) ``pool="mean"`` averages the outputs over real steps.
    Padded steps never change the result: sequences are packed when lengths differ.
    """

    def __init__(self, cfg: TemporalHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.input_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), cfg.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) features, (B,) valid lengths (None = all T) → (B, C) logits."""
        b, t, _ = x.shape
        packed = lengths is not None and bool((lengths != t).any())
        if packed:
            inp = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, (h_n, _) = self.lstm(inp)
        else:
            out, (h_n, _) = self.lstm(x)  # (B, T, H·dirs)
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
