"""Missing-modality robustness: a trained model evaluated again with each of its modalities removed.

A modality is removed through the model's own missing-modality path (the batch's modality mask, see
`erc.evaluation.inference.remove`), never by feeding zeros as if they were data. The figure is the drop in test weighted
F1 (percentage points) against the same model with every modality present.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from erc.data.dialogues import IGNORE, DialogueData
from erc.metrics import classification_metrics
from erc.evaluation.inference import Outputs, infer


def weighted_f1(outputs: Outputs, labels: list[str]) -> float:
    keep = outputs.labels != IGNORE
    return classification_metrics(outputs.labels[keep], outputs.pred[keep], labels)["wf1"]


def modality_drops(model, data: DialogueData, labels: list[str], full: Outputs | None = None) -> list[dict]:
    """One row per modality of the model (none for a single-modality model: removing it leaves no input):
    weighted F1 with all modalities and without this one, the drop, and the share of predictions that changed."""
    modalities = sorted(model.spec.input_dims)
    if len(modalities) < 2:
        return []
    full = full or infer(model, data)
    base = weighted_f1(full, labels)
    rows = []
    for m in modalities:
        without = infer(model, data, drop=(m,))
        wf1 = weighted_f1(without, labels)
        rows.append({"modality": m, "wf1_all": base, "wf1_without": wf1, "wf1_drop": base - wf1,
                     "changed": 100 * float(np.mean(without.pred != full.pred))})
    return rows


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, model, modality): mean and sample std over seeds of the drop (and the F1s)."""
    keys = ["dataset", "model", "modality"]
    stats = rows.groupby(keys, sort=True).agg(
        n_seeds=("seed", "nunique"), wf1_all=("wf1_all", "mean"), wf1_without=("wf1_without", "mean"),
        wf1_drop_mean=("wf1_drop", "mean"), wf1_drop_std=("wf1_drop", "std"), changed=("changed", "mean"))
    return stats.reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    """The drops as a dataset x model table, one column per removed modality."""
    if table.empty:
        return "No model with two or more modalities: nothing to remove.\n"
    cells = table.assign(cell=[f"{r.wf1_drop_mean:+.2f}" + ("" if pd.isna(r.wf1_drop_std) else f" ± {r.wf1_drop_std:.2f}")
                               for r in table.itertuples()])
    wide = cells.pivot_table(index=["dataset", "model"], columns="modality", values="cell", aggfunc="first")
    full = table.groupby(["dataset", "model"])["wf1_all"].first()
    modalities = list(wide.columns)
    lines = ["| dataset | model | wF1 (all) | " + " | ".join(f"drop without {m}" for m in modalities) + " |",
             "|---|---|---|" + "---|" * len(modalities)]
    for (dataset, model), row in wide.iterrows():
        lines.append(f"| {dataset} | {model} | {full[(dataset, model)]:.2f} | "
                     + " | ".join("" if pd.isna(row[m]) else row[m] for m in modalities) + " |")
    return "\n".join(lines) + "\n"
