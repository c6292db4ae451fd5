"""Metric files and plots for a run: metrics.jsonl, curves PNG, confusion-matrix PNG, per-class CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write_bytes, atomic_write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> None:
    """Save and close a matplotlib figure, atomically (a full disk is one line, not a torn PNG)."""
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=100, format=Path(path).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(ep, [h["train_top1"] for h in history], "o-", label="train top-1")
    b.plot(ep, [h["val_top1"] for h in history], "o-", label="val top-1")
    b.plot(ep, [h["val_mean_class_acc"] for h in history], "--", label="val mean class acc")
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    side = max(5.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=8 if n > 20 else 10)
    ax.set_yticklabels(classes, fontsize=8 if n > 20 else 10)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, f.getvalue())


def write_per_class(metrics: dict[str, Any], classes: Sequence[str], path: Path) -> None:
    write_csv(path, ["class", "accuracy", "support"],
              [[c, "" if acc is None or np.isnan(acc) else f"{acc:.4f}", n]
               for c, acc, n in zip(classes, metrics["per_class_acc"], metrics["support"])])


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
