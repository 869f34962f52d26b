"""`train.parallel_seeds`: in local mode on CPU the seeds of a stage train side by side, one process each (seed i in
process i mod n), each seed still its own MLflow run with the numbers it has one after another at the same thread
count; a failing seed fails the stage, and no run is left RUNNING.

Real parts: the driver's `run_all`, spawned processes running Ray Train's local mode, a real MLflow sqlite store, a
generated dataset big enough (200 training dialogues) that a seed's epochs outlast a process's start.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest

from erc.errors import ErcDataError
from erc.training.config import TrainConfig, train_settings
from erc.training.driver import run_all
from tests.fixtures import INPUTS, make_prepared

SEEDS = (0, 1)
EPOCHS = 6
ROOT = Path(__file__).resolve().parent.parent
PROGRAM = """
import sys
from erc.training.config import TrainConfig
from erc.training.driver import run_all
from tests.fixtures import INPUTS

prepared, storage, uri = sys.argv[1:4]
run_all([TrainConfig(dataset="tiny", prepared=prepared, inputs=dict(INPUTS), model_config={"hidden": 16}, seed=seed,
                     epochs=100000, patience=100000, batch_size=2, storage_path=storage, tracking_uri=uri,
                     experiment="erc-test", parallel_seeds=2, cpus_per_worker=1) for seed in (0, 1)])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    prepared = make_prepared(root / "prepared", kind="emotion", splits=(("train", 200), ("valid", 20), ("test", 20)),
                             noise=4.0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, prepared, uri


def configs(setup, **overrides) -> list[TrainConfig]:
    root, prepared, uri = setup
    base = {"dataset": "tiny", "prepared": str(prepared), "inputs": dict(INPUTS), "model_config": {"hidden": 32},
            "epochs": EPOCHS, "patience": EPOCHS, "batch_size": 4, "lr": 3e-3, "cpus_per_worker": 1,
            "storage_path": str(root / "ray"), "tracking_uri": uri, "experiment": "erc-parallel"}
    return [TrainConfig(**{**base, "seed": seed, **overrides}) for seed in SEEDS]


@pytest.fixture(scope="module")
def trained(setup):
    """The same two seeds at one thread each: one after another in this process, then side by side."""
    one_after_another = run_all(configs(setup, parallel_seeds=1))
    side = run_all(configs(setup, parallel_seeds=2))
    return mlflow.MlflowClient(setup[2]), one_after_another, side


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def predictions(client, run_id: str, tmp_path) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, "test_predictions.csv", str(tmp_path / run_id)))


def test_side_by_side_seeds_have_the_numbers_of_one_after_another(trained, tmp_path):
    client, before, side = trained
    assert [r["seed"] for r in side] == list(SEEDS)
    for alone, beside in zip(before, side):
        assert client.get_run(beside["run_id"]).info.status == "FINISHED"
        for key in ("val_wf1", "train_loss_ce"):
            assert [m.value for m in history(client, beside["run_id"], key)] == \
                [m.value for m in history(client, alone["run_id"], key)], key
        assert {k: v for k, v in beside.items() if k != "run_id"} == {k: v for k, v in alone.items() if k != "run_id"}
        pd.testing.assert_frame_equal(predictions(client, beside["run_id"], tmp_path),
                                      predictions(client, alone["run_id"], tmp_path))
    # the seeds themselves differ: the same numbers are a seed's own, not one process's output twice
    assert history(client, side[0]["run_id"], "train_loss_ce")[-1].value != \
        history(client, side[1]["run_id"], "train_loss_ce")[-1].value


def test_side_by_side_seeds_run_in_two_processes_at_once_and_say_so(trained):
    client, before, side = trained
    runs = [client.get_run(r["run_id"]) for r in side]
    pids = {r.data.tags["worker_pid"] for r in runs}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    # One after another: this process, each seed's epochs after the other's end.
    sequential = [client.get_run(r["run_id"]) for r in before]
    assert {r.data.tags["worker_pid"] for r in sequential} == {str(os.getpid())}
    spans = [(history(client, r.info.run_id, "val_wf1")[0].timestamp, r.info.end_time) for r in sequential]
    assert spans[0][1] <= spans[1][0]
    # Side by side: each seed's epochs start before the other seed has ended.
    spans = [(history(client, r.info.run_id, "val_wf1")[0].timestamp, r.info.end_time) for r in runs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    for r in runs:  # what the run records: its thread count and that it ran beside another
        assert (r.data.params["parallel_seeds"], r.data.params["cpus_per_worker"]) == ("2", "1")
    for r in sequential:
        assert (r.data.params["parallel_seeds"], r.data.params["cpus_per_worker"]) == ("1", "1")


def test_a_failing_seed_fails_the_stage_and_ends_every_run(setup):
    """Seed 1's process fails building its model (a dropout of 2); seed 0, training in the other process, is
    stopped: the stage raises seed 1's error, both runs end FAILED (none RUNNING), and no process is left."""
    first, second = configs(setup, parallel_seeds=2, epochs=10_000, patience=10_000, experiment="erc-parallel-fail")
    second.model_config = {"hidden": 32, "dropout": 2.0}
    with pytest.raises(Exception, match="dropout probability"):
        run_all([first, second])
    client = mlflow.MlflowClient(setup[2])
    assert [client.get_run(cfg.run_id).info.status for cfg in (first, second)] == ["FAILED", "FAILED"]
    assert not [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_how_many_side_by_side(setup, monkeypatch):
    """auto: as many processes as the CPUs hold at cpus_per_worker threads (null: the CPUs shared by the seeds, one
    thread at least); never more than the seeds; one where Ray's workers or a GPU take the seeds."""
    from erc.training.driver import side_by_side

    def resolved(cpus: int, seeds: int, **overrides) -> tuple:
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        runs = [replace(configs(setup, cpus_per_worker=None)[0], seed=s, **overrides) for s in range(seeds)]
        return side_by_side(runs), runs[-1].parallel_seeds, runs[-1].cpus_per_worker

    assert resolved(2, 5) == (2, 2, 1)  # the default on 2 cores: two processes of one thread
    assert resolved(2, 1) == (1, 1, 2)
    assert resolved(64, 5) == (5, 5, 12)
    assert resolved(8, 5, cpus_per_worker=4) == (2, 2, 4)
    assert resolved(2, 5, parallel_seeds=3) == (3, 3, 1)
    assert resolved(2, 2, parallel_seeds=3) == (2, 2, 1)
    assert resolved(4, 5, num_workers=2) == (1, 1, 2)
    assert resolved(4, 5, use_gpu=True) == (1, 1, 4)


def test_parallel_seeds_param_is_auto_or_a_positive_count():
    params = {"train": {"parallel_seeds": "2"}}
    assert train_settings(params, "tiny", "baseline", source="params.yaml")["parallel_seeds"] == 2
    params["train"]["parallel_seeds"] = "auto"
    assert train_settings(params, "tiny", "baseline", source="params.yaml")["parallel_seeds"] == "auto"
    for bad in (0, "many"):
        params["train"]["parallel_seeds"] = bad
        with pytest.raises(ErcDataError, match="parallel_seeds"):
            train_settings(params, "tiny", "baseline", source="params.yaml")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_stage_ends_its_side_by_side_runs_killed(setup, tmp_path, signum):
    """SIGTERM, or Ctrl-C (to the whole process group, as a terminal sends it), once both seeds have an epoch: both
    runs end KILLED, one line and no traceback, the exit status of the signal, and neither process is left."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    program = subprocess.Popen([sys.executable, "-c", PROGRAM, str(setup[1]), str(tmp_path / "ray"), uri],
                               cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    client = mlflow.MlflowClient(uri)
    deadline, found = time.time() + 120, []
    while time.time() < deadline and program.poll() is None:
        if (tmp_path / "mlflow.db").exists():
            experiment = client.get_experiment_by_name("erc-test")
            found = client.search_runs([experiment.experiment_id]) if experiment else []
        if len(found) == 2 and all(client.get_metric_history(r.info.run_id, "val_wf1") for r in found):
            break
        time.sleep(0.5)
    assert program.poll() is None, program.communicate()[1]
    workers = {int(client.get_run(r.info.run_id).data.tags["worker_pid"]) for r in found}
    os.killpg(program.pid, signum) if signum == signal.SIGINT else program.send_signal(signum)
    _, err = program.communicate(timeout=120)
    assert [client.get_run(r.info.run_id).info.status for r in found] == ["KILLED", "KILLED"], err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: tiny/baseline/seed")
    assert program.returncode == 128 + signum
    time.sleep(1)
    assert len(workers) == 2 and not any(psutil.pid_exists(pid) for pid in workers)
