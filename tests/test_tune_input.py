"""A search's bad input is one line before Ray or an MLflow run starts; a search that fails or is interrupted
leaves no run RUNNING and nothing that refuses the next search of its name (issue 27, items 1 and 2).

The command-line tests run `pipelines/tune.py` as a user would; the failure tests run `search` on the session's
Ray with the tiny search of tests/test_tune.py (single-worker trials).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from erc.errors import ErcDataError
from erc.training.config import configs_from_params
from erc.training.tune import PARENT_FILE, search, space_for, summarise
from tests.fixtures import make_prepared
from tests.test_tune import MODEL, tiny_params

ROOT = Path(__file__).resolve().parent.parent


def run_tune(tmp_path, *options):
    """`pipelines/tune.py` on a tiny dataset; its params say one trial of one epoch (what `--trials 0` once meant)."""
    make_prepared(tmp_path / "data" / "prepared" / "tiny", kind="emotion")
    params = tiny_params(tmp_path / "data", tmp_path)
    params["tune"].update(trials=1, epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return subprocess.run([sys.executable, "pipelines/tune.py", "--dataset", "tiny", "--model", MODEL, "--params",
                           str(tmp_path / "params.yaml"), "--out", str(tmp_path / "best.yaml"), *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def assert_nothing_started(tmp_path, result):
    assert "ray logs:" not in result.stderr  # init_ray's first line: Ray never started
    assert not (tmp_path / "tune").exists()  # tune.storage_path
    assert not (tmp_path / "best.yaml").exists()
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("trials", ["-3", "0"])
def test_trials_must_be_a_positive_integer(tmp_path, trials):
    result = run_tune(tmp_path, "--trials", trials)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: command line: --trials: input should be greater than or equal to 1 (got '{trials}')"]
    assert_nothing_started(tmp_path, result)


def test_a_space_outside_its_fields_range_is_one_line_before_anything(tmp_path):
    result = run_tune(tmp_path, "--set", "tune.space.all={model.dropout: {uniform: [0.5, 1.5]}}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: tune.space.all: model.dropout upper bound 1.5 outside [0, 1)"]
    assert_nothing_started(tmp_path, result)


@pytest.mark.parametrize("section, spec, problem", [
    ("all", {"model.dropout": {"uniform": [-0.1, 0.5]}},
     "tune.space.all: model.dropout lower bound -0.1 outside [0, 1)"),
    (MODEL, {"model.attn_dropout": {"choice": [0.1, 1.0]}},
     f"tune.space.{MODEL}: model.attn_dropout choice 1.0 outside [0, 1)"),  # the model's own section named
    ("all", {"train.lr": {"uniform": [0, 0.01]}}, "tune.space.all: train.lr lower bound 0 outside (0, inf)"),
    ("all", {"train.epochs": {"randint": [0, 5]}}, "tune.space.all: train.epochs lower bound 0 outside [1, inf)"),
    ("all", {"model.heads": {"randint": [1, 5]}, "train.zero_stage": {"randint": [0, 5]}},
     "tune.space.all: train.zero_stage largest draw 4 outside [0, 3]"),  # randint's high is excluded
    ("all", {"train.optimizer": {"choice": ["adamw", "sgd"]}},
     "tune.space.all: train.optimizer choice 'sgd': input should be 'adamw' or 'adam'"),
    ("all", {"model.width": {"uniform": [8, 64]}}, "model.width: uniform draws fractions, and the field takes whole"),
    ("all", {"train.lr": {"loguniform": ["1e-4", 1.0e-3]}}, "write 1.0e-4"),
    ("all", {"model.width": {"choice": []}}, "model.width: choice needs a list of options"),
])
def test_a_space_is_checked_against_the_schema_of_its_fields(section, spec, problem):
    with pytest.raises(ErcDataError) as e:
        space_for({"tune": {"space": {section: spec}}}, MODEL)
    assert str(e.value).startswith("params.yaml: tune.space.") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_a_space_inside_its_fields_ranges_passes():
    space = {"model.dropout": {"uniform": [0.0, 0.9]}, "model.width": {"randint": [8, 33]},
             "train.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "train.optimizer": {"choice": ["adam", "adamw"]}}
    assert space_for({"tune": {"space": {"all": space}}}, MODEL) == space


def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(uri)


def test_summarise_without_any_trial_result_is_one_line(tmp_path):
    _, client = store(tmp_path)
    parent = client.create_run(client.create_experiment("erc-tune-test")).info.run_id
    with pytest.raises(Exception) as e:
        summarise(client, parent, [], ["train.lr"], "tiny-search", 3)
    assert type(e.value).__name__ == "SearchFailed", repr(e.value)
    assert str(e.value) == "search tiny-search: no trial reported a validation score (0 trials)"


def tiny_base(tmp_path, uri):
    make_prepared(tmp_path / "data" / "prepared" / "tiny", kind="emotion")
    params = tiny_params(tmp_path / "data", tmp_path)
    params["train"]["epochs"] = 1
    (base,) = configs_from_params(params, "tiny", MODEL, seeds=[0])
    base.tracking_uri = uri
    base.prepared = str(Path(base.prepared).resolve())
    return base, params


def runs_of(client, role: str):
    experiment = client.get_experiment_by_name("erc-tune-test")
    return client.search_runs([experiment.experiment_id], f"tags.role = '{role}'") if experiment else []


def test_a_search_whose_trials_all_fail_ends_its_runs_and_does_not_block_the_next(ray_session, tmp_path):
    uri, client = store(tmp_path)
    base, params = tiny_base(tmp_path, uri)
    storage = params["tune"]["storage_path"]
    settings = {"space": space_for(params, MODEL), "storage_path": storage, "name": "tiny-search", "cpus_per_trial": 2,
                "max_concurrent": 1, "grace_period": 1}
    shutil.move(base.prepared, tmp_path / "aside")  # every trial fails to read its data
    with pytest.raises(Exception) as e:
        search(base, trials=2, **settings)
    (parent,) = runs_of(client, "tune")
    assert parent.info.status == "FAILED"
    assert {r.info.status for r in runs_of(client, "tune-trial")} == {"FAILED"}
    assert not (Path(storage) / "tiny-search").exists()
    assert not (Path(storage) / f"tiny-search.{PARENT_FILE}").exists()
    assert type(e.value).__name__ == "SearchFailed", repr(e.value)
    assert "no trial reported a validation score (2 trials); the first trial error: " in str(e.value)
    assert "\n" not in str(e.value)

    shutil.move(tmp_path / "aside", base.prepared)
    best = search(base, trials=1, **settings)  # the same name starts afresh
    assert best["trials"] == 1 and client.get_run(best["parent_run_id"]).info.status == "FINISHED"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error, status", [(Boom("ray went away"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_an_error_or_interruption_in_the_driver_ends_the_parent_run(ray_session, tmp_path, monkeypatch, error, status):
    from ray import tune

    def fail(self):
        raise error

    monkeypatch.setattr(tune.Tuner, "fit", fail)
    uri, client = store(tmp_path)
    base, params = tiny_base(tmp_path, uri)
    storage = Path(params["tune"]["storage_path"])
    settings = {"space": space_for(params, MODEL), "storage_path": str(storage), "name": "tiny-search", "trials": 2,
                "grace_period": 1}
    for attempt in range(2):  # the second search of the name is not refused: it starts, and fails as the first
        with pytest.raises(BaseException) as e:  # KeyboardInterrupt included
            search(base, **settings)
        if status == "KILLED":
            assert type(e.value).__name__ == "SearchInterrupted"
            assert "saved nothing to resume: run the same command to start it again" in str(e.value)
        else:
            assert e.value is error
        assert [r.info.status for r in runs_of(client, "tune")] == [status] * (attempt + 1)
        assert not (storage / "tiny-search").exists() and not (storage / f"tiny-search.{PARENT_FILE}").exists()


def test_a_folder_without_a_saved_search_does_not_refuse_the_search(ray_session, tmp_path, monkeypatch):
    from ray import tune

    def fail(self):
        raise Boom("reached Tune")

    monkeypatch.setattr(tune.Tuner, "fit", fail)
    uri, client = store(tmp_path)
    base, params = tiny_base(tmp_path, uri)
    storage = Path(params["tune"]["storage_path"])
    (storage / "tiny-search").mkdir(parents=True)  # what a search killed as it began may leave
    with pytest.raises(Boom):
        search(base, space_for(params, MODEL), trials=2, storage_path=str(storage), name="tiny-search")
    assert [r.info.status for r in runs_of(client, "tune")] == ["FAILED"]


def test_a_grace_period_past_the_last_epoch_means_no_early_stopping(ray_session, tmp_path, monkeypatch):
    from ray import tune

    def fail(self):
        raise Boom("reached Tune")

    monkeypatch.setattr(tune.Tuner, "fit", fail)
    base, params = tiny_base(tmp_path, store(tmp_path)[0])
    assert base.epochs == 1
    with pytest.raises(Boom):  # ASHA took it (it refuses a grace period past its max_t)
        search(base, space_for(params, MODEL), trials=2, storage_path=params["tune"]["storage_path"],
               name="tiny-search", grace_period=3)


def test_a_running_search_of_the_name_is_refused_and_a_dead_ones_is_not(tmp_path):
    """A live search's folder holds no saved state for its first seconds: a second search of the name must not take
    it for a killed one's leftovers and delete it. A search whose process is gone does not refuse the name."""
    import json

    from erc import tracking

    uri, client = store(tmp_path)
    base, params = tiny_base(tmp_path, uri)
    storage = Path(params["tune"]["storage_path"])
    (storage / "tiny-search").mkdir(parents=True)
    parent = client.create_run(client.create_experiment("erc-tune-test"), tags=tracking.owner_tags()).info.run_id
    (storage / f"tiny-search.{PARENT_FILE}").write_text(json.dumps({"parent_run_id": parent}))
    with pytest.raises(ErcDataError, match=f"a search of this name is running \\(process {os.getpid()}\\)"):
        search(base, space_for(params, MODEL), trials=2, storage_path=str(storage), name="tiny-search")
    assert (storage / "tiny-search").is_dir() and client.get_run(parent).info.status == "RUNNING"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client.set_tag(parent, "driver_pid", dead.stdout.strip())  # the search's process has ended
    from erc.training.tune import running_parent

    assert running_parent(client, storage / f"tiny-search.{PARENT_FILE}") is None
