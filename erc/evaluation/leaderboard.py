"""The leaderboard: test figures of the validation-selected checkpoints, from MLflow, with how sure each one is.

Per (dataset, variant, model, features): the mean and sample std over seeds, a 95% bootstrap interval of test
weighted F1 over seeds and test dialogues, paired tests against the dataset's baseline and best model (approximate
randomisation over test dialogues, Holm-corrected within the dataset; see erc.evaluation.stats), the runs' own efficiency
figures, and flags for inputs learnt with labels or flagged by the leakage probe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from erc.errors import ErcDataError
from erc.evaluation import stats

GROUP = ["dataset", "variant", "model", "features"]
HEADLINE = ["wf1", "acc", "macro_f1"]
MOSI_EXTRA = ["acc2", "wf1_binary", "acc7", "mae", "corr"]
EFFICIENCY = ["params_total", "params_trainable", "train_s_per_epoch", "infer_ms_per_dialogue", "peak_rss_mb"]
FLAGS = ["class_weights", "label_derived", "leakage_warning"]
REPLICATES = 2000
ALPHA = 0.05
MAIN_VARIANT = "tuned"  # the default leaderboard; every other variant is a second view below it


def run_files(paths, datasets: list[str], models: list[str]) -> tuple[list[Path], list[Path]]:
    """The train stages' run lists: files as given, and from each folder `<folder>/<dataset>/<model>.json` for every
    dataset and model of the pipeline's lists (each must be there). Returns (taken, skipped): a folder's other files
    (a dataset since removed from params) are skipped, not shown."""
    taken, skipped = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            taken.append(path)
            continue
        expected = [path / d / f"{m}.json" for d in datasets for m in models]
        missing = [p for p in expected if not p.is_file()]
        if missing:
            raise ErcDataError(path, f"no run list {missing[0].relative_to(path)} ({len(missing)} of {len(expected)} "
                                     "missing): run its train stage first")
        taken += expected
        skipped += sorted(p for p in path.glob("*/*.json") if p not in expected)
    return taken, skipped


def collect_run_files(paths, params: dict, *, source) -> list[Path]:
    """The run lists of `paths` (folders of train stage outputs, or the outputs) for params' pipeline lists;
    a folder's files of datasets or models no longer listed are named on stderr and left out."""
    import sys

    pipeline = params.get("pipeline") or {}
    datasets, models = pipeline.get("datasets") or [], (pipeline.get("models") or []) + (pipeline.get("distilled") or [])
    if not (datasets and models) and any(Path(p).is_dir() for p in paths):
        raise ErcDataError(source, "pipeline: no datasets or no models listed, so no run lists to collect")
    files, skipped = run_files(paths, datasets, models)
    for path in skipped:
        print(f"skipping {path} (not in params' pipeline lists)", file=sys.stderr)
    return files


def run_ids_from(files) -> list[str]:
    ids = []
    for f in files:
        try:
            ids += [r["run_id"] for r in json.loads(Path(f).read_text())["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ErcDataError(f, f"not a train stage output ({e})") from None
    return ids


def fetch_runs(client, run_ids: list[str]) -> pd.DataFrame:
    """One row per run: the tags that group and flag it, its seed, test_* metrics (without `test_`), efficiency."""
    rows = []
    for run_id in run_ids:
        try:
            r = client.get_run(run_id)
        except Exception as e:  # mlflow raises its own exception types per store
            raise ErcDataError(f"mlflow run {run_id}", f"not found in the tracking store ({type(e).__name__})") from None
        if r.info.status != "FINISHED":
            raise ErcDataError(f"mlflow run {run_id}", f"status {r.info.status}, expected FINISHED")
        tags = r.data.tags
        if tags.get("protocol", "validation") != "validation":
            raise ErcDataError(f"mlflow run {run_id}", f"a {tags['protocol']}-protocol run (its epoch picked on test) "
                                                       "never enters the leaderboard")
        if tags.get("paper_entry") == "true":
            raise ErcDataError(f"mlflow run {run_id}", "a run with params' paper entry (the official configuration, "
                                                       "untuned) belongs to the gap table, not the leaderboard")
        row = {k: tags.get(k, "") for k in GROUP + FLAGS}
        row["variant"] = tags.get("variant") or "default"
        row["class_weights"] = tags.get("class_weights") or "none"
        row.update({"seed": int(tags.get("seed", -1)), "run_id": run_id})
        row.update({k[len("test_"):]: v for k, v in r.data.metrics.items() if k.startswith("test_")})
        row.update({k: r.data.metrics[k] for k in EFFICIENCY if k in r.data.metrics})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) per group; std is NaN for a single seed. Efficiency: means over seeds."""
    out = []
    for key, part in runs.groupby(GROUP, sort=True):
        row = dict(zip(GROUP, key))
        row["n_seeds"] = int(part["seed"].nunique())
        metrics = HEADLINE + [m for m in MOSI_EXTRA if m in part and part[m].notna().any()]
        for m in metrics:
            row[f"{m}_mean"] = float(part[m].mean())
            row[f"{m}_std"] = float(part[m].std(ddof=1)) if len(part) > 1 else math.nan
        for m in EFFICIENCY:
            row[m] = float(part[m].mean()) if m in part and part[m].notna().any() else math.nan
        for flag in FLAGS:
            row[flag] = ",".join(sorted({v for v in part[flag] if v})) if flag in part else ""
        out.append(row)
    table = pd.DataFrame(out)
    first = GROUP + ["n_seeds", "wf1_mean", "wf1_std", "acc_mean", "acc_std"]
    return table[first + [c for c in table.columns if c not in first]]


def dataset_confusions(runs: pd.DataFrame, predictions: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """Per run, (dialogues, C, C) confusion counts over one dialogue and label index shared by its dataset."""
    out = {}
    for dataset, part in runs.groupby("dataset"):
        frames = {rid: predictions[rid] for rid in part["run_id"]}
        for rid, df in frames.items():
            if "dialogue_id" not in df:
                raise ErcDataError(f"mlflow run {rid}", "test_predictions.csv has no dialogue_id column (a run made "
                                                        "before erc recorded it): train it again")
        dialogues = sorted(set().union(*(set(df["dialogue_id"].astype(str)) for df in frames.values())))
        labels = sorted(set().union(*(set(df["actual"]) | set(df["predicted"]) for df in frames.values())))
        d_index, l_index = {d: i for i, d in enumerate(dialogues)}, {lab: i for i, lab in enumerate(labels)}
        for rid, df in frames.items():
            out[rid] = stats.dialogue_confusions(df["dialogue_id"].astype(str).map(d_index).to_numpy(),
                                                 df["actual"].map(l_index).to_numpy(),
                                                 df["predicted"].map(l_index).to_numpy(), len(dialogues), len(labels))
    return out


def add_significance(board: pd.DataFrame, runs: pd.DataFrame, predictions: dict[str, pd.DataFrame], *,
                     replicates: int = REPLICATES) -> pd.DataFrame:
    """Interval and paired-test columns: wf1_ci_low/high, p_vs_baseline, p_vs_best (Holm-adjusted within each
    dataset and variant), and whether each difference is significant at ALPHA."""
    confusions = dataset_confusions(runs, predictions)
    board = board.copy()
    for col in ("wf1_ci_low", "wf1_ci_high", "p_vs_baseline", "p_vs_best"):
        board[col] = math.nan

    def seeds_of(row) -> dict[int, np.ndarray]:
        part = runs[(runs[GROUP] == pd.Series({k: row[k] for k in GROUP})).all(axis=1)]
        return {int(s): confusions[rid] for s, rid in zip(part["seed"], part["run_id"])}

    for (dataset, variant), rows in board.groupby(["dataset", "variant"]):
        per_row = {i: seeds_of(board.loc[i]) for i in rows.index}
        for i, by_seed in per_row.items():
            low, high = stats.bootstrap_ci(np.stack([by_seed[s] for s in sorted(by_seed)]), replicates=replicates)
            board.loc[i, ["wf1_ci_low", "wf1_ci_high"]] = low, high
        baselines = rows[rows["model"] == "baseline"].sort_values("n_seeds", ascending=False, kind="stable")
        best = rows["wf1_mean"].idxmax()
        tests = []  # (row, column, p)
        for i in rows.index:
            for column, other in (("p_vs_baseline", baselines.index[0] if len(baselines) else None),
                                  ("p_vs_best", best)):
                if other is None or other == i:
                    continue
                common = sorted(set(per_row[i]) & set(per_row[other]))  # seed k with seed k
                if not common:
                    continue
                p = stats.paired_randomization(np.stack([per_row[i][s] for s in common]),
                                               np.stack([per_row[other][s] for s in common]), replicates=replicates)
                tests.append((i, column, p))
        for (i, column, _), adjusted in zip(tests, stats.holm([p for _, _, p in tests])):
            board.loc[i, column] = adjusted
    board["significant_vs_baseline"] = board["p_vs_baseline"] < ALPHA
    board["significant_vs_best"] = board["p_vs_best"] < ALPHA
    return board


def format_number(value, digits=2) -> str:
    """The cell formats of the leaderboard's markdown, which the report page shows as they are here."""
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def format_p(value, significant) -> str:
    if value is None or pd.isna(value):
        return ""
    return ("< 0.001" if value < 0.001 else f"{value:.3f}") + (" *" if significant else "")


def format_mean_std(row, m, digits=2) -> str:
    mean, std = row.get(f"{m}_mean"), row.get(f"{m}_std")
    if mean is None or pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None or pd.isna(std) else f" ± {std:.{digits}f}")


def _flags(row) -> str:
    out = []
    if row.get("label_derived"):
        out.append(f"label-derived {row['label_derived']} †")
    if row.get("leakage_warning"):
        out.append(f"leakage probe {row['leakage_warning']} !")
    if row.get("class_weights") not in (None, "", "none"):
        out.append(f"class weights {row['class_weights']}")
    return "; ".join(out)


def format_millions(count) -> str:
    return "" if pd.isna(count) else f"{count / 1e6:.2f}M"


def to_markdown(board: pd.DataFrame) -> str:
    lines = ["# erc leaderboard", "",
             "Test-split figures (percent) of the checkpoint selected on validation weighted F1, mean ± sample std over",
             "seeds. 95% CI: bootstrap over seeds and test dialogues (erc/evaluation/stats.py). "
             "p: approximate randomisation over",
             "test dialogues against the dataset's baseline and its best model, Holm-corrected within each dataset;",
             f"* significant at {ALPHA}. Efficiency: the runs' own figures (CPU unless the runs had GPUs); params counts "
             "a frozen teacher (SUMMER's), trainable what the optimizer updates. "
             "Flags: † inputs learnt with labels, ! the leakage probe's validation-above-test warning.",
             "Each row re-runs with `dvc repro`; every run is in MLflow.", ""]
    variants = sorted(board["variant"].unique(), key=lambda v: (v != MAIN_VARIANT, v))
    for variant in variants:
        part = board[board["variant"] == variant]
        title = {MAIN_VARIANT: "Tuned configurations (the leaderboard)",
                 "default": "Untuned: params.yaml's values (a second view)"}.get(variant, f"Variant: {variant}")
        lines += [f"## {title}", "",
                  "| dataset | model | features | seeds | weighted F1 | 95% CI | p vs baseline | p vs best | accuracy | "
                  "macro F1 | params | trainable | s/epoch | ms/dialogue | peak MB | flags |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, row in part.iterrows():
            row = row.to_dict()
            ci = f"[{format_number(row.get('wf1_ci_low'))}, {format_number(row.get('wf1_ci_high'))}]" if not pd.isna(
                row.get("wf1_ci_low", math.nan)) else ""
            params, trainable = (format_millions(row.get(k)) for k in ("params_total", "params_trainable"))
            cells = [row["dataset"], row["model"], row["features"], row["n_seeds"], format_mean_std(row, "wf1"), ci,
                     format_p(row.get("p_vs_baseline"), row.get("significant_vs_baseline")),
                     format_p(row.get("p_vs_best"), row.get("significant_vs_best")), format_mean_std(row, "acc"),
                     format_mean_std(row, "macro_f1"), params, trainable, format_number(row.get("train_s_per_epoch")),
                     format_number(row.get("infer_ms_per_dialogue")), format_number(row.get("peak_rss_mb"), 0),
                     _flags(row)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        mosi = part[part.get("acc2_mean", pd.Series(dtype=float)).notna()] if "acc2_mean" in part else part.iloc[:0]
        if len(mosi):
            lines += ["", "MOSI's sentiment figures (Acc-2 from the classifier, Acc-7 and MAE and r from the score head):",
                      "", "| model | features | Acc-2 | Acc-7 | MAE | r |", "|---|---|---|---|---|---|"]
            for _, row in mosi.iterrows():
                row = row.to_dict()
                cells = [row["model"], row["features"], format_mean_std(row, "acc2"), format_mean_std(row, "acc7"),
                         format_mean_std(row, "mae", 3), format_mean_std(row, "corr", 3)]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    return "\n".join(lines)


def dvc_metrics(board: pd.DataFrame) -> dict:
    """Nested {dataset: {model[features] (variant): {metric: value}}} for `dvc metrics show` / `dvc metrics diff`."""
    out: dict = {}
    keep = ("_mean", "_std", "_ci_low", "_ci_high")
    for _, row in board.iterrows():
        values = {k: (None if pd.isna(v) else round(float(v), 4)) for k, v in row.items()
                  if k.endswith(keep) or k.startswith("p_vs_") or k in EFFICIENCY}
        values["n_seeds"] = int(row["n_seeds"])
        name = f"{row['model']}[{row['features']}]" + ("" if row["variant"] == MAIN_VARIANT else f" ({row['variant']})")
        out.setdefault(row["dataset"], {})[name] = values
    return out
