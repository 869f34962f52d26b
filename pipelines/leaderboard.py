"""Stage `leaderboard`: the train stages' MLflow runs -> reports/leaderboard.{csv,md}, DVC metrics and plots.

    python pipelines/leaderboard.py runs/tuned --out reports
    python pipelines/leaderboard.py runs/default --out reports/untuned

A folder holds a train stage's run list per dataset and model, `<folder>/<dataset>/<model>.json`; the datasets and
models are params' `pipeline` lists. Run-list files may also be named one by one.
"""

import argparse
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from erc.evaluation import leaderboard
from erc.io import atomic_path, check_writable, write_json
from erc.params import load_params, stage_main
from erc.tracking import tracking_uri


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="folders of train stage outputs, or the outputs (JSON lists of MLflow "
                                                "run ids) themselves")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    out = Path(args.out)
    for name in ("leaderboard.csv", "leaderboard.md", "metrics.json", "confusion"):
        check_writable(out / name, folder=name == "confusion")

    files = leaderboard.collect_run_files(args.runs, load_params(args.params), source=args.params)
    client = mlflow.MlflowClient(tracking_uri())
    runs = leaderboard.fetch_runs(client, leaderboard.run_ids_from(sorted(files)))
    predictions = {}
    for run_id in runs["run_id"]:  # each run's test predictions, read once for the intervals, tests and plots
        with tempfile.TemporaryDirectory() as dl:
            predictions[run_id] = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", dl))
    board = leaderboard.add_significance(leaderboard.summarise(runs), runs, predictions)
    with atomic_path(out / "leaderboard.csv") as tmp:
        board.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "leaderboard.md") as tmp:
        tmp.write_text(leaderboard.to_markdown(board))
    write_json(out / "metrics.json", leaderboard.dvc_metrics(board))

    # DVC confusion plots: the test predictions of every seed, pooled, per (dataset, model).
    with atomic_path(out / "confusion") as tmp_dir:
        tmp_dir.mkdir()
        for (dataset, variant, model), part in runs.groupby(["dataset", "variant", "model"]):
            name = f"{dataset}_{model}" + ("" if variant == leaderboard.MAIN_VARIANT else f"_{variant}")
            frames = [predictions[run_id][["actual", "predicted"]] for run_id in part["run_id"]]
            pd.concat(frames).to_csv(tmp_dir / f"{name}.csv", index=False)
    print(leaderboard.to_markdown(board))


if __name__ == "__main__":
    main()
