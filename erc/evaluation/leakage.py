"""A cheap check that a feature set does not carry its labels into validation.

A feature set learnt with the labels of utterances that erc later uses for validation (MOSI's bc-LSTM text and
video features were trained on MOSI's whole training split) makes validation easy and selection blind. A linear
classifier fitted on the training split sees it at once: it scores far higher on validation than on test, while an
honest feature set scores about the same on both. The probe is that classifier: standardised features, multinomial
logistic regression, weighted F1 on validation and on test; a gap above `max_gap` points is a warning.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from erc.data.canonical import FeatureSet
from erc.metrics import classification_metrics
from erc.schema import check


def leakage_max_gap(params: dict, *, source) -> float:
    """`leakage.max_gap`: how far (points of weighted F1) validation may lie above test before the probe warns."""
    gap = check(Annotated[float, Field(ge=0)], (params.get("leakage") or {}).get("max_gap", 10.0), source=source,
                prefix="leakage.max_gap")
    return float(gap)


def probe(table, fs: FeatureSet, target: str, labels: list[str], *, max_gap: float, seed: int = 0) -> dict:
    """Train/valid/test weighted F1 of a linear classifier on `fs`, the gap valid - test, and the warning."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y = table[f"{target}_id"].to_numpy()
    usable = y >= 0
    if fs.present is not None:
        usable &= fs.present
    split = table["split"].to_numpy()
    rows = {s: np.flatnonzero(usable & (split == s)) for s in ("train", "valid", "test")}
    if any(len(r) == 0 for r in rows.values()) or len(np.unique(y[rows["train"]])) < 2:
        return {"skipped": "a split without labelled utterances, or one class in train"}
    # Each split's rows are gathered once (fs.values may be memory-mapped) and standardised in place (copy=False:
    # the same arithmetic), so the probe holds one copy of the rows plus lbfgs's float64 copy of the training ones.
    scaler = StandardScaler(copy=False)
    standardised = {"train": scaler.fit_transform(np.asarray(fs.values[rows["train"]]))}
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(standardised["train"], y[rows["train"]])
    out = {}
    for s, r in rows.items():
        x = standardised[s] if s in standardised else scaler.transform(np.asarray(fs.values[r]))
        pred = clf.predict(x)
        out[f"{s}_wf1"] = round(classification_metrics(y[r], pred, labels)["wf1"], 2)
    out["gap"] = round(out["valid_wf1"] - out["test_wf1"], 2)
    out["max_gap"] = max_gap
    out["warning"] = bool(out["gap"] > max_gap)
    return out


def probe_features(dataset: str, table, features: dict[str, FeatureSet], meta: dict, *, max_gap: float) -> None:
    """Probe every feature set, record the result in its info (so in its JSON and the dataset's meta.json), and
    print one line per set, a warning where validation is far above test."""
    target = meta["target"]
    labels = meta[f"{target}_labels"]
    for name, fs in features.items():
        result = probe(table, fs, target, labels, max_gap=max_gap)
        fs.info["leakage_probe"] = result
        if "skipped" in result:
            print(f"{dataset} {name}: leakage probe skipped ({result['skipped']})")
            continue
        line = (f"{dataset} {name}: linear probe weighted F1 train {result['train_wf1']:.1f}, "
                f"valid {result['valid_wf1']:.1f}, test {result['test_wf1']:.1f}")
        if result["warning"]:
            line = (f"warning: {line}: validation is {result['gap']:.1f} points above test (> {max_gap}): "
                    f"the features may have seen validation labels, and selection on validation is then blind")
        print(line)
