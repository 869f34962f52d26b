"""Stage programs on bad params: exit 1 with one line naming the params file, before any work starts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp_path, params: dict, model="baseline", dataset="meld"):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "pipelines/train.py", "--dataset", dataset, "--model", model,
                           "--out", str(tmp_path / "out.json"), "--params", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("change, model, dataset, fragment", [
    (lambda p: None, "no_such_model", "meld", "unknown model 'no_such_model'"),
    (lambda p: None, "baseline", "no_such_dataset", "no inputs.no_such_dataset entry"),
    (lambda p: p["models"]["baseline"].update(hiddn=3), "baseline", "meld", "models.baseline.hiddn: unknown key"),
    (lambda p: p["train"].update(learning_rate=3), "baseline", "meld", "train.learning_rate: unknown key"),
])
def test_train_stage_rejects_bad_params(tmp_path, change, model, dataset, fragment):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(params)
    result = run_train(tmp_path, params, model, dataset)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'params.yaml'}: ")
    assert fragment in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_train_overrides_apply_from_general_to_specific():
    from erc.training.config import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(lr=0.1, per_model={"sdt": {"lr": 0.2, "per_dataset": {"iemocap": {"lr": 0.4}}}},
                           per_dataset={"iemocap": {"lr": 0.3}})
    lr = lambda dataset, model: configs_from_params(params, dataset, model, seeds=[0])[0].lr  # noqa: E731
    assert lr("meld", "baseline") == 0.1
    assert lr("meld", "sdt") == 0.2
    assert lr("iemocap", "baseline") == 0.3
    assert lr("iemocap", "sdt") == 0.4


def test_teacher_takes_one_modality_and_the_teacher_seed():
    from erc.training.config import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (cfg,) = configs_from_params(params, "iemocap", "baseline", seeds=[7], modalities=["text"])
    assert cfg.inputs == {"text": params["inputs"]["iemocap"]["text"]} and cfg.seed == 7


def test_per_dataset_model_settings():
    from erc.training.config import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["sdt"]["per_dataset"] = {"meld": {"temperature": 8.0}}
    (meld,) = configs_from_params(params, "meld", "sdt", seeds=[0])
    (iemocap,) = configs_from_params(params, "iemocap", "sdt", seeds=[0])
    assert meld.model_config["temperature"] == 8.0
    assert "temperature" not in iemocap.model_config and "per_dataset" not in iemocap.model_config
    params["models"]["sdt"]["per_dataset"] = {"meld": {"temprature": 8.0}}
    with pytest.raises(Exception, match="temprature"):
        configs_from_params(params, "meld", "sdt", seeds=[0])


def test_class_weights_are_a_dataset_policy_not_a_model_setting():
    from erc.errors import ErcDataError
    from erc.training.config import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["per_dataset"] = {"iemocap": {"class_weights": "balanced"}}
    for model in ("baseline", "mister_e", "sdt", "mmolre", "summer"):
        assert configs_from_params(params, "iemocap", model, seeds=[0])[0].class_weights == "balanced"
        assert configs_from_params(params, "meld", model, seeds=[0])[0].class_weights == "none"
    params["train"]["per_model"] = {"sdt": {"per_dataset": {"iemocap": {"class_weights": "sdt_iemocap"}}}}
    with pytest.raises(ErcDataError, match="dataset's policy for every model"):
        configs_from_params(params, "iemocap", "sdt", seeds=[0])


def test_the_class_weight_policy_reaches_every_model_alike(tiny_emotion):
    import numpy as np
    import torch

    from erc.errors import ErcDataError
    from erc.models import MODELS, build_model
    from erc.training.config import TrainConfig
    from erc.training.task import load_task
    from tests.fixtures import INPUTS

    def spec(policy):
        cfg = TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS), class_weights=policy)
        return load_task(cfg, splits=("train",)).spec

    task = load_task(TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS)), splits=("train",))
    balanced = spec("balanced")
    assert spec("none").class_weights is None
    counts = np.bincount(task.prepared.table.query("split == 'train'")["emotion_id"], minlength=3)
    np.testing.assert_allclose(balanced.class_weights, counts.sum() / (3 * counts))
    for name in MODELS:
        model = build_model(name, balanced, {})
        torch.testing.assert_close(model.class_weights, torch.tensor(balanced.class_weights, dtype=torch.float32),
                                   msg=f"{name} does not weight its loss by the dataset's policy")
    with pytest.raises(ErcDataError, match="labels"):
        spec("sdt_iemocap")  # IEMOCAP's six labels, not the fixture's three
    with pytest.raises(ErcDataError, match="not none, balanced"):
        spec("balnced")


def stage_names(project: Path) -> set[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    listed = subprocess.run(["dvc", "stage", "list", "--all", "--name-only"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    return set(listed.stdout.split())


PIPELINES = ("dvc.yaml", "tuned/dvc.yaml", "untuned/dvc.yaml")


def pipeline_project(project: Path, params: dict) -> Path:
    """A DVC project (no git) of erc's pipeline files and these params: enough for `dvc stage list`."""
    for name in PIPELINES:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text((ROOT / name).read_text())
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def test_the_readme_quick_configuration_is_one_dataset_through_every_model(tmp_path):
    """The README's quick command, its -S settings applied as `dvc exp run` applies them: MOSI's stages only (no
    other dataset prepared or featurized), every model's search and training, the leaderboard and the report."""
    from erc.params import load_params

    block = re.search(r"dvc exp run --temp (.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    settings = re.findall(r"-S '?([^'\s]+)'?", block)
    assert "pipeline.datasets=[mosi]" in settings, block
    params = load_params(ROOT / "params.yaml", settings)
    project = pipeline_project(tmp_path / "p", params)
    names = {n for n in stage_names(project) if not n.startswith("untuned/")}  # a view `dvc exp run` does not run
    assert {n.split("@")[1].split("-")[0] for n in names if "@" in n} == {"mosi"}
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["pipeline"]
    models = shipped["models"] + shipped["distilled"]
    assert params["pipeline"]["models"] + params["pipeline"]["distilled"] == models
    assert {n.split("-", 1)[1] for n in names if n.startswith(("train@", "train_distilled@"))} == set(models)
    assert {n.split("-", 1)[1] for n in names if n.startswith("tuned/")} == set(models)
    assert {"prepare@mosi", "featurize@mosi", "teacher@mosi", "leaderboard", "report"} <= names


def test_stages_follow_the_pipeline_lists_of_params(tmp_path):
    """No pipeline file names a dataset or model: a dataset added to (or removed from) params (its `datasets` entry
    and the `pipeline` lists) adds (or removes) its stages in all of them, and nothing else changes."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pipeline = params["pipeline"]
    for name in PIPELINES:
        text = (ROOT / name).read_text()
        named = [n for n in pipeline["datasets"] + pipeline["models"] + pipeline["distilled"]
                 if re.search(rf"\b{n}\b", text.replace("benchmarks/results", ""))]
        assert named == [], f"{name} names {named}"
    project = pipeline_project(tmp_path / "p", params)
    before = stage_names(project)
    params["pipeline"]["datasets"] = [d for d in pipeline["datasets"] if d != "mosi"] + ["talk"]
    params["datasets"]["talk"] = params["datasets"].pop("mosi")
    params["datasets"]["spare"] = params["datasets"]["talk"]  # an entry in no list: not prepared, not featurized
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    after = stage_names(project)
    models = pipeline["models"] + pipeline["distilled"]
    per_dataset = lambda d: ({f"{s}@{d}" for s in ("prepare", "featurize", "teacher")}  # noqa: E731
                             | {f"train@{d}-{m}" for m in pipeline["models"]}
                             | {f"train_distilled@{d}-{m}" for m in pipeline["distilled"]}
                             | {f"tuned/dvc.yaml:tune@{d}-{m}" for m in pipeline["models"]}
                             | {f"tuned/dvc.yaml:tune_distilled@{d}-{m}" for m in pipeline["distilled"]}
                             | {f"untuned/dvc.yaml:train_untuned@{d}-{m}" for m in pipeline["models"]}
                             | {f"untuned/dvc.yaml:train_untuned_distilled@{d}-{m}" for m in pipeline["distilled"]})
    assert after - before == per_dataset("talk") and before - after == per_dataset("mosi")
    assert len(per_dataset("talk")) == 3 + len(models) * 3
    assert {f"{s}@{d}" for s in ("prepare_probed", "featurize_probed", "probe") for d in pipeline["probed"]} <= after
    assert not any(name.endswith("@spare") for name in after)
