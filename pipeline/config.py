"""Frozen configuration dataclasses for every stage; plain data, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["crop", "squash"]


@dataclass(frozen=True)
class FrameSpec:
    """How a decoded uint8 RGB frame becomes a network input.

    ``crop``: resize the short side to ``size`` (aspect kept), then centre-crop ``size``×``size``.
    ``squash``: resize both sides to ``size`` (aspect not kept, nothing cut off).
    """

    size: int = 224
    resize: ResizeMode = "crop"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"FrameSpec.size must be at least 16, got {self.size}")
        if self.resize not in ("crop", "squash"):
            raise ValueError(f"FrameSpec.resize must be 'crop' or 'squash', got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameSpec:
        return cls(size=int(d["size"]), resize=d["resize"], mean=tuple(d["mean"]), std=tuple(d["std"]))


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


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: every kept frame of every video → one 1280-d MobileNetV2 feature row in HDF5."""

    dataset: DatasetSpec
    output: str
    weights: str = "none"
    frame_spec: FrameSpec = field(default_factory=FrameSpec)
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dataset"] = self.dataset.to_dict()
        d["frame_spec"] = self.frame_spec.to_dict()
        d["selection"] = self.selection.to_dict()
        return d


@dataclass(frozen=True)
class TemporalConfig:
    """Stage two: an LSTM on cached feature sequences."""

    cache: str
    out: str
    train_split: str = "train"
    val_split: str | None = None  # None: "val" if the cache has it, else "test"
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.5
    pool: Literal["last", "mean"] = "last"
    seq_len: int = 16
    sampler: Literal["segment", "random"] = "segment"
    eval_clips: int = 1
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

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "seq_len", "eval_clips", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage three: MobileNetV2 and the same TemporalHead trained jointly from frames."""

    dataset: DatasetSpec
    out: str
    init: str | None = None  # a stage-two (or end-to-end) checkpoint: head, backbone, FrameSpec, classes
    weights: str = "imagenet"  # backbone when there is no --init
    frame_spec: FrameSpec | None = None  # None: the --init checkpoint's (else FrameSpec())
    selection: FrameSelection | None = None  # None: the --init checkpoint's (else all frames)
    train_split: str = "train"
    val_split: str | None = None
    hidden: int = 512
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.5
    pool: Literal["last", "mean"] = "last"
    seq_len: int | None = None  # None: the --init run's, else 8
    sampler: Literal["segment", "random"] = "segment"
    eval_clips: int | None = None  # None: the --init run's, else 1
    freeze_cnn: bool = False
    trainable_blocks: int | None = None  # None: all 19 children of mobilenet_v2().features
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dataset"] = self.dataset.to_dict()
        d["frame_spec"] = self.frame_spec.to_dict() if self.frame_spec else None
        d["selection"] = self.selection.to_dict() if self.selection else None
        return d
