"""How sure a leaderboard figure is: bootstrap confidence intervals and paired tests over test dialogues.

The unit of resampling is the dialogue, not the utterance: utterances of one dialogue share speakers, topic and
context, so their errors are correlated, and resampling them one by one would give intervals that are too narrow.
Every statistic here is computed from per-dialogue confusion matrices (weighted F1 depends on the confusion matrix
only), so a resample of dialogues is a weighted sum of them and thousands of replicates cost milliseconds.

Seeds enter as a second source of variation. A row's figure is the mean over its seeds of test weighted F1; its
interval comes from a two-level bootstrap that, in each replicate, draws the seeds with replacement and the
dialogues with replacement and takes the mean over the drawn seeds of weighted F1 on the drawn dialogues. It
answers "what would this row read with other seeds and another test set of the same size", which is the claim a
leaderboard makes; an interval over dialogues alone would ignore how much a model moves between seeds.

Two models are compared by approximate randomisation on the same test utterances: under the null hypothesis their
outputs are exchangeable per dialogue, so each replicate swaps the two models' predictions (every seed's, seed k with
seed k) on a random half of the dialogues and recomputes the difference of seed-mean weighted F1. The p-value is
two-sided, (1 + #{|d*| >= |d|}) / (1 + replicates). Several comparisons in one table are corrected with Holm's
step-down method.
"""

from __future__ import annotations

import numpy as np


def dialogue_confusions(dialogue_index: np.ndarray, actual: np.ndarray, predicted: np.ndarray,
                        num_dialogues: int, num_classes: int) -> np.ndarray:
    """(D, C, C) counts: one confusion matrix (rows true, columns predicted) per dialogue."""
    flat = (np.asarray(dialogue_index) * num_classes + np.asarray(actual)) * num_classes + np.asarray(predicted)
    counts = np.bincount(flat, minlength=num_dialogues * num_classes * num_classes)
    return counts.reshape(num_dialogues, num_classes, num_classes).astype(np.float64)


def weighted_f1(cm: np.ndarray) -> np.ndarray:
    """Weighted F1 in percent of confusion matrices (..., C, C), as erc.metrics computes it for one."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    actual, predicted = cm.sum(-1), cm.sum(-2)
    denom = actual + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)
    total = actual.sum(-1)
    return 100 * np.divide((f1 * actual).sum(-1), total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)


def bootstrap_ci(confusions: np.ndarray, *, replicates: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of seed-mean weighted F1; `confusions` is (seeds, dialogues, C, C).

    Each replicate draws the seeds and the dialogues with replacement (see the module's docstring)."""
    seeds, dialogues = confusions.shape[:2]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(dialogues, np.full(dialogues, 1.0 / dialogues), size=replicates).astype(np.float64)
    per_seed = weighted_f1(np.einsum("rd,sdij->rsij", counts, confusions))  # (replicates, seeds)
    drawn = rng.integers(0, seeds, size=(replicates, seeds))
    means = np.take_along_axis(per_seed, drawn, axis=1).mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_randomization(conf_a: np.ndarray, conf_b: np.ndarray, *, replicates: int = 2000,
                         seed: int = 0) -> float:
    """Two-sided p-value that two models' seed-mean weighted F1 differ, on the same test dialogues.

    `conf_a`, `conf_b`: (seeds, dialogues, C, C), seed k of one paired with seed k of the other."""
    if conf_a.shape != conf_b.shape:
        raise ValueError(f"paired test needs the same seeds and dialogues: {conf_a.shape} vs {conf_b.shape}")
    total_a, total_b = conf_a.sum(1), conf_b.sum(1)  # (seeds, C, C)
    observed = weighted_f1(total_a).mean() - weighted_f1(total_b).mean()
    rng = np.random.default_rng(seed)
    swap = rng.random((replicates, conf_a.shape[1])) < 0.5
    moved = np.einsum("rd,sdij->rsij", swap.astype(np.float64), conf_b - conf_a)  # what swapping adds to a
    diffs = weighted_f1(total_a + moved).mean(1) - weighted_f1(total_b - moved).mean(1)
    exceed = np.count_nonzero(np.abs(diffs) >= abs(observed) - 1e-9)
    return float((1 + exceed) / (1 + replicates))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries are left out of the family and stay NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
