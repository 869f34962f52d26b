"""The leaderboard, from real MLflow runs in a temporary sqlite store (no training: runs are written directly)."""

import json
import math
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from erc.errors import ErcDataError
from erc.evaluation import leaderboard
from erc.params import project_root

# (dataset, model, features) -> per-seed test metrics (percent; MAE in sentiment units)
EMO_FEATURES = "text:minilm"
RUNS = {
    ("tiny", "baseline", EMO_FEATURES): [
        {"test_wf1": 60.0, "test_acc": 70.0, "test_macro_f1": 50.0},
        {"test_wf1": 62.0, "test_acc": 71.0, "test_macro_f1": 52.0},
        {"test_wf1": 67.0, "test_acc": 75.0, "test_macro_f1": 54.0},
    ],
    ("tiny", "other", EMO_FEATURES): [
        {"test_wf1": 40.0, "test_acc": 50.0, "test_macro_f1": 30.0},
        {"test_wf1": 40.0, "test_acc": 52.0, "test_macro_f1": 30.0},
        {"test_wf1": 43.0, "test_acc": 54.0, "test_macro_f1": 33.0},
    ],
    ("mosi", "baseline", "audio:a+text:t"): [
        {"test_wf1": 70.0, "test_acc": 70.0, "test_macro_f1": 69.0, "test_acc2": 70.0, "test_wf1_binary": 70.0,
         "test_acc7": 30.0, "test_mae": 1.0, "test_corr": 0.5},
        {"test_wf1": 74.0, "test_acc": 72.0, "test_macro_f1": 71.0, "test_acc2": 72.0, "test_wf1_binary": 74.0,
         "test_acc7": 34.0, "test_mae": 0.9, "test_corr": 0.6},
    ],
}
SAMPLE_STD_60_62_67 = math.sqrt(((60 - 63) ** 2 + (62 - 63) ** 2 + (67 - 63) ** 2) / 2)  # sqrt(13)


ACCURACY = {"baseline": 0.75, "other": 0.35}  # how often each model's fixture predictions are right
DIALOGUES, PER_DIALOGUE = 40, 3


def predictions_csv(model: str, seed: int) -> str:
    """The same test utterances for every run of a dataset; `model`'s share of them right, varying with the seed."""
    rng = np.random.default_rng(100 * seed + len(model))
    labels = ["a", "b", "c"]
    rows = []
    for i in range(DIALOGUES * PER_DIALOGUE):
        actual = labels[i % 3]
        right = rng.random() < ACCURACY.get(model, 0.5)
        rows.append(f"d{i // PER_DIALOGUE},u{i},{actual},{actual if right else labels[(i + 1) % 3]}")
    return "dialogue_id,utterance_id,actual,predicted\n" + "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real sqlite store holding FINISHED runs for RUNS, each with a test_predictions.csv, plus train-stage files.
    Every run is of the `tuned` variant, except an untuned baseline on tiny (the second view)."""
    root = tmp_path_factory.mktemp("lb")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("erc", artifact_location=(root / "mlruns").as_uri())
    files, n_predictions = [], {}
    groups = [(key, "tuned", seeds) for key, seeds in RUNS.items()]
    groups.append((("tiny", "baseline", EMO_FEATURES), "default", RUNS[("tiny", "baseline", EMO_FEATURES)][:2]))
    for (dataset, model, features), variant, seeds in groups:
        results = []
        for seed, metrics in enumerate(seeds):
            tags = {"dataset": dataset, "model": model, "features": features, "seed": str(seed), "variant": variant}
            if dataset == "mosi":
                tags["label_derived"] = "text"
            r = client.create_run(exp, tags=tags)
            run_id = r.info.run_id
            for k, v in metrics.items():
                client.log_metric(run_id, k, v)
            client.log_metric(run_id, "val_wf1", 99.0)  # not a test figure: must not reach the board
            client.log_metric(run_id, "params_total", 1000.0 * (seed + 1))
            key = (dataset, model, variant)
            n_predictions[key] = n_predictions.get(key, 0) + DIALOGUES * PER_DIALOGUE
            path = root / f"pred-{run_id}" / "test_predictions.csv"
            path.parent.mkdir()
            path.write_text(predictions_csv(model, seed))
            client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
            results.append({"run_id": run_id, "seed": seed, **metrics})
        f = root / "runs" / dataset / f"{model}-{variant}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"dataset": dataset, "model": model, "runs": results}))
        files.append(f)
    return {"root": root, "uri": uri, "client": client, "experiment": exp, "files": files, "n_predictions": n_predictions}


@pytest.fixture(scope="module")
def runs(store):
    return leaderboard.fetch_runs(store["client"], leaderboard.run_ids_from(store["files"]))


@pytest.fixture(scope="module")
def board(runs):
    return leaderboard.summarise(runs[runs["variant"] == "tuned"])


def row(board, dataset, model, variant="tuned"):
    found = board[(board["dataset"] == dataset) & (board["model"] == model) & (board["variant"] == variant)]
    assert len(found) == 1
    return found.iloc[0]


def test_run_files_of_a_folder_follow_the_pipeline_lists(tmp_path):
    for dataset, model in [("a", "m1"), ("a", "m2"), ("b", "m1"), ("b", "m2"), ("gone", "m1")]:
        (tmp_path / "runs" / dataset).mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / dataset / f"{model}.json").write_text("{}")
    extra = tmp_path / "extra.json"
    taken, skipped = leaderboard.run_files([tmp_path / "runs", extra], ["a", "b"], ["m1", "m2"])
    assert taken == [tmp_path / "runs" / d / f"{m}.json" for d in "ab" for m in ("m1", "m2")] + [extra]
    assert skipped == [tmp_path / "runs" / "gone" / "m1.json"]  # a dataset since removed from params
    with pytest.raises(ErcDataError, match=r"runs: no run list c/m1.json \(2 of 6 missing\)"):
        leaderboard.run_files([tmp_path / "runs"], ["a", "b", "c"], ["m1", "m2"])


def test_run_ids_from_train_stage_files(store, tmp_path):
    ids = leaderboard.run_ids_from(store["files"])
    assert len(ids) == 10 and len(set(ids)) == 10
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "tiny"}))
    with pytest.raises(ErcDataError, match="bad.json"):
        leaderboard.run_ids_from([bad])
    with pytest.raises(ErcDataError, match="missing.json"):
        leaderboard.run_ids_from([tmp_path / "missing.json"])


def test_fetch_runs(runs):
    assert len(runs) == 10
    assert {"dataset", "variant", "model", "features", "seed", "run_id", "wf1", "acc", "macro_f1",
            "params_total", "label_derived"} <= set(runs.columns)
    assert not any(c.startswith("test_") for c in runs.columns)
    assert "val_wf1" not in runs.columns
    tiny = runs[(runs["dataset"] == "tiny") & (runs["model"] == "baseline") & (runs["variant"] == "tuned")]
    tiny = tiny.sort_values("seed")
    assert tiny["seed"].tolist() == [0, 1, 2]
    assert tiny["wf1"].tolist() == [60.0, 62.0, 67.0]


def test_summarise_mean_and_sample_std(board):
    assert list(board.columns[:9]) == ["dataset", "variant", "model", "features", "n_seeds", "wf1_mean", "wf1_std",
                                       "acc_mean", "acc_std"]
    assert len(board) == 3
    base = row(board, "tiny", "baseline")
    assert base["n_seeds"] == 3 and base["features"] == EMO_FEATURES
    assert base["wf1_mean"] == pytest.approx(63.0)
    assert base["wf1_std"] == pytest.approx(SAMPLE_STD_60_62_67)  # ddof=1, not the population std (2.94)
    assert base["acc_mean"] == pytest.approx(72.0)
    assert base["acc_std"] == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    assert base["macro_f1_mean"] == pytest.approx(52.0)
    assert base["macro_f1_std"] == pytest.approx(2.0)
    other = row(board, "tiny", "other")
    assert other["wf1_mean"] == pytest.approx(41.0)
    assert other["wf1_std"] == pytest.approx(math.sqrt(3.0))


def test_summarise_mosi_columns(board):
    for c in ("acc2_mean", "acc2_std", "mae_mean", "mae_std", "corr_mean", "acc7_mean", "wf1_binary_mean"):
        assert c in board.columns, c
    mosi = row(board, "mosi", "baseline")
    assert mosi["n_seeds"] == 2
    assert mosi["acc2_mean"] == pytest.approx(71.0)
    assert mosi["acc2_std"] == pytest.approx(math.sqrt(2.0))
    assert mosi["mae_mean"] == pytest.approx(0.95)
    assert mosi["corr_mean"] == pytest.approx(0.55)
    assert pd.isna(row(board, "tiny", "baseline")["mae_mean"])  # emotion rows have no MOSI figures


def test_summarise_without_mosi_runs_has_no_mosi_columns(runs):
    board = leaderboard.summarise(runs[(runs["dataset"] == "tiny") & (runs["variant"] == "tuned")])
    assert not any(c.startswith(("acc2", "mae", "corr", "acc7")) for c in board.columns)


def test_single_seed_has_nan_std(runs):
    one = leaderboard.summarise(runs[(runs["model"] == "other") & (runs["seed"] == 0) & (runs["variant"] == "tuned")])
    assert one["n_seeds"].tolist() == [1]
    assert math.isnan(one["wf1_std"].iloc[0])
    md = leaderboard.to_markdown(one)
    line = next(l for l in md.splitlines() if l.startswith("| tiny | other |"))
    assert "| 40.00 |" in line and "±" not in line.split("|")[5]


def test_to_markdown(board):
    md = leaderboard.to_markdown(board)
    lines = md.splitlines()
    table = [l for l in lines if l.startswith(("| tiny", "| mosi"))]
    assert len(table) == 3
    base = next(l for l in table if l.startswith("| tiny | baseline |"))
    assert f"63.00 ± {SAMPLE_STD_60_62_67:.2f}" in base  # 63.00 ± 3.61
    assert f"72.00 ± {math.sqrt(7):.2f}" in base  # 72.00 ± 2.65
    header = next(l for l in lines if l.startswith("| dataset"))
    assert all(l.count("|") == header.count("|") for l in table)  # every row has every column
    assert "label-derived text †" in next(l for l in table if l.startswith("| mosi | baseline |"))
    mosi = next(l for l in lines if l.startswith("| baseline | audio:a+text:t |"))  # MOSI's own table
    assert "71.00 ± 1.41" in mosi and "0.950 ± 0.071" in mosi and "0.550 ± 0.071" in mosi


def test_dvc_metrics(board):
    m = leaderboard.dvc_metrics(board)
    assert set(m) == {"tiny", "mosi"}
    assert set(m["tiny"]) == {f"baseline[{EMO_FEATURES}]", f"other[{EMO_FEATURES}]"}
    base = m["tiny"][f"baseline[{EMO_FEATURES}]"]
    assert base["wf1_mean"] == 63.0
    assert base["wf1_std"] == round(SAMPLE_STD_60_62_67, 4)
    assert base["n_seeds"] == 3
    assert base["mae_mean"] is None  # NaN becomes null, so the JSON stays valid
    assert m["mosi"]["baseline[audio:a+text:t]"]["mae_mean"] == 0.95
    json.loads(json.dumps(m, allow_nan=False))


def test_unfinished_or_unknown_runs_are_rejected(store):
    client = store["client"]
    running = client.create_run(store["experiment"], tags={"dataset": "tiny", "model": "baseline", "seed": "9"})
    with pytest.raises(ErcDataError, match="RUNNING"):
        leaderboard.fetch_runs(client, [running.info.run_id])
    client.set_terminated(running.info.run_id, "FAILED")
    with pytest.raises(ErcDataError, match="FAILED"):
        leaderboard.fetch_runs(client, [running.info.run_id])
    with pytest.raises(ErcDataError, match="not found"):
        leaderboard.fetch_runs(client, ["0" * 32])


def stage(store, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "pipelines/leaderboard.py", *map(str, args)], cwd=project_root(), env=env,
                          capture_output=True, text=True, timeout=300)


def test_leaderboard_stage(store, tmp_path):
    out = tmp_path / "reports"
    proc = stage(store, *store["files"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    csv = pd.read_csv(out / "leaderboard.csv")
    assert len(csv) == 4  # three tuned rows and the untuned baseline
    assert list(csv.columns[:9]) == ["dataset", "variant", "model", "features", "n_seeds", "wf1_mean", "wf1_std",
                                     "acc_mean", "acc_std"]
    base = csv[(csv["dataset"] == "tiny") & (csv["model"] == "baseline") & (csv["variant"] == "tuned")].iloc[0]
    assert base["wf1_mean"] == pytest.approx(63.0)
    assert base["wf1_std"] == pytest.approx(SAMPLE_STD_60_62_67, abs=1e-4)
    assert {"acc2_mean", "mae_mean", "corr_mean", "wf1_ci_low", "wf1_ci_high", "p_vs_baseline", "p_vs_best",
            "params_total"} <= set(csv.columns)
    assert base["params_total"] == pytest.approx(2000.0)  # the mean over its seeds' 1000, 2000, 3000
    # `other` is right on 35% of the utterances, the baseline on 75%, over 40 dialogues: a real difference
    other = csv[(csv["model"] == "other")].iloc[0]
    assert other["p_vs_baseline"] < 0.01 and other["significant_vs_baseline"]
    assert other["wf1_ci_high"] < base["wf1_ci_low"]
    assert pd.isna(base["p_vs_baseline"])  # the baseline is not compared with itself

    md = (out / "leaderboard.md").read_text()
    assert md.startswith("# erc leaderboard") and "| tiny | baseline |" in md and "| mosi | baseline |" in md
    tuned, untuned = md.index("## Tuned configurations"), md.index("## Untuned")
    assert tuned < untuned  # the tuned view first, the untuned one as a second view

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tiny"][f"baseline[{EMO_FEATURES}]"]["wf1_mean"] == 63.0
    assert metrics["tiny"][f"baseline[{EMO_FEATURES}] (default)"]["n_seeds"] == 2

    confusion = sorted(p.name for p in (out / "confusion").iterdir())
    assert confusion == ["mosi_baseline.csv", "tiny_baseline.csv", "tiny_baseline_default.csv", "tiny_other.csv"]
    for (dataset, model, variant), n in store["n_predictions"].items():
        name = f"{dataset}_{model}" + ("" if variant == "tuned" else f"_{variant}")
        pooled = pd.read_csv(out / "confusion" / f"{name}.csv")
        assert list(pooled.columns) == ["actual", "predicted"]
        assert len(pooled) == n  # every seed's test predictions, pooled
    assert not list(out.glob(".*"))  # no temporary leftovers of the atomic writes


def test_runs_without_dialogue_ids_are_rejected(runs):
    part = runs[runs["dataset"] == "tiny"]
    old = {rid: pd.DataFrame({"actual": ["a"], "predicted": ["a"]}) for rid in part["run_id"]}
    with pytest.raises(ErcDataError, match="no dialogue_id"):
        leaderboard.add_significance(leaderboard.summarise(part), part, old)


def test_leaderboard_stage_rejects_an_unknown_run(store, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": [{"run_id": "f" * 32}]}))
    proc = stage(store, bad, "--out", tmp_path / "reports")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: mlflow run " + "f" * 32)
    assert not (tmp_path / "reports" / "leaderboard.csv").exists()
