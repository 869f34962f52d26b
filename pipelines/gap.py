"""`reports/gap.md`: from each published figure down to erc's leaderboard row, one measured step at a time.

    python pipelines/gap.py reports/gap/gap.yaml --out reports/gap.md

The spec lists, per (model, dataset), the published figure and the steps: run lists written by
`python pipelines/train.py ... --out reports/gap/<row>/<step>.json` (e.g. the paper protocol, params' `paper`
entry selected on validation, the leaderboard's own run list). Test predictions are read from the MLflow store
where the runs are (for the intervals); without them a step's interval is over its seeds alone. Not a DVC stage:
its runs are made by hand, some of them picked on test (the paper protocol), and never reach the leaderboard.
"""

import argparse
import sys
import tempfile

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from erc.evaluation import gap
from erc.io import check_writable, write_text
from erc.params import stage_main
from erc.tracking import tracking_uri


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the gap spec (YAML)")
    parser.add_argument("--out", required=True, help="the markdown table to write")
    args = parser.parse_args()
    check_writable(args.out)

    rows = gap.load_rows(args.spec)
    client = mlflow.MlflowClient(tracking_uri())
    predictions = {}
    for run_id in dict.fromkeys(r["run_id"] for row in rows for step in row.steps for r in step.runs):
        try:
            with tempfile.TemporaryDirectory() as dl:
                predictions[run_id] = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", dl))
        except (MlflowException, OSError) as e:  # a run of another store: its step's interval is over seeds alone
            print(f"mlflow run {run_id}: no test predictions here ({type(e).__name__}); intervals over seeds only",
                  file=sys.stderr)
    tables = [gap.row_table(row, predictions) for row in rows]
    write_text(args.out, gap.to_markdown(rows, tables))
    for row, table in zip(rows, tables):
        print(f"{row.model} on {row.dataset}:\n{table.to_string(index=False)}\n")


if __name__ == "__main__":
    main()
