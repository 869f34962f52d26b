"""The gap table (erc/evaluation/gap.py): steps from a published figure to the leaderboard, on generated runs."""

import json

import numpy as np
import pandas as pd
import pytest

from erc.errors import ErcDataError
from erc.evaluation import gap

LABELS = ["a", "b", "c"]


def predictions(accuracy: float, seed: int, dialogues: int = 12, per_dialogue: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    actual = rng.choice(LABELS, size=dialogues * per_dialogue)
    wrong = rng.random(len(actual)) > accuracy
    predicted = np.where(wrong, np.roll(actual, 1), actual)
    return pd.DataFrame({"dialogue_id": np.repeat([f"d{i}" for i in range(dialogues)], per_dialogue),
                         "actual": actual, "predicted": predicted})


def step(name, accuracy, seeds=(0, 1, 2), metric="test_wf1", offset=0):
    preds, runs = {}, []
    for s in seeds:
        rid = f"{name}-{s}"
        preds[rid] = predictions(accuracy, 100 * offset + s)
        true, pred = preds[rid]["actual"].to_numpy(), preds[rid]["predicted"].to_numpy()
        cm = np.array([[np.sum((true == a) & (pred == b)) for b in LABELS] for a in LABELS], dtype=float)
        value = float(gap.stats.weighted_f1(cm))
        runs.append({"seed": s, "run_id": rid, "test_wf1": value, "last_test_wf1": value - 1.0})
    return gap.Step(name, runs, metric), preds


def test_difference_interval_covers_zero_for_the_same_runs_and_not_for_a_clear_gain():
    same, preds = step("x", 0.6)
    conf = np.stack(list(gap.confusions_of([same], preds).values()))
    low, high = gap.difference_interval(conf, conf, replicates=500)
    assert low <= 0 <= high
    better, more = step("y", 0.95, offset=1)
    both = gap.confusions_of([same, better], {**preds, **more})
    a = np.stack([both[r["run_id"]] for r in same.runs])
    b = np.stack([both[r["run_id"]] for r in better.runs])
    low, high = gap.difference_interval(a, b, replicates=500)
    assert low > 10


def test_row_table_walks_from_the_published_figure_step_by_step():
    paper, p1 = step("paper protocol", 0.9)
    last = gap.Step("its last epoch", paper.runs, "last_test_wf1")
    tuned, p2 = step("tuned", 0.6, offset=2)
    row = gap.Row("sdt", "iemocap", 74.08, "Ma et al. 2024", [paper, last, tuned], "the paper's features")
    table = gap.row_table(row, {**p1, **p2}, replicates=300)
    means = [np.mean(list(s.values.values())) for s in row.steps]
    assert table["wf1"].tolist()[1:] == pytest.approx(means)
    assert table["change"].iloc[1] == pytest.approx(means[0] - 74.08)
    assert table["change"].iloc[2] == pytest.approx(-1.0)  # last epoch: one point below in every seed
    assert table["interval"].tolist()[1:] == ["remainder", "same runs, seeds", "seeds only"]
    assert table["low"].iloc[2] == pytest.approx(-1.0) and table["high"].iloc[2] == pytest.approx(-1.0)  # paired
    assert table["change"].iloc[3] == pytest.approx(means[2] - means[1])
    text = gap.to_markdown([row], [table])
    assert "## sdt on iemocap" in text and "Remainder: the paper's features" in text


def test_steps_with_predictions_get_a_dialogue_interval():
    first, p1 = step("validation-selected", 0.8)
    second, p2 = step("tuned", 0.6, offset=3)
    row = gap.Row("sdt", "iemocap", 74.08, "paper", [first, second])
    table = gap.row_table(row, {**p1, **p2}, replicates=300)
    assert table["interval"].iloc[2] == "dialogues and seeds"
    assert table["high"].iloc[2] < 0  # a clear loss


def test_spec_problems_are_one_line_naming_the_spec(tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"runs": [{"seed": 0, "run_id": "r0", "test_wf1": 60.0}]}))
    spec = tmp_path / "gap.yaml"
    spec.write_text("rows:\n- {model: sdt, dataset: iemocap, published: 74.08, source: paper,\n"
                    "   steps: [{name: paper, runs: runs.json, metric: last_test_wf1}]}\n")
    with pytest.raises(ErcDataError, match="no last_test_wf1"):
        gap.load_rows(spec)
    spec.write_text("rows:\n- {model: sdt, dataset: iemocap, source: paper, steps: []}\n")
    with pytest.raises(ErcDataError, match=r"gap\.yaml.*rows\[0\].*published"):
        gap.load_rows(spec)
    spec.write_text("rows:\n- {model: sdt, dataset: iemocap, published: 74.08, source: paper,\n"
                    "   steps: [{name: paper, runs: runs.json}]}\n")
    (row,) = gap.load_rows(spec)
    assert row.steps[0].values == {0: 60.0}


def test_a_one_seed_step_has_no_interval():
    first, p1 = step("validation-selected", 0.8, seeds=(0,))
    second, p2 = step("tuned", 0.6, offset=3)
    table = gap.row_table(gap.Row("sdt", "iemocap", 74.08, "paper", [first, second]), {**p1, **p2}, replicates=100)
    assert table["interval"].iloc[2] == "none (the step above has one seed)" and np.isnan(table["low"].iloc[2])
    table = gap.row_table(gap.Row("sdt", "iemocap", 74.08, "paper", [second, first]), {**p1, **p2}, replicates=100)
    assert table["interval"].iloc[2] == "none (this step has one seed)" and np.isnan(table["low"].iloc[2])


def test_a_row_without_a_published_figure_starts_at_its_first_run_and_states_its_test_selection(tmp_path):
    paper, p1 = step("paper protocol", 0.9)
    (tmp_path / "paper.json").write_text(json.dumps({"runs": paper.runs}))
    spec = tmp_path / "gap.yaml"
    spec.write_text("rows:\n- {model: summer, dataset: meld, published: null, source: 'arXiv 2503.23721: not found',\n"
                    "   steps: [{name: best, runs: paper.json}, {name: last, runs: paper.json, metric: last_test_wf1}]}\n")
    [row] = gap.load_rows(spec)
    assert np.isnan(row.published)
    table = gap.row_table(row, p1, replicates=200)
    assert table["step"].iloc[0].startswith("no published figure") and np.isnan(table["change"].iloc[1])
    assert table["interval"].iloc[1] == ""  # no remainder without a figure to subtract from
    text = gap.to_markdown([row], [table])
    assert "| nan" not in text and "remainder" not in text.split("## summer on meld")[1].split("## What")[0]
    inflation = gap.selection_inflation([row], replicates=200)
    assert inflation["inflation"].tolist() == pytest.approx([1.0])  # every seed's last epoch is one point lower
    assert inflation["low"].iloc[0] == pytest.approx(1.0) and inflation["high"].iloc[0] == pytest.approx(1.0)
    assert "## What picking the epoch on test adds" in text and "| summer | meld | best | 3 |" in text


def test_rows_without_a_paper_protocol_step_state_no_inflation():
    tuned, p = step("tuned", 0.6)
    assert gap.selection_inflation([gap.Row("sdt", "meld", 66.6, "paper", [tuned])]).empty
