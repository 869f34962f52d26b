"""Params and inputs checked before anything starts (erc.training.config): one line `<file>: <key>: <problem>`, no Ray, no run.

The stage tests run the real `pipelines/train.py` on a real tiny prepared dataset, with an MLflow store and a Ray
folder of their own, and check that a bad invocation ends before either is touched.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from erc.errors import ErcDataError
from erc.training import config
from erc.training.config import configs_from_params
from tests.fixtures import tiny_project

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def params_with(**train):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(train)
    return params


@pytest.mark.parametrize("change, key, fragment", [
    (dict(epochs="abc"), "train.epochs", "valid integer"),
    (dict(epochs=0), "train.epochs", "greater than or equal to 1"),
    (dict(lr=-1), "train.lr", "greater than 0 (got -1)"),
    (dict(backend="gpu"), "train.backend", "'auto', 'ddp' or 'deepspeed'"),
    (dict(use_gpu="maybe"), "train.use_gpu", "valid boolean"),
    (dict(learning_rate=3), "train.learning_rate", "unknown key"),
    (dict(seeds=[]), "train.seeds", "at least 1 item"),
    (dict(seeds=[0, -1]), "train.seeds.1", "greater than or equal to 0"),
    (dict(per_model={"sdt": {"per_dataset": {"meld": {"zero_stage": 7}}}}), "train.per_model.sdt.per_dataset.meld.zero_stage",
     "less than or equal to 3"),
    (dict(per_dataset={"meld": {"patience": "x"}}), "train.per_dataset.meld.patience", "valid integer"),
])
def test_train_params_are_checked_by_type_and_range_under_their_own_key(change, key, fragment):
    with pytest.raises(ErcDataError) as e:
        configs_from_params(params_with(**change), "meld", "sdt", source="p.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"p.yaml: {key}: "), message
    assert fragment in message


@pytest.mark.parametrize("model, values, key, fragment", [
    ("sdt", {"hiddn": 3}, "models.sdt.hiddn", "unknown key"),
    ("sdt", {"dropout": 1.5}, "models.sdt.dropout", "less than 1"),
    ("summer", {"heads": 0}, "models.summer.heads", "greater than or equal to 1"),
    ("mister_e", {"supcon_temperature": 0}, "models.mister_e.supcon_temperature", "greater than 0"),
    ("mmolre", {"sentiment_weight": -1}, "models.mmolre.sentiment_weight", "greater than or equal to 0"),
    ("baseline", {"hidden": "wide"}, "models.baseline.hidden", "valid integer"),
])
def test_model_params_are_checked_against_the_model_config_types(model, values, key, fragment):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"][model] = {**(params["models"].get(model) or {}), **values}
    with pytest.raises(ErcDataError, match=f"^params.yaml: {key}: .*{fragment}"):
        configs_from_params(params, "meld", model)


@pytest.mark.parametrize("inputs, fragment", [
    ("minilm", "inputs.meld: input should be a valid dictionary"),
    ({"txt": "minilm"}, "inputs.meld.txt"),
    ({}, "inputs.meld: dictionary should have at least 1 item"),
])
def test_inputs_are_a_modality_to_feature_set_mapping(inputs, fragment):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["inputs"]["meld"] = inputs
    with pytest.raises(ErcDataError, match=f"^params.yaml: {re.escape(fragment)}"):
        configs_from_params(params, "meld", "baseline")


def test_values_given_as_text_are_converted():
    (cfg,) = configs_from_params(params_with(lr="1e-3", epochs="7", use_gpu="false"), "meld", "baseline", seeds=[0])
    assert (cfg.lr, cfg.epochs, cfg.use_gpu) == (0.001, 7, False)
    assert isinstance(cfg.epochs, int)


def test_the_shipped_params_pass_for_every_pipeline_pair():
    pipeline = PARAMS["pipeline"]
    for dataset in pipeline["datasets"]:
        for model in pipeline["models"] + pipeline["distilled"]:
            runs = configs_from_params(PARAMS, dataset, model)
            assert [r.seed for r in runs] == PARAMS["train"]["seeds"]


@pytest.mark.parametrize("section, values, read, message", [
    ("teacher", {"modality": "smell"}, config.teacher_settings, "teacher.modality: input should be 'text', 'audio'"),
    ("teacher", {"model": "bert"}, config.teacher_settings, "teacher.model: unknown model 'bert'"),
    ("teacher", {"seed": -2}, config.teacher_settings, "teacher.seed: input should be greater than or equal to 0"),
    ("tune", {"trials": 0}, config.tune_settings, "tune.trials: input should be greater than or equal to 1"),
    ("tune", {"cpus_per_trial": "two"}, config.tune_settings, "tune.cpus_per_trial: "),
    ("tune", {"grace": 3}, config.tune_settings, "tune.grace: unknown key"),
])
def test_teacher_and_tune_sections_are_checked(section, values, read, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert read(params, source="p.yaml") is not None  # the shipped values pass
    params[section].update(values)
    with pytest.raises(ErcDataError) as e:
        read(params, source="p.yaml")
    assert str(e.value).startswith(f"p.yaml: {message}"), str(e.value)


def test_distilled_models_need_their_teacher_and_the_others_refuse_one():
    assert config.needs_teacher("summer") and not config.needs_teacher("baseline")
    with pytest.raises(ErcDataError, match="^command line: --teacher: summer distils from a frozen teacher"):
        config.check_teacher("summer", None)
    with pytest.raises(ErcDataError, match="^command line: --teacher: sdt has no teacher"):
        config.check_teacher("sdt", "runs/teacher/meld")
    config.check_teacher("summer", "runs/teacher/meld")


# ----------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A params file whose dataset `tiny` is prepared (a real canonical dataset) under its data_dir."""
    return tiny_project(tmp_path_factory.mktemp("config"))


@pytest.mark.parametrize("args, culprit, fragment", [
    (["--set", "train.epochs=abc"], "{params}", "train.epochs: input should be a valid integer"),
    (["--set", "train.lr=-1"], "{params}", "train.lr: input should be greater than 0 (got -1)"),
    (["--model", "summer", "--teacher", "/nonexistent"], "/nonexistent", "--teacher: not a teacher checkpoint"),
    (["--set", "data_dir=/nonexistent"], "/nonexistent/prepared/tiny", "data_dir: no prepared dataset here"),
    (["--model", "summer"], "command line", "--teacher: summer distils from a frozen teacher"),
], ids=["epochs-abc", "negative-lr", "missing-teacher-dir", "missing-data-dir", "summer-without-teacher"])
def test_bad_invocation_stops_before_ray_and_mlflow(project, args, culprit, fragment):
    store = project / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "RAY_TMPDIR": str(project / "ray_tmp")}
    model = [] if "--model" in args else ["--model", "baseline"]
    result = subprocess.run([sys.executable, "pipelines/train.py", "--dataset", "tiny", *model, *args,
                             "--out", str(project / "out.json"), "--params", str(project / "params.yaml")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]], result.stderr  # one line: no Ray start ("ray logs: ..."), no traceback
    assert lines[0].startswith(f"error: {culprit.format(params=project / 'params.yaml')}: {fragment}"), lines[0]
    assert not store.exists()  # no MLflow store, so no run in it
    assert not (project / "ray_tmp").exists() and not (project / "ray_results").exists()
    assert not (project / "out.json").exists()


STAGE = '''
import atexit, sys, threading, time
from pathlib import Path
from erc.errors import ErcDataError
from erc.params import stage_main

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late_write():
    time.sleep(0.5)
    (out / "thread").write_text("joined")

@stage_main
def main():
    print("stage output", flush=False)  # still buffered when main returns
    threading.Thread(target=late_write).start()
    if sys.argv[2] == "bad":
        raise ErcDataError("params.yaml", "train.lr: must be positive")

if __name__ == "__main__":
    main()
    (out / "after_main").write_text("reached")
'''


@pytest.mark.parametrize("outcome", ["ok", "bad"])
def test_a_stage_program_exits_after_its_threads_and_exit_handlers(tmp_path, outcome):
    """A stage run as a program ends right after main() (no interpreter teardown), yet as Python would have: its
    non-daemon threads finish, its atexit handlers run, its buffered output is written; bad input is exit 1."""
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), outcome], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after_main").exists()  # the process ended inside the wrapper
    if outcome == "ok":
        assert done.returncode == 0 and done.stdout == "stage output\n", done.stderr
    else:
        assert done.returncode == 1 and done.stderr.strip() == "error: params.yaml: train.lr: must be positive"


def test_a_stage_main_called_from_python_returns():
    from erc.params import stage_main

    assert stage_main(lambda: 42)() == 42  # a test or a notebook calling main() keeps its process
