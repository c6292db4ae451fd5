"""Image backbones by name: any torchvision classification model, or ``timm:<name>`` through timm.

``create_backbone(name, weights)`` is the one seam every stage uses. A ``Backbone`` is the image
model with its final classifier removed, so it maps a normalised (B, 3, H, W) batch to pooled
(B, D) features (the penultimate layer, as feature extractors use it), and knows:

* ``num_features`` (D), and the default ``FrameSpec`` of its weights (torchvision's
  ``weights.transforms()``, timm's ``resolve_model_data_config``);
* its ordered ``blocks`` (for ``--trainable-blocks``): per family for torchvision (MobileNet,
  EfficientNet, MNASNet, ResNet/ResNeXt, ConvNeXt, RegNet, ViT, Swin, MaxViT, DenseNet, VGG/AlexNet,
  SqueezeNet;
  other models by top-level children), and
  timm's own parameter grouping (``group_matcher``);
* the identity of its weights, stored with caches and checkpoints.

``--weights`` accepts ``none`` (random init), ``imagenet`` (the default weights), a weight tag
(torchvision: ``IMAGENET1K_V1``; timm: a pretrained tag such as ``augreg_in21k_ft_in1k``), or a
``PATH``: a state dict (classifier optional, DDP ``module.`` stripped), a file written by this tool,
or for timm any file timm reads (``.safetensors``/``.pth``; OpenAI-CLIP and original DINOv2 key
names are converted by timm's own filters). Downloads happen only for ``imagenet`` or a tag;
offline, the error names the file to fetch.

``FrozenBackbone`` is the inference form for extraction and predict (BatchNorm and the input
scale folded into the convolutions). This module writes no files.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .checkpoint import safe_load
from .config import IMAGENET_MEAN, IMAGENET_STD, FrameOverrides, FrameSpec, WeightsIdentity
from .errors import ConfigError, PipelineError, WeightsError
from .files import sha256_file
from .preprocess import per_channel_
from .runtime import autocast_on

log = logging.getLogger(__name__)

TIMM = "timm:"
DEFAULT_BACKBONE = "mobilenet_v2"


@dataclass
class Block:
    """One unit of ``--trainable-blocks``: its parameters, and the largest modules wholly inside it
    (set to eval mode when the block is frozen, so BatchNorm statistics and dropout stay put)."""

    params: list[str]
    modules: list[str]


@dataclass
class Backbone:
    """An image model up to its pooled features: ``net`` maps (B, 3, H, W) normalised → (B, D)."""

    name: str
    net: nn.Module
    num_features: int
    frame_spec: FrameSpec
    weights: WeightsIdentity
    block_params: list[list[str]] = field(repr=False)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.net.modules())

    @functools.cached_property
    def blocks(self) -> list[Block]:
        params = _merge_interleaved(self.net, self.block_params, self.frame_spec.size) if is_timm(self.name) else \
            self.block_params
        return [Block(ps, _maximal_modules(self.net, set(ps))) for ps in params]

    def set_trainable(self, n: int) -> list[nn.Module]:
        """Only the last ``n`` blocks train. Returns the modules of the frozen blocks, which the
        caller keeps in eval mode."""
        if not 0 <= n <= len(self.blocks):
            raise ConfigError(f"--trainable-blocks must be between 0 and {len(self.blocks)} for {self.name}, got {n}")
        trainable = {p for b in self.blocks[len(self.blocks) - n:] for p in b.params}
        for name, p in self.net.named_parameters():
            p.requires_grad_(name in trainable)
        modules = dict(self.net.named_modules())
        return [modules[m] for b in self.blocks[: len(self.blocks) - n] for m in b.modules]

    def trainable_modules(self, n: int) -> list[nn.Module]:
        modules = dict(self.net.named_modules())
        return [modules[m] for b in self.blocks[len(self.blocks) - n:] for m in b.modules]


def _maximal_modules(net: nn.Module, params: set[str]) -> list[str]:
    """Names of the largest submodules all of whose parameters are in ``params`` (pre-order)."""
    out: list[str] = []
    for name, m in net.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        own = [f"{name}.{p}" for p, _ in m.named_parameters()]
        if own and all(p in params for p in own):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------ names


def is_timm(name: str) -> bool:
    return name.startswith(TIMM)


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ConfigError("timm backbones need the timm package: pip install 'action-pipeline[timm]' "
                          "(or pip install timm)") from e
    return timm


def check_name(name: str) -> str:
    """``name`` if it names a backbone this tool can build, else one line saying what can."""
    if is_timm(name):
        timm = _timm()
        arch = name[len(TIMM):].split(".")[0]
        if not arch:
            raise ConfigError("timm: needs a model name, e.g. timm:vit_small_patch16_224; see `list-backbones --timm PATTERN`")
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:6]
            raise ConfigError(f"unknown timm model {arch!r}" + (f" (similar: {', '.join(close)})" if close else "")
                              + "; see `list-backbones --timm PATTERN`")
        full = name[len(TIMM):]
        if "." in full and _timm_cfg(full) is None:
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            raise ConfigError(f"timm has no pretrained tag {full.split('.', 1)[1]!r} for {arch}: use "
                              + (", ".join(f"timm:{arch}.{t}" for t in tags[:6]) or f"timm:{arch}") + " (or no tag)")
        return name
    if name not in torchvision_names():
        import difflib

        close = difflib.get_close_matches(name, torchvision_names(), n=4)
        raise ConfigError(f"unknown backbone {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + "; use a torchvision classification model (`list-backbones`) or timm:<model name>")
    return name


def check_input_size(bb: Backbone, size: int) -> None:
    """One line if ``bb`` cannot take size×size frames, found by running one blank frame through it
    before any work: a torchvision ViT is built for one input size, and a small input can shrink a
    CNN's feature map to nothing before its last layers. A network that fails at the sizes it was
    made for too is not told to change ``--size``. A CNN at its weights' own size is not run."""
    fixed = getattr(bb.net, "image_size", None)  # torchvision ViTs: the size they were built for
    if not isinstance(fixed, int) or size == fixed:  # a size it was not built for is said below
        _check_coverage(bb, size)
    own = bb.frame_spec.size  # the weights' own size (timm builds a fixed-size model for the size asked)
    with contextlib.suppress(PipelineError):  # a name this tool does not know has no size of its own
        own = default_frame_spec(bb.name).size
    if size == own and not isinstance(fixed, int):
        return

    def failure(s: int) -> Exception | None:
        try:
            with torch.inference_mode():
                bb.net(torch.zeros(1, 3, s, s, device=next(bb.net.parameters()).device))
        except (RuntimeError, AssertionError, ValueError) as e:
            return e
        return None

    e = failure(size)
    if e is None:
        return
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    works = next((s for s in dict.fromkeys([fixed, bb.frame_spec.size]) if isinstance(s, int) and s != size
                  and failure(s) is None), None)
    if works is not None:
        tip = "" if fixed is None else " (its weights fix the input size of this ViT)"
        raise ConfigError(f"{bb.name} cannot take {size}x{size} frames ({why}); use --size {works}{tip}")
    if bb.frame_spec.size == size != own:  # built for this size (timm's fixed-size models): none other to try
        raise ConfigError(f"{bb.name} cannot take {size}x{size} frames ({why}); use --size {own}, the size its "
                          "weights were made for, or another its architecture takes")
    raise ConfigError(f"{bb.name} fails on a blank {size}x{size} frame ({why}); check --weights") from e


def _check_coverage(bb: Backbone, size: int) -> None:
    """One line if the first layer never reads the last rows and columns of size×size frames: a
    patchifying stem (a ViT's 16×16 patches at stride 16, ConvNeXt's and Swin's 4×4 at 4) over a
    size it does not divide. Such a network runs, and silently ignores part of every frame (12 of
    60 rows for 16-pixel patches). Not at the size the architecture was made for: SigLIP-so400m
    takes 384 in 14-pixel patches, and was trained so."""
    own = {(getattr(bb.net, "pretrained_cfg", None) or {}).get("input_size", [0])[-1]}
    with contextlib.suppress(PipelineError):  # a name this tool does not know has no size of its own
        own.add(default_frame_spec(bb.name).size)
    if size in own:
        return
    try:
        found = _first_conv(bb.net, size, _graph(bb.net))
    except (RuntimeError, AssertionError, ValueError):  # untraceable, and fails at this size: said next
        return
    if found is None:
        return
    conv = found[1]
    if isinstance(conv.padding, str) or conv.dilation[0] != 1:  # 'same' pads to cover every pixel
        return
    k, st, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if k != st or pad:  # an overlapping stem (k > stride) misses at most stride - 1 pixels by design:
        return          # SqueezeNet's 7x7 at stride 2 skips the last row of 224 too
    if size % st:
        raise ConfigError(_unread_message(bb.name, size, k, st))


def _unread_message(name: str, size: int, k: int, st: int) -> str:
    unread = size % st
    fits = [s for s in (size - unread, size - unread + st) if s > 0]
    return (f"{name} would never see the last {unread} rows and columns of {size}x{size} frames: its first layer "
            f"({k}x{k}, stride {st}) covers {size - unread}; use --size {' or '.join(map(str, fits))}")


# ---------------------------------------------------------------------------------- creation


def default_frame_spec(name: str, weights: str = "none") -> FrameSpec:
    """The preprocessing ``name`` with ``weights`` expects, without building the model: the weights'
    own eval transform (for ``none``, that of the default weights); a file written by this tool
    (an end-to-end checkpoint, a recalibrated backbone) gives the FrameSpec it was made with; a
    file torchvision publishes, its tag's (told by the hash in the published file's name); any
    other torchvision state dict, the default weights' (with a warning where the tags differ)."""
    check_name(name)
    path = _path_of(weights)
    ours = None
    if path is not None:
        ours = _our_file(path, metadata_only=True)  # create_backbone reads the weights
        if recorded := _recorded_spec(ours):
            return FrameSpec.from_dict(recorded)
    if is_timm(name):
        arch = name[len(TIMM):]
        full = arch if path is not None or weights.lower() in ("none", "imagenet", "default") else \
            f"{arch.split('.')[0]}.{weights}"
        cfg = _timm_cfg(full) or _timm_cfg(arch)
        if cfg is None:
            raise WeightsError(f"unknown weights {weights!r} for {name}; see `list-backbones --timm "
                               f"'{arch.split('.')[0]}*'` for its pretrained tags")
        return _timm_frame_spec(cfg.to_dict(), None)
    import torchvision

    tag = weights if path is None and weights.lower() != "none" else "imagenet"
    w = _torchvision_weights(name, tag) if tag != "imagenet" else torchvision.models.get_model_weights(name).DEFAULT
    foreign = path is not None and (ours is None or "raw" in ours)  # not written by this tool
    if foreign and (published := _published_weights_of(name, path)) is not None:
        return _torchvision_frame_spec(published)  # a file torchvision publishes: that tag's own transform
    if path is not None and name.startswith("vit_"):  # a ViT file fixes its input size: the tag made for it
        size = _vit_image_size(path, name)
        made_for = next((x for x in torchvision.models.get_model_weights(name) if _torchvision_frame_spec(x).size == size),
                        None)
        if made_for is None and size:  # weights of its own: the default transform at their size
            return _torchvision_frame_spec(w).override(FrameOverrides(size=size))
        w = made_for or w
    if foreign:
        _say_default_transform(name, path, w)
    return _torchvision_frame_spec(w)


def _published_weights_of(name: str, path: Path):
    """The torchvision weights of ``name`` whose published file ``path`` is, told by the start of
    the sha256 that torchvision's file name carries (``mobilenet_v2-b0353104.pth``); None for any
    other file."""
    import torchvision

    prefixes = [(w, published_sha256_prefix(name, w.name)) for w in torchvision.models.get_model_weights(name)]
    if not any(p for _, p in prefixes):
        return None
    got = _weights_sha256(path)
    return next((w for w, p in prefixes if p and got.startswith(p)), None)


def _weights_sha256(path: Path) -> str:
    """``sha256_file(path)``, computed once per file and change: building a torchvision backbone
    from a file reads its hash twice (which published weights it is, and its identity)."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


@functools.lru_cache(maxsize=16)
def _say_default_transform(name: str, path: Path, w) -> None:
    """Once per file: a weights file torchvision does not publish gets the preprocessing of the
    weights ``w`` (the default ones); say so where ``name``'s weights differ in it."""
    import torchvision

    if len({_torchvision_frame_spec(x) for x in torchvision.models.get_model_weights(name)}) > 1:
        spec = _torchvision_frame_spec(w)
        log.warning("%s is not a weights file torchvision publishes for %s: its frames are prepared as for the %s "
                    "weights (%s); if it was trained otherwise, set --size, --resize-size and --interpolation",
                    path, name, w.name, f"{spec.describe()}, {spec.interpolation}")


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str = "none", *,
                    input_size: int | None = None) -> Backbone:
    """The backbone ``name`` with ``weights`` (see the module docstring), in eval mode.

    ``input_size``: the square input the model will see; timm models with a fixed input size
    (ViTs) are built for it (timm resamples their position embeddings)."""
    check_name(name)
    if is_timm(name):
        return _create_timm(name[len(TIMM):], weights, input_size)
    return _create_torchvision(name, weights, input_size)


def _path_of(weights: str) -> Path | None:
    """``weights`` as a file path, None for ``none``/``imagenet``/a tag; one line if it looks like a
    path and is not a file."""
    if weights.lower() in ("none", "imagenet", "default"):
        return None
    p = Path(weights)
    if p.is_dir():
        raise WeightsError(f"--weights {p} is a folder; give the weights file")
    if p.is_file():
        return p
    if "/" in weights or "\\" in weights or p.suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt"):
        raise WeightsError(f"weights file not found: {weights!r}; use --weights none, imagenet, a weight tag, "
                           "or an existing file")
    return None  # a tag


def _recorded_spec(ours: dict[str, Any] | None) -> dict[str, Any] | None:
    """The FrameSpec (as a dict) a file of this tool records: an end-to-end checkpoint's or a
    recalibrated backbone's."""
    return ((ours or {}).get("cache") or {}).get("frame_spec") or ((ours or {}).get("meta") or {}).get("frame_spec")


def _our_file(path: Path, *, metadata_only: bool = False) -> dict[str, Any] | None:
    """The backbone state of a file this tool wrote (a recalibrated backbone or an end-to-end
    checkpoint), checked against ``name`` by the caller; None for other files. ``metadata_only``:
    the tensors are mapped from the file, not read; for a caller that drops them."""
    if path.suffix in (".safetensors", ".npz"):
        return None
    obj = safe_load(path, WeightsError, "weights file", mmap=metadata_only)
    if isinstance(obj, dict) and "backbone_state" in obj:
        return obj
    if isinstance(obj, dict) and "model_state" in obj and "schema_version" in obj:
        raise WeightsError(f"{path} is a temporal-model checkpoint without backbone weights; pass the weights the "
                           "cache was extracted with, or an end-to-end checkpoint")
    return {"raw": obj}


def _recorded_backbone(obj: dict[str, Any]) -> str | None:
    if "backbone" in obj and isinstance(obj["backbone"], str):
        return obj["backbone"]
    cache = obj.get("cache")
    if isinstance(cache, dict):
        return cache.get("backbone") or "mobilenet_v2"  # schema-1 end-to-end checkpoints
    return "mobilenet_v2" if "backbone_state" in obj else None


def backbone_of_file(weights: str) -> str | None:
    """The backbone a weights file this tool wrote records (an end-to-end checkpoint, a saved
    recalibrated backbone), so that ``--weights FILE`` needs no ``--backbone``; None for anything
    else (a tag, another file, one that cannot be read: loading it reports that)."""
    try:
        path = _path_of(weights)
        obj = _our_file(path, metadata_only=True) if path is not None else None
    except (PipelineError, OSError):
        return None
    return _recorded_backbone(obj) if obj is not None and "raw" not in obj else None


def _check_same_backbone(path: Path, obj: dict[str, Any], name: str) -> None:
    rec = _recorded_backbone(obj)
    if rec is not None and rec != name:
        raise WeightsError(f"{path} holds {rec} weights, not {name}; pass --backbone {rec} (or other weights)")


# ------------------------------------------------------------------------------ torchvision


def _torchvision_weights(name: str, tag: str):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if tag.lower() in ("imagenet", "default"):
        return enum.DEFAULT
    try:
        return enum[tag.upper().split(".")[-1]]
    except KeyError:
        raise WeightsError(f"unknown weights {tag!r} for {name}: use none, imagenet, "
                           f"{', '.join(w.name for w in enum)} or a path to a state dict / checkpoint") from None


def published_sha256_prefix(name: str, tag: str | None) -> str | None:
    """The start of the sha256 that torchvision's file of ``name``'s weights ``tag`` has: the hash
    in its file name (``resnet18-f37072fd.pth``), which torch.hub checks on download too."""
    import re

    try:
        url = _torchvision_weights(name, tag or "imagenet").url
    except (WeightsError, ValueError, KeyError):
        return None
    m = re.search(r"-([0-9a-f]{6,})\.[a-z]+$", url)
    return m.group(1) if m else None


_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")  # GoogLeNet's and Inception-v3's auxiliary classifiers


def _build_torchvision(name: str, w, *, shapes_only: bool = False, image_size: int | None = None) -> nn.Module:
    """The torchvision model; ``shapes_only``: parameters left uninitialised (on the meta device
    where the model allows it), for weights that a state dict will then give. ``image_size``: the
    input size a ViT without named weights is built for (named weights fix their own)."""
    import torchvision

    if shapes_only:
        try:
            with torch.device("meta"), _SkipInit():
                return _build_torchvision(name, w, image_size=image_size)
        except Exception:  # noqa: BLE001 - RegNet computes its widths from tensor values
            with _SkipInit():
                return _build_torchvision(name, w, image_size=image_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # googlenet/inception init notes
        kwargs: dict[str, Any] = {}
        if name in RENORMALISED:  # the input step goes into the FrameSpec (``_torchvision_frame_spec``)
            kwargs = {"transform_input": False} if w is not None else \
                {"aux_logits": False, "init_weights": True, "transform_input": False}
        if image_size and w is None and name.startswith("vit_"):
            kwargs["image_size"] = image_size
        model = torchvision.models.get_model(name, weights=w, **kwargs)
    if getattr(model, "aux_logits", False):  # the auxiliary classifiers only matter for ImageNet training
        model.aux_logits = False
        for attr in (p.rstrip(".") for p in _AUX_PREFIXES):
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model


def _remove_classifier(model: nn.Module, name: str) -> tuple[int, str]:
    """Replace the final Linear by Identity; → (its in_features, its state-dict prefix)."""
    if name.startswith("squeezenet"):  # a 1x1 conv classifier, then global average pooling
        conv = model.classifier[1]
        model.classifier = nn.AdaptiveAvgPool2d(1)  # its forward flattens: (B, 512) pooled features
        return conv.in_channels, "classifier."
    linears = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{name} has no linear classifier to remove, so it has no pooled feature vector; "
                          "choose another backbone")
    path, lin = linears[-1]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Identity())
    return lin.in_features, path + "."


def _torchvision_frame_spec(w) -> FrameSpec:
    """The eval transform of weights ``w``. GoogLeNet's and Inception-v3's (``RENORMALISED``) map
    their ImageNet-normalised input to (x - 0.5) / 0.5 inside the model (``transform_input``); this
    tool builds them without that step and normalises so in the FrameSpec instead, the same numbers
    whichever way the weights come (tag, file, checkpoint)."""
    t = w.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, list | tuple) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, list | tuple) else t.resize_size
    interp = getattr(t.interpolation, "value", str(t.interpolation)).lower()
    mean, std = (tuple(t.mean), tuple(t.std)) if not _renormalised(w) else ((0.5,) * 3, (0.5,) * 3)
    return FrameSpec(size=int(crop), resize_size=int(resize), interpolation=interp if interp in
                     ("bilinear", "bicubic", "nearest") else "bilinear", mean=mean, std=std)


RENORMALISED = ("googlenet", "inception_v3")  # torchvision sets transform_input=True with their weights


def cached_renormalised(name: str, mean: Sequence[float]) -> bool:
    """Features of GoogLeNet/Inception-v3 made the old way: with ImageNet's mean and std in the
    FrameSpec and the model's own ``transform_input`` (now: mean = std = 0.5 and no such step). A
    backbone rebuilt for them must re-normalise inside the model again."""
    return name in RENORMALISED and tuple(mean) == IMAGENET_MEAN


def _renormalised(w) -> bool:
    import torchvision

    return any(type(w) is torchvision.models.get_model_weights(n) for n in RENORMALISED)


def _vit_image_size(path: Path, name: str) -> int | None:
    """The input size the ViT weights in ``path`` were trained at, from their position embedding
    (patches + 1 class token): torchvision's SWAG weights are 384 or 518, not 224."""
    import math

    obj = _our_file(path, metadata_only=True) or {}
    state = obj.get("backbone_state", obj.get("raw"))
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    pos = next((v for k, v in (state or {}).items() if k.removeprefix("module.") == "encoder.pos_embedding"), None) \
        if isinstance(state, dict) else None
    patch = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else None
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or patch is None:
        return None
    side = math.isqrt(pos.shape[1] - 1)
    return side * patch if side * side == pos.shape[1] - 1 else None


def _create_torchvision(name: str, weights: str, input_size: int | None = None) -> Backbone:
    path = _path_of(weights)
    w = None if path is not None or weights.lower() == "none" else _torchvision_weights(name, weights)
    import torchvision

    vit = name.startswith("vit_")
    spec = default_frame_spec(name, weights) if path is not None else \
        _torchvision_frame_spec(w or torchvision.models.get_model_weights(name).DEFAULT)
    # a ViT is built for one input size: a file's own (its FrameSpec's, from its position
    # embedding), else the one asked for (random weights); named weights fix theirs
    size = (input_size if path is None and input_size else spec.size) if vit else None
    if vit and size % (patch := int(name.rsplit("_", 1)[1])):  # torchvision's own check is a bare assert
        raise ConfigError(_unread_message(name, size, patch, patch))
    try:
        model = _build_torchvision(name, w, shapes_only=path is not None, image_size=size)  # a file gives every value
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
        file = w.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"could not download the {name} weights {w.name} ({str(e).splitlines()[0][:120]}): offline? fetch "
            f"{w.url} on a machine with network and pass --weights PATH/TO/{file}") from e
    dim, head_prefix = _remove_classifier(model, name)
    if w is not None:
        ident = WeightsIdentity(source="torchvision", name=w.name)
    elif path is not None:
        model = _load_torchvision_file(model, name, path, head_prefix)
        ident = WeightsIdentity(source="file", sha256=_weights_sha256(path), path=str(path.resolve()))
    else:
        ident = WeightsIdentity(source="random")
    bad = next((k for k, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # vgg16's IMAGENET1K_FEATURES: torchvision's file has no classifier values
        others = [x.name for x in torchvision.models.get_model_weights(name) if w is None or x != w]
        what = f"the {name} weights {w.name} hold" if w is not None else f"{path} holds"
        raise WeightsError(f"{what} NaN/Inf in {bad}, which the features go through"
                           + (f"; use other weights ({', '.join(others)})" if others else ""))
    return Backbone(name=name, net=model.eval(), num_features=dim, frame_spec=spec, weights=ident,
                    block_params=_torchvision_blocks(model, name))


def _safetensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a ``.safetensors`` file (timm's install brings the package); None for any
    other file."""
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{path} is a safetensors file: pip install safetensors to read it") from None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def _load_torchvision_file(model: nn.Module, name: str, path: Path, head_prefix: str) -> nn.Module:
    obj = _our_file(path)
    if obj is not None and "backbone_state" in obj:
        _check_same_backbone(path, obj, name)
        state = obj["backbone_state"]
    else:
        state = obj["raw"] if obj is not None else _safetensors(path)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    # Module versions travel in the state dict's ``_metadata`` (MNASNet refuses to load without
    # its version): the model's own, overlaid with the file's where it has them.
    own = model.state_dict()
    metadata = dict(getattr(own, "_metadata", None) or {})
    metadata.update({k.removeprefix("module."): v for k, v in (getattr(state, "_metadata", None) or {}).items()})
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # the final classifier, and the auxiliary ImageNet-training heads torchvision's GoogLeNet and
    # Inception-v3 files hold (this tool builds them without)
    state = {k: v for k, v in state.items() if not k.startswith((head_prefix, *_AUX_PREFIXES))}
    if name == "mobilenet_v2" and not any(k in own for k in state):  # a features-only dict, no prefix
        state = {f"features.{k}": v for k, v in state.items()}
    # assign keeps the file's tensors as they are: a half-precision file would make a half model
    state = collections.OrderedDict(
        (k, v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point() else v)
        for k, v in state.items())
    state._metadata = metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: the model may be on meta
    except (RuntimeError, ValueError) as e:  # ValueError: a module's own check (MNASNet's version)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise WeightsError(f"{path} is not a {name} state dict ({detail[:160]}...)") from e
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the state dict does not hold (a non-persistent buffer): build it for real
        real = _build_torchvision(name, None, image_size=getattr(model, "image_size", None))
        _remove_classifier(real, name)
        real.load_state_dict(model.state_dict(), strict=True)
        model = real
    recorded = _recorded_spec(obj)
    if recorded and cached_renormalised(name, recorded["mean"]):
        model.transform_input = True  # fine-tuned from features cached the old way: the model re-normalises
    return model


def _torchvision_blocks(model: nn.Module, name: str) -> list[list[str]]:
    """Ordered groups of parameter names, input side first."""
    params = [n for n, _ in model.named_parameters()]

    def under(*prefixes: str) -> list[str]:
        return [p for p in params if any(p == x or p.startswith(x + ".") for x in prefixes)]

    def children(path: str) -> list[str]:
        return [f"{path}.{c}" for c, m in model.get_submodule(path).named_children() if any(True for _ in m.parameters())]

    def stages(path: str) -> list[list[str]]:
        """The parameterised children of ``path`` in order, a bare norm layer joined to the layer it
        follows (MNASNet and DenseNet list BatchNorm beside its conv)."""
        out: list[list[str]] = []
        for c, m in model.get_submodule(path).named_children():
            ps = under(f"{path}.{c}")
            if ps and out and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                out[-1] += ps
            elif ps:
                out.append(ps)
        return out

    if name.startswith(("mobilenet", "efficientnet", "convnext")):
        groups = [under(c) for c in children("features")]
    elif name.startswith(("mnasnet", "densenet", "swin", "squeezenet")):  # swin: patch embedding, stages, merging
        groups = stages("layers" if name.startswith("mnasnet") else "features")
    elif name.startswith(("vgg", "alexnet")):  # each conv, then fc6 and fc7 (fc8 is the classifier removed)
        groups = stages("features") + stages("classifier")
    elif name.startswith("maxvit"):
        groups = [under("stem")] + [under(c) for c in children("blocks")] + [under("classifier")]
    elif name.startswith(("resnet", "resnext", "wide_resnet")):
        groups = [under("conv1", "bn1")] + [under(f"layer{i}") for i in range(1, 5)]
    elif name.startswith("regnet"):
        groups = [under("stem")] + [under(c) for c in children("trunk_output")]
    elif name.startswith("vit_"):
        groups = [under("conv_proj", "class_token", "encoder.pos_embedding")] + [
            under(c) for c in children("encoder.layers")]
    else:  # generic: top-level children in registration order
        groups = [under(c) for c, m in model.named_children() if any(True for _ in m.parameters())]
    groups = [g for g in groups if g]
    rest = [p for p in params if not any(p in g for g in groups)]
    if rest:  # what follows the last block (a post-pool norm or projection) or loose parameters
        first = [p for p in rest if p in ("class_token", "cls_token", "pos_embed")]
        if first:
            groups[0] = first + groups[0]
        groups[-1] = groups[-1] + [p for p in rest if p not in first]
    return groups


# ------------------------------------------------------------------------------------- timm


def _timm_frame_spec(cfg: dict[str, Any], input_size: int | None) -> FrameSpec:
    import math

    size = int(input_size or cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    mode = cfg.get("crop_mode") if cfg.get("crop_mode") in ("squash", "border") else "crop"
    interp = cfg.get("interpolation", "bicubic")
    return FrameSpec(size=size, resize=mode, resize_size=max(size, math.floor(size / crop_pct)),
                     interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",
                     mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


def _create_timm(arch: str, weights: str, input_size: int | None) -> Backbone:
    timm = _timm()
    path = _path_of(weights)
    kw: dict[str, Any] = {"num_classes": 0}
    base_cfg = _timm_cfg(arch)
    base_cfg = base_cfg.to_dict() if base_cfg is not None else {}
    if input_size and base_cfg.get("fixed_input_size") and input_size != base_cfg.get("input_size", (0, 0, 0))[-1]:
        kw["img_size"] = input_size
    name = f"{TIMM}{arch}"
    ours = _our_file(path) if path is not None else None
    if weights.lower() == "none" or (ours is not None and "backbone_state" in ours):
        model = timm.create_model(arch, pretrained=False, **kw)
        ident = WeightsIdentity(source="random")
        if ours is not None:
            _check_same_backbone(path, ours, name)
            try:
                model.load_state_dict(ours["backbone_state"], strict=True)
            except RuntimeError as e:
                made = (FrameSpec.from_dict(_recorded_spec(ours)).size if _recorded_spec(ours) else None)
                if made and input_size and made != input_size and "size mismatch" in str(e):
                    raise ConfigError(f"{path} holds {name} made for {made}x{made} frames, which fixes its input "
                                      f"size; use --size {made}") from None
                raise WeightsError(f"{path} is not a {name} state dict ({_load_error(e)})") from e
            ident = WeightsIdentity(source="file", sha256=sha256_file(path), path=str(path.resolve()))
    elif path is not None:
        try:
            with _timm_load_report() as said:
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw)
        except Exception as e:  # noqa: BLE001 - timm's loaders raise many types for a foreign file
            own = base_cfg.get("input_size", (0, 0, 0))[-1]
            if "img_size" in kw and "size mismatch" in str(e):  # built for the size asked, which the file's shapes fix
                raise ConfigError(f"cannot load {path} into {name} built for {input_size}x{input_size} frames "
                                  f"({_load_error(e)}); use --size {own}, the size it was made for") from None
            raise WeightsError(f"cannot load {path} into {name} ({type(e).__name__}: {_load_error(e)}); pass that "
                               "model's own weights file") from e
        _check_timm_file_fits(model, said, path, name)
        ident = WeightsIdentity(source="file", sha256=sha256_file(path), path=str(path.resolve()))
    else:
        full = arch if weights.lower() in ("imagenet", "default") else f"{arch.split('.')[0]}.{weights}"
        cfg = _timm_cfg(full)
        if cfg is None:
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch.split('.')[0]}.*")]
            raise WeightsError(f"unknown weights {weights!r} for {name}: use none, imagenet, "
                               f"{', '.join(tags) or '(no pretrained tags)'} or a path to a weights file")
        where = (f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)" if getattr(cfg, "hf_hub_id", None)
                 else getattr(cfg, "url", None) or "the weights file")
        hint = f"offline? fetch {where} on a machine with network and pass --weights PATH/TO/FILE"
        if not _hub_cached(cfg) and not _hub_reachable():  # fail at once, not after the hub client's retries
            raise WeightsError(f"could not download the timm weights {full} (no connection to the Hugging Face "
                               f"hub): {hint}")
        try:
            model = timm.create_model(full, pretrained=True, **kw)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types (offline, auth, missing)
            raise WeightsError(f"could not download the timm weights {full} ({type(e).__name__}): {hint}") from e
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        file = _timm_weights_file(pcfg)  # its hash lets a later --weights PATH be checked
        ident = WeightsIdentity(source="timm", name=pcfg.get("tag") or full.split(".", 1)[1],
                                sha256=sha256_file(file) if file is not None else None)
    cfg = dict(getattr(model, "pretrained_cfg", None) or base_cfg)
    spec = _timm_frame_spec(cfg, input_size if "img_size" in kw else None)
    return Backbone(name=name, net=model.eval(), num_features=_timm_dim(model), frame_spec=spec,
                    weights=ident, block_params=_timm_blocks(model))


def _load_error(e: BaseException) -> str:
    """What a failed ``load_state_dict`` says, in one line: its first line names only the model
    ("Error(s) in loading state_dict for ResNet:"), the lines after it what is wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))), None)
    text = detail or (lines[0] if lines else type(e).__name__)
    return text if len(text) <= 200 else text[:197] + "..."


class _TimmLoadReport(logging.Handler):
    """Collects the keys timm's loader reports missing or unexpected (it logs them, no more)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.keys: dict[str, list[str]] = {"missing": [], "unexpected": []}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for kind, head in (("missing", "Missing keys ("), ("unexpected", "Unexpected keys (")):
            if msg.startswith(head) and ") " in msg:
                self.keys[kind] = [k for k in msg[len(head):msg.rindex(") ")].split(", ") if k]


@contextlib.contextmanager
def _timm_load_report() -> Iterator[dict[str, list[str]]]:
    """What timm says of the weights file it loads: it drops the classifier (``num_classes=0``) and
    then loads non-strictly, so a file of any other model, or an empty one, loads without an error
    and leaves the network at its random init. Its own log lines are held back here."""
    lg = logging.getLogger("timm.models._builder")
    report, state = _TimmLoadReport(), (lg.level, lg.propagate)
    lg.addHandler(report)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        yield report.keys
    finally:
        lg.removeHandler(report)
        lg.setLevel(state[0])
        lg.propagate = state[1]


def _check_timm_file_fits(model: nn.Module, said: dict[str, list[str]], path: Path, name: str) -> None:
    """Refuse a weights file that left parameters (or BatchNorm statistics) of ``model`` at their
    random init, or held tensors the model has no place for (another architecture's)."""
    needed = set(dict(model.named_parameters())) | {
        k for k in model.state_dict() if k.endswith((".running_mean", ".running_var"))}
    missing = [k for k in said["missing"] if k in needed]
    parts = ([f"{len(missing)} of the model's tensors are not in it ({', '.join(missing[:3])}"
              f"{', ...' if len(missing) > 3 else ''})"] if missing else [])
    # the rest of a classifier timm removes whole (LeViT's head is a BatchNorm and a linear layer,
    # timm drops only the linear's keys): keys under a classifier's module the model no longer has
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    gone = {c.rsplit(".", 1)[0] for c in ((cls,) if isinstance(cls, str) else cls) if "." in c}
    owned = {k.rsplit(".", 1)[0] for k in model.state_dict()}
    gone = {g for g in gone if not any(o == g or o.startswith(g + ".") for o in owned)}
    extra = [k for k in said["unexpected"] if not any(k.startswith(g + ".") for g in gone)]
    if extra:
        parts.append(f"it holds {len(extra)} the model has no place for ({', '.join(extra[:3])}"
                     f"{', ...' if len(extra) > 3 else ''})")
    if parts:
        raise WeightsError(f"{path} does not fit {name}: {'; '.join(parts)}; pass that model's own weights file")


def _timm_cfg(full: str) -> Any:
    """timm's pretrained config of ``arch[.tag]``, or None for a tag it does not know."""
    try:
        return _timm().models.get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag"
        return None


def _hub_weights_file(cfg: dict[str, Any]) -> Path | None:
    """The file of a timm pretrained config's weights in the local Hugging Face cache, as timm
    picks it (``timm.models._hub.load_state_dict_from_hf``: the safetensors form first); None if
    none is there or the config has no hub id. ImportError without huggingface_hub."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    f = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors",
            "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(f, f.removesuffix(".bin") + ".safetensors")
    repo_id, _, revision = repo.partition("@")
    for name in (f,) if f.endswith(".safetensors") else (safe, f):
        hit = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _timm_weights_file(cfg: dict[str, Any]) -> Path | None:
    """The local file timm just loaded a model's pretrained weights from: the Hugging Face cache's,
    else torch.hub's download of its URL; None if neither is found (a custom cache folder)."""
    import os

    try:
        hit = _hub_weights_file(cfg)
    except ImportError:
        hit = None
    if hit is not None:
        return hit
    url = cfg.get("url")
    if url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if p.is_file():
            return p
    return None


def _hub_cached(cfg: Any) -> bool:
    """Whether the weights of a timm pretrained config are already in the local Hugging Face cache."""
    try:
        return _hub_weights_file(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)) is not None
    except Exception:  # noqa: BLE001 - an old hub client: let the download itself decide
        return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub (``HF_ENDPOINT`` if set) within ``timeout``: offline, the hub
    client retries for about a minute before it gives up."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_blocks(model: nn.Module) -> list[list[str]]:
    params = [n for n, _ in model.named_parameters()]
    try:
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=False))
        groups = [list(v) for _, v in sorted(grouped.items())]
    except Exception:  # noqa: BLE001 - models without group_matcher: top-level children
        groups = [[p for p in params if p.split(".")[0] == c] for c, _ in model.named_children()]
    groups = [g for g in groups if g]
    rest = [p for p in params if not any(p in g for g in groups)]
    if rest:  # loose parameters: the input side's tokens and embeddings first (PiT's), the others last
        first = [p for p in rest if p in _INPUT_SIDE]
        if first:
            groups[0] = first + [p for p in groups[0] if p not in first]
        groups[-1] = groups[-1] + [p for p in rest if p not in first]
    return groups


_INPUT_SIDE = frozenset({"class_token", "cls_token", "dist_token", "reg_token", "pos_embed", "pos_embedding"})


def _merge_interleaved(net: nn.Module, groups: list[list[str]], size: int) -> list[list[str]]:
    """``groups`` such that the last n of them are a suffix of the network as it runs: groups whose
    modules interleave in one forward pass are merged. timm's matchers overlap some on purpose, for
    layer-wise learning-rate decay: CaiT puts its class-attention blocks with its last
    self-attention blocks, so training "the last block" left the class-attention block that runs
    after it frozen, and the backward pass went through it. The order is taken from a forward of
    one blank frame (``size``, else the size a ViT's patch embedding was built for); where that
    fails, the groups are kept as they are. Root parameters (tokens, embeddings) were placed by
    name and are left where they are."""
    patch = getattr(getattr(net, "patch_embed", None), "img_size", None)
    probe = next((p for s in dict.fromkeys([size, patch]) if s and (p := _probe(net, s)) is not None), None)
    if probe is None:
        return groups
    order = {name: probe.order[id(m)] for name, m in net.named_modules() if name and id(m) in probe.order}
    if not order:
        return groups
    spans = []
    for g in groups:
        idx = [order[m] for m in (q.rsplit(".", 1)[0] for q in g if "." in q) if m in order]
        spans.append([min(idx), max(idx), list(g)] if idx else None)
    if any(sp is None for sp in spans[1:]):  # a group that never ran: no order to go by
        return groups
    merged = [[-1, -1, groups[0]]] if spans[0] is None else [spans[0]]
    for lo, hi, g in sorted(spans[1:], key=lambda sp: sp[0]):
        if lo < merged[-1][1] and len(merged) > 1:  # starts before the group that ran earlier ends
            merged[-1][1], merged[-1][2] = max(hi, merged[-1][1]), merged[-1][2] + g
        else:
            merged.append([lo, hi, g])
    return [g for _, _, g in merged]


# ---------------------------------------------------------------------------------- listing


_RANDOM_FILLS = frozenset({"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_",
                           "cauchy_", "log_normal_"})


class _SkipInit(TorchFunctionMode):
    """Parameter initialisation skipped, in this thread only: for a model whose values a state dict
    gives next, or a listing that needs shapes. ``torch.nn.init``'s functions and the in-place
    random fills return their tensor untouched. Building MobileNetV3-Large shapes-only took 27 ms
    here with it (meta device), 67 ms without (meta runs every initialiser through Python
    references) and 72 ms for real on the CPU. A mode, not a patch of ``torch.nn.init``: another
    thread building a model at the same time still initialises it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        init = getattr(func, "__module__", None) == "torch.nn.init"
        if init or getattr(func, "__name__", None) in _RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def describe_torchvision(name: str) -> dict[str, Any]:
    """Feature dimension, default FrameSpec and weight tags of a torchvision model, without
    building it for real (shapes only)."""
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build_torchvision(name, None, shapes_only=True)
    try:
        dim, _ = _remove_classifier(model, name)
    except ConfigError:
        dim = None
    enum = torchvision.models.get_model_weights(name)
    return {"name": name, "num_features": dim, "frame_spec": _torchvision_frame_spec(enum.DEFAULT),
            "weights": [w.name for w in enum], "default": enum.DEFAULT.name}


def _timm_dim(model: nn.Module) -> int:
    """The size of the features a timm model without its classifier gives: ``head_hidden_size``
    where the model has one, which differs from ``num_features`` (the channels before pooling)
    where a layer follows the pooling (MobileNetV3/V4, GhostNet, HGNetV2: 1024 against 288)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def describe_timm(pattern: str) -> list[dict[str, Any]]:
    timm = _timm()
    out = []
    for full in timm.list_pretrained(pattern):
        arch = full.split(".")[0]
        cfg = timm.models.get_pretrained_cfg(full).to_dict()
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                dim = _timm_dim(timm.create_model(arch, pretrained=False, num_classes=0))
        except Exception:  # noqa: BLE001
            dim = None
        out.append({"name": f"{TIMM}{full}", "num_features": dim, "frame_spec": _timm_frame_spec(cfg, None),
                    "weights": [full.split(".", 1)[1]] if "." in full else [], "default": None})
    return out


# ------------------------------------------------------------------------ frozen inference


def _graph(model: nn.Module) -> Any:
    """The torch.fx graph of ``model``'s forward (module calls by qualified name), or None where fx
    cannot trace it (data-dependent control flow). Tracing only: no GraphModule is built."""
    try:
        import torch.fx

        return torch.fx.Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        log.debug("fx could not trace %s (%s)", type(model).__name__, e)
        return None


def _plain(m: nn.Module, base: type[nn.Module]) -> bool:
    """``m`` is a ``base`` that computes what ``base`` computes: a subclass with its own forward
    (timm's ``Conv2dSame`` pads inside it, ``StdConv2d`` standardises its weights there,
    ``BatchNormAct2d`` adds an activation) must not be folded as if it were the plain module."""
    return isinstance(m, base) and all(getattr(type(m), f, None) is getattr(base, f, None)
                                       for f in ("forward", "_conv_forward"))


def _foldable_bn(m: nn.Module) -> bool:
    """A plain BatchNorm2d with running statistics. One without (``track_running_stats=False``)
    normalises each batch by its own statistics, in eval too: nothing fixed to fold."""
    return _plain(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, *, copy: bool = True, graph: Any = None, size: int = 64) -> nn.Module:
    """``model`` for frozen inference with every Conv2d → BatchNorm2d pair folded into one conv
    (w' = w·γ/σ, b' = (b − μ)·γ/σ + β); same function up to float rounding. The pairs come from the
    torch.fx graph (ResNet's ``conv1``/``bn1`` attributes as well as MobileNet's Sequentials): a
    BatchNorm whose input is a conv's output that nothing else reads. A model fx cannot trace falls
    back to adjacent pairs inside Sequentials whose two modules each run once in a forward pass of
    a blank ``size`` frame (a module used twice would be changed for its other use too). On CPU
    the BatchNorm passes were about a third of MobileNetV2's inference time (measured here). The
    model keeps its own forward (no GraphModule: building one cost 0.2 s per model).
    ``copy=False`` folds ``model``'s own modules: the caller hands it over and must not use it on
    its own afterwards."""
    import copy as copy_

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = (copy_.deepcopy(model) if copy else model).eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()):
        return fused
    graph = _graph(fused) if graph is None else graph
    if graph is not None:
        calls: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        modules = dict(fused.named_modules())
        for n in graph.nodes:
            bn = modules.get(n.target) if n.op == "call_module" else None
            if not _foldable_bn(bn) or calls[n.target] != 1 or not n.args:
                continue
            src = n.args[0]
            conv = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
            if _plain(conv, nn.Conv2d) and calls[src.target] == 1 and len(src.users) == 1:
                _set_module(fused, src.target, fuse_conv_bn_eval(conv, bn))
                _set_module(fused, n.target, nn.Identity())
        return fused
    probe = _probe(fused, size)
    if probe is None:  # it does not run on such a frame: nothing known of its calls, nothing folded
        return fused
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (_plain(conv, nn.Conv2d) and _foldable_bn(bn)
                    and probe.calls.get(id(conv)) == 1 and probe.calls.get(id(bn)) == 1):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return fused


def _first_conv(net: nn.Module, size: int, graph: Any = None) -> tuple[str, nn.Conv2d] | None:
    """(qualified name, module) of the Conv2d that reads the network input itself, or None. From
    the fx graph where there is one; otherwise found by running one small input."""
    if graph is not None:
        import operator

        def shape_only(n: Any) -> bool:  # reading the input's shape (ViT's size checks) is not using it
            return (n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "ndim", "dtype")
                    or n.op == "call_method" and n.target in ("size", "dim")
                    or n.op == "call_function" and n.target is operator.getitem and shape_only(n.args[0]))

        image = next(n for n in graph.nodes if n.op == "placeholder")  # later ones: optional arguments
        users = [u for u in image.users if not shape_only(u)]
        if len(users) == 1 and users[0].op == "call_module":
            calls = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == users[0].target)
            m = net.get_submodule(users[0].target)
            return (users[0].target, m) if _plain(m, nn.Conv2d) and calls == 1 else None  # its weights change
        return None
    probe = _probe(net, size)
    first = probe.first if probe is not None and probe.input_uses == 1 else None  # nothing else reads the input
    if first is None or not _plain(first, nn.Conv2d) or probe.calls.get(id(first)) != 1:
        return None
    return next(name for name, m in net.named_modules() if m is first), first


@dataclass
class _Probe:
    calls: dict[int, int]  # id(module) → how often it ran
    order: dict[int, int]  # id(module) → the place of its first run among all modules' first runs
    input_uses: int  # operations that read the input tensor itself (its shape aside)
    first: nn.Module | None  # the Conv2d that got the input tensor itself, first


class _InputUses(TorchFunctionMode):
    """Counts the operations that take ``x`` itself as an argument; reading its shape, size,
    dtype or device does not count."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.uses = x, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) not in ("__get__", "size", "dim") and any(
                a is self.x for a in (*args, *(kwargs or {}).values())):
            self.uses += 1
        return func(*args, **(kwargs or {}))


def _probe(net: nn.Module, size: int | Sequence[int]) -> _Probe | None:
    """One forward of a blank ``size`` frame (an int, or (H, W)), in eval mode whatever the
    network's mode (which is kept): what an fx graph would tell of its module calls, their order
    and its input's uses, for a network fx cannot trace. None where it does not run on such a frame."""
    calls: dict[int, int] = {}
    order: dict[int, int] = {}
    found: list[nn.Module] = []
    p = next(net.parameters(), None)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.zeros(1, 3, *hw, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)

    def hook(m: nn.Module, args: tuple) -> None:  # returns None: the input goes on unchanged
        calls[id(m)] = calls.get(id(m), 0) + 1
        order.setdefault(id(m), len(order))
        if not found and isinstance(m, nn.Conv2d) and args and args[0] is x:
            found.append(m)

    handles = [m.register_forward_pre_hook(hook) for m in net.modules()]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()  # in training mode the blank frame would move BatchNorm's running statistics
    uses = _InputUses(x)
    try:
        with torch.no_grad(), uses:
            net(x)
    except Exception:  # noqa: BLE001 - not a network that takes such a frame
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return _Probe(calls, order, uses.uses, found[0] if found else None)


def _padded_reach(size: int, kernel: int, stride: int, pad: int, dilation: int) -> tuple[int, int]:
    """How many output positions at the start and at the end of one axis read zero padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    start = sum(1 for i in range(out) if i * stride - pad < 0)
    end = sum(1 for i in range(out) if i * stride - pad + dilation * (kernel - 1) > size - 1)
    return min(start, out), min(end, out - min(start, out))


class _CentredConv(nn.Module):
    """The conv that reads the network input, taking raw pixel values (0-255 as floats) instead of
    centred ones. Centring, ``x − c`` with ``c = 255·mean``, is linear: ``W * pad0(x − c)`` equals
    ``W * pad0(x) − R`` with ``R = W * pad0(c)`` the response to a constant image. ``R`` is one
    number per output channel away from the border, folded into the bias; within reach of the
    zero padding it differs, and that difference (``border``, zero elsewhere) is added back to the
    output's edge rows and columns. Exact for inputs of ``size``×``size``, one pass over the input
    less than centring it.

    Not under autocast: there the conv rounds to 16 bits the large response to the raw pixels
    (mean ~116) before the bias takes ``R`` back off, and the features lost 2-4 times more
    precision than the unfolded network's (measured on the CPU in bf16: relative error 0.39 vs
    0.18 for MobileNetV2, 0.049 vs 0.016 for ResNet-18). So under autocast the input is centred
    first, in float32, and the conv runs with its own bias: what the network does unfolded."""

    def __init__(self, conv: nn.Conv2d, offset: torch.Tensor, size: int) -> None:
        super().__init__()
        self.conv, self.size = conv, size
        with torch.no_grad():
            w = conv.weight.double()
            c = offset.double().view(1, 3, 1, 1).expand(1, 3, size, size)
            r = F.conv2d(c, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)  # (1, Co, H', W')
            interior = (w * offset.double().view(1, 3, 1, 1)).sum((1, 2, 3))  # (Co,)
            own = conv.bias.detach().clone() if conv.bias is not None else None
            bias = (conv.bias.double() if conv.bias is not None else torch.zeros_like(interior)) - interior
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            border = interior.view(1, -1, 1, 1) - r  # zero away from the border
        # The output rows and columns whose receptive field reaches into the padding (geometry only).
        (self.top, self.bottom), (self.left, self.right) = (
            _padded_reach(size, k, st, p, dl) for k, st, p, dl in
            zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        self.register_buffer("border", border.to(conv.weight.dtype), persistent=False)
        # For autocast (see the class docstring): the centring and the conv's own bias.
        self.register_buffer("offset", offset.view(1, 3, 1, 1).to(conv.weight.dtype), persistent=False)
        self.register_buffer("own_bias", own, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"this backbone takes {self.size}x{self.size} frames, got {tuple(x.shape[-2:])}")
        if torch.onnx.is_in_onnx_export():  # one elementwise add is the simplest graph
            y = self.conv(x)
            return y + self.border.to(y.dtype)
        if autocast_on(x.device.type):
            return self.conv._conv_forward(x - self.offset, self.conv.weight, self.own_bias)
        y = self.conv(x)
        d = self.border.to(y.dtype)
        h, w = y.shape[-2:]
        t, b, lf, r = self.top, self.bottom, self.left, self.right
        if t:
            y[..., :t, :] += d[..., :t, :]
        if b:
            y[..., h - b:, :] += d[..., h - b:, :]
        if lf:
            y[..., t:h - b, :lf] += d[..., t:h - b, :lf]
        if r:
            y[..., t:h - b, w - r:] += d[..., t:h - b, w - r:]
        return y


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module.to(memory_format=torch.channels_last)`` for its 4-d parameters and buffers only, in
    place: ``Module.to`` raises on a 5-d one (the Conv3d of timm's LambdaNets), which has no such
    format and is left as it is."""
    return module._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


class FrozenBackbone(nn.Module):
    """The inference form of a backbone for one ``FrameSpec``: (B, 3, S, S) uint8 frames → (B, D)
    features, as ``net(preprocess.normalize_frames(frames, spec))`` up to float rounding.

    Every BatchNorm is folded into its conv (``fuse_conv_bn``), and so is the whole input
    normalisation, into the conv that reads the input (a zero-padded 3-channel conv, as in every
    CNN and ViT patch embedding here): the scale 1/(255·std) into its weights, the centring into its
    bias with the border put right (``_CentredConv``; exact, since the zero padding of the centred
    input is not a zero of the raw one; under autocast it centres its input instead). What is
    left of preprocessing is the uint8 → float cast.
    A network whose input goes elsewhere first keeps the normalisation as one pass outside.
    Frames in channels_last memory (``preprocess.stack_frames``) go through without a transpose.
    ``copy=False`` folds ``net`` itself instead of a copy (see ``fuse_conv_bn``).
    """

    def __init__(self, net: nn.Module, spec: FrameSpec, *, channels_last: bool = True, copy: bool = True) -> None:
        super().__init__()
        import copy as copy_

        fused = (copy_.deepcopy(net) if copy else net).eval()  # copy=False: the caller hands ``net`` over
        graph = _graph(fused)  # the fx graph names the conv/BN pairs and the conv that reads the input
        fused = fuse_conv_bn(fused, copy=False, graph=graph, size=spec.size)
        device = next(fused.parameters()).device
        mean = torch.tensor(spec.mean, dtype=torch.float64, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64, device=device).view(1, 3, 1, 1)
        first = _first_conv(fused, spec.size, graph)
        offset = (255.0 * mean).to(torch.float32)
        shift, scale = -offset, (1.0 / (255.0 * std)).to(torch.float32)
        if first is not None:
            name, conv = first
            if conv.in_channels == 3 and conv.groups == 1 and conv.padding_mode == "zeros":
                with torch.no_grad():  # the input scale, into the conv's weights
                    conv.weight.copy_((conv.weight.double() / (255.0 * std)).to(conv.weight.dtype))
                scale = None
                if not isinstance(conv.padding, str):  # and the centring ("same" padding: left outside)
                    _set_module(fused, name, _CentredConv(conv, offset.view(3), spec.size))
                    shift = None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = to_channels_last(fused) if channels_last else fused.to(memory_format=torch.contiguous_format)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", shift, persistent=False)  # None: folded into the first conv
        self.register_buffer("scale", scale, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixel values (0-255) → the input of ``self.net``: what is left of the
        normalisation once the first conv took what it could (usually nothing)."""
        if self.shift is not None:
            x = x + self.shift
        return x if self.scale is None else x * self.scale

    def center(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 frames → the float input of ``self.net`` in the net's memory format."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"FrozenBackbone takes uint8 frames (0-255), got {frames.dtype}")
        x = frames.to(torch.float32, memory_format=self.memory_format)
        if self.shift is None and self.scale is None:
            return x
        shift = self.shift if self.shift is not None else torch.zeros_like(self.offset)
        return per_channel_(x, self.scale, shift if self.scale is None else shift * self.scale)  # (x + shift)·scale

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(self.center(frames))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` (normalised inputs), then freeze.

    ``momentum=None`` averages the per-batch statistics with equal weight, independent of batch
    order: give it equal-sized batches that are fair samples (shuffled across videos). Only the
    BatchNorms run in training mode: dropout and stochastic depth (EfficientNet, ConvNeXt) stay
    off, so the statistics are those of the network that extracts, and do not depend on the RNG.
    Returns the number of frames used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    n = 0
    try:
        with torch.no_grad():  # the statistics update in the forward; no graph to keep
            for x in batches:
                model(x.to(device))
                n += x.shape[0]
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return n
