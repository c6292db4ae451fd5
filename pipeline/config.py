"""Frozen configuration dataclasses for every stage; plain data, no I/O."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["crop", "squash", "border"]
RESIZE_MODES = ("crop", "squash", "border")
Interpolation = Literal["bilinear", "bicubic", "nearest"]
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Uniform clips per video at evaluation. More overlap almost entirely on videos of a few hundred
# frames, and each costs a pass over the split: 10,000 ran for minutes.
MAX_EVAL_CLIPS = 100
HEAD_ARCHS = ("lstm", "gru", "transformer", "attention", "mean")  # pipeline.heads.HEADS, without importing torch
TRAIN_SAMPLERS = ("segment", "random")  # how training clips are drawn (pipeline.sampling)


@dataclass(frozen=True)
class FrameSpec:
    """How a decoded uint8 RGB frame becomes a network input.

    ``crop``: resize the short side to ``resize_size`` (aspect kept), then centre-crop
    ``size``×``size`` (torchvision's ``Resize(resize_size)`` + ``CenterCrop(size)``, timm's eval
    transform with ``resize_size = size / crop_pct``). ``squash``: resize both sides to
    ``resize_size`` (aspect not kept), then centre-crop ``size``×``size`` (timm's ``crop_mode``
    squash; nothing cut off where ``resize_size == size``, the default). ``border``: resize the
    long side to ``resize_size`` (aspect kept), pad the short side to ``size`` with the mean colour
    and centre-crop ``size``×``size`` (timm's ``crop_mode`` border, a letterbox). Antialiased
    ``interpolation``; then ``(x/255 - mean) / std``.
    The default of each backbone is its weights' own eval transform (``backbones.default_frame_spec``).
    """

    size: int = 224
    resize: ResizeMode = "crop"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None  # None: ``size`` (no margin cropped away)
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"FrameSpec.size must be at least 16, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"FrameSpec.resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"FrameSpec.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        resize_size = self.size if self.resize_size is None else int(self.resize_size)
        if resize_size < self.size:
            raise ValueError(f"FrameSpec.resize_size ({resize_size}) must be at least the crop size ({self.size})")
        object.__setattr__(self, "resize_size", resize_size)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def describe(self) -> str:
        """The geometry in words, as the CLI prints it and an ONNX export's metadata states it."""
        crop = f", centre crop {self.size}x{self.size}"
        if self.resize == "squash":
            return f"squashed to {self.resize_size}x{self.resize_size}" + (crop if self.resize_size != self.size else "")
        if self.resize == "border":
            return (f"long side resized to {self.resize_size}, mean-colour padding where short of {self.size} "
                    f"(letterbox)" + (crop if self.resize_size != self.size else ""))
        return f"short side resized to {self.resize_size}{crop}"

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "resize": self.resize, "resize_size": self.resize_size,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameSpec:
        """Also reads schema-1 dicts (no ``resize_size``/``interpolation``: short side = size, bilinear)."""
        return cls(size=int(d["size"]), resize=d["resize"], mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize_size=d.get("resize_size"), interpolation=d.get("interpolation", "bilinear"))

    def override(self, o: FrameOverrides) -> FrameSpec:
        """This spec with the options a user gave. A new crop ``size`` without a ``resize_size``
        keeps the weights' crop ratio (torchvision 232/224, timm 1/crop_pct)."""
        size = o.size or self.size
        if o.resize in ("squash", "border") and self.resize != o.resize and o.resize_size is None:
            o = dataclasses.replace(o, resize_size=size)  # the whole frame unless asked otherwise, not the crop's ratio
        if o.resize_size is not None and o.resize_size < size:
            raise ConfigError(f"--resize-size {o.resize_size} is smaller than the crop, --size {size}: give at least "
                              f"{size}, or leave it out for the weights' ratio")
        resize_size = o.resize_size or (round(size * self.resize_size / self.size) if o.size else self.resize_size)
        return dataclasses.replace(self, size=size, resize_size=max(size, resize_size),
                                   resize=o.resize or self.resize, interpolation=o.interpolation or self.interpolation)


@dataclass(frozen=True)
class FrameOverrides:
    """The FrameSpec options given on the command line; None keeps the backbone's default."""

    size: int | None = None
    resize_size: int | None = None
    interpolation: Interpolation | None = None
    resize: ResizeMode | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PUBLISHED = ("torchvision", "timm")  # weights sources that name published weights by their tag


@functools.lru_cache(maxsize=64)
def legacy_timm_tag(arch: str, name: str) -> str:
    """The pretrained tag of timm weights recorded under ``name`` before 1 Dec 2026, which stored
    the hub id (``timm/resnet18.a1_in1k``, ``apple/mobileclip_s0_timm``) or, for weights without
    one, ``arch`` or ``arch.tag``; a tag (today's record) is returned as it is."""
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:  # timm is needed to use these weights at all; without it, keep the name
        return name
    base = arch.split(".")[0]
    known = {full.split(".", 1)[1]: get_pretrained_cfg(full) for full in timm.list_pretrained(f"{base}.*")}
    if name in known:
        return name
    for tag, cfg in known.items():
        if cfg is not None and name in (getattr(cfg, "hf_hub_id", None), f"{base}.{tag}"):
            return tag
    if name in (base, arch):  # asked for as "imagenet": the default tag, or the one the name carried
        try:
            return getattr(get_pretrained_cfg(arch), "tag", None) or name
        except RuntimeError:  # an unknown tag
            return name
    return name


@dataclass(frozen=True)
class WeightsIdentity:
    """What a backbone's weights are, stored with every cache and checkpoint.

    ``source``: ``torchvision`` (``name`` = the weight enum, e.g. ``IMAGENET1K_V2``), ``timm``
    (``name`` = the pretrained tag, e.g. ``a1_in1k``, ``sha256`` of the file timm loaded), ``file`` /
    ``recalibrated`` / ``random_init`` (``sha256`` of the file; the last two saved by ``--weights
    none``), ``random``, ``end_to_end``. Two identities match when their file hashes match (a file
    that moved is still the same weights), or else, where one has no hash, their source and name.
    """

    source: str
    name: str | None = None
    sha256: str | None = None
    path: str | None = None

    def matches(self, other: WeightsIdentity) -> bool:
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256
        if self.source in PUBLISHED and self.name:  # published weights by tag: one side may not have hashed its file
            return (self.source, self.name) == (other.source, other.name)
        if self.sha256 or other.sha256:
            return False
        return (self.source, self.name) == (other.source, other.name)

    def describe(self) -> str:
        if self.name:
            return f"{self.source} {self.name}"
        return f"{self.source} {self.path or ''} (sha256 {str(self.sha256)[:12]})".replace("  ", " ")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "sha256": self.sha256, "path": self.path}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsIdentity:
        return cls(source=d["source"], name=d.get("name"), sha256=d.get("sha256"), path=d.get("path"))


def _show(v: Any) -> str:
    return json.dumps(v.to_dict() if hasattr(v, "to_dict") else list(v) if isinstance(v, tuple) else v,
                      sort_keys=True)


LEGACY_BACKBONE = "mobilenet_v2"  # the only backbone schema 1 had (its files name it; this covers one that does not)


@dataclass(frozen=True)
class Provenance:
    """Where cached features come from: what must match for features to be mixed in one cache, or
    for a model trained on them to be used on other features. Stored in caches and checkpoints."""

    backbone: str
    weights: WeightsIdentity
    frame_spec: FrameSpec
    selection: FrameSelection
    feature_dim: int
    classes: tuple[str, ...] = ()
    precision: str = "float32"  # compute precision of the backbone (autocast dtype)
    dtype: str = "float16"  # storage dtype of the features

    _FIELDS = (("backbone", "backbone"), ("weights", "weights"), ("frame_spec", "FrameSpec"),
               ("selection", "frame selection"), ("feature_dim", "feature dimension"),
               ("precision", "compute precision"), ("dtype", "feature dtype"), ("classes", "class list"))

    def mismatch(self, other: Provenance, *, ignore: tuple[str, ...] = (), dated: bool = False) -> str | None:
        """Name the first field on which the two disagree (None if compatible). Frame selections
        are compared by the frames they keep (``FrameSelection.kept_as``), or with ``dated`` also
        by how they date them (one cache holds one ``folder_fps``)."""
        for key, what in self._FIELDS:
            if key in ignore:
                continue
            a, b = getattr(self, key), getattr(other, key)
            if key == "weights":
                if not a.matches(b):
                    return f"weights {a.describe()} vs {b.describe()}"
            elif key == "selection" and not dated and a.kept_as() == b.kept_as():
                continue
            elif a != b:
                return f"{what} {_show(a)} vs {_show(b)}"
        return None

    def replace(self, **kw: Any) -> Provenance:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "weights": self.weights.to_dict(), "frame_spec": self.frame_spec.to_dict(),
                "selection": self.selection.to_dict(), "feature_dim": self.feature_dim,
                "classes": list(self.classes), "precision": self.precision, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        """Also reads schema-1 dicts (MobileNetV2, 1280-d: they name it too, and FrameSpecs there have
        no resize size or filter)."""
        backbone = d.get("backbone") or LEGACY_BACKBONE
        weights = WeightsIdentity.from_dict(d["weights"])
        if weights.source == "timm" and weights.name and backbone.startswith("timm:"):
            weights = dataclasses.replace(weights, name=legacy_timm_tag(backbone.removeprefix("timm:"), weights.name))
        return cls(backbone=backbone, weights=weights, frame_spec=FrameSpec.from_dict(d["frame_spec"]),
                   selection=FrameSelection.from_dict(d["selection"]), feature_dim=int(d.get("feature_dim") or 1280),
                   classes=tuple(d.get("classes", ())), precision=d.get("precision", "float32"),
                   dtype=d.get("dtype", "float16"))


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames of a video are kept, applied in this order: fps, stride, max_frames.

    ``fps`` resamples video files (and frame folders whose rate ``folder_fps`` is given) to at most
    that rate; ``stride`` keeps every K-th remaining frame; ``max_frames`` keeps at most M of them,
    uniformly spaced. Each stored row records the source frame index it came from.
    """

    stride: int = 1
    fps: float | None = None
    max_frames: int | None = None
    folder_fps: float | None = None

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.folder_fps is not None and self.folder_fps <= 0:
            raise ValueError(f"folder_fps must be > 0, got {self.folder_fps}")

    def kept_as(self) -> FrameSelection:
        """What decides the frames kept: without ``fps``, ``folder_fps`` only dates them (a
        timeline's seconds), so two selections that differ in it alone keep the same frames."""
        return self if self.fps is not None else dataclasses.replace(self, folder_fps=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameSelection:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class DatasetSpec:
    """Where the videos are and how they are split.

    Without split files the layout is ``<root>/<split>/<class>/<video>``. With ``split_files`` or
    ``split_dir`` (HMDB51 ``*_test_split<N>.txt`` or UCF101 ``trainlist0N.txt``/``testlist0N.txt``)
    the layout is flat, ``<root>/<class>/<video>``, and the files assign videos to splits.
    """

    root: str
    splits: tuple[str, ...] | None = None
    split_files: tuple[str, ...] = ()
    split_dir: str | None = None
    split_id: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["splits"] = list(self.splits) if self.splits is not None else None
        d["split_files"] = list(self.split_files)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(root=d["root"], splits=None if d.get("splits") is None else tuple(d["splits"]),
                   split_files=tuple(d.get("split_files", ())), split_dir=d.get("split_dir"),
                   split_id=int(d.get("split_id", 1)))


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: every kept frame of every video → one feature row of ``backbone`` in HDF5.

    ``frame_spec``: a full FrameSpec, or None for the backbone's default (its weights' eval
    transform) with ``frame_overrides`` applied."""

    dataset: DatasetSpec
    output: str
    weights: str = "none"
    frame_spec: FrameSpec | None = None
    backbone: str = "mobilenet_v2"
    frame_overrides: FrameOverrides = field(default_factory=FrameOverrides)
    selection: FrameSelection = field(default_factory=FrameSelection)
    batch_size: int = 64
    workers: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    dtype: Literal["float16", "float32"] = "float16"
    channels_last: bool = True
    overwrite: bool = False
    strict: bool = False
    calibration_frames: int = 1024
    seed: int = 0
    chunk_frames: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dataset"] = self.dataset.to_dict()
        d["frame_spec"] = self.frame_spec.to_dict() if self.frame_spec else None
        d["frame_overrides"] = self.frame_overrides.to_dict()
        d["selection"] = self.selection.to_dict()
        return d


# numpy's generators take no negative seed, and runs derive per-epoch torch seeds as seed * 1_000_003 + epoch
# (which must fit 64 bits): --seed is a 32-bit unsigned integer, as seed_everything already reduces it.
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..{MAX_SEED}, got {seed}")


# Of each class, carved from the training split for validation where there is no validation split.
DEFAULT_VAL_FRACTION = 0.1


def check_optimizer(cfg: Any) -> None:
    """The AdamW settings of a training config (``lr``, ``backbone_lr`` where it has one,
    ``weight_decay``), as ConfigError: click's float ranges let nan and inf through, and the sweep
    builds configs from its grid. A step above 1 only diverges (an infinite one overflows inside)."""
    for name in ("lr", "backbone_lr"):
        v = getattr(cfg, name, None)
        if v is not None and not 0 < v <= 1:
            raise ConfigError(f"{name} must be > 0 and at most 1, got {v}")
    if not 0 <= cfg.weight_decay < float("inf"):
        raise ConfigError(f"weight_decay must be >= 0 and finite, got {cfg.weight_decay}")


@dataclass(frozen=True)
class TemporalConfig:
    """Stage two: a temporal head on cached feature sequences.

    The best epoch is picked on ``val_split``, or where the cache has no ``val`` split on a
    validation set carved from the training split (``val_fraction`` of each class, whole source
    videos, see ``data.carve_validation``); ``test_split`` is then evaluated once, with the
    picked model."""

    cache: str
    out: str
    train_split: str = "train"
    val_split: str | None = None  # None: "val" if the cache has it, else carved from train
    val_fraction: float = DEFAULT_VAL_FRACTION
    group_pattern: str | None = None  # regex naming a clip's source video (else UCF101/HMDB51 names)
    test_split: str | None = None  # None: "test" if the cache has it and it is not the val split
    head: str = "lstm"
    num_heads: int = 4
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = True  # defaults chosen by bench/defaults.py (README: Defaults)
    dropout: float = 0.5
    pool: Literal["last", "mean"] = "last"
    seq_len: int = 16
    sampler: Literal["segment", "random"] = "segment"
    eval_clips: int = 4
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    seed: int = 0
    deterministic: bool = False
    patience: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tensorboard: bool = False
    # Splits held in memory or read lazily from the cache (caches larger than RAM); auto: lazy for
    # what does not fit ``memory_budget`` GB (default: half the available memory). Same results.
    load: Literal["auto", "memory", "lazy"] = "auto"
    memory_budget: float | None = None

    def __post_init__(self) -> None:  # ConfigError: the sweep builds these from its grid, not from click's ranges
        for name in ("hidden", "layers", "seq_len", "eval_clips", "epochs", "batch_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_clips > MAX_EVAL_CLIPS:
            raise ConfigError(f"eval_clips must be at most {MAX_EVAL_CLIPS}, got {self.eval_clips}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        check_optimizer(self)
        check_seed(self.seed)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.load not in ("auto", "memory", "lazy"):
            raise ConfigError(f"load must be auto, memory or lazy, got {self.load!r}")
        if self.memory_budget is not None and not 0 < self.memory_budget < float("inf"):
            raise ConfigError(f"memory_budget must be > 0 GB, got {self.memory_budget}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# finetune's head without --init: stage two's defaults (one place for them)
FINETUNE_HEAD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TemporalConfig)
                          if f.name in ("head", "hidden", "layers", "bidirectional", "dropout", "pool", "num_heads")}


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage three: the backbone and the same temporal head trained jointly from frames."""

    dataset: DatasetSpec
    out: str
    init: str | None = None  # a stage-two (or end-to-end) checkpoint: head, backbone, FrameSpec, classes
    weights: str | None = None  # without --init: the backbone weights (None: imagenet); with --init: where the
    # backbone file its checkpoint recorded is now, if it has moved (None: where it was)
    backbone: str | None = None  # None: the --init checkpoint's, else mobilenet_v2
    frame_spec: FrameSpec | None = None  # None: the --init checkpoint's, else the backbone's default
    frame_overrides: FrameOverrides = field(default_factory=FrameOverrides)
    selection: FrameSelection | None = None  # None: the --init checkpoint's (else all frames)
    train_split: str = "train"
    val_split: str | None = None  # None: "val" if the dataset has it, else carved from train
    val_fraction: float = DEFAULT_VAL_FRACTION
    group_pattern: str | None = None
    test_split: str | None = None  # None: "test" if the dataset has it and it is not the val split
    # The head: None takes the --init run's (its weights come with it; another value is refused),
    # else FINETUNE_HEAD_DEFAULTS.
    head: str | None = None
    num_heads: int | None = None
    hidden: int | None = None
    layers: int | None = None
    bidirectional: bool | None = None
    dropout: float | None = None
    pool: Literal["last", "mean"] | None = None
    seq_len: int | None = None  # None: the --init run's, else 8
    sampler: Literal["segment", "random"] = "segment"
    eval_clips: int | None = None  # None: the --init run's, else 1
    freeze_cnn: bool = False
    trainable_blocks: int | None = None  # None: every block of the backbone
    grad_checkpoint: bool = False
    augment: bool = True
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    backbone_lr: float | None = None  # None: lr / 10
    weight_decay: float = 1e-2
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    seed: int = 0
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        check_optimizer(self)
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dataset"] = self.dataset.to_dict()
        d["frame_spec"] = self.frame_spec.to_dict() if self.frame_spec else None
        d["frame_overrides"] = self.frame_overrides.to_dict()
        d["selection"] = self.selection.to_dict() if self.selection else None
        return d


Exporter = Literal["auto", "dynamo", "legacy"]


@dataclass(frozen=True)
class ExportConfig:
    """Export a trained model (``checkpoint``) to one ONNX file (``out``) for onnxruntime."""

    checkpoint: str
    out: str
    head_only: bool = False  # only the head: (B, T, D) features → probabilities
    weights: str | None = None  # the backbone file, if the one recorded in the checkpoint has moved
    exporter: Exporter = "auto"  # auto: the dynamo exporter, the TorchScript one where dynamo fails

    def __post_init__(self) -> None:
        if self.exporter not in ("auto", "dynamo", "legacy"):
            raise ValueError(f"exporter must be auto, dynamo or legacy, got {self.exporter!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
