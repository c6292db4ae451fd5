"""Classification metrics from predicted probabilities. Pure numpy."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; row = true class, column = predicted class."""
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def topk_accuracy(probs: np.ndarray, target: np.ndarray, k: int) -> float:
    """Whether the target is among the ``k`` most probable classes, ties broken as argmax breaks
    them (the first of tied classes ranks higher), so top-k never falls below top-1: argpartition
    kept an arbitrary few of more than k tied classes."""
    n, c = probs.shape
    probs = np.where(np.isnan(probs), np.inf, probs)  # argmax takes the first NaN as the largest: so does this
    p_target = probs[np.arange(n), target][:, None]
    before = (probs > p_target) | ((probs == p_target) & (np.arange(c) < target[:, None]))
    return float((before.sum(1) < k).mean())


def classification_metrics(probs: np.ndarray, target: np.ndarray, loss: float) -> dict[str, Any]:
    """loss, top1, top5, mean class accuracy (over classes present), per-class accuracy, confusion."""
    c = probs.shape[1]
    cm = confusion_matrix(probs.argmax(1), target, c)
    support = cm.sum(1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    return {
        "loss": float(loss),
        "top1": topk_accuracy(probs, target, 1),
        "top5": topk_accuracy(probs, target, 5),
        "mean_class_acc": float(np.nanmean(per_class)) if (support > 0).any() else float("nan"),
        # None (JSON null, not the NaN no JSON parser must accept) for a class with no video here
        "per_class_acc": [float(a) if n else None for a, n in zip(per_class, support)],
        "support": support.tolist(),
        "confusion": cm.tolist(),
    }
