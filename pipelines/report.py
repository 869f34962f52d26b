"""Stage `report`: the leaderboard's runs evaluated again -> reports/report/index.html (one self-contained page),
its tables and figures, and an MLflow parent run of the leaderboard's runs holding the same files.

    python pipelines/report.py runs/tuned --leaderboard reports/leaderboard.csv --out reports/report

The runs are the leaderboard's: a folder of run lists (`<folder>/<dataset>/<model>.json`, for params' `pipeline`
lists) or run-list files named one by one.
"""

import argparse
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd

from erc import gates as gate_stats
from erc import leaderboard, report, robustness, tracking
from erc.io import atomic_path
from erc.params import load_params, stage_main


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="folders of train stage outputs, or the outputs (JSON lists of MLflow "
                                                "run ids) themselves")
    parser.add_argument("--leaderboard", required=True, help="the leaderboard stage's CSV")
    parser.add_argument("--models-doc", default="docs/models.md", help="published numbers are read from here")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    uri = tracking.tracking_uri()
    client = mlflow.MlflowClient(uri)
    files = leaderboard.collect_run_files(args.runs, params, source=args.params)
    runs = leaderboard.fetch_runs(client, leaderboard.run_ids_from(sorted(files)))
    board = pd.read_csv(args.leaderboard)
    published = report.published_numbers(args.models_doc)
    evaluated = report.evaluate(runs, params.get("data_dir", "data"), uri)
    robust = robustness.summarise(evaluated.robustness) if len(evaluated.robustness) else pd.DataFrame()
    curves = report.learning_curves(client, runs)

    out = Path(args.out)
    with atomic_path(out) as tmp:
        (tmp / "figures").mkdir(parents=True)
        images = {"gates": [], "confusion": [], "curves": []}
        if len(evaluated.gates):
            keys = ["dataset", "model", "gate", "expert"]
            means = evaluated.gates.groupby(keys, sort=False).mean(numeric_only=True).reset_index()
            means.drop(columns=["seed"]).to_csv(tmp / "gates.csv", index=False, float_format="%.4f")
            for (dataset, model), part in means.groupby(["dataset", "model"], sort=True):
                path = tmp / "figures" / f"gates_{dataset}_{model}.png"
                gate_stats.plot(part, evaluated.labels[dataset], f"{dataset} {model}", path)
                images["gates"].append((f"{dataset} {model} gates", path.read_bytes()))
        for (dataset, model), (labels, cm) in sorted(evaluated.confusions.items()):
            path = tmp / "figures" / f"confusion_{dataset}_{model}.png"
            tracking.confusion_png(cm, labels, f"{dataset} {model}: test, all seeds", path)
            images["confusion"].append((f"{dataset} {model} confusion", path.read_bytes()))
        for dataset in sorted(curves["dataset"].unique()):
            png = report.curves_png(curves, dataset)
            (tmp / "figures" / f"curves_{dataset}.png").write_bytes(png)
            images["curves"].append((f"{dataset} learning curves", png))
        if len(robust):
            robust.to_csv(tmp / "robustness.csv", index=False, float_format="%.4f")
            (tmp / "robustness.md").write_text(robustness.to_markdown(robust))
        published.to_csv(tmp / "published.csv", index=False)
        shutil.copy2(args.leaderboard, tmp / "leaderboard.csv")
        generated = (f"{len(runs)} runs, {runs['dataset'].nunique()} datasets, {runs['model'].nunique()} models; "
                     f"made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {uri}")
        (tmp / "index.html").write_text(report.page(
            board=board, published=published, classes=report.per_class_f1(runs, evaluated.labels),
            robust_table=report.robustness_display(robust), images=images, generated=generated))

    experiment = tracking.experiment_id(params.get("train", {}).get("experiment", tracking.EXPERIMENT), uri)
    parent = report.log_parent_run(client, experiment, out, runs, robust)
    best = report.mark_best_versions(client, runs)
    print(robustness.to_markdown(robust) if len(robust) else "no multimodal runs: no robustness table")
    print(f"report: {out / 'index.html'}; MLflow run {parent}; alias 'best' on {len(best)} registered models")
    print(f"in `mlflow ui`: {tracking.ui_url(experiment)}")


if __name__ == "__main__":
    main()
