"""Temporal heads over per-frame features, through one registry. No I/O.

Contract for every head: ``(B, T, D)`` features and ``(B,)`` lengths (``None``: all ``T`` real)
→ ``(B, C)`` logits; steps past a clip's length (padding) never change its output.
``build_head(HeadConfig)`` builds one; a checkpoint stores ``HeadConfig.to_dict()`` and rebuilds it.

* ``lstm``, ``gru``: a recurrent layer; ``pool`` ``last`` (final state of each direction) or
  ``mean`` (outputs averaged over real steps). Packed sequences when lengths differ.
* ``transformer``: a small pre-norm Transformer encoder over the clip (input projection to
  ``hidden``, learned positions, key-padding mask), outputs averaged over real steps.
* ``attention``: attention pooling, the attentive-probe shape (V-JEPA): one learned query attends
  over the projected frames (with learned positions, so it can read order), then an MLP.
* ``mean``: the average frame feature and a linear layer: TSN's order-blind baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .errors import ConfigError


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
    num_heads: int = 4  # attention heads (transformer, attention)
    max_len: int = 64  # longest clip the learned positions cover (transformer, attention)

    def __post_init__(self) -> None:
        # ConfigError (one line from the CLI), worded with the options that set these fields
        if self.arch not in HEADS:
            raise ConfigError(f"unknown head {self.arch!r}: use one of {', '.join(HEADS)}")
        for name in ("num_classes", "input_dim", "hidden", "layers", "num_heads", "max_len"):
            if getattr(self, name) < 1:
                what = {"hidden": "--hidden", "layers": "--layers", "num_heads": "--num-heads"}.get(name, f"the head's {name}")
                raise ConfigError(f"{what} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.arch in ("transformer", "attention") and self.hidden % self.num_heads:
            raise ConfigError(f"--hidden ({self.hidden}) must be divisible by --num-heads ({self.num_heads}) "
                              f"for the {self.arch} head")

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


def unused_fields(arch: str) -> tuple[str, ...]:
    """The config fields head ``arch`` does not read (its class's ``unused``)."""
    return getattr(HEADS.get(arch), "unused", ())


# HeadConfig fields that no option of the same name sets (``arch`` also goes by ``head`` in run configs).
_OPTIONS = {"arch": "--head", "max_len": "--seq-len", "num_classes": "the number of classes",
            "input_dim": "the feature dimension"}


def head_option(field: str, value: Any, *, with_value: bool = True) -> str:
    """A head setting as the command line gives it: ``--hidden 512``, ``--unidirectional``,
    ``--seq-len 16`` for ``max_len``; without ``with_value``, the option alone."""
    if field == "bidirectional":
        return "--bidirectional" if value else "--unidirectional"
    name = _OPTIONS.get(field, f"--{field.replace('_', '-')}")
    return f"{name} {value}" if with_value else name


@register("lstm")
class LSTMHead(nn.Module):
    """LSTM over a clip of frame features → class logits.

    ``pool="last"`` classifies the final hidden state of each direction (``h_n``): for the forward
    direction the state after the last real frame, for the backward direction the state after
    reading the whole clip backwards to the first frame. (The last *output step* would give the
    backward direction after only one frame.) ``pool="mean"`` averages the outputs over real steps.
    Padded steps never change the result: sequences are packed when lengths differ.
    """

    unused = ("num_heads",)  # config fields this head does not read (the sweep collapses them)

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


@register("gru")
class GRUHead(LSTMHead):
    """As ``lstm``, with a GRU."""

    rnn_type = nn.GRU


def _valid_mask(lengths: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, T) True on real steps."""
    if lengths is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    return torch.arange(t, device=device)[None] < lengths.to(device)[:, None]


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, H) averaged over the real steps of each row → (B, H). Padding is zeroed, not summed."""
    w = valid.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def max_clip_len(head: nn.Module) -> int | None:
    """The longest clip ``head`` takes: the steps its learned positions cover; None if unbounded."""
    return min((m.max_len for m in head.modules() if isinstance(m, _Positions)), default=None)


class _Positions(nn.Module):
    """Learned position embeddings for up to ``max_len`` steps."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"clip of {t} steps is longer than the head's {self.max_len} learned positions")
        return x + self.weight[:, :t]


@register("transformer")
class TransformerHead(nn.Module):
    """Pre-norm Transformer encoder over the frames; real outputs averaged, then a linear layer."""

    unused = ("bidirectional", "pool")

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.input_dim, cfg.hidden)
        self.pos = _Positions(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.num_heads, dim_feedforward=2 * cfg.hidden,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        valid = _valid_mask(lengths, b, t, x.device)  # (B, T)
        h = self.pos(self.proj(x))  # (B, T, H)
        h = self.encoder(h, src_key_padding_mask=~valid if lengths is not None else None)
        return self.classifier(self.dropout(_masked_mean(self.norm(h), valid)))


@register("attention")
class AttentionPoolHead(nn.Module):
    """A learned query attends over the projected frames (with learned positions); then an MLP."""

    unused = ("layers", "bidirectional", "pool")

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.input_dim, cfg.hidden)
        self.pos = _Positions(cfg.max_len, cfg.hidden)
        self.query = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 2 * cfg.hidden), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.hidden, cfg.hidden))
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        kv = self.norm(self.pos(self.proj(x)))  # (B, T, H)
        mask = ~_valid_mask(lengths, b, t, x.device) if lengths is not None else None
        z, _ = self.attn(self.query.expand(b, -1, -1), kv, kv, key_padding_mask=mask, need_weights=False)
        z = z[:, 0]  # (B, H)
        z = z + self.mlp(z)
        return self.classifier(self.dropout(z))


@register("mean")
class MeanHead(nn.Module):
    """The average of the real frames' features, dropout, a linear layer (order-blind)."""

    unused = ("hidden", "layers", "bidirectional", "pool", "num_heads")

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.input_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        return self.classifier(self.dropout(_masked_mean(x, _valid_mask(lengths, b, t, x.device))))
