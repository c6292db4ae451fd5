"""Versioned checkpoints: atomic save, ``weights_only`` load, schema check with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .files import atomic_torch_save

TOOL = "action-pipeline"
SCHEMA_VERSION = 1


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or of another schema or tool."""


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, hint: str = "") -> None:
    """Through a temporary file and a rename: a crash never leaves a half-written checkpoint."""
    atomic_torch_save(path, {"tool": TOOL, "schema_version": SCHEMA_VERSION, **payload}, hint=hint)


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
        return "a damaged or incomplete torch.save file"
    if head[:1] == b"\x80":
        return "a plain pickle, not a torch.save file"
    return "not a torch.save file"


def safe_load(path: str | Path, error: type[PipelineError] = PipelineError, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or ``error`` with one line saying what the
    file is. Never suggests ``weights_only=False``: code in a pickle would run on load."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file fails in many ways (struct.error, EOFError, ...)
        raise error(f"{path} is not a {what} this tool can load safely: {_what_is(path, e)}") from e


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = safe_load(path, CheckpointError)
    if not isinstance(ckpt, dict) or ckpt.get("tool") != TOOL:
        raise CheckpointError(f"{path} is not a checkpoint written by {TOOL} (train-temporal / finetune-end-to-end)")
    if ckpt.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint schema {ckpt.get('schema_version')}, this version reads {SCHEMA_VERSION}")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt
