"""Runs of one experiment logging the same dataset at the same moment (a stage's seeds side by side) all get it."""

import threading

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from erc.tracking import log_dataset_inputs

RUNS = 8


def test_runs_logging_one_dataset_at_once_all_get_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("erc", artifact_location=str(tmp_path / "artifacts"))
    runs = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
    dataset = [DatasetInput(Dataset(name="tiny-train", digest="0123abcd", source_type="local",
                                    source='{"uri": "data/prepared/tiny"}'),
                            tags=[InputTag("mlflow.data.context", "train")])]
    start, errors = threading.Barrier(RUNS), []

    def log(run_id):
        start.wait()  # every run finds no row for the dataset, then all insert it
        try:
            log_dataset_inputs(client, run_id, dataset)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for run_id in runs:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("tiny-train", "0123abcd")]
