"""Versioned checkpoints: atomic save, ``weights_only`` load, schema check with a clear error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError

TOOL = "action-pipeline"
SCHEMA_VERSION = 1


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or of another schema or tool."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"tool": TOOL, "schema_version": SCHEMA_VERSION, **payload}, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not outrun the data (power loss)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}; is it complete?") from e
    if not isinstance(ckpt, dict) or ckpt.get("tool") != TOOL:
        raise CheckpointError(f"{path} is not a checkpoint written by {TOOL} (train-temporal / finetune-end-to-end)")
    if ckpt.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint schema {ckpt.get('schema_version')}, this version reads {SCHEMA_VERSION}")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt
