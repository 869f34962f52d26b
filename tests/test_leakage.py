"""The leakage probe flags features that saw validation labels and passes honest ones."""

import numpy as np
import pandas as pd

from erc.data.canonical import FeatureSet
from erc.evaluation.leakage import probe, probe_features

LABELS = ["a", "b", "c"]


def table_and_labels(seed=0):
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * 600 + ["valid"] * 400 + ["test"] * 400)
    y = rng.integers(0, 3, size=len(split))
    return pd.DataFrame({"split": split, "emotion_id": y}), y, rng


def test_label_derived_features_are_flagged():
    table, y, rng = table_and_labels()
    signal = np.eye(3)[y] * 3.0
    # Learnt with the labels of train and validation (as bc-LSTM's MOSI sets), uninformed on test.
    seen = table["split"].to_numpy() != "test"
    values = np.where(seen[:, None], signal, 0.0) + rng.normal(size=(len(y), 3))
    fs = FeatureSet("leaky", "text", values.astype(np.float32), ["generated"])
    result = probe(table, fs, "emotion", LABELS, max_gap=10)
    assert result["valid_wf1"] > 90 and result["test_wf1"] < 50
    assert result["warning"] and result["gap"] > 10


def test_honest_features_pass(capsys):
    table, y, rng = table_and_labels(1)
    values = (np.eye(3)[y] * 2.0 + rng.normal(size=(len(y), 3))).astype(np.float32)  # the same signal everywhere
    fs = FeatureSet("honest", "text", values, ["generated"])
    probe_features("tiny", table, {"honest": fs}, {"target": "emotion", "emotion_labels": LABELS}, max_gap=10)
    result = fs.info["leakage_probe"]
    assert not result["warning"] and abs(result["gap"]) < 10, result
    assert result["valid_wf1"] > 45 and result["test_wf1"] > 45  # the probe does learn something
    out = capsys.readouterr().out
    assert "tiny honest: linear probe" in out and "warning" not in out
