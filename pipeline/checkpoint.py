"""Versioned checkpoints: atomic save, ``weights_only`` load, schema check with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .files import atomic_torch_save

TOOL = "action-pipeline"
SCHEMA_VERSION = 2  # 2: provenance names the backbone, heads have an arch, FrameSpec has resize/interpolation


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or of another schema or tool."""


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, hint: str = "") -> None:
    """Through a temporary file and a rename: a crash never leaves a half-written checkpoint."""
    atomic_torch_save(path, {"tool": TOOL, "schema_version": SCHEMA_VERSION, **payload}, hint=hint)


DAMAGED = "a damaged or incomplete torch.save file"
DAMAGED_HINT = "replace it with an intact copy, or rerun what wrote it"  # its writes are atomic: a disk fault, an edit


def _what_is(path: Path, e: BaseException) -> str:
    """What a file torch cannot load is, from the error and the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if not head:
        return "an empty file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (a feature cache?)"
    if "Unsupported global" in str(e):
        return "it holds Python objects other than tensors and plain data, which could run code when loaded"
    if head.startswith(b"PK"):
        return DAMAGED
    if head[:1] == b"\x80":
        return "a plain pickle, not a torch.save file"
    return "not a torch.save file"


def safe_load(path: str | Path, error: type[PipelineError] = PipelineError, what: str = "checkpoint", *,
              mmap: bool = False, damaged: str = DAMAGED_HINT) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or ``error`` with one line saying what the
    file is. Never suggests ``weights_only=False``: code in a pickle would run on load.

    ``mmap``: tensors map the file instead of being read (torch.save's zip format; others are read),
    for a caller that only looks at the metadata: a ResNet-50 file opens in 27 ms instead of 86-127.
    ``damaged``: what to do about a damaged file (its writes are atomic: a disk fault, a hand edit)."""
    path = Path(path)
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001, S110 - not a zip file, or damaged: the plain load below says which
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file fails in many ways (struct.error, EOFError, ...)
        desc = _what_is(path, e)
        raise error(f"{path} is not a {what} this tool can load safely: {desc}"
                    f"{'; ' + damaged if desc == DAMAGED else ''}") from e


def load_checkpoint(path: str | Path, *, kind: str | None = None, damaged: str = DAMAGED_HINT) -> dict[str, Any]:
    """A checkpoint of this tool, migrated in memory to the current schema. ``damaged``: what to
    do about a damaged file (see ``safe_load``)."""
    path = Path(path)
    if path.is_dir():
        hint = f"pass {path / 'best.pt'}" if (path / "best.pt").is_file() else "pass the checkpoint file in it"
        raise CheckpointError(f"{path} is a folder; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = safe_load(path, CheckpointError, damaged=damaged)
    if not isinstance(ckpt, dict) or ckpt.get("tool") != TOOL:
        raise CheckpointError(f"{path} is not a checkpoint written by {TOOL} (train-temporal / finetune-end-to-end)")
    version = ckpt.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise CheckpointError(f"{path} has checkpoint schema {version}, this version reads 1 to {SCHEMA_VERSION}; "
                              "upgrade action-pipeline to use it")
    if version == 1:
        ckpt = _migrate_v1(ckpt)
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


def _migrate_v1(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (MobileNetV2 and the LSTM were the only choices): the head config had no ``arch``,
    the LSTM's layer was ``lstm`` (now ``rnn``), FrameSpecs had no resize size; end-to-end
    checkpoints kept the head twice (``head_state``). Their provenance named the backbone and
    its dimension; the defaults below only cover one that does not."""
    ckpt = dict(ckpt)
    for key in ("model_state", "head_state"):
        if isinstance(ckpt.get(key), dict):
            ckpt[key] = {("rnn." + k[5:] if k.startswith("lstm.") else k): v for k, v in ckpt[key].items()}
    ckpt.pop("head_state", None)
    ckpt["model_config"] = {"arch": "lstm", **ckpt.get("model_config", {})}
    prov = dict(ckpt.get("cache", {}))
    prov.setdefault("backbone", "mobilenet_v2")
    prov.setdefault("feature_dim", 1280)
    ckpt["cache"] = prov
    ckpt["schema_version"] = SCHEMA_VERSION
    ckpt["migrated_from"] = 1
    return ckpt
