"""Classification and sentiment metrics, computed once over a whole split (percent where a rate)."""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted."""
    return np.bincount(num_classes * y_true + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0), cm.sum(1)
    denom = predicted + actual
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def classification_metrics(y_true, y_pred, labels: list[str], prefix: str = "") -> dict:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cm = confusion(y_true, y_pred, len(labels))
    f1 = per_class_f1(cm)
    support = cm.sum(1)
    out = {
        f"{prefix}wf1": 100 * float((f1 * support).sum() / max(support.sum(), 1)),
        f"{prefix}acc": 100 * float(np.diag(cm).sum() / max(cm.sum(), 1)),
        f"{prefix}macro_f1": 100 * float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
    }
    out.update({f"{prefix}f1_{name}": 100 * float(v) for name, v in zip(labels, f1)})
    return out


def sentiment_score_metrics(score_true, score_pred, prefix: str = "") -> dict:
    """MOSI's regression figures: MAE, Pearson r, Acc-7 (rounded, clipped to [-3, 3]), Acc-2 from the sign."""
    t, p = np.asarray(score_true, dtype=np.float64), np.asarray(score_pred, dtype=np.float64)
    corr = float(np.corrcoef(t, p)[0, 1]) if len(t) > 1 and t.std() > 0 and p.std() > 0 else 0.0
    acc7 = float((np.clip(np.round(t), -3, 3) == np.clip(np.round(p), -3, 3)).mean())
    return {
        f"{prefix}mae": float(np.abs(t - p).mean()),
        f"{prefix}corr": corr,
        f"{prefix}acc7": 100 * acc7,
        f"{prefix}acc2_score": 100 * float(((t >= 0) == (p >= 0)).mean()),
    }


def split_metrics(y_true, y_pred, labels, *, target: str, score_true=None, score_pred=None, prefix="") -> tuple[dict, np.ndarray]:
    """All metrics of a split and its confusion matrix.

    For a binary sentiment target (MOSI), Acc-2 and binary weighted F1 are the classifier's accuracy
    and weighted F1; the regression head adds MAE, Pearson r, Acc-7 and the sign-based Acc-2.
    """
    metrics = classification_metrics(y_true, y_pred, labels, prefix)
    if target == "sentiment" and len(labels) == 2:
        metrics[f"{prefix}acc2"] = metrics[f"{prefix}acc"]
        metrics[f"{prefix}wf1_binary"] = metrics[f"{prefix}wf1"]
    if score_true is not None and score_pred is not None and len(score_true):
        metrics.update(sentiment_score_metrics(score_true, score_pred, prefix))
    return metrics, confusion(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), len(labels))
