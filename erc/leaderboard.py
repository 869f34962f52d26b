"""The leaderboard: test figures of the validation-selected checkpoints, from MLflow, mean ± std over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from erc.errors import ErcDataError

GROUP = ["dataset", "model", "features"]
HEADLINE = ["wf1", "acc", "macro_f1"]
MOSI_EXTRA = ["acc2", "wf1_binary", "acc7", "mae", "corr"]


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


def run_ids_from(files) -> list[str]:
    ids = []
    for f in files:
        try:
            ids += [r["run_id"] for r in json.loads(Path(f).read_text())["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ErcDataError(f, f"not a train stage output ({e})") from None
    return ids


def fetch_runs(client, run_ids: list[str]) -> pd.DataFrame:
    """One row per run: its tags that group it, its seed and its test_* metrics (names without `test_`)."""
    rows = []
    for run_id in run_ids:
        try:
            r = client.get_run(run_id)
        except Exception as e:  # mlflow raises its own exception types per store
            raise ErcDataError(f"mlflow run {run_id}", f"not found in the tracking store ({type(e).__name__})") from None
        if r.info.status != "FINISHED":
            raise ErcDataError(f"mlflow run {run_id}", f"status {r.info.status}, expected FINISHED")
        row = {k: r.data.tags.get(k, "") for k in GROUP}
        if r.data.tags.get("variant", "default") != "default":  # a tuned config sits beside the default one
            row["model"] = f"{row['model']}-{r.data.tags['variant']}"
        row.update({"seed": int(r.data.tags.get("seed", -1)), "run_id": run_id})
        row.update({k[len("test_"):]: v for k, v in r.data.metrics.items() if k.startswith("test_")})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) per (dataset, model, features); std is NaN for a single seed."""
    out = []
    for key, part in runs.groupby(GROUP, sort=True):
        row = dict(zip(GROUP, key))
        row["n_seeds"] = int(part["seed"].nunique())
        metrics = HEADLINE + [m for m in MOSI_EXTRA if m in part and part[m].notna().any()]
        for m in metrics:
            row[f"{m}_mean"] = float(part[m].mean())
            row[f"{m}_std"] = float(part[m].std(ddof=1)) if len(part) > 1 else math.nan
        out.append(row)
    table = pd.DataFrame(out)
    first = GROUP + ["n_seeds", "wf1_mean", "wf1_std", "acc_mean", "acc_std"]
    return table[first + [c for c in table.columns if c not in first]]


def to_markdown(board: pd.DataFrame) -> str:
    lines = ["# erc leaderboard", "",
             "Test-split figures (percent; MAE in sentiment units) of the checkpoint selected on validation weighted F1,",
             "mean ± sample std over seeds. Each row re-runs with `dvc repro`; every run is in MLflow.", "",
             "| dataset | model | features | seeds | weighted F1 | accuracy | macro F1 | MOSI Acc-2 | MOSI Acc-7 | MOSI MAE | MOSI r |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pm(row, m, digits=2):
        mean = row.get(f"{m}_mean")
        if mean is None or pd.isna(mean):
            return ""
        std = row.get(f"{m}_std")
        return f"{mean:.{digits}f}" + ("" if std is None or pd.isna(std) else f" ± {std:.{digits}f}")

    for _, row in board.iterrows():
        row = row.to_dict()
        lines.append(f"| {row['dataset']} | {row['model']} | {row['features']} | {row['n_seeds']} | {pm(row, 'wf1')} | "
                     f"{pm(row, 'acc')} | {pm(row, 'macro_f1')} | {pm(row, 'acc2')} | {pm(row, 'acc7')} | "
                     f"{pm(row, 'mae', 3)} | {pm(row, 'corr', 3)} |")
    return "\n".join(lines) + "\n"


def dvc_metrics(board: pd.DataFrame) -> dict:
    """Nested {dataset: {model: {metric: value}}} for `dvc metrics show` / `dvc exp show`."""
    out: dict = {}
    for _, row in board.iterrows():
        values = {k: (None if pd.isna(v) else round(float(v), 4)) for k, v in row.items()
                  if k.endswith("_mean") or k.endswith("_std")}
        values["n_seeds"] = int(row["n_seeds"])
        out.setdefault(row["dataset"], {})[f"{row['model']}[{row['features']}]"] = values
    return out
