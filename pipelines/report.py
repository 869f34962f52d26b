"""Stage `report`: the leaderboard's runs evaluated again -> reports/report/index.html (one self-contained page),
its tables and figures, and an MLflow parent run of the leaderboard's runs holding the same files.

    python pipelines/report.py runs/tuned --leaderboard reports/leaderboard.csv --out reports/report

The runs are the leaderboard's: a folder of run lists (`<folder>/<dataset>/<model>.json`, for params' `pipeline`
lists) or run-list files named one by one. The gap table (--gap, reports/gap.md) is shown where it exists.
"""

import argparse
import time
from pathlib import Path

import mlflow
import pandas as pd

from erc import tracking
from erc.evaluation import leaderboard, report, robustness
from erc.io import atomic_path, check_writable
from erc.params import load_params, stage_main


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="folders of train stage outputs, or the outputs (JSON lists of MLflow "
                                                "run ids) themselves")
    parser.add_argument("--leaderboard", required=True, help="the leaderboard stage's CSV")
    parser.add_argument("--models-doc", default="docs/models.md", help="published numbers are read from here")
    parser.add_argument("--gap", default="reports/gap.md", help="the gap table (pipelines/gap.py), shown where it "
                                                                 "exists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    check_writable(args.out, folder=True)

    params = load_params(args.params)
    uri = tracking.tracking_uri()
    client = mlflow.MlflowClient(uri)
    files = leaderboard.collect_run_files(args.runs, params, source=args.params)
    runs = leaderboard.fetch_runs(client, leaderboard.run_ids_from(sorted(files)))
    board = pd.read_csv(args.leaderboard)
    published = report.published_numbers(args.models_doc)
    gap = report.read_gap(args.gap)
    evaluated = report.evaluate(runs, params.get("data_dir", "data"), uri)
    robust = robustness.summarise(evaluated.robustness) if len(evaluated.robustness) else pd.DataFrame()
    curves = report.learning_curves(client, runs)

    out = Path(args.out)
    generated = (f"{len(runs)} runs, {runs['dataset'].nunique()} datasets, {runs['model'].nunique()} models; "
                 f"made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {uri}")
    with atomic_path(out) as tmp:
        report.write_page(tmp, board=board, published=published, evaluated=evaluated, robust=robust, curves=curves,
                          runs=runs, leaderboard_csv=args.leaderboard, generated=generated, gap=gap)

    experiment = tracking.experiment_id(params.get("train", {}).get("experiment", tracking.EXPERIMENT), uri)
    parent = report.log_parent_run(client, experiment, out, runs, robust)
    best = report.mark_best_versions(client, runs)
    print(robustness.to_markdown(robust) if len(robust) else "no multimodal runs: no robustness table")
    print(f"report: {out / 'index.html'}; MLflow run {parent}; alias 'best' on {len(best)} registered models")
    print(f"in `mlflow ui`: {tracking.ui_url(experiment)}")


if __name__ == "__main__":
    main()
