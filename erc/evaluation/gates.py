"""How the experts are used: gate and router statistics of a trained model, and their plots.

For each gate or router (`erc.models.gates`: MiSTER-E's gate over its experts, SDT's modality gate, SUMMER's
and MMoLRE's routers and fusions), over the utterances it ran on:
- the mean weight per expert (or modality) per true class, and over all utterances;
- the load per expert: for a sparse top-k router the share of the chosen slots that go to the expert (the
  Switch Transformer's f_e; uniform routing gives 1/E), for a dense gate the share of utterances whose
  largest weight is the expert's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from erc.data.dialogues import IGNORE
from erc.evaluation.inference import GateOutputs, Outputs


def load(g: GateOutputs) -> np.ndarray:
    """(E,) load per expert over the valid utterances (see the module docstring); sums to 1."""
    w = g.weights[g.valid]
    if not len(w):
        return np.full(len(g.names), np.nan)
    if g.top_k is not None:
        chosen = (w > 0).sum(0).astype(float)
        return chosen / chosen.sum()
    return np.bincount(w.argmax(-1), minlength=len(g.names)) / len(w)


def statistics(outputs: Outputs, labels: list[str]) -> pd.DataFrame:
    """One row per (gate, expert): `mean` weight, `load`, and `w_<label>`, the mean weight over the utterances
    of that true class (NaN where there are none)."""
    rows = []
    for name, g in outputs.gates.items():
        w, valid = g.weights, g.valid
        per_class = {}
        for c, label in enumerate(labels):
            of_class = valid & (outputs.labels == c)
            per_class[label] = w[of_class].mean(0) if of_class.any() else np.full(len(g.names), np.nan)
        mean = w[valid].mean(0) if valid.any() else np.full(len(g.names), np.nan)
        share = load(g)
        for e, expert in enumerate(g.names):
            rows.append({"gate": name, "expert": expert, "sparse": g.top_k is not None, "mean": float(mean[e]),
                         "load": float(share[e]), **{f"w_{label}": float(v[e]) for label, v in per_class.items()},
                         "utterances": int(valid.sum()),
                         "labelled": int((valid & (outputs.labels != IGNORE)).sum())})
    return pd.DataFrame(rows)


def plot(stats: pd.DataFrame, labels: list[str], title: str, path) -> None:
    """One heatmap per gate (experts x true classes: mean weight; last column: load), in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(stats["gate"]))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    width = 0.55 * (len(labels) + 1) + 2.2
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 0.45 * stats.groupby("gate").size().max() * rows
                                                  + 1.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        part = stats[stats["gate"] == name]
        values = np.column_stack([part[f"w_{label}"].to_numpy() for label in labels] + [part["load"].to_numpy()])
        ax.imshow(np.nan_to_num(values, nan=0.0), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(labels) + 1), [*labels, "load"], rotation=45, ha="right")
        ax.set_yticks(range(len(part)), part["expert"].tolist())
        ax.axvline(len(labels) - 0.5, color="white", linewidth=2)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if values[i, j] > 0.6 else "white")
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}: mean gate weight per true class, and load", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
