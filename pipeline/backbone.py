"""MobileNetV2 feature extractor, weight resolution and BatchNorm recalibration. Writes no files.

``--weights`` accepts:

* ``imagenet`` (torchvision's current default weights) or a torchvision weight name such as
  ``IMAGENET1K_V1``: loaded through torchvision's weights API (download on first use);
* ``PATH``: a torchvision-style state dict (classifier and ``features.`` prefix optional,
  ``module.`` from DDP stripped) or a checkpoint written by this project (``backbone_state``);
* ``none``: random initialisation. Its BatchNorm running statistics are still the defaults, which
  make eval-mode features degenerate, so the extractor recalibrates them on the dataset's frames
  and saves the result (see ``recalibrate_batchnorm``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .config import FrameSpec
from .checkpoint import safe_load
from .errors import WeightsError
from .preprocess import per_channel_

log = logging.getLogger(__name__)

BACKBONE = "mobilenet_v2"
FEATURE_DIM = 1280


class MobileNetV2Features(nn.Module):
    """torchvision MobileNetV2 up to the global average pool: (B, 3, H, W) → (B, 1280)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.mobilenet_v2(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1280, h, w)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 1280)


@dataclass(frozen=True)
class WeightsIdentity:
    """What the backbone's weights are, stored with every cache and checkpoint.

    Two identities match when their torchvision name matches, or their file hashes match: a file
    that moved is still the same weights.
    """

    source: str  # "torchvision" | "file" | "recalibrated"
    name: str | None = None  # torchvision weight enum name
    sha256: str | None = None
    path: str | None = None

    def matches(self, other: WeightsIdentity) -> bool:
        if self.sha256 or other.sha256:
            return self.sha256 == other.sha256
        return (self.source, self.name) == (other.source, other.name)

    def describe(self) -> str:
        if self.name:
            return f"torchvision {self.name}"
        return f"{self.source} {self.path or ''} (sha256 {str(self.sha256)[:12]})".replace("  ", " ")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "sha256": self.sha256, "path": self.path}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsIdentity:
        return cls(source=d["source"], name=d.get("name"), sha256=d.get("sha256"), path=d.get("path"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torchvision_weights(name: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.MobileNet_V2_Weights
    if name.lower() in ("imagenet", "default"):
        return enum.DEFAULT
    try:
        return enum[name.upper().removeprefix("MOBILENET_V2_WEIGHTS.")]
    except KeyError:
        raise WeightsError(
            f"unknown weights {name!r}: use none, imagenet, "
            f"{', '.join(w.name for w in enum)} or a path to a state dict / checkpoint"
        ) from None


def is_weights_name(spec: str) -> bool:
    return spec.lower() in ("imagenet", "default") or spec.upper().startswith("IMAGENET1K_")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept full-model, features-only, DDP (``module.``) and our own state dicts."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if state and not any(k.startswith("features.") for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
    return state


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A backbone state dict from a torchvision-style file or a project checkpoint."""
    obj = safe_load(path, WeightsError, "weights file")
    if isinstance(obj, dict) and "backbone_state" in obj:
        obj = obj["backbone_state"]
    elif isinstance(obj, dict) and "model_state" in obj and "schema_version" in obj:
        raise WeightsError(
            f"{path} is a temporal-model checkpoint without backbone weights; pass the weights the "
            "cache was extracted with, or an end-to-end checkpoint"
        )
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return _normalise_keys(obj)


def build_backbone(weights: str) -> tuple[MobileNetV2Features, WeightsIdentity]:
    """The feature extractor in eval mode, with ``weights`` resolved, and their identity."""
    model = MobileNetV2Features()
    if weights.lower() == "none":
        identity = WeightsIdentity(source="random")
    elif is_weights_name(weights):
        w = _torchvision_weights(weights)
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise WeightsError(
                f"could not download the ImageNet weights {w} ({str(e).splitlines()[0]}): offline? "
                f"fetch {w.url} on a machine with network and pass --weights PATH/TO/{w.url.rsplit('/', 1)[-1]}"
            ) from e
        model.load_state_dict(_normalise_keys(state), strict=True)
        identity = WeightsIdentity(source="torchvision", name=str(w).split(".")[-1])
    else:
        path = Path(weights)
        if path.is_dir():
            raise WeightsError(f"--weights {path} is a folder; give the weights file")
        if not weights or not path.is_file():
            raise WeightsError(
                f"weights file not found: {weights!r}; use --weights none, imagenet, or an existing file"
            )
        state = load_state_file(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise WeightsError(f"{path} is not a MobileNetV2 state dict ({first[:160]}...)") from e
        identity = WeightsIdentity(source="file", sha256=sha256_file(path), path=str(path.resolve()))
    return model.eval(), identity


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, *, copy: bool = True) -> nn.Module:
    """``model`` for frozen inference with every Conv2d → BatchNorm2d pair folded into one conv
    (w' = w·γ/σ, b' = (b − μ)·γ/σ + β). Same function up to float rounding; on CPU it removes the
    BatchNorm passes, about a third of MobileNetV2's inference time (measured here).
    By default a folded copy; ``copy=False`` swaps the folded convs into ``model``'s own Sequentials
    and returns it (no deep copy, ~50 ms saved): references to its old submodules go stale."""
    import copy as copy_

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = (copy_.deepcopy(model) if copy else model).eval()
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return fused


class FrozenBackbone(nn.Module):
    """The inference form of ``MobileNetV2Features`` for one ``FrameSpec``: (B, 3, S, S) uint8 frames
    → (B, 1280) features, as ``model(preprocess.normalize_frames(frames, spec))`` up to float rounding.

    Every BatchNorm is folded into its conv (``fuse_conv_bn``), and so is the per-channel scale
    1/(255·std) of the input normalisation, into the first conv. What is left of preprocessing is
    one elementwise pass, uint8 → float ``x − 255·mean``. Centring, rather than scaling, is what stays
    outside: a zero of the centred input is the mean pixel, which normalises to zero, so the first
    conv's zero padding means the same as on the normalised input and the fold is exact at borders.
    Frames in channels_last memory (``preprocess.stack_frames``) go through without a transpose.
    ``copy=False`` folds ``model`` itself instead of a copy (see ``fuse_conv_bn``): the caller
    hands it over and must not use it on its own afterwards.
    """

    def __init__(self, model: MobileNetV2Features, spec: FrameSpec, *, channels_last: bool = True,
                 copy: bool = True) -> None:
        super().__init__()
        first = model.features[0][0]  # checked before anything is folded
        if not isinstance(first, nn.Conv2d) or first.padding_mode != "zeros" or first.in_channels != 3:
            raise TypeError("FrozenBackbone expects MobileNetV2's first layer: a zero-padded 3-channel conv")
        net = fuse_conv_bn(model, copy=copy)  # copy=False: the caller hands ``model`` over
        first = net.features[0][0]
        device = first.weight.device
        mean = torch.tensor(spec.mean, dtype=torch.float64, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64, device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            first.weight.copy_((first.weight.double() / (255.0 * std)).to(first.weight.dtype))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.register_buffer("offset", (255.0 * mean).to(torch.float32), persistent=False)

    def center(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 frames → the float input of ``self.net``, x − 255·mean, in the net's
        memory format."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"FrozenBackbone takes uint8 frames (0-255), got {frames.dtype}")
        return per_channel_(frames.to(torch.float32, memory_format=self.memory_format), None, -self.offset)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(self.center(frames))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], *, device: torch.device | str = "cpu"
) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` (normalised inputs), then freeze.

    ``momentum=None`` averages the per-batch statistics with equal weight, independent of batch
    order: give it equal-sized batches that are fair samples (shuffled across videos). Returns the
    number of frames used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x in batches:
            model(x.to(device))
            n += x.shape[0]
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return n
