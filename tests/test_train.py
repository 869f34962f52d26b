"""Training end to end on a real local Ray and a real MLflow sqlite store, on tiny generated data.

Two Ray Train fits in all (module-scoped): an emotion run, and a MOSI-like run that also exercises
early stopping. The other tests read what those runs left in MLflow.
"""

import json
import re
from dataclasses import replace

import mlflow
import numpy as np
import pandas as pd
import pytest

from erc.data import canonical
from erc.metrics import classification_metrics
from erc.models.checkpoint import load_checkpoint
from erc.training.config import TrainConfig
from erc.training.driver import run
from erc.training.task import load_task, predict
from tests.fixtures import INPUTS

TAGS = ("model", "dataset", "features", "seed", "git_commit", "data_sha256")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def config(prepared, tmp, uri, **overrides) -> TrainConfig:
    base = dict(dataset="tiny", prepared=str(prepared), inputs=dict(INPUTS), model="baseline",
                model_config={"hidden": 16}, seed=0, epochs=3, patience=10, batch_size=2, lr=1e-2,
                storage_path=str(tmp / "ray"), tracking_uri=uri, experiment="erc-test")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def emotion_run(ray_session, tiny_emotion, store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = config(tiny_emotion, tmp, store[1])
    result = run(cfg)
    return cfg, result, mlflow.MlflowClient(store[1])


@pytest.fixture(scope="module")
def mosi_run(ray_session, tiny_mosi, store, tmp_path_factory):
    """lr=0 leaves the weights as initialised, so validation never improves after epoch 0:
    with patience 2 the run stops after epoch 2, and the three-way tie must select epoch 0."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = config(tiny_mosi, tmp, store[1], dataset="tiny-mosi", epochs=6, patience=2, lr=0.0, seed=3)
    result = run(cfg)
    return cfg, result, mlflow.MlflowClient(store[1])


def history(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def first_argmax(values):
    return int(np.argmax(values))  # numpy returns the first of equal maxima


def test_workers_load_only_train_and_valid(tiny_emotion):
    cfg = TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS))
    assert load_task(cfg).splits.keys() == {"train", "valid"}


def test_test_split_does_not_influence_training_inputs(tiny_emotion, tmp_path):
    """Feature standardisation uses the training split only: changing test features changes nothing else."""
    changed = canonical.load(tiny_emotion)
    test_rows = (changed.table["split"] == "test").to_numpy()
    for fs in changed.features.values():
        fs.values = fs.values.copy()
        fs.values[test_rows] = fs.values[test_rows] * 100 + 7
    canonical.save(changed, tmp_path / "changed")
    cfg = TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS))
    a = load_task(cfg, splits=("train", "valid", "test"))
    b = load_task(replace(cfg, prepared=str(tmp_path / "changed")), splits=("train", "valid", "test"))
    for split in ("train", "valid"):
        for m in INPUTS:
            rows = np.concatenate([d.rows for d in a.splits[split].dialogues])
            np.testing.assert_array_equal(a.splits[split].features[m][rows], b.splits[split].features[m][rows])
    rows = np.concatenate([d.rows for d in a.splits["test"].dialogues])
    assert not np.allclose(a.splits["test"].features["text"][rows], b.splits["test"].features["text"][rows])


def test_run_is_finished_and_tagged(emotion_run, tiny_emotion):
    cfg, result, client = emotion_run
    r = client.get_run(result["run_id"])
    assert r.info.status == "FINISHED"
    assert set(TAGS) <= set(r.data.tags)
    assert r.data.tags["model"] == "baseline"
    assert r.data.tags["dataset"] == "tiny"
    assert r.data.tags["features"] == "audio:audio8+text:text16"
    assert r.data.tags["seed"] == "0"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", r.data.tags["git_commit"])
    sources = json.loads((tiny_emotion / "meta.json").read_text())["sources"]
    assert json.loads(r.data.tags["data_sha256"]) == sources
    assert r.data.params["lr"] == "0.01"
    assert r.data.params["epochs"] == "3"
    assert r.data.params["model_config.hidden"] == "16"
    assert r.data.params["model_config.dropout"] == "0.3"  # the default, recorded too
    assert r.data.params["inputs.text"] == "text16"


def test_artifacts_stay_beside_the_tracking_store(emotion_run, store):
    cfg, result, client = emotion_run
    uri = client.get_run(result["run_id"]).info.artifact_uri
    assert uri.startswith((store[0] / "mlruns").as_uri())


def test_validation_history_and_selection(emotion_run):
    cfg, result, client = emotion_run
    run_id = result["run_id"]
    val = history(client, run_id, "val_wf1")
    assert [m.step for m in val] == [0, 1, 2]
    values = [m.value for m in val]
    metrics = client.get_run(run_id).data.metrics
    for key in ("test_wf1", "test_acc", "test_macro_f1", "test_f1_a", "test_f1_b", "test_f1_c"):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0, key
    assert metrics["selected_epoch"] == first_argmax(values)
    assert metrics["selected_val_wf1"] == pytest.approx(max(values))
    assert result["selected_epoch"] == first_argmax(values)
    assert [m.value for m in history(client, run_id, "best_val_wf1")] == pytest.approx(list(np.maximum.accumulate(values)))
    assert len(history(client, run_id, "train_loss_ce")) == 3
    assert "test_acc2" not in metrics and "test_mae" not in metrics  # emotion target: no MOSI figures


def test_artifacts_and_predictions(emotion_run, tiny_emotion, tmp_path):
    cfg, result, client = emotion_run
    run_id = result["run_id"]
    top = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"confusion_test.png", "confusion_test.csv", "test_predictions.csv", "checkpoint"} <= set(top)
    assert top["checkpoint"].is_dir
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} >= {"checkpoint/model.pt", "checkpoint/model.json"}

    preds = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", str(tmp_path)))
    table = canonical.load(tiny_emotion).table
    test = table[table["split"] == "test"]
    assert list(preds.columns) == ["dialogue_id", "utterance_id", "actual", "predicted", "p_a", "p_b", "p_c"]
    probs = preds[["p_a", "p_b", "p_c"]].to_numpy()
    assert np.allclose(probs.sum(1), 1) and (np.array(["a", "b", "c"])[probs.argmax(1)] == preds["predicted"]).all()
    assert len(preds) == int((test["emotion_id"] >= 0).sum())
    assert set(preds["utterance_id"]) == set(test["utterance_id"])
    truth = dict(zip(test["utterance_id"], test["emotion"]))
    assert (preds["actual"] == preds["utterance_id"].map(truth)).all()
    labels = ["a", "b", "c"]
    m = classification_metrics(preds["actual"].map(labels.index), preds["predicted"].map(labels.index), labels)
    logged = client.get_run(run_id).data.metrics
    assert logged["test_wf1"] == pytest.approx(m["wf1"])
    assert logged["test_acc"] == pytest.approx(m["acc"])

    cm = pd.read_csv(client.download_artifacts(run_id, "confusion_test.csv", str(tmp_path)), index_col=0)
    assert int(cm.to_numpy().sum()) == len(preds)


def test_checkpoint_reproduces_test_predictions(emotion_run, tmp_path):
    cfg, result, client = emotion_run
    run_id = result["run_id"]
    ckpt = client.download_artifacts(run_id, "checkpoint", str(tmp_path))
    model, info = load_checkpoint(ckpt)
    assert info["model"] == "baseline" and info["model_config"] == {"hidden": 16}
    assert info["epoch"] == result["selected_epoch"]
    task = load_task(cfg, splits=("test",))
    p = predict(model, task.splits["test"])
    ids = task.prepared.table["utterance_id"].to_numpy()[p["rows"]]
    mine = pd.Series(np.asarray(task.labels)[p["pred"]], index=ids)
    logged = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", str(tmp_path)))
    assert (logged["predicted"].to_numpy() == mine.loc[logged["utterance_id"]].to_numpy()).all()


def test_mosi_run_reports_sentiment_figures_and_stops_early(mosi_run, tiny_mosi, tmp_path):
    cfg, result, client = mosi_run
    run_id = result["run_id"]
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    metrics = r.data.metrics
    for key in ("test_acc2", "test_wf1_binary", "test_mae", "test_corr", "test_acc7", "test_acc2_score", "test_wf1"):
        assert key in metrics, key
    assert metrics["test_acc2"] == metrics["test_acc"]
    assert metrics["test_mae"] >= 0.0 and -1.0 <= metrics["test_corr"] <= 1.0
    val = history(client, run_id, "val_wf1")
    assert [m.step for m in val] == [0, 1, 2]  # patience 2: stopped after two epochs without improvement
    assert val[0].value == val[1].value == val[2].value
    assert metrics["selected_epoch"] == 0  # the first of equal maxima, not a later tie
    assert result["selected_epoch"] == 0
    preds = pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", str(tmp_path)))
    assert list(preds.columns)[:6] == ["dialogue_id", "utterance_id", "actual", "predicted", "score_actual",
                                        "score_predicted"]
    assert all(c.startswith("p_") for c in preds.columns[6:]) and len(preds.columns) == 8  # MOSI: two classes
    table = canonical.load(tiny_mosi).table
    assert len(preds) == int((table["split"] == "test").sum())
    assert np.abs(preds["score_actual"] - preds["score_predicted"]).mean() == pytest.approx(metrics["test_mae"], rel=1e-5)


def test_failed_run_is_marked_failed(tiny_emotion, store, tmp_path):
    """A run that cannot start (unknown model config key) ends FAILED in MLflow, not RUNNING."""
    cfg = config(tiny_emotion, tmp_path, store[1], model_config={"no_such_key": 1}, seed=7)
    with pytest.raises(TypeError):
        run(cfg)
    client = mlflow.MlflowClient(store[1])
    failed = client.get_run(cfg.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["seed"] == "7"


def test_seeds_of_a_stage_share_one_worker_and_match_separate_runs(ray_session, tiny_emotion, store, tmp_path):
    """The train stage's seeds run one after another in one worker group (the data loaded once); each seed
    still gets its own MLflow run, and the same numbers as when it runs alone."""
    from erc.training.driver import run_all

    client = mlflow.MlflowClient(store[1])
    together = run_all([config(tiny_emotion, tmp_path, store[1], seed=seed, epochs=3, num_workers=1)
                        for seed in (4, 5)])
    alone = run(config(tiny_emotion, tmp_path, store[1], seed=5, epochs=3, num_workers=1))
    runs = [client.get_run(r["run_id"]) for r in together]
    assert [r.data.tags["seed"] for r in runs] == ["4", "5"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.tags["worker_pid"] == runs[1].data.tags["worker_pid"]
    assert client.get_run(alone["run_id"]).data.tags["worker_pid"] != runs[1].data.tags["worker_pid"]
    assert [m.value for m in history(client, together[1]["run_id"], "val_wf1")] == \
        [m.value for m in history(client, alone["run_id"], "val_wf1")]
    for key in ("test_wf1", "test_acc", "selected_epoch"):
        assert together[1][key] == alone[key], key
    # The two seeds differ (a shared worker does not leak one seed's state into the next).
    assert [m.value for m in history(client, together[0]["run_id"], "train_loss_ce")] != \
        [m.value for m in history(client, together[1]["run_id"], "train_loss_ce")]


def test_local_mode_runs_in_this_process_with_the_worker_groups_numbers(ray_session, tiny_emotion, store, tmp_path):
    """num_workers 0 (Ray Train's local mode, the default): the loop runs in the calling process, no Ray is
    started for it, and a seed's numbers are the ones a one-worker group gives."""
    import os

    client = mlflow.MlflowClient(store[1])
    local = run(config(tiny_emotion, tmp_path, store[1], seed=6, num_workers=0))
    group = run(config(tiny_emotion, tmp_path, store[1], seed=6, num_workers=1))
    local_run, group_run = client.get_run(local["run_id"]), client.get_run(group["run_id"])
    assert local_run.data.tags["worker_pid"] == str(os.getpid())
    assert group_run.data.tags["worker_pid"] != str(os.getpid())
    assert "time_driver_ray_init_s" not in local_run.data.metrics
    assert local_run.data.params["num_workers"] == "0" and local_run.data.params["world_size"] == "1"
    assert local_run.info.status == "FINISHED"
    assert [m.value for m in history(client, local["run_id"], "val_wf1")] == \
        [m.value for m in history(client, group["run_id"], "val_wf1")]
    for key in ("test_wf1", "test_acc", "selected_epoch"):
        assert local[key] == group[key], key


def test_run_records_its_environment_and_phase_times(emotion_run, tmp_path):
    cfg, result, client = emotion_run
    r = client.get_run(result["run_id"])
    import torch

    assert r.data.params["env.torch"] == torch.__version__
    assert r.data.params["env.python"].count(".") == 2
    path = client.download_artifacts(result["run_id"], "environment/requirements.txt", str(tmp_path))
    lines = open(path).read().splitlines()
    assert f"torch=={torch.__version__}" in lines and any(line.startswith("mlflow==") for line in lines)
    for phase in ("data_load", "train", "valid", "test", "checkpoint", "mlflow", "worker_start", "driver_mlflow"):
        assert r.data.metrics[f"time_{phase}_s"] >= 0, phase


def test_a_local_ray_is_found_by_its_own_processes_beside_another_ray(ray_session, tmp_path):
    """Two Rays on one machine (this test session's and an erc command's local one): the Ray processes of the
    erc command that look for "the" cluster (Ray Train's placement-group cleaner does) must find their own."""
    import subprocess
    import sys

    script = (
        "import ray\n"
        "from erc.training.cluster import init_ray\n"
        "init_ray()\n"
        "@ray.remote\n"
        "def found():\n"
        "    from ray._private.services import canonicalize_bootstrap_address_or_die\n"
        "    return canonicalize_bootstrap_address_or_die(None)\n"
        "print(ray.get(found.remote()), ray._private.worker._global_node.gcs_address)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    found, own = done.stdout.split()[-2:]
    assert found == own and own != ray_session.address
