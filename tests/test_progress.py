"""The terminal's progress lines, read back from a real MLflow store as the train stage's driver reads them."""

from __future__ import annotations

import io
from types import SimpleNamespace

import mlflow

from erc.training.progress import RunProgress


def test_not_on_a_terminal_a_long_run_prints_a_line_per_interval_and_one_at_its_end(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("erc", artifact_location=(tmp_path / "mlruns").as_uri())
    runs = [SimpleNamespace(run_id=client.create_run(exp).info.run_id, dataset="meld", model="sdt", seed=s, epochs=4,
                            protocol="validation")
            for s in (0, 1)]
    stream = io.StringIO()  # not a TTY: lines, no live bars
    every_epoch = RunProgress(client, runs, stream, log_every=0.0)
    seldom = RunProgress(client, runs, io.StringIO())  # the default minute
    for epoch in range(3):
        for run in runs:
            client.log_batch(run.run_id, metrics=[mlflow.entities.Metric(k, v, 0, epoch) for k, v in
                                                  {"epoch": epoch, "val_wf1": 50.0 + epoch, "best_val_wf1": 50.0 + epoch,
                                                   "train_seconds": 2.0}.items()])
        every_epoch.update()
        every_epoch.update()  # no new epoch, no new line
        seldom.update()
    assert stream.getvalue().count("meld/sdt/seed0  epoch ") == 2  # its first epoch starts its clock
    assert "meld/sdt/seed1  epoch 3/4  val wF1 52.00  best 52.00  ~2 s left at most" in stream.getvalue()
    assert seldom.stream.getvalue() == ""
    client.log_batch(runs[0].run_id, metrics=[mlflow.entities.Metric(k, v, 0, 3) for k, v in
                                              {"selected_epoch": 2, "test_wf1": 48.5}.items()])
    client.set_terminated(runs[0].run_id)
    seldom.update()
    seldom.update()  # a finished run is printed once
    assert seldom.stream.getvalue().splitlines() == [
        "meld/sdt/seed0  epoch 3/4  val wF1 52.00  best 52.00 (epoch 2)  test wF1 48.50  finished"]
