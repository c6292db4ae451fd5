"""``load_model``: the one way to rebuild a trained model from a checkpoint alone.

A checkpoint holds everything: the head's config and weights, the classes, the provenance of the
features it was trained on (backbone, weights identity, FrameSpec, frame selection), and the clip
sampling (seq-len, eval clips). ``evaluate``, ``predict``, ``finetune-end-to-end --init`` and
``export`` all go through here, so every compatibility check lives in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, cached_renormalised, create_backbone, published_sha256_prefix
from .checkpoint import CheckpointError, load_checkpoint
from .config import FrameSelection, FrameSpec, Provenance, WeightsIdentity
from .errors import CacheError, ConfigError, WeightsError
from .files import sha256_file
from .heads import HeadConfig, build_head

log = logging.getLogger(__name__)

TRAINED_KINDS = ("temporal", "end_to_end")


@dataclass
class Model:
    """A trained head and what it needs, rebuilt from ``path``; the backbone is built on demand."""

    path: Path
    kind: str  # "temporal" (stage two) or "end_to_end" (stage three)
    head: nn.Module  # eval mode, on the CPU
    head_config: HeadConfig
    classes: list[str]
    provenance: Provenance  # of the features the head was trained on
    seq_len: int
    eval_clips: int
    ckpt: dict[str, Any]

    @property
    def frame_spec(self) -> FrameSpec:
        return self.provenance.frame_spec

    @property
    def selection(self) -> FrameSelection:
        return self.provenance.selection

    def features_provenance(self) -> Provenance:
        """The provenance a cache must have for this model to be evaluated on it. An end-to-end
        model's features are those of a cache extracted with ``--weights <this checkpoint>``."""
        if self.kind == "end_to_end":
            return self.provenance.replace(weights=WeightsIdentity(source="file", sha256=sha256_file(self.path)))
        return self.provenance

    def check_cache(self, cache: Provenance, cache_path: str | Path) -> None:
        """Refuse a cache whose features are not the ones this model was trained on."""
        ignore = ("precision", "dtype") if self.kind == "end_to_end" else ()
        diff = self.features_provenance().mismatch(cache, ignore=ignore)
        if diff:
            how = (f"extract-features --weights {self.path}, its own fine-tuned backbone" if self.kind == "end_to_end"
                   else "the checkpoint's backbone and settings")
            raise CacheError(f"{cache_path} does not match {self.path}: {diff}; evaluate on a cache extracted with {how}")

    def backbone(self, weights: str | Path | None = None) -> Backbone:
        """The backbone that made the features: from the checkpoint itself (end-to-end), by its
        weight name (torchvision/timm, downloaded if needed), or from the recorded file. ``weights``
        points at that file if it has moved; its sha256 must match the recorded one, or for named
        torchvision weights the hash in their published file name (timm publishes none)."""
        bb = self._backbone(weights)
        prov = self.provenance
        if cached_renormalised(prov.backbone, prov.frame_spec.mean):
            bb.net.transform_input = True  # cached the old way: the model re-normalised its input itself
        return bb

    def _backbone(self, weights: str | Path | None) -> Backbone:
        prov = self.provenance
        if self.kind == "end_to_end":
            if weights is not None:
                raise ConfigError(f"{self.path} holds its own fine-tuned backbone; drop --weights")
            bb = create_backbone(prov.backbone, "none", input_size=prov.frame_spec.size)
            try:
                bb.net.load_state_dict(self.ckpt["backbone_state"])
            except RuntimeError as e:
                raise CheckpointError(f"{self.path}: its backbone_state does not fit {prov.backbone} "
                                      f"({str(e).splitlines()[0][:120]})") from e
            bb.weights = WeightsIdentity(source="end_to_end", sha256=None, path=str(self.path))
            return bb
        ident = prov.weights
        if ident.source in ("torchvision", "timm") and weights is None:
            bb = create_backbone(prov.backbone, ident.name or "imagenet", input_size=prov.frame_spec.size)
            if ident.sha256 and bb.weights.sha256 and bb.weights.sha256 != ident.sha256:
                raise WeightsError(f"{prov.backbone} weights {ident.name} are another file now (sha256 "
                                   f"{bb.weights.sha256[:12]}... != {ident.sha256[:12]}...) than the features of "
                                   f"{self.path} were made with; pass that file as --weights PATH")
            return bb
        if ident.source == "random":
            raise WeightsError(f"{self.path} was trained on features of an uncalibrated random backbone")
        if weights is not None and str(weights).lower() in ("none", "imagenet", "default"):
            raise ConfigError(f"{self.path} records its backbone weights ({ident.describe()}); --weights with it is "
                              f"only the PATH of that file if it has moved: drop --weights {weights}")
        path = Path(weights) if weights is not None else Path(ident.path or "")
        if weights is not None and path.is_dir():
            raise WeightsError(f"--weights {path} is a folder; give the backbone weights file")
        if weights is None and not path.is_file():
            raise WeightsError(f"the backbone weights this model was trained with are not at {ident.path}; "
                               f"pass --weights PATH (a file with sha256 {str(ident.sha256)[:12]}...)")
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        got = sha256_file(path)
        want = ident.sha256  # published torchvision weights: the hash their file name carries
        if want is None and ident.source == "torchvision":
            want = published_sha256_prefix(prov.backbone, ident.name)
        if want and not got.startswith(want):
            raise WeightsError(f"{path} is not the backbone this model was trained with (sha256 {got[:12]}... != "
                               f"{want[:12]}...)")
        if not want:  # timm weights recorded before their file was hashed
            log.warning("cannot check that %s holds the %s weights %s this model was trained with (no hash recorded): "
                        "make sure it does", path, prov.backbone, ident.describe())
        return create_backbone(prov.backbone, str(path), input_size=prov.frame_spec.size)


def _non_finite(state: dict[str, Any]) -> str | None:
    """The first floating-point tensor of ``state`` holding a NaN or an infinity, by name."""
    return next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                 and not torch.isfinite(v).all()), None)


def load_model(path: str | Path) -> Model:
    """Rebuild the trained model in ``path`` (a ``best.pt``/``last.pt`` of train-temporal, the sweep
    or finetune-end-to-end; schema 1 or 2)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") not in TRAINED_KINDS:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, not a trained model")
    for key, kind in (("model_config", dict), ("model_state", dict), ("classes", list | tuple), ("cache", dict)):
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path} is damaged: {'no' if key not in ckpt else 'a broken'} {key}; use the run's "
                                  "other checkpoint (best.pt / last.pt) or train it again")
    for key in ("model_state", "backbone_state"):
        bad = _non_finite(ckpt.get(key) or {})
        if bad is not None:  # a run that diverged and was saved anyway, or a damaged file: NaN for every video
            raise CheckpointError(f"{path} holds non-finite weights ({bad}): the run diverged or the file is "
                                  "damaged; use another checkpoint, or train again with a lower --lr")
    try:
        cfg = HeadConfig.from_dict(ckpt["model_config"])
    except ConfigError as e:  # the checkpoint's, not an option the user gave
        raise CheckpointError(f"{path}: its head config is damaged ({e})") from e
    head = build_head(cfg)
    try:
        head.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit its {cfg.arch} head "
                              f"({str(e).splitlines()[0][:120]})") from e
    if len(ckpt["classes"]) != cfg.num_classes:
        raise CheckpointError(f"{path} is damaged: it lists {len(ckpt['classes'])} classes for a head of "
                              f"{cfg.num_classes} outputs")
    tc = ckpt.get("train_config", {})
    return Model(path=path, kind=ckpt["kind"], head=head.eval(), head_config=cfg, classes=list(ckpt["classes"]),
                 provenance=Provenance.from_dict({**ckpt["cache"], "classes": ckpt["cache"].get("classes",
                                                                                                ckpt["classes"])}),
                 seq_len=int(tc.get("seq_len", 16)), eval_clips=int(tc.get("eval_clips", 1)), ckpt=ckpt)
